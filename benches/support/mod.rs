//! Shared by the custom benchmark drivers (`claim`, `ingest`, `dispatch`): a private
//! `redis-server` on a free loopback port, `redis-benchmark` runs against it, `INFO` deltas
//! (Redis CPU, commands by type) and latency quantiles.
//!
//! Every server is started by the bench itself, in a temporary directory, under a shell guard
//! that kills it when the bench exits or dies; the benches never touch a server they did not
//! start. Without persistence (no RDB, no AOF) unless a bench asks for an append-only file
//! ([`RedisServer::start_aof`]).
#![allow(dead_code)] // each bench uses a different subset

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the server as soon as our end of its stdin closes (drop, exit or crash of the bench).
const GUARD: &str = r#"exec 3<&0
redis-server "$@" </dev/null >/dev/null 2>&1 &
pid=$!
{ read _ <&3; kill $pid 2>/dev/null; } &
watcher=$!
wait $pid
status=$?
kill $watcher 2>/dev/null
exit $status"#;

/// A redis-server of our own: no RDB, loopback only; no AOF unless started with
/// [`RedisServer::start_aof`].
pub struct RedisServer {
    pub port: u16,
    /// What it persists, for the bench's header: `no RDB, no AOF` or `no RDB, AOF, appendfsync X`.
    pub persistence: String,
    _dir: tempfile::TempDir,
    child: Option<Child>,
}

/// `FERRY_BENCH_REDIS_ARGS`: more `redis-server` arguments, split on whitespace (to measure a
/// server setting, e.g. `--stream-node-max-bytes 512`).
fn extra_args() -> Vec<String> {
    std::env::var("FERRY_BENCH_REDIS_ARGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

impl RedisServer {
    /// Without persistence: no RDB, no AOF.
    pub fn start() -> RedisServer {
        Self::start_with(&["--appendonly", "no"], "no RDB, no AOF".into())
    }

    /// With an append-only file in its temporary directory (`appendonly yes`, `appendfsync`
    /// = `fsync`: `everysec` or `always`), still no RDB.
    pub fn start_aof(fsync: &str) -> RedisServer {
        Self::start_with(
            &["--appendonly", "yes", "--appendfsync", fsync],
            format!("no RDB, AOF with appendfsync {fsync}"),
        )
    }

    fn start_with(persistence_args: &[&str], persistence: String) -> RedisServer {
        let dir = tempfile::tempdir().expect("temporary directory for redis-server");
        for _ in 0..10 {
            let port = free_port();
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(GUARD)
                .arg("redis-guard")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .arg("--dir")
                .arg(dir.path())
                .args(["--save", ""])
                .args(persistence_args)
                .args(extra_args())
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn redis-server (is it installed?)");
            let end = Instant::now() + Duration::from_secs(20);
            loop {
                if child.try_wait().expect("poll redis-server").is_some() {
                    break; // port taken meanwhile: try another
                }
                if ping(port) {
                    return RedisServer {
                        port,
                        persistence,
                        _dir: dir,
                        child: Some(child),
                    };
                }
                if Instant::now() > end {
                    drop(child.stdin.take());
                    let _ = child.wait();
                    panic!("redis-server on port {port} did not answer in time");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start redis-server on a free port");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `FLUSHALL`, so the next measurement starts from an empty server (ours).
    pub fn flush(&self) {
        redis_cli(self.port, &["FLUSHALL"]);
    }

    /// Runs `redis-benchmark -p PORT -q --csv ARGS...` and returns requests/s of each test line.
    pub fn benchmark(&self, args: &[&str]) -> Vec<(String, f64)> {
        let out = Command::new("redis-benchmark")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "--csv"])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .expect("run redis-benchmark (is it installed?)");
        let text = String::from_utf8_lossy(&out.stdout);
        let rows: Vec<(String, f64)> = text
            .lines()
            .skip(1)
            .filter_map(|l| {
                let cols: Vec<&str> = l.split("\",\"").collect();
                let name = cols.first()?.trim_matches('"').to_string();
                let rps = cols.get(1)?.trim_matches('"').parse().ok()?;
                Some((name, rps))
            })
            .collect();
        assert!(
            !rows.is_empty(),
            "redis-benchmark printed no result: {text}"
        );
        rows
    }

    /// The rate of a single-command `redis-benchmark` run (`args` include `-n`, `-c`, ...).
    pub fn benchmark_one(&self, args: &[&str]) -> f64 {
        self.benchmark(args)[0].1
    }

    pub fn info(&self) -> Info {
        Info::parse(&redis_cli(self.port, &["INFO", "everything"]))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take()); // the guard kills the server
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("run redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The parts of `INFO` the benches use.
#[derive(Clone, Debug, Default)]
pub struct Info {
    /// used_cpu_sys + used_cpu_user, seconds.
    pub cpu_s: f64,
    pub total_commands: u64,
    /// command → (calls, usec)
    pub commands: BTreeMap<String, (u64, u64)>,
    pub version: String,
    /// `used_memory`, bytes.
    pub used_memory: u64,
}

impl Info {
    fn parse(text: &str) -> Info {
        let mut info = Info::default();
        for line in text.lines() {
            let Some((k, v)) = line.trim().split_once(':') else {
                continue;
            };
            match k {
                "used_cpu_sys" | "used_cpu_user" => info.cpu_s += v.parse::<f64>().unwrap_or(0.0),
                "total_commands_processed" => info.total_commands = v.parse().unwrap_or(0),
                "redis_version" => info.version = v.to_string(),
                "used_memory" => info.used_memory = v.parse().unwrap_or(0),
                _ => {
                    if let Some(cmd) = k.strip_prefix("cmdstat_") {
                        let field = |name: &str| -> u64 {
                            v.split(',')
                                .find_map(|kv| kv.strip_prefix(name))
                                .and_then(|n| n.parse().ok())
                                .unwrap_or(0)
                        };
                        info.commands
                            .insert(cmd.to_string(), (field("calls="), field("usec=")));
                    }
                }
            }
        }
        info
    }

    /// What happened between `self` (earlier) and `later`.
    pub fn delta(&self, later: &Info) -> Delta {
        let mut commands = BTreeMap::new();
        for (cmd, &(calls, usec)) in &later.commands {
            let (c0, u0) = self.commands.get(cmd).copied().unwrap_or((0, 0));
            if calls > c0 {
                commands.insert(cmd.clone(), (calls - c0, usec.saturating_sub(u0)));
            }
        }
        Delta {
            cpu_s: later.cpu_s - self.cpu_s,
            total_commands: later.total_commands - self.total_commands,
            commands,
        }
    }
}

/// Commands that ferry's scripts run and clients send too: the benches account for them by
/// hand (`INFO`: the info script, read by the sweep leader, and the benches' own probes, which
/// every bench leaves out of its round trips).
pub const SCRIPT_AND_CLIENT: &[&str] = &["info"];

/// Every command a script in `src/store/redis/` calls must be in [`SCRIPT_ONLY`] or
/// [`SCRIPT_AND_CLIENT`], or the round-trip counts would be wrong: panics naming the others.
fn check_script_commands() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/store/redis");
    let mut unknown = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&dir).expect("the scripts' directory") {
        let path = entry.expect("a script").path();
        if path.extension().is_none_or(|e| e != "lua") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("a script");
        for call in text.split("redis.call('").skip(1) {
            let cmd = call.split('\'').next().unwrap_or("").to_ascii_lowercase();
            if !SCRIPT_ONLY.contains(&cmd.as_str()) && !SCRIPT_AND_CLIENT.contains(&cmd.as_str()) {
                unknown.insert(cmd);
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "benches/support: scripts call {unknown:?}, which SCRIPT_ONLY / SCRIPT_AND_CLIENT do not classify"
    );
}

/// Commands only ever issued from inside ferry's Lua scripts (never by a client of the
/// benchmarked path). Redis counts them in `commandstats` and `total_commands_processed` too, so
/// round trips = every command except these.
pub const SCRIPT_ONLY: &[&str] = &[
    "xadd",
    "xlen",
    "zadd",
    "zrem",
    "hset",
    "hget",
    "hdel",
    "hmget",
    "hexists",
    "incr",
    "sadd",
    "srem",
    "lpush",
    "ltrim",
    "exists",
    "del",
    "time",
    "set",
    "get",
    "mget",
    "pexpire",
    "zrange",
    "zrangebyscore",
    "zpopmin",
    "smembers",
    "sismember",
    "zcard",
    "xinfo",
    "xpending",
    "xtrim",
];

#[derive(Clone, Debug, Default)]
pub struct Delta {
    pub cpu_s: f64,
    pub total_commands: u64,
    pub commands: BTreeMap<String, (u64, u64)>,
}

impl Delta {
    /// Commands sent by clients (network round trips, counting a pipelined command as one),
    /// leaving out `exclude` (the bench's own probes: `info`, ...).
    pub fn round_trips(&self, exclude: &[&str]) -> u64 {
        self.commands
            .iter()
            .filter(|(c, _)| !SCRIPT_ONLY.contains(&c.as_str()) && !exclude.contains(&c.as_str()))
            .map(|(_, (calls, _))| calls)
            .sum()
    }

    /// One line per command: calls per `unit`, µs per call, server µs per `unit`.
    pub fn print_breakdown(&self, units: f64, unit: &str, exclude: &[&str]) {
        let mut rows: Vec<_> = self
            .commands
            .iter()
            .filter(|(c, _)| !exclude.contains(&c.as_str()))
            .collect();
        rows.sort_by_key(|(_, (_, usec))| std::cmp::Reverse(*usec));
        println!(
            "    {:<14} {:>10} {:>10} {:>10} {:>12}  (commandstats; script-internal calls are also inside evalsha's µs)",
            "command", "calls", format!("/{unit}"), "µs/call", format!("µs/{unit}")
        );
        for (cmd, (calls, usec)) in rows {
            let inner = if SCRIPT_ONLY.contains(&cmd.as_str()) {
                " (in scripts)"
            } else {
                ""
            };
            println!(
                "    {:<14} {:>10} {:>10.2} {:>10.2} {:>12.2}{inner}",
                cmd,
                calls,
                *calls as f64 / units,
                *usec as f64 / (*calls).max(1) as f64,
                *usec as f64 / units
            );
        }
    }
}

/// The `q` quantile of sorted samples (nearest rank).
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The machine and load, printed at the top of every bench (the numbers are only comparable
/// within one run).
pub fn print_machine(server: &RedisServer) {
    check_script_commands();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "machine: {cores} cores (shared, noisy); loadavg {}; redis-server {} on 127.0.0.1:{} ({})",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
        server.info().version,
        server.port,
        server.persistence,
    );
}

/// Prints `RESULT <name> <value> <unit>` lines that BENCHMARKS.md quotes.
pub fn result(name: &str, value: f64, unit: &str) {
    println!("RESULT {name} {value:.3} {unit}");
}

/// A child process under the same kind of shell guard as the redis-server: it gets SIGTERM as
/// soon as our end of the guard's stdin closes (drop, exit or crash of the bench), so no role
/// process outlives the bench. stderr goes to `log`.
pub struct Guarded {
    child: Option<Child>,
    pub log: std::path::PathBuf,
}

const PROC_GUARD: &str = r#"exec 3<&0
"$@" </dev/null >/dev/null &
pid=$!
{ read _ <&3; kill $pid 2>/dev/null; } &
watcher=$!
wait $pid
status=$?
kill $watcher 2>/dev/null
exit $status"#;

impl Guarded {
    pub fn spawn(
        program: &std::path::Path,
        args: &[&str],
        envs: &[(&str, &str)],
        log: std::path::PathBuf,
    ) -> Guarded {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new("sh")
            .arg("-c")
            .arg(PROC_GUARD)
            .arg("ferry-guard")
            .arg(program)
            .args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn a role process");
        Guarded {
            child: Some(child),
            log,
        }
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// The guarded program's pid(s): the guard shell's children that are not shells.
    fn program_pids(&self) -> Vec<u32> {
        let Some(child) = &self.child else {
            return Vec::new();
        };
        let pid = child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
        children
            .split_whitespace()
            .filter_map(|c| c.parse::<u32>().ok())
            .filter(|c| {
                std::fs::read_to_string(format!("/proc/{c}/comm"))
                    .is_ok_and(|comm| comm.trim() != "sh")
            })
            .collect()
    }

    /// CPU time used so far by the guarded program (the guard shell's children).
    pub fn cpu(&self) -> Duration {
        self.program_pids().into_iter().map(pid_cpu).sum()
    }

    /// Sends `signal` (`libc::SIGSTOP`, `libc::SIGCONT`, …) to the guarded program.
    pub fn signal(&self, signal: libc::c_int) {
        let pids = self.program_pids();
        assert!(!pids.is_empty(), "no guarded program to signal");
        for pid in pids {
            // SAFETY: kill(2) has no memory effects; the pid is our own grandchild.
            let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
            assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
        }
    }

    /// The tail of its stderr, for a failure message.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // A program stopped with SIGSTOP (the pre-filled dispatch phase) would never act on
        // the SIGTERM below, and a panic may have left it stopped: continue it first.
        for pid in self.program_pids() {
            // SAFETY: kill(2) has no memory effects; the pid is our own grandchild.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGCONT) };
        }
        if let Some(mut child) = self.child.take() {
            drop(child.stdin.take()); // the guard sends SIGTERM
            let _ = child.wait();
        }
    }
}

/// CPU time (user + system) this process used so far, from /proc/self/stat (10 ms ticks).
pub fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time (user + system) of process `pid` so far.
pub fn pid_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time so far of this process's threads whose name starts with `prefix` (tokio runtimes
/// built with `thread_name`).
pub fn threads_cpu(prefix: &str) -> Duration {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Duration::ZERO;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim().starts_with(prefix))
        })
        .map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| {
                fields
                    .get(i)
                    .and_then(|f| f.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            Duration::from_millis((ticks(11) + ticks(12)) * 10)
        })
        .sum()
}

/// Makes the server record every command in its slowlog (up to `max_len` entries), from empty.
pub async fn slowlog_start(conn: &mut redis::aio::MultiplexedConnection, max_len: usize) {
    let max_len = max_len.to_string();
    let _: () = redis::cmd("CONFIG")
        .arg(&[
            "SET",
            "slowlog-log-slower-than",
            "0",
            "slowlog-max-len",
            &max_len,
        ])
        .query_async(conn)
        .await
        .expect("slowlog on");
    let _: () = redis::cmd("SLOWLOG")
        .arg("RESET")
        .query_async(conn)
        .await
        .expect("slowlog reset");
}

/// Stops recording (back to commands over 10 ms) and returns what was recorded: each command's
/// µs and arguments (lossy UTF-8; the slowlog keeps at most 32, the last one then reads
/// `... (N more arguments)`).
pub async fn slowlog_take(conn: &mut redis::aio::MultiplexedConnection) -> Vec<(u64, Vec<String>)> {
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "slowlog-log-slower-than", "10000"])
        .query_async(conn)
        .await
        .expect("slowlog off");
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(conn)
        .await
        .expect("slowlog");
    entries
        .into_iter()
        .filter_map(|e| {
            let redis::Value::Array(f) = e else {
                return None;
            };
            let us: u64 = redis::from_redis_value(f.get(2)?.clone()).unwrap_or(0);
            let args: Vec<Vec<u8>> = redis::from_redis_value(f.get(3)?.clone()).unwrap_or_default();
            let args = args
                .iter()
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((us, args))
        })
        .collect()
}
