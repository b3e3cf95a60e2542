//! The real `ferry` binary: configuration errors, `ferry replay --verify` on a live store, and
//! coordinator processes killed with SIGKILL in the middle of a burst.

use crate::harness::{self, wait_until, DEADLINE};
use ferry::domain::JobPhase;
use ferry::replay;
use ferry::store::redis::RedisStore;
use ferry::store::{Append, EventLog, Store, StreamId};
use ferry_proto::*;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;

/// The ferry binary, with the store and namespace of a test, and quiet logs.
pub fn ferry(url: &str, ns: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FERRY_STORE", url)
        .env("FERRY_NAMESPACE", ns)
        .env("FERRY_LOG", "warn");
    cmd
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A process that is killed with SIGKILL when dropped.
pub struct Proc(pub Child);

impl Proc {
    pub fn kill9(&mut self) {
        let _ = self.0.kill(); // SIGKILL
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn noop_job() -> (JobId, Event) {
    let job = JobId::new();
    let created = ferry::store::conformance::noop_job(job, "v1", "default", &["build"]);
    (job, created.into())
}

#[test]
fn a_bad_config_fails_at_start_naming_the_key_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferry.toml");
    std::fs::write(&file, "[coordinator]\nlease_ttl = \"15 parsecs\"\n").unwrap();
    let out = ferry("redis://127.0.0.1:1/", "x")
        .arg("--config")
        .arg(&file)
        .arg("coordinator")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("coordinator.lease_ttl"), "{msg}");
    assert!(msg.contains(&file.display().to_string()), "{msg}");

    std::fs::write(&file, "[agent]\nhost_key_policy = \"ignore\"\n").unwrap();
    let out = ferry("redis://127.0.0.1:1/", "x")
        .arg("--config")
        .arg(&file)
        .arg("agent")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("agent.host_key_policy"),
        "{}",
        text(&out)
    );
}

#[test]
fn an_agent_whose_git_ca_file_is_unreadable_fails_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("git-ca.pem");
    let out = ferry("redis://127.0.0.1:1/", "x")
        .env("FERRY_AGENT_GIT_CA_FILE", &missing)
        .arg("agent")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("agent.git_ca_file"), "{msg}");
    assert!(msg.contains(&missing.display().to_string()), "{msg}");
}

#[test]
fn role_flags_belong_to_their_subcommand() {
    let out = ferry("redis://127.0.0.1:1/", "x")
        .args(["coordinator", "--concurrency", "4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("--concurrency"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_verify_passes_on_a_live_store_and_fails_after_tampering() {
    let server = harness::shared();
    let ns = harness::namespace();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&server.url(), &ns).await.unwrap());
    let mut coordinator = Proc(
        ferry(&server.url(), &ns)
            .arg("coordinator")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut jobs = Vec::new();
    for _ in 0..5 {
        let (job, created) = noop_job();
        store
            .append(Append::new(StreamId::Job(job), vec![created]).expect(0))
            .await
            .unwrap();
        jobs.push(job);
    }
    // No agent serves the pool: the coordinator queues each step and they wait.
    wait_until(DEADLINE, || async {
        store.queued().await.unwrap().len() == jobs.len()
    })
    .await;
    coordinator.kill9();

    let run = |args: &[&str]| {
        ferry(&server.url(), &ns)
            .arg("replay")
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--verify", "--save-snapshot"]);
    assert!(out.status.success(), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("jobs: 5 (queued 5)"), "{msg}");
    assert!(msg.contains("verified: 5 jobs"), "{msg}");
    let out = run(&["--from-snapshot", "--verify"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("resuming from the snapshot"),
        "{}",
        text(&out)
    );

    // A queue entry appears that no event put there.
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ZREM")
        .arg(format!("{{{ns}}}:ready:default"))
        .arg(format!("{}/build", jobs[0]))
        .query_async(&mut conn)
        .await
        .unwrap();
    let out = run(&["--verify"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let msg = text(&out);
    assert!(msg.contains("verification failed"), "{msg}");
    assert!(msg.contains(&jobs[0].to_string()), "{msg}");
}

/// Two coordinator processes consume one feed; one is killed with SIGKILL in the middle of a
/// burst. Every job must still be planned exactly once and run to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_killed_mid_burst_loses_nothing() {
    let server = harness::shared();
    let ns = harness::namespace();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&server.url(), &ns).await.unwrap());
    let spawn = |name: &str| {
        Proc(
            ferry(&server.url(), &ns)
                .env("FERRY_AGENT_NAME", name)
                .env("FERRY_COORDINATOR_SWEEP_INTERVAL", "200ms")
                .arg("coordinator")
                .spawn()
                .unwrap(),
        )
    };
    let mut victim = spawn("c-victim");
    let _survivor = spawn("c-survivor");
    let _agent = Proc(
        ferry(&server.url(), &ns)
            .env("FERRY_AGENT_NAME", "a1")
            .arg("agent")
            .spawn()
            .unwrap(),
    );
    let mut jobs = Vec::new();
    for i in 0..200 {
        let (job, created) = noop_job();
        store
            .append(Append::new(StreamId::Job(job), vec![created]).expect(0))
            .await
            .unwrap();
        jobs.push(job);
        if i == 60 {
            victim.kill9();
        }
    }
    wait_until(DEADLINE * 6, || async {
        let view = replay::rebuild(&*store).await.unwrap();
        jobs.iter()
            .all(|j| view.jobs.get(j).map(|s| s.phase) == Some(JobPhase::Succeeded))
    })
    .await;
    for job in &jobs {
        let events: Vec<Event> = store
            .read_stream(&StreamId::Job(*job), 0)
            .await
            .unwrap()
            .iter()
            .map(|s| s.decode().unwrap())
            .collect();
        let count = |f: fn(&Event) -> bool| events.iter().filter(|e| f(e)).count();
        assert_eq!(
            count(|e| matches!(e, Event::StepQueued(_))),
            1,
            "{events:?}"
        );
        assert_eq!(
            count(|e| matches!(e, Event::StepSucceeded(_))),
            1,
            "{events:?}"
        );
        assert_eq!(
            count(|e| matches!(e, Event::JobSucceeded(_))),
            1,
            "{events:?}"
        );
    }
}

/// `ferry <role>` with its metrics on a free loopback port (`env_key` names the setting's
/// variable), started once `/healthz` answers. Retries on another port if the one picked was
/// taken in between.
async fn with_metrics(
    url: &str,
    ns: &str,
    data_dir: &str,
    env_key: &str,
    args: &[&str],
) -> (Proc, String) {
    let http = reqwest::Client::new();
    for _ in 0..5 {
        let port = harness::free_port();
        let base = format!("http://127.0.0.1:{port}");
        let mut child = Proc(
            ferry(url, ns)
                .env("FERRY_DATA_DIR", data_dir)
                .env(env_key, format!("127.0.0.1:{port}"))
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let end = std::time::Instant::now() + DEADLINE;
        while std::time::Instant::now() < end {
            if let Ok(r) = http.get(format!("{base}/healthz")).send().await {
                if r.status().is_success() {
                    return (child, base);
                }
            }
            if child.0.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let mut err = String::new();
        if let Some(mut e) = child.0.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        assert!(
            err.contains("cannot listen"),
            "{args:?} did not start: {err}"
        );
    }
    panic!("{args:?}: no free port for its metrics");
}

/// The value of the sample `series` (name and labels exactly as exposed) in a text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `ferry coordinator` and `ferry agent` each serve their own metrics: series exist at zero
/// before any work, and a job's run moves them (claims, steps by kind and outcome, decisions by
/// event, feed entries, the sweep lock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_and_the_agent_serve_their_metrics() {
    let (url, ns) = (harness::shared().url(), harness::namespace());
    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().display().to_string();
    // A project whose builds go to a pool no agent serves: the sweep leader reports its depth.
    let config = data.path().join("ferry.toml");
    std::fs::write(
        &config,
        "[[projects]]\npath = \"g/idle\"\nallow_unauthenticated = true\n\
         [projects.build]\npool = \"idle\"\ncommands = [\"true\"]\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let (_c, coordinator) = with_metrics(
        &url,
        &ns,
        &data_dir,
        "FERRY_COORDINATOR_METRICS_LISTEN",
        &["--config", &config, "coordinator"],
    )
    .await;
    let (_a, agent) = with_metrics(
        &url,
        &ns,
        &data_dir,
        "FERRY_AGENT_METRICS_LISTEN",
        &["agent", "--name", "metrics-agent", "--pools", "metrics"],
    )
    .await;
    let http = reqwest::Client::new();
    let get = |base: String| {
        let http = http.clone();
        async move {
            let r = http.get(format!("{base}/metrics")).send().await.unwrap();
            assert!(r.status().is_success());
            r.text().await.unwrap()
        }
    };
    let a = get(agent.clone()).await;
    assert_eq!(
        sample(
            &a,
            r#"ferry_agent_steps_total{kind="noop",outcome="succeeded"}"#
        ),
        Some(0.0),
        "{a}"
    );
    assert!(!a.contains("ferry_coordinator_"), "each role its own: {a}");
    let c = get(coordinator.clone()).await;
    assert_eq!(
        sample(
            &c,
            r#"ferry_coordinator_decisions_total{event="step_queued"}"#
        ),
        Some(0.0),
        "{c}"
    );

    let store = RedisStore::connect(&url, &ns).await.unwrap();
    let job = JobId::new();
    let created = ferry::store::conformance::noop_job(job, "v1", "metrics", &["build"]);
    store
        .append(Append::new(StreamId::Job(job), vec![created.into()]).expect(0))
        .await
        .unwrap();
    harness::job_succeeded(&store, job, DEADLINE).await;
    let idle = ferry::store::conformance::noop_job(JobId::new(), "v1", "idle", &["build"]);
    store
        .append(Append::new(StreamId::Job(idle.job), vec![idle.into()]).expect(0))
        .await
        .unwrap();

    let a = harness::wait_for(DEADLINE, "the agent's metrics to count the step", || {
        let get = get(agent.clone());
        async move {
            let a = get.await;
            (sample(
                &a,
                r#"ferry_agent_steps_total{kind="noop",outcome="succeeded"}"#,
            ) == Some(1.0))
            .then_some(a)
        }
    })
    .await;
    assert_eq!(
        sample(&a, r#"ferry_agent_claims_total{pool="metrics"}"#),
        Some(1.0),
        "{a}"
    );
    assert_eq!(sample(&a, "ferry_agent_slots"), Some(2.0), "{a}");
    // The filesystem of its data_dir, read with every heartbeat.
    let size = sample(&a, "ferry_agent_disk_size_bytes").unwrap_or(0.0);
    let free = sample(&a, "ferry_agent_disk_free_bytes").unwrap_or(-1.0);
    assert!(size > 0.0 && (0.0..=size).contains(&free), "{a}");
    assert_eq!(sample(&a, "ferry_agent_steps_running"), Some(0.0), "{a}");
    assert_eq!(
        sample(&a, r#"ferry_agent_step_seconds_count{kind="noop"}"#),
        Some(1.0),
        "{a}"
    );
    let c = harness::wait_for(
        DEADLINE,
        "the coordinator's metrics to count its decisions",
        || {
            let get = get(coordinator.clone());
            async move {
                let c = get.await;
                (sample(
                    &c,
                    r#"ferry_coordinator_decisions_total{event="job_succeeded"}"#,
                ) == Some(1.0))
                .then_some(c)
            }
        },
    )
    .await;
    // (the idle pool's job may be queued already)
    assert!(
        sample(
            &c,
            r#"ferry_coordinator_decisions_total{event="step_queued"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{c}"
    );
    assert!(
        sample(&c, "ferry_coordinator_feed_entries_total").unwrap_or(0.0) >= 5.0,
        "{c}"
    );
    assert_eq!(sample(&c, "ferry_sweep_leader"), Some(1.0), "{c}");
    // The idle pool's step waits (nobody serves it): its depth shows, and how long it has
    // waited grows from one sweep to the next.
    let waited = |c: &str| sample(c, r#"ferry_steps_ready_wait_seconds{pool="idle"}"#);
    let c = harness::wait_for(DEADLINE, "the idle pool's depth", || {
        let get = get(coordinator.clone());
        async move {
            let c = get.await;
            (sample(&c, r#"ferry_steps_ready{pool="idle"}"#) == Some(1.0)).then_some(c)
        }
    })
    .await;
    let first = waited(&c).expect("the idle pool's wait");
    harness::wait_for(DEADLINE, "the idle pool's wait to grow", || {
        let get = get(coordinator.clone());
        async move { (waited(&get.await)? > first).then_some(()) }
    })
    .await;
    assert_eq!(sample(&c, "ferry_steps_delayed"), Some(0.0), "{c}");
    // The store's size, for the alert that fires before a full Redis refuses every write
    // (the tests' Redis has no maxmemory: 0).
    assert!(
        sample(&c, "ferry_store_used_bytes").unwrap_or(0.0) > 0.0,
        "{c}"
    );
    assert_eq!(sample(&c, "ferry_store_limit_bytes"), Some(0.0), "{c}");
    // The default artifact store is a directory (file://): its filesystem's free space.
    let size = sample(&c, "ferry_artifacts_disk_size_bytes").unwrap_or(0.0);
    let free = sample(&c, "ferry_artifacts_disk_free_bytes").unwrap_or(-1.0);
    assert!(size > 0.0 && (0.0..=size).contains(&free), "{c}");
}

/// Like Sidekiq and BullMQ, ferry warns at start when Redis may evict its keys.
#[test]
fn a_redis_that_may_evict_keys_is_warned_about_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let (port, mut guard) = harness::serve_on_free_port("redis-lru", |port| {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir.path())
            .args(["--save", "", "--appendonly", "no"])
            .args(["--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lru"]);
        cmd
    });
    let replay = |url: &str| {
        let out = ferry(url, &harness::namespace())
            .arg("replay")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        text(&out)
    };
    let evicting = replay(&format!("redis://127.0.0.1:{port}/"));
    assert!(
        evicting.contains("maxmemory-policy is allkeys-lru")
            && evicting.contains("set maxmemory-policy noeviction"),
        "{evicting}"
    );
    let fine = replay(&harness::shared().url());
    assert!(!fine.contains("maxmemory-policy"), "{fine}");
    drop(guard.stdin.take());
    let _ = guard.wait();
}
