//! Redis-specific tests: the Lua score formula, the key layout, outages and blocking commands.

use crate::harness::{self, wait_for, RedisServer, DEADLINE};
use ferry::store::redis::{queue_score_probe, RedisStore};
use ferry::store::{queue_score, Append, Error, EventLog, Feed, StreamId, WorkQueue};
use ferry_proto::{Event, JobId, StepQueued, StepRetryScheduled};
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
