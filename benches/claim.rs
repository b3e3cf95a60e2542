//! The claim script's rate against a private redis-server, side by side with `redis-benchmark`
//! running the nearest raw primitives on the same server in the same run.
//!
//! `cargo bench --bench claim` (env: `CLAIM_N` steps per phase, default 30000)
//!
//! For 1 and for 8 concurrent clients (each its own connection): FLUSHALL, enqueue N steps by
//! appending `StepQueued` events through `RedisStore` (64 appends in flight), then claim until
//! every queue is empty, timing the claims only. Then, on the same server, `redis-benchmark`
//! with the same client count: `ZADD` (random members), `ZPOPMIN` (its built-in test), and
//! `EVAL "return 1" 0` (the floor of any script call). Ratios are ferry / reference.

#[path = "support/mod.rs"]
mod support;

use ferry::store::redis::RedisStore;
use ferry::store::EventLog;
use ferry::store::{Append, StreamId, WorkQueue};
use ferry_proto::{AgentId, JobId, StepId, StepQueued};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{result, RedisServer};

const POOL: &str = "default";
const NS: &str = "bench";

fn main() {
    let n: usize = std::env::var("CLAIM_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30_000);
    let server = RedisServer::start();
    support::print_machine(&server);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let url = server.url();
    for clients in [1usize, 8] {
        println!("\n== claim, {clients} client(s), {n} steps ==");
        server.flush();
        let (enqueue_rate, claimed, claim_rate, delta) =
            rt.block_on(ferry_phase(&url, &server, n, clients));
        assert_eq!(claimed, n, "every queued step is claimed exactly once");
        let evalsha = delta.commands.get("evalsha").copied().unwrap_or((0, 0));
        println!("ferry enqueue (append StepQueued, 64 in flight): {enqueue_rate:.0} steps/s");
        println!(
            "ferry claim: {claim_rate:.0} claims/s; redis: {:.1} µs CPU per claim, claim script {:.1} µs per call (commandstats), {:.2} round trips per claim",
            delta.cpu_s * 1e6 / n as f64,
            evalsha.1 as f64 / evalsha.0.max(1) as f64,
            // One claim per call: the claim script, then the adapter's XRANGE of the job's
            // stream, two round trips per claim.
            delta.round_trips(&["info"]) as f64 / n as f64,
        );
        delta.print_breakdown(n as f64, "claim", &["info"]);

        server.flush();
        let c = clients.to_string();
        let reqs = "100000";
        let zadd = server.benchmark_one(&[
            "-n",
            reqs,
            "-c",
            &c,
            "-P",
            "1",
            "-r",
            "1000000",
            "ZADD",
            "z",
            "__rand_int__",
            "m__rand_int__",
        ]);
        server.flush();
        let zpop = server
            .benchmark(&["-n", reqs, "-c", &c, "-P", "1", "-t", "zadd,zpopmin"])
            .into_iter()
            .find(|(name, _)| name.eq_ignore_ascii_case("zpopmin"))
            .map(|(_, rps)| rps)
            .unwrap_or(f64::NAN);
        server.flush();
        let eval =
            server.benchmark_one(&["-n", reqs, "-c", &c, "-P", "1", "EVAL", "return 1", "0"]);
        println!("redis-benchmark, same server, -c {clients} -P 1:");
        println!(
            "  ZADD z __rand_int__ m__rand_int__ : {zadd:.0}/s  -> claim = {:.3} x",
            claim_rate / zadd
        );
        println!(
            "  ZPOPMIN (built-in -t zpopmin)      : {zpop:.0}/s  -> claim = {:.3} x",
            claim_rate / zpop
        );
        println!(
            "  EVAL \"return 1\" 0                 : {eval:.0}/s  -> claim = {:.3} x",
            claim_rate / eval
        );
        result(
            &format!("claim.c{clients}.claims_per_s"),
            claim_rate,
            "claims/s",
        );
        result(
            &format!("claim.c{clients}.enqueue_per_s"),
            enqueue_rate,
            "steps/s",
        );
        result(&format!("claim.c{clients}.ref_zadd"), zadd, "ops/s");
        result(&format!("claim.c{clients}.ref_zpopmin"), zpop, "ops/s");
        result(&format!("claim.c{clients}.ref_eval"), eval, "ops/s");
        result(
            &format!("claim.c{clients}.ratio_zpopmin"),
            claim_rate / zpop,
            "x",
        );
        result(
            &format!("claim.c{clients}.ratio_eval"),
            claim_rate / eval,
            "x",
        );
        result(
            &format!("claim.c{clients}.redis_cpu_us_per_claim"),
            delta.cpu_s * 1e6 / n as f64,
            "us",
        );
    }

    let history: usize = std::env::var("CLAIM_HISTORY")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7_000);
    println!("\n== claim of a step whose job already holds {history} events (a deploy to many hosts), 5 jobs ==");
    server.flush();
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(rt.block_on(long_claim(&url, history)));
    }
    held.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (script, page, wall) = held[2];
    println!(
        "median of 5: the claim script held the server {script:.0} µs, the longest XRANGE page after it {page:.0} µs; the whole claim took {wall:.1} ms"
    );
    result("claim.long_history.script_us", script, "us");
    result("claim.long_history.longest_page_us", page, "us");
    result("claim.long_history.claim_ms", wall, "ms");
}

/// One job with `history` events (checkpoints of a deploy, ~100 bytes each) and a queued step,
/// claimed with the slowlog recording every command: the claim script's time, the longest
/// client `XRANGE` after it (the adapter reading the stream, a page of 1024 entries at a time),
/// and the claim's wall time in ms.
async fn long_claim(url: &str, history: usize) -> (f64, f64, f64) {
    use ferry_proto::DeployHostCheckpoint;
    let store = RedisStore::connect(url, NS).await.expect("connect");
    let job = JobId::new();
    let events: Vec<ferry_proto::Event> = (0..history)
        .map(|i| {
            DeployHostCheckpoint {
                step: StepId::new("deploy:production"),
                attempt: 1,
                host: format!("web-{i:05}.example.internal"),
                phase: "uploaded".into(),
            }
            .into()
        })
        .collect();
    for chunk in events.chunks(500) {
        store
            .append(Append::new(StreamId::Job(job), chunk.to_vec()))
            .await
            .expect("history");
    }
    let queued = StepQueued {
        step: StepId::new("deploy:staging"),
        attempt: 1,
        pool: "long".into(),
        priority: 0,
    };
    store
        .append(Append::new(StreamId::Job(job), vec![queued.into()]))
        .await
        .expect("enqueue");
    let client = redis::Client::open(url).expect("url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    support::slowlog_start(&mut conn, 100_000).await;
    let t0 = Instant::now();
    let claim = store
        .claim(
            &["long".into()],
            &AgentId::new("deployer"),
            Duration::from_secs(60),
        )
        .await
        .expect("claim")
        .expect("a step");
    let wall = t0.elapsed().as_secs_f64() * 1e3;
    assert_eq!(claim.history.len(), history + 2, "the whole history");
    let (mut script, mut page) = (0f64, 0f64);
    for (us, args) in support::slowlog_take(&mut conn).await {
        let arg = |i: usize| args.get(i).map(|a| a.to_lowercase());
        match arg(0).as_deref() {
            Some("evalsha") => script = script.max(us as f64),
            // the adapter's reads of the stream, a page each
            Some("xrange") => page = page.max(us as f64),
            _ => {}
        }
    }
    (script, page, wall)
}

/// Enqueues `n` steps, then claims them all with `clients` connections. Returns the enqueue
/// rate, the number claimed, the claim rate and the server's INFO delta over the claims.
async fn ferry_phase(
    url: &str,
    server: &RedisServer,
    n: usize,
    clients: usize,
) -> (f64, usize, f64, support::Delta) {
    let store = Arc::new(RedisStore::connect(url, NS).await.expect("connect"));
    // Enqueue: one job per step, 64 appends in flight.
    let t0 = Instant::now();
    let inflight = 64;
    let mut tasks = Vec::new();
    for w in 0..inflight {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for _ in (w..n).step_by(inflight) {
                let queued = StepQueued {
                    step: StepId::new("build"),
                    attempt: 1,
                    pool: POOL.into(),
                    priority: 0,
                };
                store
                    .append(Append::new(
                        StreamId::Job(JobId::new()),
                        vec![queued.into()],
                    ))
                    .await
                    .expect("enqueue");
            }
        }));
    }
    for t in tasks {
        t.await.expect("enqueue task");
    }
    let enqueue_rate = n as f64 / t0.elapsed().as_secs_f64();

    let mut stores = Vec::new();
    for _ in 0..clients {
        stores.push(Arc::new(
            RedisStore::connect(url, NS).await.expect("connect"),
        ));
    }
    // Load the script on the server outside the measurement (a claim on an empty pool).
    stores[0]
        .claim(
            &["warmup".into()],
            &AgentId::new("warm"),
            Duration::from_secs(60),
        )
        .await
        .expect("warm-up claim");
    let before = server.info();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(60);
    let mut tasks = Vec::new();
    for (i, store) in stores.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let pools = vec![POOL.to_string()];
            let agent = AgentId::new(format!("agent-{i}"));
            let mut count = 0usize;
            while Instant::now() < deadline {
                match store
                    .claim(&pools, &agent, Duration::from_secs(600))
                    .await
                    .expect("claim")
                {
                    Some(_) => count += 1,
                    None => break,
                }
            }
            count
        }));
    }
    let mut claimed = 0;
    for t in tasks {
        claimed += t.await.expect("claim task");
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let delta = before.delta(&server.info());
    (enqueue_rate, claimed, claimed as f64 / elapsed, delta)
}
