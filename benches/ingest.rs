//! Webhook ingest over real HTTP: the real gateway router (`ferry::gateway::serve`) on
//! 127.0.0.1:0 over a private redis-server, loaded by K HTTP/1.1 keep-alive connections, side by
//! side with `redis-benchmark` XADD of a comparable payload on the same server in the same run.
//!
//! `cargo bench --bench ingest` (env: `INGEST_N` requests per phase, default 20000;
//! `INGEST_CONNS` comma-separated connection counts, default `8,32,64`)
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
        .unwrap_or_else(|_| "8,32,64".into())
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
        .worker_threads(1)
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

        // Warm-up (script load, connections, allocator), not measured.
        client_rt.block_on(load(addr, &bodies[n..], k, usize::MAX));
        let before = server.info();
        let cpu0 = support::process_cpu();
        let (gw0, load0) = (
            support::threads_cpu("gateway"),
            support::threads_cpu("load"),
        );
        let t0 = Instant::now();
        let outcome = client_rt.block_on(load(addr, &bodies[..n], k, 10));
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
///
/// The client is a minimal HTTP/1.1 writer and reader over a keep-alive `TcpStream` (one write
/// per request, responses read by `Content-Length`), so that the load generator's own CPU, which
/// shares the two cores with the gateway and Redis, stays small: a general HTTP client cost
/// about as much CPU per request as the gateway itself.
async fn load(
    addr: std::net::SocketAddr,
    bodies: &[String],
    k: usize,
    dup_every: usize,
) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs(120);
    let bodies: Arc<Vec<String>> = Arc::new(bodies.to_vec());
    let mut tasks = Vec::new();
    for c in 0..k {
        let bodies = bodies.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn::open(addr).await;
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
                let (status, text) = conn.post(&addr, &key, &bodies[i]).await;
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

/// One keep-alive HTTP/1.1 connection to the gateway.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    request: Vec<u8>,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr) -> Conn {
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Conn {
            stream,
            buf: Vec::with_capacity(4096),
            request: Vec::with_capacity(4096),
        }
    }

    /// POSTs `body` to /hooks/gitlab and returns the status and the response body.
    async fn post(&mut self, addr: &std::net::SocketAddr, key: &str, body: &str) -> (u16, String) {
        use std::io::Write;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.request.clear();
        write!(
            self.request,
            "POST /hooks/gitlab HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             x-gitlab-event: Tag Push Hook\r\nx-gitlab-token: {TOKEN}\r\n\
             idempotency-key: {key}\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .expect("format");
        self.request.extend_from_slice(body.as_bytes());
        if self.stream.write_all(&self.request).await.is_err() {
            return (0, String::new());
        }
        // Read until the head is complete, then until the body is.
        self.buf.clear();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(head_end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
                let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0u16);
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let total = head_end + 4 + length;
                while self.buf.len() < total {
                    match self.stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return (0, String::new()),
                        Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&self.buf[head_end + 4..total]).into_owned();
                return (status, text);
            }
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return (0, String::new()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
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
