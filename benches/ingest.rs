//! Webhook ingest over real HTTP: the real gateway router (`ferry::gateway::serve`) on
//! 127.0.0.1:0 over a private redis-server, loaded by K HTTP/1.1 keep-alive connections, side by
//! side with `redis-benchmark` XADD of a comparable payload on the same server in the same run.
//!
//! `cargo bench --bench ingest` (env: `INGEST_N` requests per phase, default 20000;
//! `INGEST_CONNS` comma-separated connection counts, default `8,32`)
//!
//! Bodies are `tests/fixtures/gitlab/tag_push_create.json` with a unique tag, `after` and
//! `checkout_sha` each, so their content keys differ; every request carries the project token
//! (one constant-time token check each) and an `Idempotency-Key`. Every 10th request of a
//! connection re-sends one of its earlier requests (same body and key): a duplicate that must
//! be answered 200 `duplicate: true`. The gateway runs on its own 2-thread runtime, the load
//! generator on another, in this process; both share the 2 cores with redis-server.

#[path = "support/mod.rs"]
mod support;

use ferry::gateway::{serve, GatewayOptions, GatewayState, ProjectHooks, Secret};
use ferry::store::redis::RedisStore;
use ferry::store::Store;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{ms, quantile, result, RedisServer};

const FIXTURE: &str = include_str!("../tests/fixtures/gitlab/tag_push_create.json");
const TOKEN: &str = "bench-token-0123456789";
const NS: &str = "bench";
const WARMUP: usize = 500;

fn main() {
    let n: usize = env_or("INGEST_N", 20_000);
    let conns: Vec<usize> = std::env::var("INGEST_CONNS")
        .unwrap_or_else(|_| "8,32".into())
        .split(',')
        .filter_map(|c| c.trim().parse().ok())
        .collect();
    let server = RedisServer::start();
    support::print_machine(&server);
    let gateway_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gateway")
        .enable_all()
        .build()
        .expect("gateway runtime");
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("load")
        .enable_all()
        .build()
        .expect("load runtime");

    let bodies = bodies(n + WARMUP);
    let body_len = bodies.iter().map(String::len).sum::<usize>() / bodies.len();
    println!(
        "bodies: {} unique tag pushes, {body_len} bytes on average",
        bodies.len()
    );

    for k in conns {
        println!(
            "\n== ingest, {k} keep-alive connections, {n} requests (every 10th a duplicate) =="
        );
        server.flush();
        let url = server.url();
        let (addr, stop) = gateway_rt.block_on(async {
            let store: Arc<dyn Store> =
                Arc::new(RedisStore::connect(&url, NS).await.expect("connect"));
            let project = ProjectHooks {
                id: Some(1),
                webhook_token: Some(Secret::new(TOKEN)),
                ..ProjectHooks::new("jsmith/example")
            };
            let state = GatewayState::new(store, vec![project], GatewayOptions::default())
                .expect("gateway state");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            tokio::spawn(serve(listener, state, async {
                let _ = stopped.await;
            }));
            (addr, stop)
        });
        let endpoint = format!("http://{addr}/hooks/gitlab");

        // Warm-up (script load, connections, allocator), not measured.
        client_rt.block_on(load(&endpoint, &bodies[n..], k, usize::MAX));
        let before = server.info();
        let cpu0 = support::process_cpu();
        let (gw0, load0) = (
            support::threads_cpu("gateway"),
            support::threads_cpu("load"),
        );
        let t0 = Instant::now();
        let outcome = client_rt.block_on(load(&endpoint, &bodies[..n], k, 10));
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu = support::process_cpu() - cpu0;
        let gw = support::threads_cpu("gateway") - gw0;
        let load_cpu = support::threads_cpu("load") - load0;
        let delta = before.delta(&server.info());
        drop(stop);

        let mut lat = outcome.latencies;
        lat.sort();
        let total = outcome.accepted + outcome.duplicates + outcome.other;
        let accepted_rate = outcome.accepted as f64 / elapsed;
        println!(
            "ferry: {total} requests in {elapsed:.2} s: {} accepted (202), {} duplicates (200), {} other",
            outcome.accepted, outcome.duplicates, outcome.other
        );
        println!(
            "ferry: {accepted_rate:.0} accepted webhooks/s ({:.0} requests/s); latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            total as f64 / elapsed,
            ms(quantile(&lat, 0.5)),
            ms(quantile(&lat, 0.99)),
            ms(quantile(&lat, 1.0)),
        );
        let evalsha = delta.commands.get("evalsha").copied().unwrap_or((0, 0));
        println!(
            "redis: {:.1} µs CPU per request, append script {:.1} µs per call, {:.2} round trips per request",
            delta.cpu_s * 1e6 / total as f64,
            evalsha.1 as f64 / evalsha.0.max(1) as f64,
            delta.round_trips(&["info"]) as f64 / total as f64
        );
        println!(
            "bench process (gateway + load generator): {:.0} µs CPU per request, {:.2} cores busy on average",
            cpu.as_secs_f64() * 1e6 / total as f64,
            cpu.as_secs_f64() / elapsed
        );
        println!(
            "  of which gateway runtime threads {:.0} µs, load-generator threads {:.0} µs per request",
            gw.as_secs_f64() * 1e6 / total as f64,
            load_cpu.as_secs_f64() * 1e6 / total as f64
        );
        result(
            &format!("ingest.c{k}.gateway_cpu_us_per_req"),
            gw.as_secs_f64() * 1e6 / total as f64,
            "us",
        );
        delta.print_breakdown(total as f64, "req", &["info"]);
        assert_eq!(outcome.other, 0, "every request is accepted or a duplicate");

        // A stored webhook entry's size, for a comparable XADD payload.
        let entry = entry_size(&server);
        server.flush();
        let payload = "x".repeat(entry);
        let c = k.to_string();
        let xadd = server.benchmark_one(&[
            "-n", "100000", "-c", &c, "-P", "1", "XADD", "s", "*", "p", &payload,
        ]);
        println!(
            "redis-benchmark, same server: XADD s * p <{entry} bytes>, -c {k} -P 1: {xadd:.0}/s -> ferry accepted = {:.3} x",
            accepted_rate / xadd
        );
        result(
            &format!("ingest.c{k}.accepted_per_s"),
            accepted_rate,
            "webhooks/s",
        );
        result(
            &format!("ingest.c{k}.p50_ms"),
            ms(quantile(&lat, 0.5)),
            "ms",
        );
        result(
            &format!("ingest.c{k}.p99_ms"),
            ms(quantile(&lat, 0.99)),
            "ms",
        );
        result(&format!("ingest.c{k}.ref_xadd"), xadd, "ops/s");
        result(
            &format!("ingest.c{k}.ratio_xadd"),
            accepted_rate / xadd,
            "x",
        );
        result(
            &format!("ingest.c{k}.redis_cpu_us_per_req"),
            delta.cpu_s * 1e6 / total as f64,
            "us",
        );
    }
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` tag-push bodies, each with its own tag and commit.
fn bodies(n: usize) -> Vec<String> {
    let template: serde_json::Value = serde_json::from_str(FIXTURE).expect("fixture");
    (0..n)
        .map(|i| {
            let mut v = template.clone();
            let sha = format!("{:040x}", rand::random::<u128>() ^ (i as u128) << 64);
            v["ref"] = format!("refs/tags/v1.{}.{}", i / 1000, i % 1000).into();
            v["after"] = sha.clone().into();
            v["checkout_sha"] = sha.into();
            v["message"] = format!("Release {i}").into();
            serde_json::to_string(&v).expect("body")
        })
        .collect()
}

#[derive(Default)]
struct Outcome {
    accepted: usize,
    duplicates: usize,
    other: usize,
    latencies: Vec<Duration>,
}

/// Sends `bodies` over `k` connections (connection `c` sends bodies `c, c+k, ...`, one request
/// at a time); every `dup_every`-th request of a connection re-sends its request of 5 earlier.
/// Bounded: gives up after 120 s.
async fn load(endpoint: &str, bodies: &[String], k: usize, dup_every: usize) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(120);
    let bodies: Arc<Vec<String>> = Arc::new(bodies.to_vec());
    let mut tasks = Vec::new();
    for c in 0..k {
        let bodies = bodies.clone();
        let endpoint = endpoint.to_string();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client");
            let mut sent: Vec<(usize, String)> = Vec::new();
            let mut out = Outcome::default();
            let mut own = (c..bodies.len()).step_by(k);
            let mut until_dup = dup_every;
            while Instant::now() < deadline {
                until_dup -= 1;
                let dup = until_dup == 0;
                if dup {
                    until_dup = dup_every;
                }
                let (i, key) = if dup && sent.len() >= 5 {
                    sent[sent.len() - 5].clone()
                } else {
                    let Some(i) = own.next() else { break };
                    (i, uuid::Uuid::new_v4().to_string())
                };
                let t = Instant::now();
                let response = client
                    .post(&endpoint)
                    .header("content-type", "application/json")
                    .header("x-gitlab-event", "Tag Push Hook")
                    .header("x-gitlab-token", TOKEN)
                    .header("idempotency-key", &key)
                    .body(bodies[i].clone())
                    .send()
                    .await;
                let (status, text) = match response {
                    Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                    Err(_) => (0, String::new()),
                };
                out.latencies.push(t.elapsed());
                match status {
                    202 => out.accepted += 1,
                    200 if text.contains("\"duplicate\":true") => out.duplicates += 1,
                    _ => {
                        if out.other < 3 {
                            eprintln!("unexpected answer {status}: {text}");
                        }
                        out.other += 1
                    }
                }
                sent.push((i, key));
            }
            out
        }));
    }
    let mut total = Outcome::default();
    for t in tasks {
        let o = t.await.expect("load task");
        total.accepted += o.accepted;
        total.duplicates += o.duplicates;
        total.other += o.other;
        total.latencies.extend(o.latencies);
    }
    total
}

/// Bytes of the fields of one entry of the `webhooks` stream.
fn entry_size(server: &RedisServer) -> usize {
    let out = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &server.port.to_string(), "--raw"])
        .args([
            "XRANGE",
            &format!("{{{NS}}}:s:webhooks"),
            "-",
            "+",
            "COUNT",
            "1",
        ])
        .output()
        .expect("redis-cli");
    let text = String::from_utf8_lossy(&out.stdout);
    // First line is the entry id; the rest are field names and values.
    text.lines()
        .skip(1)
        .map(|l| l.len())
        .sum::<usize>()
        .max(100)
}
