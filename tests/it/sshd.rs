//! Test harness: real OpenSSH `sshd` processes on free loopback ports, each with its own host key
//! and `authorized_keys`, accepting one client key generated per test run. Like the redis
//! servers of `harness.rs`, each runs under a guard that kills it when the test process exits.
//!
//! All the servers share this machine's filesystem: a "host" is told apart by its port (in the
//! session's `$SSH_CONNECTION`), not by its files.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

const SSHD: &str = "/usr/sbin/sshd";
const STARTUP: Duration = Duration::from_secs(20);

/// Runs sshd in the foreground under a shell guard that kills it as soon as our end of its stdin
/// closes: when the server is dropped, and also when the test process exits or dies.
const GUARD: &str = r#"exec 3<&0
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
    child: Mutex<Option<Child>>,
}

impl Sshd {
    pub fn start() -> Sshd {
        let dir = tempfile::tempdir().expect("temporary directory for sshd");
        keygen(dir.path(), "host_ed25519");
        std::fs::write(
            dir.path().join("authorized_keys"),
            format!("{}\n", client_key().public),
        )
        .unwrap();
        std::fs::create_dir_all("/run/sshd").expect("create /run/sshd (privilege separation)");
        for _ in 0..10 {
            let port = free_port();
            if let Some(child) = spawn(port, dir.path()) {
                return Sshd {
                    port,
                    dir,
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

    pub fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            drop(child.stdin.take()); // the guard kills sshd
            let _ = child.wait();
        }
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

/// Spawns sshd on `port` and waits until it sends its banner; `None` if it exited instead (the
/// port was taken).
fn spawn(port: u16, dir: &Path) -> Option<Child> {
    let conf = dir.join("sshd_config");
    std::fs::write(&conf, config(port, dir)).unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(GUARD)
        .arg("sshd-guard")
        .arg(SSHD)
        .arg(&conf)
        .arg(dir.join("sshd.log"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn sshd (is openssh-server installed?)");
    let end = Instant::now() + STARTUP;
    loop {
        if child.try_wait().expect("poll sshd").is_some() {
            return None;
        }
        if banner(port) {
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
