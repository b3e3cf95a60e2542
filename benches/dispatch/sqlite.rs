//! `FERRY_BENCH_STORE=sqlite cargo bench --bench dispatch`: the same two measurements against
//! the embedded store, a fresh SQLite file per phase (`synchronous = FULL`, on the disk that
//! holds the temporary directory).
//!
//! Unlike the Redis run, the coordinators and agents run **inside this process**, sharing its
//! store handle, as `ferry up` runs them: the binary cannot open a SQLite store until store
//! selection is wired (`--store`). So there is no per-process CPU split and no server to
//! compare with; CPU is this whole process's.
//!
//! 1. **Pickup latency** (1 coordinator, 1 agent with concurrency 1): append one job, then a
//!    blocking `read_new` on an observer group until the job's `StepStarted` shows, then sleep
//!    5 ms. Same two kinds as the Redis run (*queued*, *created*).
//! 2. **Throughput**: N no-op jobs appended with 64 in flight while the roles run (agents with
//!    concurrency 50), until the global log holds every job's 6 events (read with `read_log`
//!    every 5 ms, as the Redis run polls `XLEN`); then a replay checks that every job
//!    succeeded.

use super::{noop_job, started_kind, Samples, POOL};
use crate::support::{ms, process_cpu, quantile, result};
use ferry::domain::JobPhase;
use ferry::store::sqlite::SqliteStore;
use ferry::store::{Append, EventLog, Feed, LogPos, Store, StreamId};
use ferry_proto::{StepId, StepQueued};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The feed group the bench observes the log through (the roles use their own).
const OBSERVER: &str = "bench-observer";

pub fn main(samples: usize, n: usize) {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {} cores (shared, noisy); loadavg {}; store: sqlite (WAL, synchronous = FULL), roles in this process",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");

    println!("\n== pickup latency (sqlite): 1 coordinator + 1 agent (concurrency 1), in this process, {samples} samples per kind ==");
    rt.block_on(async {
        let dir = tempfile::tempdir().expect("temporary directory");
        let store = open(dir.path()).await;
        let fleet = Fleet::start(&store, 1, 1, 1).await;
        let (queued, created) = pickup(&store, samples).await;
        fleet.stop().await;
        for (name, s) in [("queued", &queued), ("created", &created)] {
            let mut from_return: Vec<Duration> = s.iter().map(|x| x.0).collect();
            let mut from_call: Vec<Duration> = s.iter().map(|x| x.1).collect();
            from_return.sort();
            from_call.sort();
            println!(
                "ferry pickup ({name}): from append returned p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; from append called p50 {:.2} ms, p99 {:.2} ms",
                ms(quantile(&from_return, 0.5)),
                ms(quantile(&from_return, 0.99)),
                ms(quantile(&from_return, 1.0)),
                ms(quantile(&from_call, 0.5)),
                ms(quantile(&from_call, 0.99)),
            );
            for (what, q) in [("p50_ms", 0.5), ("p99_ms", 0.99)] {
                result(
                    &format!("sqlite.pickup.{name}.{what}"),
                    ms(quantile(&from_return, q)),
                    "ms",
                );
            }
        }
    });

    for (coordinators, agents) in [(1usize, 1usize), (2, 2)] {
        println!("\n== dispatch throughput (sqlite): {n} no-op jobs, {coordinators} coordinator(s) + {agents} agent(s) (concurrency 50), in this process ==");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("temporary directory");
            let store = open(dir.path()).await;
            let fleet = Fleet::start(&store, coordinators, agents, 50).await;
            let cpu0 = process_cpu();
            let t0 = Instant::now();
            let produced = produce(&store, n).await;
            let elapsed = t0.elapsed().as_secs_f64();
            let cpu = process_cpu() - cpu0;
            fleet.stop().await;
            let view = ferry::replay::rebuild(&*store).await.expect("replay");
            let succeeded = view
                .jobs
                .values()
                .filter(|j| j.phase == JobPhase::Succeeded)
                .count();
            let rate = succeeded as f64 / elapsed;
            let steps = succeeded.max(1) as f64;
            println!(
                "ferry: {succeeded}/{produced} jobs succeeded in {elapsed:.2} s: {rate:.0} steps/s end to end (producer included)"
            );
            println!(
                "CPU µs per step, whole process (roles, store, producer): {:.1}; cores busy {:.2}",
                cpu.as_secs_f64() * 1e6 / steps,
                cpu.as_secs_f64() / elapsed,
            );
            let tag = format!("c{coordinators}a{agents}");
            result(&format!("sqlite.dispatch.{tag}.steps_per_s"), rate, "steps/s");
            result(
                &format!("sqlite.dispatch.{tag}.cpu_us_per_step"),
                cpu.as_secs_f64() * 1e6 / steps,
                "us",
            );
            assert_eq!(succeeded, n, "every job succeeded");
        });
    }
}

/// A fresh store in `dir`, with the observer group created before any job is appended.
async fn open(dir: &Path) -> Arc<SqliteStore> {
    let store = Arc::new(SqliteStore::open(&dir.join("ferry.db")).expect("open the sqlite store"));
    store.ensure_group(OBSERVER).await.expect("observer group");
    store
}

/// Coordinators and agents running in this process on the shared store.
struct Fleet {
    stop: watch::Sender<bool>,
    roles: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    async fn start(
        store: &Arc<SqliteStore>,
        coordinators: usize,
        agents: usize,
        concurrency: usize,
    ) -> Fleet {
        let (stop, rx) = watch::channel(false);
        let mut roles = Vec::new();
        for i in 0..coordinators {
            let opts = ferry::coordinator::Options {
                consumer: format!("bench-c{i}"),
                ..Default::default()
            };
            let (store, rx): (Arc<dyn Store>, _) = (store.clone(), rx.clone());
            roles.push(tokio::spawn(async move {
                ferry::coordinator::run(store, opts, ferry::app::until(rx))
                    .await
                    .expect("coordinator");
            }));
        }
        for i in 0..agents {
            let mut opts = ferry::agent::Options::new(&format!("bench-a{i}"), &[POOL]);
            opts.concurrency = concurrency;
            let (store, rx): (Arc<dyn Store>, _) = (store.clone(), rx.clone());
            roles.push(tokio::spawn(async move {
                ferry::agent::run(store, opts, ferry::app::until(rx))
                    .await
                    .expect("agent");
            }));
        }
        // Every agent joined: the roles sit in their blocking reads.
        let deadline = Instant::now() + Duration::from_secs(30);
        while store
            .read_stream(&StreamId::Agents, 0)
            .await
            .map(|s| s.len())
            .unwrap_or(0)
            < agents
        {
            assert!(Instant::now() < deadline, "the fleet did not start in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        Fleet { stop, roles }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for r in self.roles {
            r.await.expect("a role panicked");
        }
    }
}

async fn pickup(store: &Arc<SqliteStore>, samples: usize) -> (Samples, Samples) {
    let started = started_kind();
    let (mut queued, mut created) = (Vec::new(), Vec::new());
    let warmup = 20;
    // Start observing from here: skip what the fleet wrote while starting.
    while !store
        .read_new(OBSERVER, "bench", 1024, Duration::ZERO)
        .await
        .expect("observe")
        .is_empty()
    {}
    for i in 0..(samples + warmup) * 2 {
        let (job, event) = noop_job();
        let direct = i % 2 == 0;
        let mut events = vec![event];
        if direct {
            events.push(
                StepQueued {
                    step: StepId::new("noop"),
                    attempt: 1,
                    pool: POOL.into(),
                    priority: 0,
                }
                .into(),
            );
        }
        let stream = StreamId::Job(job).name();
        let t_call = Instant::now();
        store
            .append(Append::new(StreamId::Job(job), events).expect(0))
            .await
            .expect("append the job");
        let t_return = Instant::now();
        let seen = 'watch: loop {
            let got = store
                .read_new(OBSERVER, "bench", 1024, Duration::from_secs(5))
                .await
                .expect("observe");
            let now = Instant::now();
            assert!(!got.is_empty(), "job {job}: no StepStarted within 5 s");
            if got
                .iter()
                .any(|e| e.envelope.stream == stream && e.envelope.kind == started)
            {
                break 'watch now;
            }
        };
        if i >= warmup * 2 {
            let sample = (seen - t_return, seen - t_call);
            if direct {
                queued.push(sample);
            } else {
                created.push(sample);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (queued, created)
}

/// Appends `n` no-op jobs (64 in flight) and waits until the log holds their 6 events each,
/// polled every 5 ms (bounded to 150 s). Returns the jobs appended.
async fn produce(store: &Arc<SqliteStore>, n: usize) -> usize {
    // Start counting after what the fleet wrote while starting (AgentJoined).
    let mut after: Option<LogPos> = None;
    loop {
        let page = store
            .read_log(after.as_ref(), 4096)
            .await
            .expect("read the log");
        match page.last() {
            Some(last) => after = Some(last.pos.clone()),
            None => break,
        }
    }
    let inflight = 64;
    let mut tasks = Vec::new();
    for w in 0..inflight {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut count = 0;
            for _ in (w..n).step_by(inflight) {
                let (job, created) = noop_job();
                store
                    .append(Append::new(StreamId::Job(job), vec![created]).expect(0))
                    .await
                    .expect("append a job");
                count += 1;
            }
            count
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut seen = 0usize;
    while seen < 6 * n && Instant::now() < deadline {
        let page = store
            .read_log(after.as_ref(), 4096)
            .await
            .expect("read the log");
        match page.last() {
            Some(last) => {
                after = Some(last.pos.clone());
                seen += page
                    .iter()
                    .filter(|e| e.envelope.stream.starts_with("job:"))
                    .count();
            }
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let mut produced = 0;
    for t in tasks {
        produced += t.await.expect("producer");
    }
    produced
}
