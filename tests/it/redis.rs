//! Redis-specific tests: the Lua score formula, the key layout, outages and blocking commands,
//! listing jobs that earlier builds ended for log retention.

use crate::harness::{self, wait_for, wait_until, RedisServer, DEADLINE};
use ferry::coordinator;
use ferry::replay;
use ferry::store::conformance::noop_job;
use ferry::store::redis::{queue_score_probe, RedisStore};
use ferry::store::{
    queue_score, Append, Capacity, Error, EventLog, Feed, Leases, Listing, LogPos, Logs, Store,
    StreamId, WorkQueue,
};
use ferry_proto::{Event, JobId, JobSucceeded, LogsExpired, StepQueued, StepRetryScheduled};
use std::sync::Arc;
use std::time::Duration;

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(harness::shared().url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lua_and_rust_queue_scores_agree() {
    let mut conn = raw().await;
    let probe = queue_score_probe();
    let times: [u64; 6] = [
        0,
        1,
        1_700_000_000_123,
        1_800_000_000_000,
        (1 << 43) - 1,
        (1 << 43) + 5,
    ];
    for p in [-1000, -101, -100, -99, -1, 0, 1, 7, 99, 100, 101, 5000] {
        for ms in times {
            let lua: String = probe.arg(p).arg(ms).invoke_async(&mut conn).await.unwrap();
            let rust = queue_score(p, ms);
            assert_eq!(lua, format!("{rust:.0}"), "priority {p}, ms {ms}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_scores_use_the_store_clock() {
    let store = harness::redis_store().await;
    let job = JobId::new();
    let before = ferry::store::now_ms();
    let ev = Event::StepQueued(StepQueued {
        step: "build".into(),
        attempt: 1,
        pool: "linux".into(),
        priority: 7,
    });
    store
        .append(Append::new(StreamId::Job(job), vec![ev]))
        .await
        .unwrap();
    let after = ferry::store::now_ms();
    let key = format!("{{{}}}:ready:linux", store.namespace());
    let score: f64 = redis::cmd("ZSCORE")
        .arg(&key)
        .arg(format!("{job}/build"))
        .query_async(&mut raw().await)
        .await
        .unwrap();
    // same machine: the store clock is the local clock
    let lo = queue_score(7, before.saturating_sub(1000));
    let hi = queue_score(7, after + 1000);
    assert!(lo <= score && score <= hi, "{lo} <= {score} <= {hi}");
    assert_eq!(score as u64 >> 43, 93, "priority band");
}

/// A ready member whose queue item is missing (damaged by hand) is refused as corrupt, and the
/// refused claim writes nothing: the member stays ready, with one pool (popped and put back) as
/// with several (only looked at).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_member_without_an_item_is_corrupt_and_stays_put() {
    let store = harness::redis_store().await;
    let job = JobId::new();
    let ev = Event::StepQueued(StepQueued {
        step: "build".into(),
        attempt: 1,
        pool: "linux".into(),
        priority: 0,
    });
    store
        .append(Append::new(StreamId::Job(job), vec![ev]))
        .await
        .unwrap();
    let ns = store.namespace();
    let member = format!("{job}/build");
    let mut conn = raw().await;
    let _: () = redis::cmd("HDEL")
        .arg(format!("{{{ns}}}:items"))
        .arg(&member)
        .query_async(&mut conn)
        .await
        .unwrap();
    let ready = format!("{{{ns}}}:ready:linux");
    let score = |conn: &mut redis::aio::MultiplexedConnection| {
        let (ready, member) = (ready.clone(), member.clone());
        let mut conn = conn.clone();
        async move {
            redis::cmd("ZSCORE")
                .arg(ready)
                .arg(member)
                .query_async::<Option<f64>>(&mut conn)
                .await
                .unwrap()
        }
    };
    let before = score(&mut conn).await.expect("queued");
    for pools in [
        vec!["linux".to_string()],
        vec!["linux".into(), "arm".into()],
    ] {
        match store
            .claim(&pools, &"agent".into(), Duration::from_secs(30))
            .await
        {
            Err(Error::Corrupt(m)) => assert!(m.contains("no queue item"), "{m}"),
            other => panic!("{pools:?}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(score(&mut conn).await, Some(before), "{pools:?}");
    }
    let stream = store.read_stream(&StreamId::Job(job), 0).await.unwrap();
    assert_eq!(stream.len(), 1, "no StepClaimed was written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_due_delayed_member_with_a_malformed_item_is_dropped_and_the_others_promoted() {
    let store = harness::redis_store().await;
    let ns = store.namespace().to_string();
    let (good, bad) = (JobId::new(), JobId::new());
    for job in [good, bad] {
        let ev = Event::StepRetryScheduled(StepRetryScheduled {
            step: "build".into(),
            attempt: 2,
            pool: "linux".into(),
            priority: 0,
            due_ms: 0,
            reason: "lease expired".into(),
        });
        store
            .append(Append::new(StreamId::Job(job), vec![ev]))
            .await
            .unwrap();
    }
    let mut conn = raw().await;
    let _: () = redis::cmd("HSET")
        .arg(format!("{{{ns}}}:items"))
        .arg(format!("{bad}/build"))
        .arg("two|0|linux")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(store.promote_due(10).await.unwrap(), 1);
    let members = |key: String| {
        let mut conn = conn.clone();
        async move {
            redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .query_async::<Vec<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    let delayed = members(format!("{{{ns}}}:delayed")).await;
    assert!(delayed.is_empty(), "{delayed:?}");
    let ready = members(format!("{{{ns}}}:ready:linux")).await;
    assert_eq!(ready, vec![format!("{good}/build")]);
    let queued = |job| {
        let store = &store;
        async move {
            store
                .read_stream(&StreamId::Job(job), 0)
                .await
                .unwrap()
                .iter()
                .filter_map(|s| match s.decode().unwrap() {
                    Event::StepQueued(q) => Some((q.attempt, q.priority, q.pool)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(queued(good).await, vec![(2, 0, "linux".to_string())]);
    assert!(queued(bad).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_keys_share_the_namespace_hash_tag() {
    let fixture = harness::redis_fixture().await;
    ferry::store::conformance::clear_job_removes_queue_entries_and_leases(&fixture).await;
    let store = harness::redis_store().await;
    let ns = store.namespace().to_string();
    let job = JobId::new();
    store
        .append(Append::new(
            StreamId::Job(job),
            vec![Event::StepQueued(StepQueued {
                step: "build".into(),
                attempt: 1,
                pool: "linux".into(),
                priority: 0,
            })],
        ))
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("*{ns}*"))
        .query_async(&mut raw().await)
        .await
        .unwrap();
    assert!(!keys.is_empty());
    for k in keys {
        assert!(k.starts_with(&format!("{{{ns}}}:")), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_nothing_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    match RedisStore::connect(&format!("redis://127.0.0.1:{port}/"), "x").await {
        Err(Error::Unavailable(_)) => {}
        other => panic!("expected unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_unavailable_then_recovers() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), "outage").await.unwrap();
    let ev = || {
        vec![Event::StepQueued(StepQueued {
            step: "build".into(),
            attempt: 1,
            pool: "linux".into(),
            priority: 0,
        })]
    };
    let job = JobId::new();
    store
        .append(Append::new(StreamId::Job(job), ev()))
        .await
        .unwrap();
    server.stop();
    match store.append(Append::new(StreamId::Job(job), ev())).await {
        Err(Error::Unavailable(_)) => {}
        other => panic!("an append to a stopped server reported {other:?}"),
    }
    match store.ping().await {
        Err(Error::Unavailable(_)) => {}
        other => panic!("a ping to a stopped server reported {other:?}"),
    }
    server.restart();
    wait_for(DEADLINE, "the store to reconnect", || async {
        store.ping().await.ok()
    })
    .await;
    let written = store
        .append(Append::new(StreamId::Job(job), ev()))
        .await
        .unwrap();
    // the restarted server has no persistence: the stream starts over
    assert!(matches!(
        written,
        ferry::store::Appended::Written { version: 1, .. }
    ));
    assert_eq!(store.queued().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_reads_do_not_delay_other_commands() {
    let store = harness::redis_store().await;
    store.ensure_group("g").await.unwrap();
    let reader = store.clone();
    let read =
        tokio::spawn(async move { reader.read_new("g", "c", 10, Duration::from_secs(4)).await });
    let waiter = store.clone();
    let wait = tokio::spawn(async move {
        waiter
            .wait_for_work(&["nothing".to_string()], Duration::from_secs(4))
            .await
    });
    // the same store (sharing its normal connection) keeps answering while both block
    for _ in 0..20 {
        store.ping().await.unwrap();
    }
    assert!(store.read_log(None, 10).await.unwrap().is_empty());
    assert!(
        !read.is_finished() && !wait.is_finished(),
        "both blocking calls are still waiting after the other commands were answered"
    );
    assert!(read.await.unwrap().unwrap().is_empty());
    wait.await.unwrap().unwrap();
}

/// Entries stored before the packed layout (one field each: `s`, `k`, `v`, `t`, `n`, `f`, `p`,
/// and `l` in streams) are still read, beside entries written now: in the job's stream, the
/// log, the feed and a claim's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_the_older_one_field_each_layout_are_still_read() {
    use ferry_proto::{AgentId, Envelope, StepClaimed};
    let store = harness::redis_store().await;
    let ns = store.namespace().to_string();
    let job = JobId::new();
    let stream = StreamId::Job(job).name();
    let queued = |attempt| -> Event {
        StepQueued {
            step: "build".into(),
            attempt,
            pool: "linux".into(),
            priority: 3,
        }
        .into()
    };
    // Attempt 1, written in the older layout (as an earlier ferry did), with a token.
    let old = Envelope::new(&queued(1), stream.clone(), 1_764_900_000_000, Some(42));
    let mut conn = raw().await;
    let fields = |extra: Option<&str>| {
        let mut f: Vec<(&str, Vec<u8>)> = vec![
            ("s", stream.clone().into_bytes()),
            ("k", old.kind.to_string().into_bytes()),
            ("v", old.version.to_string().into_bytes()),
            ("t", old.at_ms.to_string().into_bytes()),
            ("n", b"1".to_vec()),
            ("f", b"42".to_vec()),
            ("p", old.payload.clone()),
        ];
        if let Some(l) = extra {
            f.push(("l", l.as_bytes().to_vec()));
        }
        f
    };
    let log_id: String = redis::cmd("XADD")
        .arg(format!("{{{ns}}}:log"))
        .arg("*")
        .arg(fields(None))
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(format!("{{{ns}}}:s:{stream}"))
        .arg("*")
        .arg(fields(Some(&log_id)))
        .query_async(&mut conn)
        .await
        .unwrap();

    // Attempt 2 appended now, packed, at the version the old entry makes; then claimed.
    store
        .append(Append::new(StreamId::Job(job), vec![queued(2)]).expect(1))
        .await
        .unwrap();
    let claim = store
        .claim(
            &["linux".to_string()],
            &AgentId::new("a"),
            Duration::from_secs(60),
        )
        .await
        .unwrap()
        .expect("attempt 2 is queued");

    let check = |read: &[ferry::store::Stored], what: &str| {
        let read: Vec<_> = read
            .iter()
            .filter(|s| s.envelope.stream == stream)
            .collect();
        assert_eq!(read.len(), 3, "{what}: {read:?}");
        let first = read[0];
        assert_eq!(first.decode().unwrap(), queued(1), "{what}");
        assert_eq!(
            (first.seq, first.envelope.token, first.envelope.at_ms),
            (Some(1), Some(42), 1_764_900_000_000),
            "{what}"
        );
        assert_eq!(
            first.pos.to_string(),
            log_id,
            "{what}: its place in the log"
        );
        assert_eq!(
            (read[1].decode().unwrap(), read[1].seq),
            (queued(2), Some(2))
        );
        assert!(
            matches!(
                read[2].decode().unwrap(),
                Event::StepClaimed(StepClaimed { attempt: 2, .. })
            ),
            "{what}"
        );
        assert_eq!(
            (read[2].seq, read[2].envelope.token),
            (Some(3), Some(claim.token.0))
        );
    };
    check(&claim.history, "the claim's history");
    check(
        &store.read_stream(&StreamId::Job(job), 0).await.unwrap(),
        "the job's stream",
    );
    check(&store.read_log(None, 100).await.unwrap(), "the log");
    store.ensure_group("readers").await.unwrap();
    let fed = store
        .read_new("readers", "r1", 100, Duration::ZERO)
        .await
        .unwrap();
    check(&fed, "the feed");
}

/// While an installation is upgraded from builds that read only the one-field-each layout, the
/// key `layout` = `fields` makes every script write that layout; without it they write the
/// packed one. Both read back the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layout_key_chooses_how_entries_are_written() {
    use ferry_proto::{AgentId, StepStarted};
    let store = harness::redis_store().await;
    let ns = store.namespace().to_string();
    let mut conn = raw().await;
    let layout_key = format!("{{{ns}}}:layout");
    let _: () = redis::cmd("SET")
        .arg(&layout_key)
        .arg("fields")
        .query_async(&mut conn)
        .await
        .unwrap();
    let job = JobId::new();
    let queued: Event = StepQueued {
        step: "build".into(),
        attempt: 1,
        pool: "linux".into(),
        priority: 0,
    }
    .into();
    store
        .append(Append::new(StreamId::Job(job), vec![queued.clone()]).expect(0))
        .await
        .unwrap();
    let claim = store
        .claim(
            &["linux".to_string()],
            &AgentId::new("a"),
            Duration::from_secs(60),
        )
        .await
        .unwrap()
        .expect("queued");
    let _: () = redis::cmd("DEL")
        .arg(&layout_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let started: Event = StepStarted {
        step: "build".into(),
        attempt: 1,
        agent: "a".into(),
    }
    .into();
    store
        .append(
            Append::new(StreamId::Job(job), vec![started.clone()])
                .fenced("build".into(), claim.token),
        )
        .await
        .unwrap();

    // Field names of each entry, as stored, in the job's stream and in the log.
    let names = |reply: redis::streams::StreamRangeReply| -> Vec<Vec<String>> {
        reply
            .ids
            .iter()
            .map(|e| {
                let mut keys: Vec<String> = e.map.keys().cloned().collect();
                keys.sort();
                keys
            })
            .collect()
    };
    let job_stream: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{{{ns}}}:s:job:{job}"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let one_each = |token: bool| {
        let mut k: Vec<String> = ["k", "l", "n", "p", "s", "t", "v"]
            .map(String::from)
            .to_vec();
        if token {
            k.push("f".into());
            k.sort();
        }
        k
    };
    let packed: Vec<String> = ["h", "l", "p"].map(String::from).to_vec();
    assert_eq!(
        names(job_stream),
        [one_each(false), one_each(true), packed],
        "queued and claimed one field each, started packed"
    );
    let log: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{{{ns}}}:log"))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let log_names = names(log);
    assert!(log_names[0].contains(&"k".to_string()), "{log_names:?}");
    assert_eq!(log_names[2], ["h", "p", "s"], "{log_names:?}");

    // The claim's own entry came back in the layout it was written in, and everything reads.
    let claimed = claim.history.last().unwrap();
    assert_eq!(
        (claimed.seq, claimed.envelope.token),
        (Some(2), Some(claim.token.0))
    );
    let events: Vec<Event> = store
        .read_stream(&StreamId::Job(job), 0)
        .await
        .unwrap()
        .iter()
        .map(|s| s.decode().unwrap())
        .collect();
    assert_eq!(events.len(), 3);
    assert_eq!((&events[0], &events[2]), (&queued, &started));
}

/// An installation upgraded from a build before log retention: the jobs that build ended are
/// not listed in `kept_logs`, so their output would stay forever, and `replay --verify` says
/// so. The coordinator's walk lists each of them with the time of its first terminal event,
/// passes over live jobs and jobs whose logs expired, and remembers when it is complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_ended_by_an_earlier_build_are_listed_for_log_retention() {
    let ns = harness::namespace();
    let store = RedisStore::connect(&harness::shared().url(), &ns)
        .await
        .unwrap();
    let mut jobs = Vec::new();
    for i in 0..3 {
        let job = JobId::new();
        let created = noop_job(job, &format!("v{i}"), "linux", &["build"]);
        store
            .append(Append::new(StreamId::Job(job), vec![created.into()]).expect(0))
            .await
            .unwrap();
        if i != 1 {
            store
                .append(Append::new(
                    StreamId::Job(job),
                    vec![JobSucceeded {}.into()],
                ))
                .await
                .unwrap();
        }
        jobs.push(job);
    }
    let (old, live, expired) = (jobs[0], jobs[1], jobs[2]);
    let expire = LogsExpired { kept_for_ms: 1 };
    store
        .append(Append::new(StreamId::Job(expired), vec![expire.into()]))
        .await
        .unwrap();
    // What an earlier build left: the ended job is not listed.
    let mut conn = raw().await;
    let removed: i64 = redis::cmd("ZREM")
        .arg(format!("{{{ns}}}:kept_logs"))
        .arg(old.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let view = replay::rebuild(&store).await.unwrap();
    let check = replay::verify(&store, &view).await.unwrap();
    assert_eq!(check.differences.len(), 1, "{:?}", check.differences);
    assert!(
        check.differences[0].contains(&format!("job {old}: ended, but not listed")),
        "{:?}",
        check.differences
    );

    let first = store.list_ended_unlisted(None, 2).await.unwrap();
    assert_eq!(
        first,
        Listing {
            listed: 1,
            next: Some(live)
        }
    );
    let last = store.list_ended_unlisted(Some(live), 2).await.unwrap();
    assert_eq!(
        last,
        Listing {
            listed: 0,
            next: None
        }
    );
    let ended_at = store.read_stream(&StreamId::Job(old), 0).await.unwrap()[1]
        .envelope
        .at_ms;
    assert_eq!(
        store.logs_to_expire(u64::MAX, 10).await.unwrap(),
        [(old, ended_at)]
    );
    assert!(replay::verify(&store, &view).await.unwrap().ok());
    // The other way round: a live job in the list is a difference too.
    let kept = format!("{{{ns}}}:kept_logs");
    let zadd = |job: JobId| {
        redis::cmd("ZADD")
            .arg(&kept)
            .arg(1)
            .arg(job.to_string())
            .clone()
    };
    let _: i64 = zadd(live).query_async(&mut conn).await.unwrap();
    let check = replay::verify(&store, &view).await.unwrap();
    assert_eq!(
        check.differences,
        [format!(
            "job {live}: listed for log retention, but it has not ended"
        )]
    );
    let _: i64 = redis::cmd("ZREM")
        .arg(&kept)
        .arg(live.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();

    // The walk is complete: it does not run again.
    let _: i64 = redis::cmd("ZREM")
        .arg(format!("{{{ns}}}:kept_logs"))
        .arg(old.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        store.list_ended_unlisted(None, 10).await.unwrap(),
        Listing::default()
    );
    assert!(store.logs_to_expire(u64::MAX, 10).await.unwrap().is_empty());

    // A coordinator holding the sweep lock walks on its own, then expires the job's logs.
    let _: i64 = redis::cmd("DEL")
        .arg(format!("{{{ns}}}:kept_logs_listed"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let store: Arc<dyn Store> = Arc::new(store);
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let opts = coordinator::Options {
        sweep_interval: Duration::from_millis(100),
        keep_logs: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let coordinator = tokio::spawn(coordinator::run(store.clone(), opts, async move {
        let _ = stopped.wait_for(|s| *s).await;
    }));
    wait_for(DEADLINE, "the old job's logs to expire", || async {
        let events = store.read_stream(&StreamId::Job(old), 0).await.unwrap();
        let last = events.last().unwrap().decode().unwrap();
        matches!(last, Event::LogsExpired(_)).then_some(())
    })
    .await;
    let _ = stop.send(true);
    coordinator.await.unwrap().unwrap();
}

/// The store's size and limit come from the server's INFO (through a script, so a cluster
/// answers from the namespace's node and no CONFIG permission is needed); so does the check
/// for settings that put ferry's data at risk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_and_configuration_risks_come_from_the_servers_info() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mut guard) = harness::serve_on_free_port("redis-limited", |port| {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .args(["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"])
            // as hosted services do: CONFIG is not there for clients
            .args(["--rename-command", "CONFIG", ""]);
        cmd
    });
    let url = format!("redis://127.0.0.1:{port}/");
    let store = RedisStore::connect(&url, &harness::namespace())
        .await
        .unwrap();
    let usage = store.usage().await.unwrap();
    assert_eq!(usage.limit_bytes, Some(64 << 20), "{usage:?}");
    assert!(usage.used_bytes > 0, "{usage:?}");
    let (warnings, notes) = store.configuration_risks().await;
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("maxmemory-policy is volatile-lru"),
        "{warnings:?}"
    );
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(notes[0].contains("appendonly no"), "{notes:?}");
    drop(guard.stdin.take());
    let _ = guard.wait();
}

/// Where CONFIG is allowed, a server whose stream nodes start at 4 KB (the default) is noted:
/// every job's stream keeps that much; at 2048 nothing is said.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_stream_nodes_are_noted_where_config_is_readable() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mut guard) = harness::serve_on_free_port("redis-small-nodes", |port| {
        let mut cmd = std::process::Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .args(["--stream-node-max-bytes", "2048"]);
        cmd
    });
    let notes = |url: String| async move {
        let store = RedisStore::connect(&url, &harness::namespace())
            .await
            .unwrap();
        store.configuration_risks().await.1
    };
    let default = notes(harness::shared().url()).await;
    assert!(
        default
            .iter()
            .any(|n| n.contains("stream-node-max-bytes is 4096")
                && n.contains("set stream-node-max-bytes 2048")),
        "{default:?}"
    );
    let small = notes(format!("redis://127.0.0.1:{port}/")).await;
    assert!(
        !small.iter().any(|n| n.contains("stream-node-max-bytes")),
        "{small:?}"
    );
    assert!(
        small.iter().any(|n| n.contains("appendonly no")),
        "the other notes stay: {small:?}"
    );
    drop(guard.stdin.take());
    let _ = guard.wait();
}

/// Redis trims the global log by whole nodes, up to what the least advanced consumer group
/// has handled, and names that group; a group that has read nothing holds everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_is_trimmed_up_to_what_every_group_has_handled() {
    let store = harness::redis_store().await;
    store.ensure_group("g").await.unwrap();
    for chunk in 0..60 {
        let events: Vec<Event> = (0..10)
            .map(|i| {
                ferry_proto::WebhookReceived {
                    event: format!("e{}", chunk * 10 + i),
                    ..Default::default()
                }
                .into()
            })
            .collect();
        store
            .append(Append::new(StreamId::Webhooks, events))
            .await
            .unwrap();
    }
    let handled: Vec<LogPos> = store
        .read_new("g", "c", 400, Duration::ZERO)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.pos)
        .collect();
    store.ack("g", &handled).await.unwrap();
    let pending = store.read_new("g", "c", 100, Duration::ZERO).await.unwrap();
    let later = ferry::store::now_ms() + 60_000;

    // A group created now has read nothing: it holds the whole log.
    store.ensure_group("late").await.unwrap();
    let held = store.trim_log(later).await.unwrap();
    assert_eq!(held.deleted, 0);
    assert_eq!(held.held_by.as_deref(), Some("late"));
    assert_eq!(store.log_complete_from().await.unwrap(), None);
    let all: Vec<LogPos> = store
        .read_new("late", "x", 1000, Duration::ZERO)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.pos)
        .collect();
    store.ack("late", &all).await.unwrap();

    let trimmed = store.trim_log(later).await.unwrap();
    assert_eq!(trimmed.held_by.as_deref(), Some("g"), "{trimmed:?}");
    assert!(
        (100..=400).contains(&trimmed.deleted),
        "whole nodes of the 400 handled entries: {trimmed:?}"
    );
    let from = store.log_complete_from().await.unwrap().expect("trimmed");
    assert!(from <= pending[0].pos, "{from}");
    let log = store.read_log(None, 1000).await.unwrap();
    assert_eq!(log.len() as u64, 600 - trimmed.deleted);
    assert_eq!(
        store
            .read_stream(&StreamId::Webhooks, 0)
            .await
            .unwrap()
            .len(),
        600
    );
}

/// The claim script grants the leases before the adapter reads the claimed jobs' streams. A
/// read that fails is tried again while the leases are young; one that keeps failing hands
/// the claims back at once (StepReleased), instead of leaving the steps to wait for their
/// leases to run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_job_cannot_be_read_is_read_again_or_handed_back() {
    // (the limited user's XRANGE fails while denied: the claim script does not use it)
    let user = harness::LimitedUser::new(&["xrange"]).await;
    let ns = harness::namespace();
    let admin = RedisStore::connect(&harness::shared().url(), &ns)
        .await
        .unwrap();
    let limited = Arc::new(RedisStore::connect(&user.url, &ns).await.unwrap());
    let pools = vec!["default".to_string()];
    let queue = |job: JobId| {
        let admin = &admin;
        async move {
            let queued = StepQueued {
                step: "build".into(),
                attempt: 1,
                pool: "default".into(),
                priority: 0,
            };
            admin
                .append(Append::new(StreamId::Job(job), vec![queued.into()]))
                .await
                .unwrap();
        }
    };
    let kinds = |job: JobId| {
        let admin = &admin;
        async move {
            let events = admin.read_stream(&StreamId::Job(job), 0).await.unwrap();
            events
                .iter()
                .map(|s| s.decode().unwrap())
                .collect::<Vec<_>>()
        }
    };

    // Readable again while the lease is young: the claim comes back whole.
    let first = JobId::new();
    queue(first).await;
    let claim = tokio::spawn({
        let (limited, pools) = (limited.clone(), pools.clone());
        async move {
            limited
                .claim_many(&pools, &"a".into(), Duration::from_secs(60), 1)
                .await
        }
    });
    wait_until(DEADLINE, || async { kinds(first).await.len() == 2 }).await;
    user.allow("xrange").await;
    let claims = claim.await.unwrap().expect("the claim, read once allowed");
    assert_eq!(claims.len(), 1);
    assert_eq!(claims[0].job, first);
    let history: Vec<Event> = claims[0]
        .history
        .iter()
        .map(|s| s.decode().unwrap())
        .collect();
    assert!(
        matches!(&history[..], [Event::StepQueued(_), Event::StepClaimed(c)] if c.token == claims[0].token),
        "{history:?}"
    );

    // Never readable: handed back, the lease gone, the error said.
    user.deny("xrange").await;
    let second = JobId::new();
    queue(second).await;
    let err = limited
        .claim_many(&pools, &"a".into(), Duration::from_millis(900), 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Unavailable(m) if m.contains("read the claimed jobs")),
        "{err:?}"
    );
    let events = kinds(second).await;
    assert!(
        matches!(&events[..], [Event::StepQueued(_), Event::StepClaimed(_), Event::StepReleased(r)]
            if r.agent.as_str() == "a" && r.reason.contains("could not read the claimed job")),
        "{events:?}"
    );
    let held: Vec<JobId> = admin
        .leases()
        .await
        .unwrap()
        .iter()
        .map(|l| l.job)
        .collect();
    assert_eq!(held, [first], "only the first claim's lease is held");
}

/// A consumer restarted with a pending entry that keeps failing (a job it cannot reconcile
/// yet) does not spin on it: it goes on to new entries, and the failing one comes back by the
/// takeover once it has been idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_entry_that_keeps_failing_does_not_hold_up_new_ones() {
    use ferry::feed::{consume, Consumer};
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    store.ensure_group("g").await.unwrap();
    let record = |n: u32| {
        let store = store.clone();
        async move {
            let e = ferry_proto::WebhookReceived {
                action: format!("entry {n}"),
                ..Default::default()
            };
            match store
                .append(Append::new(StreamId::Webhooks, vec![e.into()]))
                .await
                .unwrap()
            {
                ferry::store::Appended::Written { positions, .. } => positions[0].clone(),
                other => panic!("{other:?}"),
            }
        }
    };
    let failing = record(1).await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::<LogPos>::new()));
    // Handles everything but `failing`, which it never acknowledges.
    let run = || {
        let (store, seen, failing) = (store.clone(), seen.clone(), failing.clone());
        tokio::spawn(async move {
            let consumer = Consumer {
                group: "g",
                name: "c",
                batch: 10,
                takeover_after: Duration::from_millis(400),
            };
            consume(&*store, consumer, |batch| {
                let (store, seen, failing) = (store.clone(), seen.clone(), failing.clone());
                async move {
                    let positions: Vec<LogPos> = batch.into_iter().map(|s| s.pos).collect();
                    seen.lock().unwrap().extend(positions.iter().cloned());
                    let done: Vec<LogPos> =
                        positions.into_iter().filter(|p| *p != failing).collect();
                    store.ack("g", &done).await.unwrap();
                }
            })
            .await
        })
    };
    let count = |pos: &LogPos| seen.lock().unwrap().iter().filter(|p| *p == pos).count();
    let first = run();
    wait_until(DEADLINE, || async { count(&failing) == 1 }).await;
    first.abort();
    let _ = first.await;

    // Restarted: the failing entry is pending; a new one still gets through.
    let _second = run();
    let new = record(2).await;
    wait_until(DEADLINE, || async { count(&new) == 1 }).await;
    // The failing entry is tried again, by the takeover, for as long as it fails.
    wait_until(DEADLINE, || async { count(&failing) >= 4 }).await;
}

/// A retry is due after the delay its writer meant, on the store's clock: a coordinator whose
/// clock is an hour behind neither lets its retries go at once nor (an hour ahead) holds them
/// back an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_are_due_on_the_store_clock_whatever_the_writers_clock() {
    let store = harness::redis_store().await;
    let hour = 3_600_000;
    let now = ferry::store::now_ms();
    let retry = |job: JobId, writer_ms: u64, delay_ms: u64| {
        let mut append = Append::new(
            StreamId::Job(job),
            vec![StepRetryScheduled {
                step: "build".into(),
                attempt: 2,
                pool: "default".into(),
                priority: 0,
                due_ms: writer_ms + delay_ms,
                reason: "test".into(),
            }
            .into()],
        );
        append.at_ms = writer_ms;
        append
    };
    // Behind by an hour, a minute's delay: not due yet.
    let planned = |job: JobId| {
        let created = noop_job(job, "v1", "default", &["build"]);
        Append::new(StreamId::Job(job), vec![created.into()])
    };
    let behind = JobId::new();
    store.append(planned(behind)).await.unwrap();
    store
        .append(retry(behind, now - hour, 60_000))
        .await
        .unwrap();
    assert_eq!(store.promote_due(10).await.unwrap(), 0);
    // Ahead by an hour, no delay: due at once.
    let ahead = JobId::new();
    store.append(planned(ahead)).await.unwrap();
    store.append(retry(ahead, now + hour, 0)).await.unwrap();
    assert_eq!(store.promote_due(10).await.unwrap(), 1);
    let ready: Vec<JobId> = store
        .queued()
        .await
        .unwrap()
        .iter()
        .filter(|q| q.due_ms.is_none())
        .map(|q| q.job)
        .collect();
    assert_eq!(ready, [ahead]);
    // The delayed step is due at the store's time, not at the event's due_ms to the
    // millisecond: replay --verify still finds the store as the log says.
    let view = replay::rebuild(&store).await.unwrap();
    let verified = replay::verify(&store, &view).await.unwrap();
    assert!(verified.ok(), "{:?}", verified.differences);
}

/// A Redis that restarts without its data loses the consumer groups with it: the feed creates
/// its group again and goes on with what is appended from then on, instead of failing every
/// read until the process restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_recreates_its_group_after_a_restart_that_lost_it() {
    use ferry::feed::{consume, Consumer};
    let server = RedisServer::start();
    let store: Arc<dyn Store> = Arc::new(
        RedisStore::connect(&server.url(), &harness::namespace())
            .await
            .unwrap(),
    );
    store.ensure_group("g").await.unwrap();
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let _consumer = tokio::spawn({
        let (store, seen) = (store.clone(), seen.clone());
        async move {
            let consumer = Consumer {
                group: "g",
                name: "c",
                batch: 10,
                takeover_after: Duration::from_secs(60),
            };
            consume(&*store, consumer, |batch| {
                let (store, seen) = (store.clone(), seen.clone());
                async move {
                    let positions: Vec<LogPos> = batch.iter().map(|s| s.pos.clone()).collect();
                    for s in &batch {
                        if let Ok(Event::WebhookReceived(w)) = s.decode() {
                            seen.lock().unwrap().push(w.action);
                        }
                    }
                    store.ack("g", &positions).await.unwrap();
                }
            })
            .await
        }
    });
    let record = |action: &str| {
        let store = store.clone();
        let e = ferry_proto::WebhookReceived {
            action: action.into(),
            ..Default::default()
        };
        async move {
            wait_for(DEADLINE, "the append", || async {
                store
                    .append(Append::new(StreamId::Webhooks, vec![e.clone().into()]))
                    .await
                    .ok()
            })
            .await
        }
    };
    record("before").await;
    wait_until(DEADLINE, || async { seen.lock().unwrap().len() == 1 }).await;
    server.restart();
    record("after").await;
    wait_until(DEADLINE * 2, || async {
        seen.lock().unwrap().iter().any(|a| a == "after")
    })
    .await;
}

/// The feed hands its consumer only batches that hold entries: a read that waited and found
/// nothing is no batch (an idle coordinator's batch-time histogram counted every empty wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_feed_hands_over_no_empty_batches() {
    let store = harness::redis_store().await;
    store.ensure_group("g").await.unwrap();
    let batches = std::sync::Mutex::new(Vec::<usize>::new());
    let consumer = ferry::feed::Consumer {
        group: "g",
        name: "c",
        batch: 10,
        takeover_after: Duration::from_secs(60),
    };
    let consume = ferry::feed::consume(&store, consumer.clone(), |batch| {
        batches.lock().unwrap().push(batch.len());
        async {}
    });
    // (waits of the feed's read run out every 500 ms: three of them)
    let _ = tokio::time::timeout(Duration::from_millis(1600), consume).await;
    assert_eq!(*batches.lock().unwrap(), Vec::<usize>::new());

    let job = JobId::new();
    let created = noop_job(job, "v1", "default", &["build"]);
    store
        .append(Append::new(StreamId::Job(job), vec![created.into()]))
        .await
        .unwrap();
    let consume = ferry::feed::consume(&store, consumer, |batch| {
        batches.lock().unwrap().push(batch.len());
        async {}
    });
    let _ = tokio::time::timeout(DEADLINE, async {
        tokio::select! {
            _ = consume => {}
            _ = wait_until(DEADLINE, || async { !batches.lock().unwrap().is_empty() }) => {}
        }
    })
    .await;
    assert_eq!(*batches.lock().unwrap(), vec![1]);
}
