//! Agents running real deploy steps (local transport) under a real coordinator on Redis: host
//! checkpoints and log lines are recorded under the lease, and an agent told to stop hands its
//! running step back so another agent finishes it.

use crate::harness::{self, wait_until, DEADLINE};
use async_trait::async_trait;
use ferry::agent::{self, ArtifactFetch, Runner};
use ferry::coordinator;
use ferry::domain::JobPhase;
use ferry::store::redis::RedisStore;
use ferry::store::{Append, Store, StreamId};
use ferry_proto::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Artifacts from a local directory, by key.
struct Dir(PathBuf);

#[async_trait]
impl ArtifactFetch for Dir {
    async fn fetch(&self, key: &str, dest: &Path) -> Result<(), String> {
        tokio::fs::copy(self.0.join(key), dest)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

fn artifact(dir: &Path) -> ArtifactPublished {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("app.sh"), "echo hello from the release\n").unwrap();
    let path = dir.join("app.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(".", &src).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    use sha2::Digest;
    let bytes = std::fs::read(&path).unwrap();
    ArtifactPublished {
        step: StepId::new("deploy:prod"),
        attempt: 1,
        name: "app.tar.gz".into(),
        key: "app.tar.gz".into(),
        size: bytes.len() as u64,
        sha256: sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    }
}

/// A job whose only step deploys to `local`, with its artifact already published.
fn deploy_job(path: &Path, after_switch: &str) -> (JobId, Vec<Event>, DeploySpec) {
    let job = JobId::new();
    let spec = DeploySpec {
        environment: "prod".into(),
        hosts: vec!["local".into()],
        path: path.display().to_string(),
        after_switch: vec![after_switch.into()],
        max_parallel: 1,
        keep_releases: 3,
        ..Default::default()
    };
    let created = JobCreated {
        artifact: None,
        job,
        project_id: 1,
        project: "group/app".into(),
        tag: "v1.0.0".into(),
        git_ref: "refs/tags/v1.0.0".into(),
        sha: "0123456789abcdef0123456789abcdef01234567".into(),
        priority: 0,
        trigger: "test".into(),
        steps: vec![StepPlan {
            step: StepId::new("deploy:prod"),
            pool: "default".into(),
            priority: 0,
            spec: StepSpec::Deploy(spec.clone()),
        }],
    };
    (job, vec![created.into()], spec)
}

fn start(
    store: &Arc<dyn Store>,
    role: &'static str,
    artifacts: &Path,
    grace: Duration,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, mut rx) = watch::channel(false);
    let store = store.clone();
    let artifacts = artifacts.to_path_buf();
    let task = tokio::spawn(async move {
        let until = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        if role == "coordinator" {
            let opts = coordinator::Options {
                consumer: "c".into(),
                sweep_interval: Duration::from_millis(100),
                ..Default::default()
            };
            coordinator::run(store, opts, until).await.unwrap();
        } else {
            let opts = agent::Options {
                name: AgentId::new(role),
                pools: vec!["default".into()],
                labels: vec![],
                concurrency: 1,
                // (long: a claim whose job cannot be read is read again for a third of it)
                lease_ttl: Duration::from_secs(60),
                shutdown_grace: grace,
                runner: Arc::new(Runner {
                    artifacts: Some(Arc::new(Dir(artifacts.clone()))),
                    ..Runner::local(artifacts.join("agent-data"))
                }),
            };
            agent::run(store, opts, until).await.unwrap();
        }
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_step_records_checkpoints_and_logs_under_its_lease() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let dir = tempfile::tempdir().unwrap();
    let published = artifact(dir.path());
    let target = dir.path().join("srv");
    let (job, mut events, _) = deploy_job(&target, "sh app.sh");
    events.push(published.into());
    let _c = start(&store, "coordinator", dir.path(), Duration::from_secs(5));
    let _a = start(&store, "agent-1", dir.path(), Duration::from_secs(5));
    store
        .append(Append::new(StreamId::Job(job), events).expect(0))
        .await
        .unwrap();
    wait_until(DEADLINE * 2, || async {
        harness::job_events(&*store, job).await.0.phase == JobPhase::Succeeded
    })
    .await;
    let link = std::fs::read_link(target.join("current")).unwrap();
    assert_eq!(link, Path::new("releases/v1.0.0-0123456"));
    let (s, events) = harness::job_events(&*store, job).await;
    let host = &s.steps[0].hosts["local"];
    assert_eq!((host.phase.as_str(), host.ok), ("finished", Some(true)));
    let phases: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::DeployHostCheckpoint(c) => Some(c.phase.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        phases,
        ["uploaded", "unpacked", "switched", "restarted", "healthy"]
    );
    let logs = store
        .read_logs(job, None, 100, Duration::ZERO)
        .await
        .unwrap();
    assert!(
        logs.iter()
            .any(|(_, l)| l.line == "[local] hello from the release"),
        "{logs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_agent_hands_its_step_back_and_another_finishes_it() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let dir = tempfile::tempdir().unwrap();
    let published = artifact(dir.path());
    let target = dir.path().join("srv");
    let gate = dir.path().join("second-agent");
    let pid_file = dir.path().join("sleeper.pid");
    // The first run blocks in after_switch (in the background, like a slow restart) until the
    // test lets later runs through.
    let cmd = format!(
        "test -f {gate} || {{ sleep 1000 & echo $! > {pid}; wait; }}",
        gate = gate.display(),
        pid = pid_file.display()
    );
    let (job, mut events, _) = deploy_job(&target, &cmd);
    events.push(published.into());
    let _c = start(&store, "coordinator", dir.path(), Duration::from_secs(5));
    let (stop_a1, a1) = start(&store, "agent-1", dir.path(), Duration::from_millis(200));
    store
        .append(Append::new(StreamId::Job(job), events).expect(0))
        .await
        .unwrap();
    wait_until(DEADLINE, || async { pid_file.exists() }).await;
    let sleeper: i32 = wait_for_pid(&pid_file).await;

    // SIGTERM-equivalent: stop taking work, then hand the step back after the grace period.
    stop_a1.send(true).unwrap();
    a1.await.unwrap();
    let (_, events) = harness::job_events(&*store, job).await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::StepReleased(r) if r.agent.as_str() == "agent-1")),
        "{events:?}"
    );
    // It said it left: no longer live at once, and never reported lost for this stop.
    let said: Vec<String> = store
        .read_stream(&StreamId::Agents, 0)
        .await
        .unwrap()
        .iter()
        .filter_map(|s| match s.decode().unwrap() {
            Event::AgentLeft(l) if l.agent.as_str() == "agent-1" => Some(l.reason),
            _ => None,
        })
        .collect();
    assert_eq!(
        said,
        ["shut down: running steps handed back after the grace period"]
    );
    assert!(!store
        .live_agents()
        .await
        .unwrap()
        .iter()
        .any(|(a, _)| a.as_str() == "agent-1"));
    // Its processes are gone with it.
    wait_until(DEADLINE, || async {
        // SAFETY: signal 0 only checks whether the process exists.
        unsafe { libc::kill(sleeper, 0) != 0 }
    })
    .await;

    std::fs::write(&gate, "").unwrap();
    let _a2 = start(&store, "agent-2", dir.path(), Duration::from_secs(5));
    wait_until(DEADLINE * 2, || async {
        harness::job_events(&*store, job).await.0.phase == JobPhase::Succeeded
    })
    .await;
    let (_, events) = harness::job_events(&*store, job).await;
    let claimed: Vec<(String, u32)> = events
        .iter()
        .filter_map(|e| match e {
            Event::StepClaimed(c) => Some((c.agent.to_string(), c.attempt)),
            _ => None,
        })
        .collect();
    assert_eq!(
        claimed,
        [("agent-1".to_string(), 1), ("agent-2".to_string(), 2)]
    );
    let succeeded = events
        .iter()
        .filter(|e| matches!(e, Event::StepSucceeded(_)))
        .count();
    assert_eq!(succeeded, 1);
}

/// A stop heard while a claim call is in flight does not drop the call: the leases it was
/// granted would otherwise wait to run out, and count an attempt. Here the call is held in
/// flight by its read of the claimed job, which fails until the test allows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_heard_during_a_claim_runs_what_the_claim_took() {
    let user = harness::LimitedUser::new(&["xrange"]).await;
    let ns = harness::namespace();
    let url = harness::shared().url();
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&url, &ns).await.unwrap());
    let limited: Arc<dyn Store> = Arc::new(RedisStore::connect(&user.url, &ns).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let published = artifact(dir.path());
    let (job, mut events, _) = deploy_job(&dir.path().join("srv"), "true");
    events.push(published.into());
    let _c = start(&store, "coordinator", dir.path(), Duration::from_secs(5));
    let (stop, agent) = start(&limited, "agent-1", dir.path(), Duration::from_secs(10));
    store
        .append(Append::new(StreamId::Job(job), events).expect(0))
        .await
        .unwrap();
    wait_until(DEADLINE, || async {
        let (_, events) = harness::job_events(&*store, job).await;
        events.iter().any(|e| matches!(e, Event::StepClaimed(_)))
    })
    .await;
    stop.send(true).unwrap();
    // The agent has heard the stop once its end of the channel is gone.
    wait_until(DEADLINE, || async { stop.receiver_count() == 0 }).await;
    user.allow("xrange").await;
    tokio::time::timeout(DEADLINE * 2, agent)
        .await
        .expect("the agent stops")
        .unwrap();

    let (state, events) = harness::job_events(&*store, job).await;
    let by_agent: Vec<&str> = events
        .iter()
        .filter_map(|e| match e {
            Event::StepClaimed(_) => Some("claimed"),
            Event::StepStarted(_) => Some("started"),
            Event::StepSucceeded(_) => Some("succeeded"),
            Event::StepReleased(_) => Some("released"),
            Event::LeaseExpired(_) => Some("expired"),
            _ => None,
        })
        .collect();
    assert_eq!(by_agent, ["claimed", "started", "succeeded"], "{events:?}");
    wait_until(DEADLINE, || async {
        harness::job_events(&*store, job).await.0.phase == JobPhase::Succeeded
    })
    .await;
    let said: Vec<String> = store
        .read_stream(&StreamId::Agents, 0)
        .await
        .unwrap()
        .iter()
        .filter_map(|s| match s.decode().unwrap() {
            Event::AgentLeft(l) => Some(l.reason),
            _ => None,
        })
        .collect();
    assert_eq!(said, ["shut down: running steps finished"], "{state:?}");
}

async fn wait_for_pid(path: &Path) -> i32 {
    crate::harness::wait_for(DEADLINE, "the pid file", || async {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
    })
    .await
}

/// The API serves a job's lines (paged, long-polled, or as server-sent events) and
/// `ferry jobs logs -f` follows a running job to its end with a progress line per step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_are_served_by_the_api_and_followed_by_the_cli() {
    use ferry::api::{self, ApiState};
    use ferry::config::Secret;
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let router = api::router(ApiState::new(store.clone(), &[Secret::new("t0k")]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let published = artifact(dir.path());
    let gate = dir.path().join("go");
    let cmd = format!(
        "echo first line; while ! test -f {gate}; do sleep 0.05; done; echo second line",
        gate = gate.display()
    );
    let (job, mut events, _) = deploy_job(&dir.path().join("srv"), &cmd);
    events.push(published.into());
    let _c = start(&store, "coordinator", dir.path(), Duration::from_secs(5));
    let _a = start(&store, "agent-1", dir.path(), Duration::from_secs(5));
    store
        .append(Append::new(StreamId::Job(job), events).expect(0))
        .await
        .unwrap();

    // Follow with the real binary while the step runs.
    let follower = {
        let (base, job) = (base.clone(), job.to_string());
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("FERRY_LOG", "warn")
                .args(["jobs", "logs", "-f", &job, "--api", &base, "--token", "t0k"])
                .output()
                .unwrap()
        })
    };
    let http = reqwest::Client::new();
    let logs_url = format!("{base}/api/v1/jobs/{job}/logs");
    wait_until(DEADLINE, || async {
        let v: serde_json::Value = http
            .get(&logs_url)
            .bearer_auth("t0k")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["line"] == "[local] first line")
    })
    .await;
    std::fs::write(&gate, "").unwrap();
    let out = follower.await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "==> deploy:prod: running",
        "[deploy:prod] [local] first line",
        "[deploy:prod] [local] second line",
        "==> job",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    // Paging: the cursor continues after the last line read.
    let page: serde_json::Value = http
        .get(format!("{logs_url}?limit=1"))
        .bearer_auth("t0k")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    let rest: serde_json::Value = http
        .get(format!(
            "{logs_url}?cursor={}",
            page["next"].as_str().unwrap()
        ))
        .bearer_auth("t0k")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!rest["items"].as_array().unwrap().is_empty());
    assert_ne!(rest["items"][0]["pos"], page["items"][0]["pos"]);

    // Server-sent events: every line, then the end with the job's state.
    let sse = http
        .get(format!("{logs_url}?follow=true"))
        .bearer_auth("t0k")
        .send()
        .await
        .unwrap();
    assert_eq!(
        sse.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let body = tokio::time::timeout(DEADLINE, sse.text())
        .await
        .expect("the event stream ends when the job has ended")
        .unwrap();
    assert!(body.contains("event: log"), "{body}");
    assert!(body.contains("second line"), "{body}");
    assert!(
        body.contains("event: end\ndata: {\"state\":\"succeeded\"}"),
        "{body}"
    );

    // Bad parameters are named.
    let bad = http
        .get(format!("{logs_url}?wait=99999999"))
        .bearer_auth("t0k")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("invalid wait"));
}
