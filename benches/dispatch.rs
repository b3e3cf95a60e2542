//! End-to-end dispatch of no-op steps: a private redis-server, `ferry coordinator` and
//! `ferry agent` processes (the real binary, each in its own process), and this bench as the
//! producer and observer.
//!
//! `cargo bench --bench dispatch` (env: `DISPATCH_SAMPLES` pickup samples, default 500;
//! `DISPATCH_N` jobs per throughput phase, default 10000; `FERRY_BIN` the ferry binary,
//! default the one cargo builds for this bench, `CARGO_BIN_EXE_ferry`;
//! `FERRY_BENCH_REDIS_ARGS` more arguments for the private redis-server, e.g.
//! `--stream-node-max-bytes 2048`)
//!
//! 1. **Pickup latency**, idle fleet (1 coordinator, 1 agent with concurrency 1, both in their
//!    own processes). Per sample: append one job and watch its stream with a blocking `XREAD`
//!    until `StepStarted` shows, then sleep 5 ms. Two kinds, interleaved:
//!    - *queued*: `[JobCreated, StepQueued]` in one append (what the coordinator writes for a
//!      new job): enqueue → StepStarted, the agent's share alone;
//!    - *created*: `[JobCreated]` alone: the coordinator plans and queues it, then the agent
//!      starts it: the whole dispatch path.
//!
//!    Latency is measured from the append returning (and from it being called) to the
//!    observer's `XREAD` returning the StepStarted entry, on this process's monotonic clock.
//! 2. **Throughput**: N jobs (`JobCreated` with one `StepSpec::Noop` step), appended by this
//!    process with 64 in flight while coordinators and agents (concurrency 50 each) run; from
//!    the first append until the global log holds every job's 6 events (JobCreated, StepQueued,
//!    StepClaimed, StepStarted, StepSucceeded, JobSucceeded), polled with `XLEN` every 5 ms.
//!    Then a replay checks that every job succeeded. Redis CPU (`INFO cpu`) and commands
//!    (`INFO commandstats`) are diffed over the same window and divided by the steps.
//!    The same again on a **pre-filled** log, BullMQ's definition of its processing rate (a
//!    pre-filled queue, workers started together): the fleet starts and sits idle, the
//!    coordinators are stopped with SIGSTOP, the N jobs are appended, and the clock starts
//!    when the coordinators get SIGCONT; the producer's work is outside the window. Results
//!    are named `dispatch.prefilled.*`.
//!    With `DISPATCH_SLOWLOG` set, Redis records every command during each throughput phase
//!    (`slowlog-log-slower-than 0`) and the bench prints the time per step of each script,
//!    named by its first key (`{ns}:log` = append, `{ns}:items` = claim, `{ns}:leases` =
//!    sweep, `{ns}:delayed` = promote, `{ns}:agents` = heartbeat and agent expiry,
//!    `{ns}:lock:*` = leader locks) and of each command; recording costs Redis time itself,
//!    so the other figures of such a run are not comparable.
//! 3. `redis-benchmark -n 100000 XADD s * f v` and `ZADD` (50 clients, the BullMQ peer's raw
//!    figures) on the same server, so every figure is also a ratio to raw Redis.
//!
//! Unset or `FERRY_BENCH_STORE=redis`, it runs as described above. Two more modes run the roles
//! inside this process instead, as `ferry up` does on one machine (see `dispatch/in_process.rs`):
//!
//! - `FERRY_BENCH_STORE=sqlite`: 1. and 2. against the embedded SQLite store.
//! - `FERRY_BENCH_STORE=both`: the same in-process harness against the embedded store and against
//!   private redis-servers (no persistence, AOF `everysec`, AOF `always`), back to back in one
//!   run, 1 coordinator + 1 agent, with every figure's ratio to SQLite's. Its defaults are
//!   smaller (`DISPATCH_SAMPLES` 300, `DISPATCH_N` 3000) so that a run takes a few minutes;
//!   `DISPATCH_ROUNDS` (default 2) repeats it, the order reversed every other round.

#[path = "support/mod.rs"]
mod support;

#[path = "dispatch/in_process.rs"]
mod in_process;

use ferry::domain::JobPhase;
use ferry::store::redis::RedisStore;
use ferry::store::{Append, EventLog, Feed, StreamId};
use ferry_proto::{Event, JobCreated, JobId, StepId, StepQueued, StepStarted};
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{ms, quantile, result, Guarded, RedisServer};

const NS: &str = "bench";
const POOL: &str = "default";

fn main() {
    let samples: usize = env_or("DISPATCH_SAMPLES", 500);
    let n: usize = env_or("DISPATCH_N", 10_000);
    match std::env::var("FERRY_BENCH_STORE").as_deref() {
        Err(_) | Ok("redis") => {}
        Ok("sqlite") => return in_process::sqlite_main(samples, n),
        Ok("both") => {
            return in_process::both_main(
                env_or("DISPATCH_SAMPLES", 300),
                env_or("DISPATCH_N", 3_000),
                env_or("DISPATCH_ROUNDS", 2).max(1),
            )
        }
        Ok(other) => panic!("FERRY_BENCH_STORE={other}: expected redis, sqlite or both"),
    }
    let bin = PathBuf::from(
        std::env::var("FERRY_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_ferry").to_string()),
    );
    assert!(bin.exists(), "ferry binary {} not found", bin.display());
    let server = RedisServer::start();
    support::print_machine(&server);
    println!("ferry binary: {}", bin.display());
    let logs = tempfile::tempdir().expect("log dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let fleet = Fleet {
        bin,
        url: server.url(),
        logs: logs.path().to_path_buf(),
    };

    // 1. Pickup latency.
    println!("\n== pickup latency: 1 coordinator + 1 agent (concurrency 1), own processes, {samples} samples per kind ==");
    server.flush();
    {
        let mut procs = vec![fleet.coordinator(0), fleet.agent(0, 1)];
        rt.block_on(fleet.ready(&mut procs, 1));
        let (queued, created) = rt.block_on(pickup(&fleet.url, samples));
        for (name, s) in [("queued", &queued), ("created", &created)] {
            let mut from_return: Vec<Duration> = s.iter().map(|x| x.0).collect();
            let mut from_call: Vec<Duration> = s.iter().map(|x| x.1).collect();
            from_return.sort();
            from_call.sort();
            let what = match name {
                "queued" => "append [JobCreated, StepQueued] → StepStarted",
                _ => "append [JobCreated] → coordinator queues → StepStarted",
            };
            println!(
                "ferry pickup ({what}): from append returned p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; from append called p50 {:.2} ms, p99 {:.2} ms",
                ms(quantile(&from_return, 0.5)),
                ms(quantile(&from_return, 0.99)),
                ms(quantile(&from_return, 1.0)),
                ms(quantile(&from_call, 0.5)),
                ms(quantile(&from_call, 0.99)),
            );
            result(
                &format!("pickup.{name}.p50_ms"),
                ms(quantile(&from_return, 0.5)),
                "ms",
            );
            result(
                &format!("pickup.{name}.p99_ms"),
                ms(quantile(&from_return, 0.99)),
                "ms",
            );
            result(
                &format!("pickup.{name}.call_p50_ms"),
                ms(quantile(&from_call, 0.5)),
                "ms",
            );
            result(
                &format!("pickup.{name}.call_p99_ms"),
                ms(quantile(&from_call, 0.99)),
                "ms",
            );
        }
        for p in &mut procs {
            assert!(p.alive(), "a role process died:\n{}", p.log_tail());
        }
    }

    // 2. Throughput: producer included, then on a pre-filled log (BullMQ's definition).
    for prefilled in [false, true] {
        for (coordinators, agents) in [(1usize, 1usize), (2, 2)] {
            rt.block_on(throughput(
                &fleet,
                &server,
                n,
                coordinators,
                agents,
                prefilled,
            ));
        }
    }

    // 3. Raw Redis on the same server.
    server.flush();
    let xadd = server.benchmark_one(&["-n", "100000", "XADD", "s", "*", "f", "v"]);
    server.flush();
    let zadd = server.benchmark_one(&[
        "-n",
        "200000",
        "-r",
        "1000000",
        "ZADD",
        "z",
        "__rand_int__",
        "m__rand_int__",
    ]);
    println!(
        "\nredis-benchmark, same server, -c 50 -P 1: XADD s * f v {xadd:.0}/s; ZADD {zadd:.0}/s"
    );
    result("dispatch.ref_xadd", xadd, "ops/s");
    result("dispatch.ref_zadd", zadd, "ops/s");
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Fleet {
    bin: PathBuf,
    url: String,
    logs: PathBuf,
}

impl Fleet {
    fn coordinator(&self, i: usize) -> Guarded {
        let name = format!("bench-c{i}");
        Guarded::spawn(
            &self.bin,
            &["--store", &self.url, "coordinator"],
            &[
                ("FERRY_NAMESPACE", NS),
                ("FERRY_AGENT_NAME", &name),
                ("FERRY_LOG", "warn"),
            ],
            self.logs.join(format!("{name}.log")),
        )
    }

    fn agent(&self, i: usize, concurrency: usize) -> Guarded {
        let name = format!("bench-a{i}");
        Guarded::spawn(
            &self.bin,
            &[
                "--store",
                &self.url,
                "agent",
                "--name",
                &name,
                "--pools",
                POOL,
                "--concurrency",
                &concurrency.to_string(),
            ],
            &[("FERRY_NAMESPACE", NS), ("FERRY_LOG", "warn")],
            self.logs.join(format!("{name}.log")),
        )
    }

    /// Waits until `agents` agents joined and the coordinators' group exists, then a little
    /// more so every process sits in its blocking read.
    async fn ready(&self, procs: &mut [Guarded], agents: usize) {
        let store = RedisStore::connect(&self.url, NS).await.expect("connect");
        let mut conn = client(&self.url).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for p in procs.iter_mut() {
                assert!(p.alive(), "a role process exited:\n{}", p.log_tail());
            }
            let joined = store
                .read_stream(&StreamId::Agents, 0)
                .await
                .map(|s| s.len())
                .unwrap_or(0);
            let groups: redis::Value = redis::cmd("XINFO")
                .arg("GROUPS")
                .arg(format!("{{{NS}}}:log"))
                .query_async(&mut conn)
                .await
                .unwrap_or(redis::Value::Nil);
            let has_group = matches!(&groups, redis::Value::Array(a) if !a.is_empty());
            if joined >= agents && has_group {
                break;
            }
            assert!(Instant::now() < deadline, "the fleet did not start in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn client(url: &str) -> MultiplexedConnection {
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(url)
        .expect("url")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect")
}

fn noop_job() -> (JobId, Event) {
    let job = JobId::new();
    let created = JobCreated {
        trigger: "bench".into(),
        ..ferry::store::conformance::noop_job(job, "v1", POOL, &["noop"])
    };
    (job, created.into())
}

fn started_kind() -> u16 {
    Event::from(StepStarted {
        step: StepId::new("x"),
        attempt: 1,
        agent: ferry_proto::AgentId::new("x"),
    })
    .kind()
}

/// Pickup samples, alternating kinds: (from append returned, from append called).
type Samples = Vec<(Duration, Duration)>;

async fn pickup(url: &str, samples: usize) -> (Samples, Samples) {
    let store = RedisStore::connect(url, NS).await.expect("connect");
    let mut watch = client(url).await;
    let started = started_kind().to_string();
    let (mut queued, mut created) = (Vec::new(), Vec::new());
    let warmup = 20;
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
        let t_call = Instant::now();
        store
            .append(Append::new(StreamId::Job(job), events).expect(0))
            .await
            .expect("append the job");
        let t_return = Instant::now();
        let key = format!("{{{NS}}}:s:job:{job}");
        let mut last = "0-0".to_string();
        let seen = 'watch: loop {
            let reply: Option<StreamReadReply> = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(16)
                .arg("BLOCK")
                .arg(5000)
                .arg("STREAMS")
                .arg(&key)
                .arg(&last)
                .query_async(&mut watch)
                .await
                .expect("xread");
            let Some(reply) = reply else {
                panic!("job {job}: no StepStarted within 5 s");
            };
            let now = Instant::now();
            for entry in reply.keys.into_iter().flat_map(|k| k.ids) {
                // The kind heads the packed header `h` (`k` in entries of the older layout).
                let kind: Option<String> = entry
                    .get::<String>("h")
                    .and_then(|h| h.split('|').next().map(str::to_string))
                    .or_else(|| entry.get("k"));
                if kind.as_deref() == Some(started.as_str()) {
                    break 'watch now;
                }
                last = entry.id;
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

fn xlen(server: &RedisServer) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &server.port.to_string()])
        .args(["XLEN", &format!("{{{NS}}}:log")])
        .output()
        .expect("redis-cli");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Appends `n` no-op jobs, 64 in flight; returns how many were appended.
async fn append_jobs(url: &str, n: usize) -> usize {
    let store = Arc::new(RedisStore::connect(url, NS).await.expect("connect"));
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
    let mut appended = 0;
    for t in tasks {
        appended += t.await.expect("producer");
    }
    appended
}

/// Polls the global log's length every 5 ms until it reaches `target` (bounded to 150 s);
/// returns the polls made.
async fn wait_for_log(url: &str, target: u64) -> u64 {
    let mut conn = client(url).await;
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut polls = 0u64;
    loop {
        let len: u64 = redis::cmd("XLEN")
            .arg(format!("{{{NS}}}:log"))
            .query_async(&mut conn)
            .await
            .expect("xlen");
        polls += 1;
        if len >= target || Instant::now() > deadline {
            return polls;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Jobs that reached `Succeeded`, by a replay of the log.
async fn succeeded(url: &str) -> usize {
    let store = RedisStore::connect(url, NS).await.expect("connect");
    let view = ferry::replay::rebuild(&store).await.expect("replay");
    view.jobs
        .values()
        .filter(|j| j.phase == JobPhase::Succeeded)
        .count()
}

/// One throughput phase: `n` no-op jobs through `coordinators` coordinators and `agents` agents
/// (concurrency 50 each). With `prefilled`, the jobs are appended while the coordinators are
/// stopped (SIGSTOP), and the clock starts when they are continued (SIGCONT): the producer's
/// work is outside the window, as in BullMQ's processing figure (a pre-filled queue, workers
/// started together). Otherwise this process appends them while the fleet runs.
async fn throughput(
    fleet: &Fleet,
    server: &RedisServer,
    n: usize,
    coordinators: usize,
    agents: usize,
    prefilled: bool,
) {
    let how = if prefilled {
        "pre-filled log, coordinators continued together"
    } else {
        "producer included"
    };
    println!("\n== dispatch throughput: {n} no-op jobs, {coordinators} coordinator(s) + {agents} agent(s) (concurrency 50), own processes, {how} ==");
    server.flush();
    let empty = server.info().used_memory;
    let mut procs = Vec::new();
    for i in 0..coordinators {
        procs.push(fleet.coordinator(i));
    }
    for i in 0..agents {
        procs.push(fleet.agent(i, 50));
    }
    fleet.ready(&mut procs, agents).await;
    let base = xlen(server);
    let target = base + 6 * n as u64;
    let mut producer = None;
    if prefilled {
        for c in &procs[..coordinators] {
            c.signal(libc::SIGSTOP);
        }
        let t = Instant::now();
        let appended = append_jobs(&fleet.url, n).await;
        assert_eq!(appended, n, "every job appended");
        println!(
            "pre-filled {n} jobs in {:.2} s ({:.0} appends/s), coordinators stopped",
            t.elapsed().as_secs_f64(),
            n as f64 / t.elapsed().as_secs_f64()
        );
    }
    let slowlog = std::env::var_os("DISPATCH_SLOWLOG").is_some();
    if slowlog {
        support::slowlog_start(&mut client(&fleet.url).await, 2_000_000).await;
    }
    let cpu0: Vec<Duration> = procs.iter().map(Guarded::cpu).collect();
    let bench_cpu0 = support::process_cpu();
    let before = server.info();
    let t0 = Instant::now();
    if prefilled {
        for c in &procs[..coordinators] {
            c.signal(libc::SIGCONT);
        }
    } else {
        let url = fleet.url.clone();
        producer = Some(tokio::spawn(async move { append_jobs(&url, n).await }));
    }
    let polls = wait_for_log(&fleet.url, target).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let delta = before.delta(&server.info());
    let bench_cpu = support::process_cpu() - bench_cpu0;
    let cpu: Vec<Duration> = procs
        .iter()
        .zip(&cpu0)
        .map(|(p, c0)| p.cpu() - *c0)
        .collect();
    if slowlog {
        per_script(&fleet.url, n).await;
    }
    if let Some(producer) = producer {
        assert_eq!(producer.await.expect("producer"), n, "every job appended");
    }
    for p in &mut procs {
        assert!(p.alive(), "a role process died:\n{}", p.log_tail());
    }
    drop(procs);
    let succeeded = succeeded(&fleet.url).await;
    let rate = succeeded as f64 / elapsed;
    // What the finished jobs hold in Redis: their events (in the log and in their streams),
    // the job index, the kept-logs list; no-op steps write no output lines.
    let per_job = server.info().used_memory.saturating_sub(empty) as f64 / n as f64;
    println!("ferry: {succeeded}/{n} jobs succeeded in {elapsed:.2} s: {rate:.0} steps/s end to end ({how})");
    let exclude = ["info", "xlen"];
    let tag = format!(
        "{}c{coordinators}a{agents}",
        if prefilled { "prefilled." } else { "" }
    );
    let steps = succeeded.max(1) as f64;
    // The adapter reads each claimed job's stream with an XRANGE (every step is claimed once),
    // all of a claim call's in one pipeline: commandstats counts them one by one, so one per
    // step comes off (the pipeline's one round trip per claim call is not counted).
    let round_trips = (delta.round_trips(&exclude) as f64 - steps).max(0.0) / steps;
    println!(
        "redis: {:.1} µs CPU per step; {round_trips:.1} round trips per step (client commands, not counting the bench's {polls} XLEN polls and INFO)",
        delta.cpu_s * 1e6 / steps,
    );
    let per = |d: Duration| d.as_secs_f64() * 1e6 / steps;
    let coord_cpu: Duration = cpu[..coordinators].iter().sum();
    let agent_cpu: Duration = cpu[coordinators..].iter().sum();
    println!(
        "CPU µs per step: redis {:.1}, coordinators {:.1}, agents {:.1}, producer/observer (this process) {:.1}; cores busy: redis {:.2}, coordinators {:.2}, agents {:.2}, producer {:.2}",
        delta.cpu_s * 1e6 / steps,
        per(coord_cpu),
        per(agent_cpu),
        per(bench_cpu),
        delta.cpu_s / elapsed,
        coord_cpu.as_secs_f64() / elapsed,
        agent_cpu.as_secs_f64() / elapsed,
        bench_cpu.as_secs_f64() / elapsed,
    );
    result(
        &format!("dispatch.{tag}.coordinator_cpu_us_per_step"),
        per(coord_cpu),
        "us",
    );
    result(
        &format!("dispatch.{tag}.agent_cpu_us_per_step"),
        per(agent_cpu),
        "us",
    );
    delta.print_breakdown(steps, "step", &exclude);
    result(&format!("dispatch.{tag}.steps_per_s"), rate, "steps/s");
    result(
        &format!("dispatch.{tag}.redis_cpu_us_per_step"),
        delta.cpu_s * 1e6 / steps,
        "us",
    );
    result(
        &format!("dispatch.{tag}.round_trips_per_step"),
        round_trips,
        "",
    );
    println!(
        "redis: {per_job:.0} bytes of memory per finished one-step job (used_memory, from empty)"
    );
    result(
        &format!("dispatch.{tag}.redis_bytes_per_job"),
        per_job,
        "bytes",
    );
    // What stays for good once the global log's copy of the events is trimmed (as the sweep
    // leader does after coordinator.keep_feed): every consumer group has handled them all.
    let store = RedisStore::connect(&fleet.url, NS).await.expect("connect");
    let later = ferry::store::now_ms() + 60_000;
    while store.trim_log(later).await.expect("trim the log").deleted > 0 {}
    let kept = server.info().used_memory.saturating_sub(empty) as f64 / n as f64;
    println!(
        "redis: {kept:.0} bytes of memory per finished one-step job once the log's copy is trimmed"
    );
    result(
        &format!("dispatch.{tag}.redis_bytes_per_job_trimmed"),
        kept,
        "bytes",
    );
    assert_eq!(succeeded, n, "every job succeeded");
}

/// With `DISPATCH_SLOWLOG`: every command's time by script (the first key names it), from a
/// slowlog that recorded everything.
async fn per_script(url: &str, steps: usize) {
    let mut by: std::collections::BTreeMap<String, (u64, u64, u64)> = Default::default();
    for (us, args) in support::slowlog_take(&mut client(url).await).await {
        let name = match args.first().map(|a| a.to_lowercase()) {
            Some(c) if c == "evalsha" => {
                format!("evalsha {}", args.get(3).cloned().unwrap_or_default())
            }
            Some(c) => c,
            None => continue,
        };
        let nargs: u64 = args
            .iter()
            .find_map(|a| {
                a.strip_prefix("... (")
                    .and_then(|r| r.split(' ').next())
                    .and_then(|x| x.parse().ok())
            })
            .map(|m: u64| m + 31)
            .unwrap_or(args.len() as u64);
        let slot = by.entry(name).or_default();
        slot.0 += 1;
        slot.1 += us;
        slot.2 += nargs;
    }
    println!("    per script (slowlog, µs per step; calls per step; args per call):");
    for (name, (calls, us, nargs)) in by {
        println!(
            "    {name:40} {:8.2} µs/step {:6.3} calls/step {:6.1} args/call",
            us as f64 / steps as f64,
            calls as f64 / steps as f64,
            nargs as f64 / calls as f64
        );
    }
}
