//! The machinery end to end on a real Redis: coordinators and agents in this process move no-op
//! jobs through their plans; replay rebuilds the same view and verification catches tampering.

use crate::harness::{self, wait_until, DEADLINE};
use ferry::agent;
use ferry::coordinator::{self, decide::RetryPolicy};
use ferry::domain::JobPhase;
use ferry::replay;
use ferry::store::{Append, Store, StreamId};
use ferry_proto::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

fn noop_job(steps: &[&str], pool: &str) -> (JobId, Event) {
    let job = JobId::new();
    let created = ferry::store::conformance::noop_job(job, "v1", pool, steps);
    (job, created.into())
}

/// Roles running in this process until the returned sender is dropped or set.
struct Roles {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Roles {
    fn start(store: &Arc<dyn Store>, coordinators: usize, agents: usize, pool: &str) -> Roles {
        Self::start_with(store, coordinators, agents, pool, Default::default())
    }

    /// [`Roles::start`] with coordinators made from `base`.
    fn start_with(
        store: &Arc<dyn Store>,
        coordinators: usize,
        agents: usize,
        pool: &str,
        base: coordinator::Options,
    ) -> Roles {
        let (stop, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        for i in 0..coordinators {
            let opts = coordinator::Options {
                consumer: format!("c{i}"),
                policy: RetryPolicy {
                    max_attempts: 3,
                    base: Duration::from_millis(50),
                    max: Duration::from_millis(200),
                },
                sweep_interval: Duration::from_millis(100),
                ..base.clone()
            };
            let (store, rx) = (store.clone(), rx.clone());
            tasks.push(tokio::spawn(async move {
                coordinator::run(store, opts, until(rx)).await.unwrap();
            }));
        }
        for i in 0..agents {
            let opts = agent::Options {
                name: AgentId::new(format!("agent-{i}")),
                pools: vec![pool.into()],
                labels: vec![],
                concurrency: 4,
                lease_ttl: Duration::from_secs(5),
                shutdown_grace: Duration::from_secs(5),
                runner: Arc::new(agent::Runner::local(
                    std::env::temp_dir().join("ferry-agent"),
                )),
            };
            let (store, rx) = (store.clone(), rx.clone());
            tasks.push(tokio::spawn(async move {
                agent::run(store, opts, until(rx)).await.unwrap();
            }));
        }
        Roles { stop, tasks }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// Appends `n` no-op jobs of `steps` for `pool`, as a coordinator's feed sees new jobs.
async fn add_jobs(store: &dyn Store, n: usize, steps: &[&str], pool: &str) -> Vec<JobId> {
    let mut jobs = Vec::with_capacity(n);
    for _ in 0..n {
        let (job, created) = noop_job(steps, pool);
        store
            .append(Append::new(StreamId::Job(job), vec![created]).expect(0))
            .await
            .unwrap();
        jobs.push(job);
    }
    jobs
}

/// Waits until every one of `jobs` has succeeded.
async fn all_succeed(store: &dyn Store, jobs: &[JobId]) {
    wait_until(DEADLINE * 3, || async {
        let view = replay::rebuild(store).await.unwrap();
        jobs.iter()
            .all(|j| view.jobs.get(j).map(|s| s.phase) == Some(JobPhase::Succeeded))
    })
    .await;
}

async fn phase(store: &dyn Store, job: JobId) -> Option<JobPhase> {
    let view = replay::rebuild(store).await.unwrap();
    view.jobs.get(&job).map(|j| j.phase)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noop_jobs_run_to_success_and_replay_verifies() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let roles = Roles::start(&store, 2, 2, "default");
    let jobs = add_jobs(&*store, 30, &["build", "deploy:prod"], "default").await;
    all_succeed(&*store, &jobs).await;
    roles.stop().await;

    let view = replay::rebuild(&*store).await.unwrap();
    for job in &jobs {
        let events: Vec<Event> = store
            .read_stream(&StreamId::Job(*job), 0)
            .await
            .unwrap()
            .iter()
            .map(|s| s.decode().unwrap())
            .collect();
        let succeeded = events
            .iter()
            .filter(|e| matches!(e, Event::StepSucceeded(_)))
            .count();
        assert_eq!(succeeded, 2, "each step succeeds exactly once: {events:?}");
        assert_eq!(view.jobs[job].version as usize, events.len());
    }
    let check = replay::verify(&*store, &view).await.unwrap();
    assert!(check.ok(), "{:?}", check.differences);
    assert_eq!(check.checked, jobs.len());
    assert!(check.skipped.is_empty());
}

/// The sweep leader trims the global log behind the consumer groups (`coordinator.keep_feed`):
/// entries every group handled leave the log, every job's stream keeps all its events, and
/// replay rebuilds the same jobs from the streams and verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweep_trims_the_log_behind_the_coordinators_and_replay_still_verifies() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let trimming = coordinator::Options {
        keep_feed: Some(Duration::from_millis(1)),
        trim_every: Duration::from_millis(100),
        ..Default::default()
    };
    let roles = Roles::start_with(&store, 1, 1, "default", trimming);
    // 6 events per job: several whole nodes of the log (Redis trims whole nodes)
    let jobs = add_jobs(&*store, 120, &["build"], "default").await;
    all_succeed(&*store, &jobs).await;
    wait_until(DEADLINE, || async {
        store.log_complete_from().await.unwrap().is_some()
    })
    .await;
    roles.stop().await;

    let view = replay::rebuild(&*store).await.unwrap();
    let log = store.read_log(None, 100_000).await.unwrap();
    assert!(
        (log.len() as u64) < view.events,
        "{} of {} events left in the log",
        log.len(),
        view.events
    );
    for job in &jobs {
        assert_eq!(view.jobs[job].phase, JobPhase::Succeeded);
        let stream = store.read_stream(&StreamId::Job(*job), 0).await.unwrap();
        assert_eq!(stream.len(), 6, "the job's stream keeps every event");
    }
    let check = replay::verify(&*store, &view).await.unwrap();
    assert!(check.ok(), "{:?}", check.differences);
    assert_eq!(check.checked, jobs.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_with_no_agent_stays_queued_and_verify_catches_tampering() {
    let server = harness::shared();
    let ns = harness::namespace();
    let store: Arc<dyn Store> = Arc::new(
        ferry::store::redis::RedisStore::connect(&server.url(), &ns)
            .await
            .unwrap(),
    );
    let roles = Roles::start(&store, 1, 0, "default");
    let (job, created) = noop_job(&["build"], "nobody-serves-this");
    store
        .append(Append::new(StreamId::Job(job), vec![created]).expect(0))
        .await
        .unwrap();
    wait_until(DEADLINE, || async {
        store.queued().await.unwrap().iter().any(|q| q.job == job)
    })
    .await;
    roles.stop().await;
    assert_eq!(phase(&*store, job).await, Some(JobPhase::Queued));

    let view = replay::rebuild(&*store).await.unwrap();
    assert!(replay::verify(&*store, &view).await.unwrap().ok());

    // Someone removes the queue entry behind ferry's back: the log says it must be there.
    let client = redis::Client::open(server.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let removed: i64 = redis::cmd("ZREM")
        .arg(format!("{{{ns}}}:ready:nobody-serves-this"))
        .arg(format!("{job}/build"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let check = replay::verify(&*store, &view).await.unwrap();
    assert!(!check.ok());
    assert!(
        check.differences[0].contains("should be queued"),
        "{:?}",
        check.differences
    );

    // ... and takes the job out of its tag's live index (where the deploy gate would look for
    // it, had it a deploy): verify names the index.
    let live = format!("live:{}", ferry::store::tag_index("group/app", "v1"));
    let removed: i64 = redis::cmd("SREM")
        .arg(format!("{{{ns}}}:idx:{live}"))
        .arg(job.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(removed, 1);
    let check = replay::verify(&*store, &view).await.unwrap();
    assert!(
        check
            .differences
            .iter()
            .any(|d| d == &format!("job {job}: missing from index {live}")),
        "{:?}",
        check.differences
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_snapshot_equals_a_full_replay() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let roles = Roles::start(&store, 1, 1, "default");
    let mut jobs = Vec::new();
    for round in 0..2 {
        jobs.extend(add_jobs(&*store, 10, &["build"], "default").await);
        all_succeed(&*store, &jobs).await;
        if round == 0 {
            let view = replay::rebuild(&*store).await.unwrap();
            replay::save_snapshot(&*store, &view).await.unwrap();
        }
    }
    roles.stop().await;
    let mut resumed = replay::load_snapshot(&*store).await.unwrap().unwrap();
    assert!(resumed.jobs.len() < jobs.len());
    replay::catch_up(&*store, &mut resumed).await.unwrap();
    assert_eq!(resumed, replay::rebuild(&*store).await.unwrap());

    // A snapshot another fold saved is not resumed from: the state it carries is that fold's.
    let bytes = store
        .get_snapshot(&replay::snapshot_name())
        .await
        .unwrap()
        .unwrap();
    use ferry::store::Snapshots;
    let other = harness::redis_store().await;
    for older in [replay::SNAPSHOT.to_string(), "view-fold1".to_string()] {
        other.put_snapshot(&older, &bytes).await.unwrap();
    }
    assert_eq!(replay::load_snapshot(&other).await.unwrap(), None);
    other
        .put_snapshot(&replay::snapshot_name(), &bytes)
        .await
        .unwrap();
    assert!(replay::load_snapshot(&other).await.unwrap().is_some());
}
