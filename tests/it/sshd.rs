//! Test harness: real OpenSSH `sshd` processes on free loopback ports, each with its own host key
//! and `authorized_keys`, accepting one client key generated per test run.
//!
//! **Isolation.** Every sshd runs as the child of a small guard shell that is PID 1 of its own
//! PID and mount namespaces (`unshare -m -p -f --kill-child --propagation private`). The guard
//! kills sshd as soon as our end of its stdin closes — when the server is dropped or stopped, and
//! also when the test process exits or dies — and when the guard (PID 1) exits, the kernel kills
//! every process left in the namespace, so the sessions that sshd forked (which run in sessions of
//! their own) die with it: nothing outlives a server.
//!
//! **Private target roots ([`Fleet`]).** All servers share this machine's filesystem, but an
//! environment has one absolute `path` for all its hosts. A fleet host therefore bind-mounts its
//! own private root over the fleet's shared target directory inside its mount namespace: every
//! host sees the same absolute path, and writes land in that host's own directory. From the test
//! (outside every namespace) the shared directory is empty and each host's files are read under
//! [`Sshd::root`]. Fleet hosts also see root's `~/.bashrc` empty ([`ROOT_BASHRC`]). When
//! namespaces are not available the harness panics (it never skips).

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";

/// sshd runs every command through root's login shell, and bash started by sshd reads
/// `~/.bashrc`. A developer's `.bashrc` (pyenv, cargo, ...) has nothing to do with the hosts a
/// fleet stands for, and can cost a tenth of a second per command; fleet hosts see it empty.
const ROOT_BASHRC: &str = "/root/.bashrc";
const STARTUP: Duration = Duration::from_secs(30);

/// PID 1 of the server's namespaces: mounts the private root (when there is one) and hides
/// root's `~/.bashrc` (see [`ROOT_BASHRC`]), runs sshd in the foreground and kills it as soon as
/// our end of stdin closes. Its exit takes every process of the namespace with it. Arguments:
/// sshd, config, log, then optionally root, target and the file to hide.
const GUARD: &str = r#"exec 3<&0
if [ -n "${4:-}" ]; then
  mount --bind "$4" "$5" || { echo "ferry-test-harness: mount --bind failed" >&2; exit 97; }
  if [ -e "$6" ]; then
    mount --bind /dev/null "$6" || { echo "ferry-test-harness: hiding $6 failed" >&2; exit 97; }
  fi
fi
"$1" -D -e -f "$2" </dev/null >/dev/null 2>>"$3" &
pid=$!
{ read _ <&3; kill $pid 2>/dev/null; } &
watcher=$!
wait $pid
status=$?
kill $watcher 2>/dev/null
exit $status"#;

/// The client key every test sshd accepts (generated once per test run).
pub struct ClientKey {
    pub private: PathBuf,
    pub public: String,
}

pub fn client_key() -> &'static ClientKey {
    static KEY: OnceLock<ClientKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("ssh-client-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let private = keygen(&dir, "id_ed25519");
        let public = std::fs::read_to_string(dir.join("id_ed25519.pub")).unwrap();
        // Remove the keys of earlier runs whose process is gone.
        if let Ok(entries) = std::fs::read_dir(env!("CARGO_TARGET_TMPDIR")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("ssh-client-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                }
            }
        }
        ClientKey {
            private,
            public: public.trim().to_string(),
        }
    })
}

/// Generates an ed25519 key pair `dir/name` (+ `.pub`) without passphrase; returns the private
/// key's path.
pub fn keygen(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&path)
        .stdin(Stdio::null())
        .status()
        .expect("run ssh-keygen (is openssh-client installed?)");
    assert!(status.success(), "ssh-keygen failed");
    path
}

/// `SHA256:...` of a public key file, as `ssh-keygen -l` prints it.
pub fn fingerprint(public: &Path) -> String {
    let out = Command::new("ssh-keygen")
        .args(["-l", "-E", "sha256", "-f"])
        .arg(public)
        .output()
        .expect("run ssh-keygen -l");
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace()
        .nth(1)
        .expect("ssh-keygen -l output")
        .to_string()
}

/// An sshd of our own.
pub struct Sshd {
    port: u16,
    dir: tempfile::TempDir,
    /// `(private root, shared target)`: the root is bind-mounted over the target in the
    /// server's mount namespace.
    mount: Option<(PathBuf, PathBuf)>,
    child: Mutex<Option<Child>>,
}

impl Sshd {
    /// A server whose sessions see this machine's filesystem as it is.
    pub fn start() -> Sshd {
        Sshd::launch(None)
    }

    /// A server whose sessions see their own private root (created under the server's
    /// directory, see [`Sshd::root`]) at the absolute path `target`, which must exist.
    pub fn start_rooted(target: &Path) -> Sshd {
        Sshd::launch(Some(target))
    }

    fn launch(target: Option<&Path>) -> Sshd {
        let dir = tempfile::tempdir().expect("temporary directory for sshd");
        keygen(dir.path(), "host_ed25519");
        std::fs::write(
            dir.path().join("authorized_keys"),
            format!("{}\n", client_key().public),
        )
        .unwrap();
        let mount = target.map(|t| {
            let root = dir.path().join("root");
            std::fs::create_dir_all(&root).unwrap();
            (root, t.to_path_buf())
        });
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd (privilege separation)");
        for _ in 0..10 {
            let port = free_port();
            if let Some(child) = spawn(port, dir.path(), mount.as_ref()) {
                return Sshd {
                    port,
                    dir,
                    mount,
                    child: Mutex::new(Some(child)),
                };
            }
        }
        panic!(
            "could not start sshd on a free port; its log:\n{}",
            std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `root@127.0.0.1:<port>`
    pub fn target(&self) -> String {
        format!("root@127.0.0.1:{}", self.port)
    }

    /// This host's private root, as the test sees it (`None` for a server without one).
    pub fn root(&self) -> Option<&Path> {
        self.mount.as_ref().map(|(root, _)| root.as_path())
    }

    pub fn host_public_key(&self) -> PathBuf {
        self.dir.path().join("host_ed25519.pub")
    }

    /// `<algorithm> <base64>` of the host key.
    pub fn host_key(&self) -> String {
        let text = std::fs::read_to_string(self.host_public_key()).unwrap();
        let mut parts = text.split_whitespace();
        format!("{} {}", parts.next().unwrap(), parts.next().unwrap())
    }

    /// This server's `known_hosts` line: `[127.0.0.1]:<port> <algorithm> <base64>`.
    pub fn known_hosts_line(&self) -> String {
        format!("[127.0.0.1]:{} {}", self.port, self.host_key())
    }

    pub fn fingerprint(&self) -> String {
        fingerprint(&self.host_public_key())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sshd.log")).unwrap_or_default()
    }

    /// How many SFTP sessions this server has started (ferry opens one per upload).
    pub fn sftp_sessions(&self) -> usize {
        self.log().matches("subsystem 'sftp'").count()
    }

    /// Stops the server; when this returns, sshd and every session it started are gone and the
    /// port is free.
    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            drop(child.stdin.take()); // the guard kills sshd, then its namespace dies
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, with the same host key.
    pub fn restart(&self) {
        self.stop();
        let child = spawn(self.port, self.dir.path(), self.mount.as_ref()).unwrap_or_else(|| {
            panic!(
                "sshd did not restart on port {}; its log:\n{}",
                self.port,
                self.log()
            )
        });
        *self.child.lock().unwrap() = Some(child);
    }

    /// Restarts the server on the same port with a freshly generated host key: clients that
    /// recorded the old key now see a changed one.
    pub fn restart_with_new_key(&self) {
        self.stop();
        for f in ["host_ed25519", "host_ed25519.pub"] {
            std::fs::remove_file(self.dir.path().join(f)).unwrap();
        }
        keygen(self.dir.path(), "host_ed25519");
        self.restart();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `known_hosts` file listing `servers`.
pub fn known_hosts(path: &Path, servers: &[&Sshd]) {
    let text: String = servers
        .iter()
        .map(|s| format!("{}\n", s.known_hosts_line()))
        .collect();
    std::fs::write(path, text).unwrap();
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free loopback port")
        .port()
}

/// A loopback port that refuses every connection for as long as this lives: a TCP socket bound
/// to it but never listening, so the kernel answers connection attempts with a reset and no
/// other process can take the port meanwhile.
pub struct RefusedPort {
    port: u16,
    _socket: OwnedFd,
}

impl RefusedPort {
    pub fn new() -> RefusedPort {
        // SAFETY: plain socket calls on a socket this function owns; the address struct is
        // fully initialised and its size is passed along.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let socket = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from(std::net::Ipv4Addr::LOCALHOST).to_be();
            addr.sin_port = 0;
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            let rc = libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len);
            assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
            let mut bound: libc::sockaddr_in = std::mem::zeroed();
            let mut blen = len;
            let rc = libc::getsockname(fd, &mut bound as *mut _ as *mut libc::sockaddr, &mut blen);
            assert_eq!(rc, 0, "getsockname: {}", std::io::Error::last_os_error());
            RefusedPort {
                port: u16::from_be(bound.sin_port),
                _socket: socket,
            }
        }
    }

    /// `root@127.0.0.1:<port>`
    pub fn target(&self) -> String {
        format!("root@127.0.0.1:{}", self.port)
    }
}

/// N servers whose sessions each see their own private root at one shared absolute directory
/// ([`Fleet::target_dir`]), so one environment `path` under it ([`Fleet::path`]) is a separate
/// target directory on every host.
pub struct Fleet {
    hosts: Vec<Sshd>,
    /// Declared after `hosts`: the servers stop before the directory goes.
    dir: tempfile::TempDir,
}

impl Fleet {
    /// Starts `n` servers (in parallel).
    pub fn start(n: usize) -> Fleet {
        let dir = tempfile::tempdir().expect("temporary directory for the fleet");
        let target = dir.path().join("target");
        std::fs::create_dir_all(&target).unwrap();
        let hosts = std::thread::scope(|s| {
            let started: Vec<_> = (0..n)
                .map(|_| s.spawn(|| Sshd::start_rooted(&target)))
                .collect();
            started
                .into_iter()
                .map(|h| h.join().expect("start a fleet host"))
                .collect()
        });
        Fleet { hosts, dir }
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn host(&self, i: usize) -> &Sshd {
        &self.hosts[i]
    }

    pub fn hosts(&self) -> &[Sshd] {
        &self.hosts
    }

    /// `root@127.0.0.1:<port>` of every host, in order.
    pub fn targets(&self) -> Vec<String> {
        self.hosts.iter().map(Sshd::target).collect()
    }

    /// The absolute directory every host sees as its own private root.
    pub fn target_dir(&self) -> PathBuf {
        self.dir.path().join("target")
    }

    /// The environment path to deploy to: `<target_dir>/app`.
    pub fn path(&self) -> String {
        self.target_dir().join("app").display().to_string()
    }

    /// A scratch directory outside every host's root, for the test's own files.
    pub fn scratch(&self) -> PathBuf {
        let p = self.dir.path().join("scratch");
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    /// Where host `i`'s files under the shared target directory really are.
    pub fn root(&self, i: usize) -> &Path {
        self.hosts[i].root().expect("fleet hosts have a root")
    }

    /// Host `i`'s view of `path` (an absolute path under the target directory, or one relative
    /// to the environment path), as the test can read it.
    pub fn file(&self, i: usize, path: &str) -> PathBuf {
        let full = if path.starts_with('/') {
            PathBuf::from(path)
        } else {
            Path::new(&self.path()).join(path)
        };
        let rel = full
            .strip_prefix(self.target_dir())
            .unwrap_or_else(|_| panic!("{} is not under the fleet's target", full.display()));
        self.root(i).join(rel)
    }

    /// Where host `i`'s `current` link points (relative, as the switch writes it), if it exists.
    pub fn current(&self, i: usize) -> Option<String> {
        std::fs::read_link(self.file(i, "current"))
            .ok()
            .map(|p| p.display().to_string())
    }

    /// The release directories on host `i`, sorted (temporary and hidden entries left out).
    pub fn releases(&self, i: usize) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.file(i, "releases"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// The lines of a file on host `i` (relative to the environment path); none if missing.
    pub fn lines(&self, i: usize, path: &str) -> Vec<String> {
        std::fs::read_to_string(self.file(i, path))
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// A shell test that fails on a host while it is marked unhealthy ([`Fleet::set_unhealthy`]).
    pub fn health_check(&self) -> String {
        format!("test ! -e '{}/unhealthy'", self.target_dir().display())
    }

    /// Marks host `i` unhealthy (or healthy again) for [`Fleet::health_check`].
    pub fn set_unhealthy(&self, i: usize, unhealthy: bool) {
        let marker = self.root(i).join("unhealthy");
        if unhealthy {
            std::fs::write(marker, "").unwrap();
        } else {
            let _ = std::fs::remove_file(marker);
        }
    }

    /// A `known_hosts` file listing every host's current key.
    pub fn known_hosts(&self, path: &Path) {
        known_hosts(path, &self.hosts.iter().collect::<Vec<_>>());
    }
}

fn config(port: u16, dir: &Path) -> String {
    let d = dir.display();
    format!(
        "ListenAddress 127.0.0.1:{port}
HostKey {d}/host_ed25519
PidFile none
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile {d}/authorized_keys
AllowUsers root
PermitRootLogin prohibit-password
Subsystem sftp internal-sftp
MaxStartups 100
MaxSessions 100
LogLevel VERBOSE
"
    )
}

/// Spawns sshd on `port` in namespaces of its own and waits until it sends its banner; `None`
/// if sshd exited because the port was taken. Any other failure (no `unshare`, namespaces not
/// permitted, the bind mount refused) panics with the log.
fn spawn(port: u16, dir: &Path, mount: Option<&(PathBuf, PathBuf)>) -> Option<Child> {
    let conf = dir.join("sshd_config");
    std::fs::write(&conf, config(port, dir)).unwrap();
    let log_path = dir.join("sshd.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let start_len = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--propagation",
        "private",
    ])
    .args(["sh", "-c", GUARD, "sshd-guard", SSHD])
    .arg(&conf)
    .arg(&log_path);
    if let Some((root, target)) = mount {
        cmd.arg(root).arg(target).arg(ROOT_BASHRC);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn unshare (util-linux) to run sshd in namespaces of its own");
    let end = Instant::now() + STARTUP;
    loop {
        if let Some(status) = child.try_wait().expect("poll sshd") {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let new = text.get(start_len as usize..).unwrap_or(&text);
            if new.contains("Address already in use") {
                return None;
            }
            panic!(
                "sshd on port {port} could not start in its own namespaces ({status}); the test \
                 harness needs root, util-linux `unshare` with mount and PID namespaces, and \
                 openssh-server. Its log:\n{new}"
            );
        }
        // Answering on the port is not enough: another test's sshd may have taken the same
        // free port a moment before (this one then exits with "Address already in use"). Only
        // this server's own log says it listens.
        let listening = || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            text.get(start_len as usize..)
                .unwrap_or(&text)
                .contains("Server listening on")
        };
        if listening() && banner(port) {
            return Some(child);
        }
        if Instant::now() > end {
            drop(child.stdin.take());
            let _ = child.wait();
            panic!("sshd on port {port} did not answer within {STARTUP:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether an SSH server answers on `port` with its identification string.
fn banner(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}
