//! The in-process harness: the coordinators and agents run **inside this process** on one shared
//! store handle, as `ferry up` runs them on one machine, with this process also the producer and
//! the observer. The harness only sees the storage ports (`Arc<dyn Store>`), so it runs
//! unchanged against either backend.
//!
//! - `FERRY_BENCH_STORE=sqlite cargo bench --bench dispatch`: the embedded store only, a fresh
//!   SQLite file per phase (WAL, `synchronous = FULL`, on the disk that holds the temporary
//!   directory); pickup, then throughput with 1 + 1 and 2 + 2 roles.
//! - `FERRY_BENCH_STORE=both cargo bench --bench dispatch`: the **same** harness against the
//!   embedded store and against private redis-servers, back to back in one run: SQLite, Redis
//!   without persistence, Redis with `appendonly yes` + `appendfsync everysec`, Redis with
//!   `appendfsync always` (each server started fresh, in a temporary directory on the same disk
//!   as the SQLite file). 1 coordinator + 1 agent; at the end one table with every figure and its
//!   ratio to SQLite's. `DISPATCH_ROUNDS` (default 2) repeats the four, the order reversed every
//!   other round, so that a drift of the machine's load shows.
//!
//! There is no per-process CPU split: CPU is this whole process's (roles, producer, observer
//! and, for SQLite, the store itself), plus for Redis the server's (`INFO cpu`).
//!
//! 0. **One write** (`both` only), before any role runs: 200 sequential appends of a new job's
//!    `JobCreated`, each one write (a committing transaction, so one fsync, on SQLite; one
//!    script call on Redis, plus an fsync before the reply with `appendfsync always`).
//! 1. **Pickup latency** (1 coordinator, 1 agent with concurrency 1): append one job, then a
//!    blocking `read_new` on an observer consumer group until the job's `StepStarted` shows,
//!    then sleep 5 ms. The same two kinds as the multi-process Redis run: *queued*
//!    (`[JobCreated, StepQueued]` in one append, the agent's share) and *created*
//!    (`[JobCreated]` alone, through the coordinator). Each `read_new` is itself a write on both
//!    stores (it records the delivery: `XREADGROUP`, or a committing transaction on SQLite).
//! 2. **Throughput**: N no-op jobs appended with 64 in flight while the roles run (agents with
//!    concurrency 50), until the global log holds every job's 6 events (read with `read_log`
//!    every 5 ms, as the Redis run polls `XLEN`); then a replay checks that every job
//!    succeeded.

use super::{noop_job, started_kind, Samples, NS, POOL};
use crate::support::{ms, process_cpu, quantile, result, RedisServer};
use ferry::domain::JobPhase;
use ferry::store::redis::RedisStore;
use ferry::store::sqlite::SqliteStore;
use ferry::store::{Append, LogPos, Store, StreamId};
use ferry_proto::{StepId, StepQueued};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The feed group the bench observes the log through (the roles use their own).
const OBSERVER: &str = "bench-observer";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn loadavg() -> String {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

/// `FERRY_BENCH_STORE=sqlite`.
pub fn sqlite_main(samples: usize, n: usize) {
    println!(
        "machine: {} cores (shared, noisy); loadavg {}; store: sqlite (WAL, synchronous = FULL), roles in this process",
        cores(),
        loadavg(),
    );
    let rt = runtime();
    let host = Host::start(Backend::Sqlite);

    println!("\n== pickup latency (sqlite): 1 coordinator + 1 agent (concurrency 1), in this process, {samples} samples per kind ==");
    let pickup = rt.block_on(pickup_phase(&host, samples));
    pickup.print();
    for (name, q) in [("queued", &pickup.queued), ("created", &pickup.created)] {
        result(&format!("sqlite.pickup.{name}.p50_ms"), q.p50, "ms");
        result(&format!("sqlite.pickup.{name}.p99_ms"), q.p99, "ms");
    }

    for (coordinators, agents) in [(1usize, 1usize), (2, 2)] {
        println!("\n== dispatch throughput (sqlite): {n} no-op jobs, {coordinators} coordinator(s) + {agents} agent(s) (concurrency 50), in this process ==");
        let t = rt.block_on(throughput_phase(&host, coordinators, agents, n));
        t.print();
        let tag = format!("c{coordinators}a{agents}");
        result(
            &format!("sqlite.dispatch.{tag}.steps_per_s"),
            t.rate(),
            "steps/s",
        );
        result(
            &format!("sqlite.dispatch.{tag}.cpu_us_per_step"),
            t.cpu_per_step(),
            "us",
        );
        assert_eq!(t.succeeded, n, "every job succeeded");
    }
}

/// `FERRY_BENCH_STORE=both`.
pub fn both_main(samples: usize, n: usize, rounds: usize) {
    let backends = [
        Backend::Sqlite,
        Backend::Redis(Aof::Off),
        Backend::Redis(Aof::Everysec),
        Backend::Redis(Aof::Always),
    ];
    let when = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M:%S UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let redis_version = {
        let server = RedisServer::start();
        server.info().version
    };
    println!(
        "machine: {} cores (shared, noisy); loadavg {}; started {when}; redis-server {redis_version}",
        cores(),
        loadavg(),
    );
    println!(
        "same in-process harness for every store: roles in this process on one store handle (as `ferry up`), 1 coordinator + 1 agent; temporary files under {}",
        std::env::temp_dir().display()
    );
    println!("{samples} pickup samples per kind, {n} jobs for throughput, {rounds} round(s)");
    let rt = runtime();
    let mut rows: Vec<Row> = Vec::new();
    for round in 1..=rounds {
        let mut order = backends.to_vec();
        if round % 2 == 0 {
            order.reverse();
        }
        for backend in order {
            let host = Host::start(backend);
            let load_before = loadavg();
            println!(
                "\n=== round {round}: {} ({}) — loadavg {load_before} ===",
                backend.label(),
                host.describe()
            );
            let write = rt.block_on(write_phase(&host));
            println!(
                "one write (sequential appends of a new job, no roles running): p50 {:.3} ms, p99 {:.3} ms",
                write.p50, write.p99
            );
            println!("-- pickup latency: 1 coordinator + 1 agent (concurrency 1), {samples} samples per kind");
            let pickup = rt.block_on(pickup_phase(&host, samples));
            pickup.print();
            println!(
                "-- dispatch throughput: {n} no-op jobs, 1 coordinator + 1 agent (concurrency 50)"
            );
            let throughput = rt.block_on(throughput_phase(&host, 1, 1, n));
            throughput.print();
            assert_eq!(throughput.succeeded, n, "every job succeeded");
            rows.push(Row {
                round,
                backend,
                write,
                pickup,
                throughput,
                load: format!("{load_before} → {}", loadavg()),
            });
        }
    }
    summary(&rows);
}

/// What a store is in the `both` run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Redis(Aof),
}

/// The Redis server's append-only file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Aof {
    Off,
    Everysec,
    Always,
}

impl Backend {
    fn label(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Redis(Aof::Off) => "redis",
            Backend::Redis(Aof::Everysec) => "redis+aof-everysec",
            Backend::Redis(Aof::Always) => "redis+aof-always",
        }
    }

    /// The `RESULT` name part.
    fn tag(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Redis(Aof::Off) => "redis_noaof",
            Backend::Redis(Aof::Everysec) => "redis_aof_everysec",
            Backend::Redis(Aof::Always) => "redis_aof_always",
        }
    }
}

/// Where a backend's data lives while it is measured: a temporary directory for SQLite files,
/// or a private redis-server.
enum Host {
    Sqlite(tempfile::TempDir),
    Redis(RedisServer),
}

impl Host {
    fn start(backend: Backend) -> Host {
        match backend {
            Backend::Sqlite => {
                Host::Sqlite(tempfile::tempdir().expect("temporary directory for sqlite"))
            }
            Backend::Redis(Aof::Off) => Host::Redis(RedisServer::start()),
            Backend::Redis(Aof::Everysec) => Host::Redis(RedisServer::start_aof("everysec")),
            Backend::Redis(Aof::Always) => Host::Redis(RedisServer::start_aof("always")),
        }
    }

    fn describe(&self) -> String {
        match self {
            Host::Sqlite(_) => {
                "embedded, WAL, synchronous = FULL: one fsync per write transaction".to_string()
            }
            Host::Redis(s) => format!(
                "redis-server {} on 127.0.0.1:{}, {}",
                s.info().version,
                s.port,
                s.persistence
            ),
        }
    }

    /// An empty store for one phase (a new file, or the server flushed), with the observer
    /// group created before any job is appended.
    async fn fresh(&self, phase: &str) -> Arc<dyn Store> {
        let store: Arc<dyn Store> = match self {
            Host::Sqlite(dir) => Arc::new(
                SqliteStore::open(&dir.path().join(format!("{phase}.db")))
                    .expect("open the sqlite store"),
            ),
            Host::Redis(server) => {
                server.flush();
                Arc::new(
                    RedisStore::connect(&server.url(), NS)
                        .await
                        .expect("connect to redis"),
                )
            }
        };
        store.ensure_group(OBSERVER).await.expect("observer group");
        store
    }

    /// The server's CPU seconds so far (Redis only).
    fn server_cpu(&self) -> Option<f64> {
        match self {
            Host::Sqlite(_) => None,
            Host::Redis(server) => Some(server.info().cpu_s),
        }
    }
}

/// p50 / p99 / max in ms.
#[derive(Clone, Copy, Debug, Default)]
struct Quantiles {
    p50: f64,
    p99: f64,
    max: f64,
}

impl Quantiles {
    fn of(mut d: Vec<Duration>) -> Quantiles {
        d.sort();
        Quantiles {
            p50: ms(quantile(&d, 0.5)),
            p99: ms(quantile(&d, 0.99)),
            max: ms(quantile(&d, 1.0)),
        }
    }
}

/// 200 sequential appends of a new job's `JobCreated` (what the producer writes), on a fresh
/// store with no roles running: the cost of one write. (Not a heartbeat: Redis does not write a
/// `ZADD` that leaves the score unchanged to its AOF, and two heartbeats in one millisecond
/// leave it unchanged.)
async fn write_phase(host: &Host) -> Quantiles {
    let store = host.fresh("write").await;
    let mut took = Vec::new();
    for i in 0..220 {
        let (job, created) = noop_job();
        let t = Instant::now();
        store
            .append(Append::new(StreamId::Job(job), vec![created]).expect(0))
            .await
            .expect("append a job");
        if i >= 20 {
            took.push(t.elapsed());
        }
    }
    Quantiles::of(took)
}

struct Pickup {
    /// From the append returned.
    queued: Quantiles,
    created: Quantiles,
    /// From the append called.
    queued_call: Quantiles,
    created_call: Quantiles,
}

impl Pickup {
    fn print(&self) {
        for (name, q, c) in [
            ("queued", &self.queued, &self.queued_call),
            ("created", &self.created, &self.created_call),
        ] {
            println!(
                "ferry pickup ({name}): from append returned p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; from append called p50 {:.2} ms, p99 {:.2} ms",
                q.p50, q.p99, q.max, c.p50, c.p99,
            );
        }
    }
}

async fn pickup_phase(host: &Host, samples: usize) -> Pickup {
    let store = host.fresh("pickup").await;
    let fleet = Fleet::start(&store, 1, 1, 1).await;
    let (queued, created) = pickup(&store, samples).await;
    fleet.stop().await;
    let returned = |s: &Samples| Quantiles::of(s.iter().map(|x| x.0).collect());
    let called = |s: &Samples| Quantiles::of(s.iter().map(|x| x.1).collect());
    Pickup {
        queued: returned(&queued),
        created: returned(&created),
        queued_call: called(&queued),
        created_call: called(&created),
    }
}

struct Throughput {
    succeeded: usize,
    produced: usize,
    elapsed: f64,
    /// This process.
    cpu: Duration,
    /// The redis-server's, seconds.
    server_cpu: Option<f64>,
}

impl Throughput {
    fn rate(&self) -> f64 {
        self.succeeded as f64 / self.elapsed
    }

    fn steps(&self) -> f64 {
        self.succeeded.max(1) as f64
    }

    fn cpu_per_step(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.steps()
    }

    fn server_cpu_per_step(&self) -> Option<f64> {
        self.server_cpu.map(|s| s * 1e6 / self.steps())
    }

    fn print(&self) {
        println!(
            "ferry: {}/{} jobs succeeded in {:.2} s: {:.0} steps/s end to end (producer included)",
            self.succeeded,
            self.produced,
            self.elapsed,
            self.rate()
        );
        let server = match self.server_cpu {
            Some(s) => format!(
                "; redis-server {:.1} µs per step, {:.2} cores busy",
                s * 1e6 / self.steps(),
                s / self.elapsed
            ),
            None => String::new(),
        };
        println!(
            "CPU: this process (roles, producer, observer{}) {:.1} µs per step, {:.2} cores busy{server}",
            if self.server_cpu.is_none() {
                ", store"
            } else {
                ""
            },
            self.cpu_per_step(),
            self.cpu.as_secs_f64() / self.elapsed,
        );
    }
}

async fn throughput_phase(host: &Host, coordinators: usize, agents: usize, n: usize) -> Throughput {
    let store = host
        .fresh(&format!("throughput-c{coordinators}a{agents}"))
        .await;
    let fleet = Fleet::start(&store, coordinators, agents, 50).await;
    let cpu0 = process_cpu();
    let server0 = host.server_cpu();
    let t0 = Instant::now();
    let produced = produce(&store, n).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let cpu = process_cpu() - cpu0;
    let server_cpu = host.server_cpu().zip(server0).map(|(b, a)| b - a);
    fleet.stop().await;
    let view = ferry::replay::rebuild(&*store).await.expect("replay");
    let succeeded = view
        .jobs
        .values()
        .filter(|j| j.phase == JobPhase::Succeeded)
        .count();
    Throughput {
        succeeded,
        produced,
        elapsed,
        cpu,
        server_cpu,
    }
}

/// One backend's figures in one round.
struct Row {
    round: usize,
    backend: Backend,
    write: Quantiles,
    pickup: Pickup,
    throughput: Throughput,
    load: String,
}

/// Prints every row, its ratio to the same round's SQLite row, a Markdown table, and the
/// `RESULT` lines.
fn summary(rows: &[Row]) {
    println!("\n== side by side (1 coordinator + 1 agent, roles in this process) ==");
    let header = "| Round | Store | One write p50 / p99 | Pickup queued → StepStarted p50 / p99 | Pickup created → StepStarted p50 / p99 | Throughput | CPU per step: process + server | Throughput ÷ SQLite | Pickup queued p50 ÷ SQLite | Load (1-min avg) before → after |";
    println!("{header}");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let base = rows
            .iter()
            .find(|r| r.round == row.round && r.backend == Backend::Sqlite)
            .expect("every round measures sqlite");
        let t = &row.throughput;
        let cpu = match t.server_cpu_per_step() {
            Some(s) => format!("{:.0} + {:.0} µs", t.cpu_per_step(), s),
            None => format!("{:.0} µs (store inside)", t.cpu_per_step()),
        };
        println!(
            "| {} | {} | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:.0} steps/s | {cpu} | {:.2}× | {:.2}× | {} |",
            row.round,
            row.backend.label(),
            row.write.p50,
            row.write.p99,
            row.pickup.queued.p50,
            row.pickup.queued.p99,
            row.pickup.created.p50,
            row.pickup.created.p99,
            t.rate(),
            t.rate() / base.throughput.rate(),
            row.pickup.queued.p50 / base.pickup.queued.p50,
            row.load,
        );
    }
    println!();
    for row in rows {
        let tag = format!("both.r{}.{}", row.round, row.backend.tag());
        result(&format!("{tag}.write.p50_ms"), row.write.p50, "ms");
        result(&format!("{tag}.write.p99_ms"), row.write.p99, "ms");
        for (name, q) in [
            ("queued", &row.pickup.queued),
            ("created", &row.pickup.created),
        ] {
            result(&format!("{tag}.pickup.{name}.p50_ms"), q.p50, "ms");
            result(&format!("{tag}.pickup.{name}.p99_ms"), q.p99, "ms");
        }
        let t = &row.throughput;
        result(&format!("{tag}.c1a1.steps_per_s"), t.rate(), "steps/s");
        result(
            &format!("{tag}.c1a1.process_cpu_us_per_step"),
            t.cpu_per_step(),
            "us",
        );
        if let Some(s) = t.server_cpu_per_step() {
            result(&format!("{tag}.c1a1.server_cpu_us_per_step"), s, "us");
        }
    }
}

/// Coordinators and agents running in this process on the shared store.
struct Fleet {
    stop: watch::Sender<bool>,
    roles: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    async fn start(
        store: &Arc<dyn Store>,
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
            let (store, rx) = (store.clone(), rx.clone());
            roles.push(tokio::spawn(async move {
                ferry::coordinator::run(store, opts, ferry::app::until(rx))
                    .await
                    .expect("coordinator");
            }));
        }
        for i in 0..agents {
            let mut opts = ferry::agent::Options::new(&format!("bench-a{i}"), &[POOL]);
            opts.concurrency = concurrency;
            let (store, rx) = (store.clone(), rx.clone());
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

async fn pickup(store: &Arc<dyn Store>, samples: usize) -> (Samples, Samples) {
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
/// polled every 5 ms (bounded to 300 s). Returns the jobs appended.
async fn produce(store: &Arc<dyn Store>, n: usize) -> usize {
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
    let deadline = Instant::now() + Duration::from_secs(300);
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
