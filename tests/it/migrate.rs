//! `ferry migrate`: the whole log moves to another store, whose fold then equals the source's and
//! verifies; webhook dedupe keys come along; a step that was running is interrupted, not lost;
//! a target holding events is refused without `--force`, and a second run adds nothing.

use crate::harness::{self, wait_until, DEADLINE};
use ferry::agent;
use ferry::coordinator::{self, decide::RetryPolicy};
use ferry::domain::{JobPhase, StepStatus, View};
use ferry::gateway::dedupe_keys;
use ferry::migrate::{migrate, MigrateError};
use ferry::replay;
use ferry::store::{Append, Appended, Store, StreamId};
use ferry_proto::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const WINDOW: Duration = Duration::from_secs(3600);

fn noop_job(pool: &str) -> (JobId, Event) {
    let job = JobId::new();
    let created = JobCreated {
        artifact: None,
        job,
        project_id: 1,
        project: "group/app".into(),
        tag: format!("v-{job}"),
        git_ref: "refs/tags/v1".into(),
        sha: "a".repeat(40),
        priority: 0,
        trigger: "test".into(),
        steps: ["build", "deploy:production"]
            .iter()
            .map(|s| StepPlan {
                step: StepId::new(*s),
                pool: pool.into(),
                priority: 0,
                spec: StepSpec::Noop,
            })
            .collect(),
    };
    (job, created.into())
}

fn webhook(delivery: &str) -> WebhookReceived {
    WebhookReceived {
        delivery_id: Some(delivery.into()),
        event: "Tag Push Hook".into(),
        project_id: Some(1),
        project_path: Some("group/app".into()),
        git_ref: Some("refs/tags/v9".into()),
        before: Some("0".repeat(40)),
        after: Some("b".repeat(40)),
        checkout_sha: Some("b".repeat(40)),
        action: "ignored".into(),
        reason: Some("test".into()),
        ..Default::default()
    }
}

async fn deliver(store: &dyn Store, w: &WebhookReceived) -> Appended {
    let keys = dedupe_keys(w);
    store
        .append(Append::new(StreamId::Webhooks, vec![w.clone().into()]).dedupe(keys, WINDOW))
        .await
        .unwrap()
}

/// A coordinator and an agent serving `pool`, in this process.
fn roles(
    store: &Arc<dyn Store>,
    pool: &str,
) -> (watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>) {
    let (stop, rx) = watch::channel(false);
    let until = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let coordinator_opts = coordinator::Options {
        consumer: "c0".into(),
        policy: RetryPolicy {
            max_attempts: 3,
            base: Duration::from_millis(50),
            max: Duration::from_millis(200),
        },
        sweep_interval: Duration::from_millis(100),
        ..Default::default()
    };
    let agent_opts = agent::Options {
        concurrency: 4,
        ..agent::Options::new("agent-0", &[pool])
    };
    let tasks = vec![
        tokio::spawn({
            let (store, rx) = (store.clone(), rx.clone());
            async move {
                coordinator::run(store, coordinator_opts, until(rx))
                    .await
                    .unwrap()
            }
        }),
        tokio::spawn({
            let store = store.clone();
            async move { agent::run(store, agent_opts, until(rx)).await.unwrap() }
        }),
    ];
    (stop, tasks)
}

async fn stop(roles: (watch::Sender<bool>, Vec<tokio::task::JoinHandle<()>>)) {
    let _ = roles.0.send(true);
    for t in roles.1 {
        t.await.unwrap();
    }
}

/// Fills `source` with finished jobs, a job waiting for a pool nobody serves, a job whose step
/// an agent holds, and a webhook delivery; returns (done jobs, waiting job, running job).
async fn populate(source: &Arc<dyn Store>) -> (Vec<JobId>, JobId, JobId) {
    let roles = roles(source, "work");
    let mut done = Vec::new();
    for _ in 0..5 {
        let (job, created) = noop_job("work");
        source
            .append(Append::new(StreamId::Job(job), vec![created]).expect(0))
            .await
            .unwrap();
        done.push(job);
    }
    let (waiting, created) = noop_job("nobody");
    source
        .append(Append::new(StreamId::Job(waiting), vec![created]).expect(0))
        .await
        .unwrap();
    let (running, created) = noop_job("held");
    source
        .append(Append::new(StreamId::Job(running), vec![created]).expect(0))
        .await
        .unwrap();
    wait_until(DEADLINE * 2, || async {
        let view = replay::rebuild(&**source).await.unwrap();
        let queued = |job: &JobId| {
            view.jobs[job]
                .steps
                .first()
                .is_some_and(|s| matches!(s.status, StepStatus::Queued { .. }))
        };
        done.iter()
            .all(|j| view.jobs[j].phase == JobPhase::Succeeded)
            && queued(&waiting)
            && queued(&running)
    })
    .await;
    stop(roles).await;
    // An agent holds the running job's step (and will never finish it).
    let claim = source
        .claim(
            &["held".to_string()],
            &AgentId::new("gone"),
            Duration::from_secs(600),
        )
        .await
        .unwrap()
        .expect("the held step");
    assert_eq!(claim.job, running);
    // Its output so far: the log moves with the events.
    let fence = ferry::store::Fence {
        step: claim.step.clone(),
        token: claim.token,
    };
    let lines: Vec<StepLog> = (1..=3)
        .map(|n| StepLog {
            step: claim.step.clone(),
            attempt: claim.attempt,
            stream: "stdout".into(),
            line: format!("line {n}"),
        })
        .collect();
    source.append_logs(running, &fence, &lines).await.unwrap();
    assert!(matches!(
        deliver(&**source, &webhook("d-1")).await,
        Appended::Written { .. }
    ));
    (done, waiting, running)
}

fn same_fold(a: &View, b: &View) {
    assert_eq!(a.events, b.events);
    assert_eq!(a.jobs, b.jobs);
    assert_eq!(a.agents, b.agents);
    assert_eq!(a.webhooks, b.webhooks);
}

/// The migration suite, for any pair of stores.
pub async fn migrates(source: Arc<dyn Store>, target: Arc<dyn Store>) {
    let (done, waiting, running) = populate(&source).await;
    let before = replay::rebuild(&*source).await.unwrap();

    let report = migrate(&*source, &*target, false, WINDOW).await.unwrap();
    assert_eq!(report.read, before.events);
    assert_eq!(report.written, before.events);
    assert_eq!(report.skipped, 0);
    assert_eq!(report.log_lines, 3);
    let output = |store: Arc<dyn Store>| async move {
        store
            .read_logs(running, None, 100, Duration::ZERO)
            .await
            .unwrap()
            .into_iter()
            .map(|(_, l)| l.line)
            .collect::<Vec<_>>()
    };
    assert_eq!(output(target.clone()).await, ["line 1", "line 2", "line 3"]);
    assert_eq!(
        report.interrupted,
        vec![(running, "build".to_string())],
        "the held step's lease did not move"
    );
    // Tokens keep growing in the target: a deploy host that saw the source's last one would
    // refuse a switch under a smaller one.
    let source_max = source
        .read_log(None, 10_000)
        .await
        .unwrap()
        .iter()
        .filter_map(|s| s.envelope.token)
        .max()
        .unwrap();
    assert!(source_max > 0);
    assert_eq!(report.fence, source_max);

    // The target folds to the source's view, plus the interrupted lease.
    let after = replay::rebuild(&*target).await.unwrap();
    assert_eq!(after.events, before.events + 1);
    for job in done.iter().chain([&waiting]) {
        assert_eq!(after.jobs[job], before.jobs[job], "job {job}");
    }
    assert!(matches!(
        after.jobs[&running].steps[0].status,
        StepStatus::Interrupted { .. }
    ));
    assert_eq!(after.webhooks, before.webhooks);
    let verified = replay::verify(&*target, &after).await.unwrap();
    assert!(verified.ok(), "{:?}", verified.differences);
    // The waiting step is in the target's queue, like in the source's.
    assert!(target
        .queued()
        .await
        .unwrap()
        .iter()
        .any(|q| q.job == waiting));

    // A redelivered webhook is still a duplicate in the target.
    assert!(matches!(
        deliver(&*target, &webhook("d-1")).await,
        Appended::Duplicate { .. }
    ));

    // A target with events is refused without force; with force a second run adds nothing.
    assert!(matches!(
        migrate(&*source, &*target, false, WINDOW).await,
        Err(MigrateError::TargetNotEmpty)
    ));
    let again = migrate(&*source, &*target, true, WINDOW).await.unwrap();
    assert_eq!(again.written, 0, "{again:?}");
    assert_eq!(
        again.log_lines, 0,
        "the lines already there are not copied twice"
    );
    assert_eq!(output(target.clone()).await.len(), 3);
    assert_eq!(again.skipped, before.events);
    assert!(again.interrupted.is_empty());
    same_fold(&replay::rebuild(&*target).await.unwrap(), &after);

    // The source went on after the migration (here the held job is cancelled there): a run
    // again is refused, not quietly missing what the target cannot take.
    let version = source
        .read_stream(&StreamId::Job(running), 0)
        .await
        .unwrap()
        .len() as u64;
    let cancelled = JobCancelled {
        reason: "went on in the source".into(),
        by: "test".into(),
    };
    source
        .append(Append::new(StreamId::Job(running), vec![cancelled.into()]).expect(version))
        .await
        .unwrap();
    match migrate(&*source, &*target, true, WINDOW).await {
        Err(MigrateError::Differs { stream, index }) => {
            assert_eq!(stream, StreamId::Job(running).name());
            assert_eq!(index, version);
        }
        other => panic!("{other:?}"),
    }
    same_fold(&replay::rebuild(&*target).await.unwrap(), &after);

    // The interrupted step runs again in the target and the job finishes there.
    let roles = roles(&target, "held");
    wait_until(DEADLINE * 2, || async {
        replay::rebuild(&*target).await.unwrap().jobs[&running].phase == JobPhase::Succeeded
    })
    .await;
    stop(roles).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_to_redis() {
    let source: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let target: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    migrates(source, target).await;
}

fn sqlite(dir: &tempfile::TempDir, name: &str) -> Arc<dyn Store> {
    Arc::new(ferry::store::sqlite::SqliteStore::open(&dir.path().join(name)).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_to_redis() {
    let dir = tempfile::tempdir().unwrap();
    let target: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    migrates(sqlite(&dir, "ferry.db"), target).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_to_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let source: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    migrates(source, sqlite(&dir, "ferry.db")).await;
}

/// The commands: `ferry migrate` from an embedded file to Redis, then `ferry replay --verify` on
/// the target; a second `ferry migrate` without `--force` is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migrate_command_moves_an_embedded_store_to_redis_and_replay_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("ferry.db");
    {
        let source = sqlite(&dir, "ferry.db");
        populate(&source).await;
    }
    let url = harness::shared().url();
    let ns = harness::namespace();
    let ferry = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FERRY_NAMESPACE", &ns)
            .env("FERRY_LOG", "warn")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let from = format!("sqlite://{}", file.display());
    let (ok, out, err) = ferry(&["migrate", "--from", &from, "--to", &url]);
    assert!(ok, "{out}\n{err}");
    assert!(out.contains("written"), "{out}");
    assert!(
        out.contains("was running"),
        "the held step is reported: {out}"
    );
    let (ok, out, err) = ferry(&["--store", &url, "replay", "--verify"]);
    assert!(ok, "replay --verify on the target: {out}\n{err}");
    let (ok, _, err) = ferry(&["migrate", "--from", &from, "--to", &url]);
    assert!(!ok);
    assert!(err.contains("already holds events"), "{err}");
    let (ok, _, err) = ferry(&[
        "migrate",
        "--from",
        "sqlite:///nonexistent/ferry.db",
        "--to",
        &url,
    ]);
    assert!(!ok);
    assert!(err.contains("no such file"), "{err}");
}

/// A Redis store whose global log was trimmed (its oldest entries gone, every stream whole)
/// replays to the same view, verifies, continues no snapshot from before the trim, and
/// migrates whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_store_with_a_trimmed_log_replays_and_migrates_whole() {
    let source: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    // Old deliveries first: enough to fill whole nodes of the log, which is what Redis trims,
    // and more than a page (1,000) of the webhooks stream, which is read a page at a time.
    for n in 0..1100 {
        let old = WebhookReceived {
            git_ref: Some(format!("refs/tags/old-{n}")),
            ..webhook(&format!("old-{n}"))
        };
        assert!(matches!(
            deliver(&*source, &old).await,
            Appended::Written { .. }
        ));
    }
    let (done, waiting, running) = populate(&source).await;
    let before = replay::rebuild(&*source).await.unwrap();
    assert_eq!(source.log_complete_from().await.unwrap(), None);

    let trimmed = source
        .trim_log(ferry::store::now_ms() + 60_000)
        .await
        .unwrap();
    assert!(trimmed.deleted >= 100, "{trimmed:?}");
    assert!(source.log_complete_from().await.unwrap().is_some());
    let log = source.read_log(None, 10_000).await.unwrap();
    assert_eq!(log.len() as u64, before.events - trimmed.deleted);

    let replayed = replay::rebuild(&*source).await.unwrap();
    same_fold(&replayed, &before);
    assert_eq!(replayed.position, before.position);
    let verified = replay::verify(&*source, &replayed).await.unwrap();
    assert!(verified.ok(), "{:?}", verified.differences);

    // A snapshot from before the trim: what followed it is no longer all in the log.
    let mut stale = View {
        position: Some("1-0".into()),
        ..View::default()
    };
    assert!(replay::catch_up(&*source, &mut stale).await.unwrap());
    same_fold(&stale, &before);
    // One from after it continues.
    let mut fresh = before.clone();
    assert!(!replay::catch_up(&*source, &mut fresh).await.unwrap());
    same_fold(&fresh, &before);

    let dir = tempfile::tempdir().unwrap();
    let target = sqlite(&dir, "ferry.db");
    let report = migrate(&*source, &*target, false, WINDOW).await.unwrap();
    assert_eq!(report.read, before.events);
    assert_eq!(report.written, before.events);
    assert_eq!(report.interrupted, vec![(running, "build".to_string())]);
    let after = replay::rebuild(&*target).await.unwrap();
    for job in done.iter().chain([&waiting]) {
        assert_eq!(after.jobs[job], before.jobs[job], "job {job}");
    }
    assert_eq!(after.webhooks, before.webhooks);
    assert_eq!(after.agents, before.agents);
}
