//! Test harness: real `redis-server` processes on free loopback ports, fresh namespaces, fresh
//! SQLite files, and condition polling.

use ferry::store::conformance::Fixture;
use ferry::store::redis::RedisStore;
use ferry::store::sqlite::SqliteStore;
use ferry::store::Store;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[allow(unused_imports)]
pub use ferry::store::conformance::{wait_for, wait_until, DEADLINE};

/// A job's state (the fold of its stream) and its events, in order.
pub async fn job_events(
    store: &dyn Store,
    job: ferry_proto::JobId,
) -> (ferry::domain::JobState, Vec<ferry_proto::Event>) {
    let mut state = ferry::domain::JobState::new(job);
    let mut events = Vec::new();
    for s in store
        .read_stream(&ferry::store::StreamId::Job(job), 0)
        .await
        .unwrap()
    {
        let e = s.decode().unwrap();
        state.evolve(&e, s.envelope.at_ms);
        events.push(e);
    }
    (state, events)
}

/// Waits up to `deadline` for `job` to end, asserts that it succeeded, and returns its events.
pub async fn job_succeeded(
    store: &dyn Store,
    job: ferry_proto::JobId,
    deadline: Duration,
) -> Vec<ferry_proto::Event> {
    wait_until(deadline, || async {
        job_events(store, job).await.0.phase.is_terminal()
    })
    .await;
    let (state, events) = job_events(store, job).await;
    assert_eq!(
        state.phase,
        ferry::domain::JobPhase::Succeeded,
        "{events:#?}"
    );
    events
}

/// How long a fresh server may take to answer PING.
const STARTUP: Duration = Duration::from_secs(20);

/// Runs a program (the arguments after the guard's name) under a tiny shell guard: the guard
/// kills the program as soon as our end of its stdin closes — when the server is stopped or
/// dropped, and also when the test process exits or dies, so no server outlives the tests. The
/// guard exits when the program does.
pub const GUARD: &str = r#"exec 3<&0
"$@" </dev/null >/dev/null 2>&1 &
pid=$!
{ read _ <&3; kill $pid 2>/dev/null; } &
watcher=$!
wait $pid
status=$?
kill $watcher 2>/dev/null
exit $status"#;

/// A redis-server of our own, in its own temporary directory, without persistence.
pub struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    child: Mutex<Option<Child>>,
}

impl RedisServer {
    /// Starts a server on a free port (retrying with another port if the one picked was taken
    /// in the meantime).
    pub fn start() -> RedisServer {
        let dir = tempfile::tempdir().expect("temporary directory for redis-server");
        for _ in 0..10 {
            let port = free_port();
            if let Some(child) = spawn(port, dir.path()) {
                return RedisServer {
                    port,
                    dir,
                    child: Mutex::new(Some(child)),
                };
            }
        }
        panic!("could not start redis-server on a free port");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the server and waits until it is gone.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            drop(child.stdin.take()); // the guard kills the server
            child.wait().expect("wait for redis-server");
        }
    }

    /// Starts the server again on the same port (its data is gone: no persistence).
    pub fn restart(&self) {
        self.stop();
        let child = spawn(self.port, self.dir.path())
            .unwrap_or_else(|| panic!("redis-server did not restart on port {}", self.port));
        *self.child.lock().unwrap() = Some(child);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// Spawns a server on `port` and waits until it answers PING; `None` if it exited instead.
fn spawn(port: u16, dir: &std::path::Path) -> Option<Child> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(GUARD)
        .args(["redis-guard", "redis-server"])
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args(["--save", "", "--appendonly", "no"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn redis-server (is it installed?)");
    let end = Instant::now() + STARTUP;
    loop {
        if child.try_wait().expect("poll redis-server").is_some() {
            return None;
        }
        if ping(port) {
            return Some(child);
        }
        if Instant::now() > end {
            drop(child.stdin.take());
            let _ = child.wait();
            panic!("redis-server on port {port} did not answer within {STARTUP:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

/// The server shared by every test of this binary.
pub fn shared() -> &'static RedisServer {
    static SHARED: OnceLock<RedisServer> = OnceLock::new();
    SHARED.get_or_init(RedisServer::start)
}

/// A fresh random namespace: tests isolate by key prefix and run in parallel.
pub fn namespace() -> String {
    format!("t{:016x}", rand::random::<u64>())
}

/// A user of the shared server (fresh per call) that may run every command except those the
/// test denies it, and the URL that logs in as it: one client's command fails, when the test
/// chooses, while everything else works. (Scripts run under the caller's permissions too.)
#[allow(dead_code)]
pub struct LimitedUser {
    name: String,
    pub url: String,
}

#[allow(dead_code)]
impl LimitedUser {
    pub async fn new(denied: &[&str]) -> LimitedUser {
        let name = format!("u{}", namespace());
        let password = namespace();
        let server = shared();
        let user = LimitedUser {
            url: format!("redis://{name}:{password}@127.0.0.1:{}/", server.port),
            name,
        };
        let mut rules = vec!["on".to_string(), format!(">{password}")];
        rules.extend(["~*", "&*", "+@all"].map(String::from));
        rules.extend(denied.iter().map(|c| format!("-{c}")));
        user.set(&rules).await;
        user
    }

    pub async fn allow(&self, command: &str) {
        self.set(&[format!("+{command}")]).await;
    }

    pub async fn deny(&self, command: &str) {
        self.set(&[format!("-{command}")]).await;
    }

    async fn set(&self, rules: &[String]) {
        let mut conn = redis::Client::open(shared().url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let () = redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&self.name)
            .arg(rules)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// A `sleep` duration unique to this call, `300.<digits>`: a process running `sleep <it>` (or a
/// shell whose script names it) is found by its command line, in whatever PID namespace it runs
/// (a pid a process writes inside a test sshd's namespace means another process out here).
#[allow(dead_code)]
pub fn sleep_marker() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("300.{:06}{:03}", std::process::id() % 1_000_000, n % 1000)
}

/// The processes whose command line holds `marker`.
#[allow(dead_code)]
pub fn processes_with(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(marker))
                .unwrap_or(false)
        })
        .collect()
}

/// Waits until no process's command line holds `marker`.
#[allow(dead_code)]
pub async fn wait_until_none_with(marker: &str) {
    wait_until(DEADLINE, || async { processes_with(marker).is_empty() }).await;
}

/// Waits until the process whose pid the file at `pid_file` holds is gone (a pid of this
/// machine's namespace: not one written inside a test sshd, see [`sleep_marker`]).
#[allow(dead_code)]
pub async fn wait_until_gone(pid_file: &std::path::Path) {
    let pid: i32 = std::fs::read_to_string(pid_file)
        .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()))
        .trim()
        .parse()
        .unwrap();
    wait_until(DEADLINE, || async move {
        // SAFETY: signal 0 only checks whether the process exists.
        unsafe { libc::kill(pid, 0) != 0 }
    })
    .await;
}

/// A store on the shared server, in a fresh namespace.
#[allow(dead_code)]
pub async fn redis_store() -> RedisStore {
    RedisStore::connect(&shared().url(), &namespace())
        .await
        .expect("connect to the test redis")
}

/// A conformance fixture on the shared server, in a fresh namespace.
pub async fn redis_fixture() -> Fixture {
    let (url, ns) = (shared().url(), namespace());
    let open = move || {
        let (url, ns) = (url.clone(), ns.clone());
        async move {
            let s = RedisStore::connect(&url, &ns)
                .await
                .expect("connect to the test redis");
            Arc::new(s) as Arc<dyn Store>
        }
    };
    let store = open().await;
    Fixture::new(store, open)
}

/// A conformance fixture on a fresh SQLite file in its own temporary directory. `another()`
/// opens the same file again, which in one process shares the connection, as roles in one
/// process do. The opener owns the directory, so it lives as long as the fixture.
pub async fn sqlite_fixture() -> Fixture {
    sqlite_fixture_with(SqliteStore::open).await
}

/// Like [`sqlite_fixture`], but every handle, `another()` included, has a connection of its
/// own, as separate processes on one file would: SQLite's locks serialise them and waiters
/// learn of the others' writes by polling.
pub async fn sqlite_fixture_separate() -> Fixture {
    sqlite_fixture_with(SqliteStore::open_separate).await
}

async fn sqlite_fixture_with(
    open: fn(&std::path::Path) -> ferry::store::Result<SqliteStore>,
) -> Fixture {
    let dir = Arc::new(tempfile::tempdir().expect("temporary directory for the sqlite store"));
    let path = dir.path().join("ferry.db");
    let opener = move || {
        // Naming `dir` here makes the closure own it: the directory lives as long as the
        // fixture does.
        let (_dir, path) = (dir.clone(), path.clone());
        async move {
            let s = open(&path).expect("open the test sqlite store");
            Arc::new(s) as Arc<dyn Store>
        }
    };
    let store = opener().await;
    Fixture::new(store, opener)
}

/// Runs git in `dir` with a fixed identity and no user or system config; returns stdout.
pub fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=ferry",
            "-c",
            "user.email=ferry@test",
            "-c",
            "tag.gpgSign=false",
            "-c",
            "commit.gpgSign=false",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// GitLab's Tag Push webhook body (the fixture) for creating `tag` at commit `sha` in project
/// `id` / `path`.
pub fn tag_push(id: u64, path: &str, tag: &str, sha: &str) -> serde_json::Value {
    let mut body: serde_json::Value =
        serde_json::from_str(include_str!("../fixtures/gitlab/tag_push_create.json")).unwrap();
    body["project_id"] = id.into();
    body["project"]["id"] = id.into();
    body["project"]["path_with_namespace"] = path.into();
    body["ref"] = format!("refs/tags/{tag}").into();
    body["before"] = "0".repeat(40).into();
    body["after"] = sha.into();
    body["checkout_sha"] = sha.into();
    body
}

/// Starts a server program under [`GUARD`] on a free loopback port and waits until the port
/// accepts connections; tries another port when the server exits first (the port was taken in
/// the meantime). `command(port)` is the program and its arguments. Returns the port and the
/// guard (closing its stdin stops the server).
pub fn serve_on_free_port(what: &str, command: impl Fn(u16) -> Command) -> (u16, Child) {
    for _ in 0..10 {
        let port = free_port();
        let program = command(port);
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(GUARD)
            .arg(format!("{what}-guard"))
            .arg(program.get_program())
            .args(program.get_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null()) // the guard's "Terminated" when it stops the watcher
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let end = Instant::now() + STARTUP;
        loop {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return (port, child);
            }
            if child.try_wait().unwrap().is_some() || Instant::now() > end {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(child.stdin.take());
        let _ = child.wait();
    }
    panic!("{what} did not start on a free port");
}

/// A real S3-compatible server (`s3s-fs`, which stores objects as files under its root) on a
/// free loopback port, with one bucket. `scripts/test.sh` installs it into `target/tools`;
/// `FERRY_TEST_S3S_FS` names another binary.
pub struct S3Server {
    pub port: u16,
    pub root: tempfile::TempDir,
    child: Child,
}

impl S3Server {
    pub const ACCESS_KEY: &'static str = "ferry-test-access";
    pub const SECRET_KEY: &'static str = "ferry-test-secret-0123456789";
    pub const BUCKET: &'static str = "artifacts";

    pub fn start() -> S3Server {
        let bin = std::env::var_os("FERRY_TEST_S3S_FS")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/bin/s3s-fs")
            });
        assert!(
            bin.exists(),
            "the S3 tests need s3s-fs at {}: run scripts/test.sh, which installs it \
             (cargo install s3s-fs --version 0.14.1 --locked --features binary --root target/tools)",
            bin.display()
        );
        let root = tempfile::tempdir().expect("temporary directory for s3s-fs");
        std::fs::create_dir_all(root.path().join(Self::BUCKET)).unwrap();
        let (port, child) = serve_on_free_port("s3s-fs", |port| {
            let mut cmd = Command::new(&bin);
            cmd.args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args([
                    "--access-key",
                    Self::ACCESS_KEY,
                    "--secret-key",
                    Self::SECRET_KEY,
                ])
                .arg(root.path());
            cmd
        });
        S3Server { port, root, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The S3 settings a client of this server needs (as `AWS_*` variables, lower-cased).
    pub fn options(&self) -> Vec<(&'static str, String)> {
        vec![
            ("aws_endpoint_url", self.endpoint()),
            ("aws_access_key_id", Self::ACCESS_KEY.into()),
            ("aws_secret_access_key", Self::SECRET_KEY.into()),
            ("aws_region", "us-east-1".into()),
            ("aws_allow_http", "true".into()),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        drop(self.child.stdin.take()); // the guard kills the server
        let _ = self.child.wait();
    }
}

/// A TCP proxy to a local port whose traffic the test can freeze: after [`Proxy::freeze`] no byte
/// goes through in either direction and the connections stay open, as when a network path is cut
/// without a reset. Dropping it lets held traffic go and stops forwarding.
pub struct Proxy {
    pub port: u16,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    closed: Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    pub fn start(upstream: u16) -> Proxy {
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let frozen = Arc::new(AtomicBool::new(false));
        let closed = Arc::new(AtomicBool::new(false));
        let (f, c) = (frozen.clone(), closed.clone());
        std::thread::spawn(move || {
            for down in listener.incoming() {
                if c.load(SeqCst) {
                    return;
                }
                let (Ok(down), Ok(up)) = (down, TcpStream::connect(("127.0.0.1", upstream))) else {
                    continue;
                };
                let pairs = [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ];
                for (mut from, mut to) in pairs {
                    let (f, c) = (f.clone(), c.clone());
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16 * 1024];
                        while let Ok(n @ 1..) = from.read(&mut buf) {
                            while f.load(SeqCst) && !c.load(SeqCst) {
                                std::thread::sleep(Duration::from_millis(10));
                            }
                            if c.load(SeqCst) || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            port,
            frozen,
            closed,
        }
    }

    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wakes the accept loop
    }
}
