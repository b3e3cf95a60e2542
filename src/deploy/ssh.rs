//! The SSH transport: russh client, SFTP uploads (russh-sftp), host keys verified against an
//! OpenSSH `known_hosts` file.
//!
//! - **Host keys.** Every connection checks the server's key against `known_hosts`
//!   (`[host]:port` entries for ports other than 22, hashed `|1|` entries, comma-separated host
//!   lists). A key recorded for `host:port` that differs from the one presented is refused under
//!   every policy; an unknown key is refused under [`HostKeyPolicy::Strict`] and pinned (appended
//!   to `known_hosts`, reported through `on_pin` and to the caller of
//!   [`Connector::connect_noting_pins`], which a deploy records as a `host_key_pinned` event)
//!   under [`HostKeyPolicy::AcceptNew`]. There is no policy that ignores keys. Errors name the
//!   host and the key's SHA256 fingerprint.
//! - **Commands.** A script runs as `sh -c <script>` behind `export K='v';` lines: values are
//!   single-quoted (`'` becomes `'\''`), so nothing in them is ever interpreted, and most sshd
//!   refuse `SetEnv` anyway. The remote login shell must be POSIX (`sh`, `bash`, `dash`, ...).
//! - **Uploads.** SFTP into `<remote>.part` in chunks, then an atomic `mv -f` over `<remote>`.
//! - **One connection per host per deploy**: [`SshConnector::connect`] returns a transport that
//!   owns the session; every call of that host's deploy opens a channel on it.

use super::transport::{Connector, Error, LogFn, Output, PinnedKey, Transport};
use crate::config::{Agent, Host, HostKeyPolicy};
use async_trait::async_trait;
use russh::client;
use russh::keys::known_hosts::known_host_keys_path;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};
use russh::ChannelMsg;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// TCP connect + handshake + authentication must finish within this.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keepalives: a host that stops answering is dropped after about 3 × this.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Upload chunk size (the SFTP client pipelines the writes).
const CHUNK: usize = 256 * 1024;

/// Called when an unknown host key is pinned under `accept-new`: `(host, fingerprint)`, with the
/// host as configured (`user@host:port`) and the fingerprint as `SHA256:...`.
pub type OnPin = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Opens SSH sessions with the agent's key, verifying host keys.
#[derive(Clone)]
pub struct SshConnector {
    key: PathBuf,
    secret: Arc<PrivateKey>,
    known_hosts: PathBuf,
    policy: HostKeyPolicy,
    on_pin: Option<OnPin>,
    /// Serialises check-then-pin on `known_hosts` between concurrent connections.
    pin_lock: Arc<Mutex<()>>,
    connect_timeout: Duration,
}

impl fmt::Debug for SshConnector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshConnector")
            .field("key", &self.key)
            .field("known_hosts", &self.known_hosts)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl SshConnector {
    /// Loads the private key (ed25519 or ECDSA, unencrypted OpenSSH or PKCS#8 format).
    pub fn new(
        key: impl Into<PathBuf>,
        known_hosts: impl Into<PathBuf>,
        policy: HostKeyPolicy,
    ) -> Result<SshConnector, String> {
        let key = key.into();
        let secret = russh::keys::load_secret_key(&key, None)
            .map_err(|e| format!("cannot load ssh key {}: {e}", key.display()))?;
        Ok(SshConnector {
            key,
            secret: Arc::new(secret),
            known_hosts: known_hosts.into(),
            policy,
            on_pin: None,
            pin_lock: Arc::new(Mutex::new(())),
            connect_timeout: CONNECT_TIMEOUT,
        })
    }

    /// The agent's SSH settings; `Ok(None)` when no `ssh_key` is configured (local deploys only).
    pub fn from_config(agent: &Agent) -> Result<Option<SshConnector>, String> {
        agent
            .ssh_key
            .as_ref()
            .map(|key| SshConnector::new(key, &agent.known_hosts, agent.host_key_policy))
            .transpose()
    }

    /// Calls `f(host, fingerprint)` whenever a key is pinned (the agent records it as an event).
    pub fn on_pin(mut self, f: impl Fn(&str, &str) + Send + Sync + 'static) -> SshConnector {
        self.on_pin = Some(Arc::new(f));
        self
    }

    /// Bounds TCP connect + handshake + authentication (default [`CONNECT_TIMEOUT`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> SshConnector {
        self.connect_timeout = timeout;
        self
    }

    pub fn known_hosts(&self) -> &Path {
        &self.known_hosts
    }

    /// Connects and authenticates to `user@host[:port]`.
    pub async fn session(&self, target: &str) -> Result<SshTransport, Error> {
        self.session_noting_pins(target).await.0
    }

    /// Like [`SshConnector::session`], and also returns the keys pinned on the way (at most
    /// one, under `accept-new`), whether or not the session then opened.
    pub async fn session_noting_pins(
        &self,
        target: &str,
    ) -> (Result<SshTransport, Error>, Vec<PinnedKey>) {
        let pinned = Arc::new(Mutex::new(Vec::new()));
        let result = self.open(target, pinned.clone()).await;
        let pins = std::mem::take(&mut *pinned.lock().unwrap_or_else(|e| e.into_inner()));
        (result, pins)
    }

    async fn open(
        &self,
        target: &str,
        pinned: Arc<Mutex<Vec<PinnedKey>>>,
    ) -> Result<SshTransport, Error> {
        let connect = |reason: String| Error::Connect {
            host: target.to_string(),
            reason,
        };
        let (user, host, port) = match target.parse::<Host>().map_err(connect)? {
            Host::Ssh { user, host, port } => (user, host, port),
            Host::Local => return Err(connect("\"local\" is not an ssh host".into())),
        };
        let checker = HostCheck {
            target: target.to_string(),
            host: host.clone(),
            port,
            known_hosts: self.known_hosts.clone(),
            policy: self.policy,
            on_pin: self.on_pin.clone(),
            pinned,
            lock: self.pin_lock.clone(),
        };
        let config = Arc::new(client::Config {
            preferred: preferred_for(&host, port, &self.known_hosts),
            keepalive_interval: Some(KEEPALIVE),
            keepalive_max: 3,
            nodelay: true,
            ..Default::default()
        });
        let secret = self.secret.clone();
        let attempt = async {
            let mut handle = client::connect(config, (host.as_str(), port), checker)
                .await
                .map_err(|e| match e {
                    CheckError::HostKey(reason) => Error::HostKey {
                        host: target.to_string(),
                        reason,
                    },
                    CheckError::Ssh(e) => connect(e.to_string()),
                })?;
            let auth = handle
                .authenticate_publickey(&user, PrivateKeyWithHashAlg::new(secret, None))
                .await
                .map_err(|e| connect(format!("authentication: {e}")))?;
            if !auth.success() {
                return Err(connect(format!(
                    "the server refused the key {} for user {user}",
                    self.key.display()
                )));
            }
            Ok(handle)
        };
        let handle = tokio::time::timeout(self.connect_timeout, attempt)
            .await
            .map_err(|_| {
                connect(format!(
                    "timed out after {:?} (connect, handshake and authentication)",
                    self.connect_timeout
                ))
            })??;
        Ok(SshTransport {
            host: target.to_string(),
            handle,
        })
    }
}

#[async_trait]
impl Connector for SshConnector {
    async fn connect(&self, host: &str) -> Result<Box<dyn Transport>, Error> {
        Ok(Box::new(self.session(host).await?))
    }

    async fn connect_noting_pins(
        &self,
        host: &str,
    ) -> (Result<Box<dyn Transport>, Error>, Vec<PinnedKey>) {
        let (result, pins) = self.session_noting_pins(host).await;
        (result.map(|t| Box::new(t) as Box<dyn Transport>), pins)
    }
}

/// Host-key algorithms in russh's default order, but with the algorithms of keys already known
/// for this host first — so a host whose recorded key is ECDSA is not asked for its ed25519 key
/// (which would not match and be refused as changed).
fn preferred_for(host: &str, port: u16, known_hosts: &Path) -> russh::Preferred {
    let mut preferred = russh::Preferred::default();
    let known: Vec<_> = known_host_keys_path(host, port, known_hosts)
        .map(|keys| keys.into_iter().map(|(_, k)| k.algorithm()).collect())
        .unwrap_or_default();
    if !known.is_empty() {
        let mut order: Vec<_> = preferred
            .key
            .iter()
            .filter(|a| known.contains(a))
            .cloned()
            .collect();
        order.extend(preferred.key.iter().filter(|a| !known.contains(a)).cloned());
        preferred.key = order.into();
    }
    preferred
}

/// `SHA256:...` of a key.
pub(crate) fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// How `known_hosts` names `host:port`.
pub(crate) fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// Entries of a `known_hosts` text that concern `name` (as [`known_hosts_name`] writes it) in a
/// form the key lookup does not evaluate: `@revoked` and `@cert-authority` markers, wildcard
/// (`*`, `?`) and negated (`!`) patterns, names that differ only in case. Each as `line N:
/// why`. Under `accept-new` an unknown key is not pinned while there are any: the operator said
/// something about the host that ferry cannot check the key against.
fn unevaluated_entries(text: &str, name: &str) -> Vec<String> {
    let name = name.to_ascii_lowercase();
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next().filter(|f| !f.starts_with('#')) else {
            continue;
        };
        let (marker, patterns) = match first.strip_prefix('@') {
            Some(marker) => (Some(marker), fields.next().unwrap_or("")),
            None => (None, first),
        };
        // (hashed entries name one host each, and the lookup evaluates them)
        if patterns.starts_with("|1|") {
            continue;
        }
        for pattern in patterns.split(',') {
            let (negated, pattern) = match pattern.strip_prefix('!') {
                Some(p) => (true, p),
                None => (false, pattern),
            };
            let lower = pattern.to_ascii_lowercase();
            let wild = pattern.contains(['*', '?']);
            if !glob(&lower, &name) {
                continue;
            }
            let why = match (marker, negated, wild) {
                (Some(m), _, _) => format!("a @{m} marker"),
                (None, true, _) => "a negated pattern".to_string(),
                (None, false, true) => format!("the wildcard pattern {pattern}"),
                (None, false, false) if pattern != name => format!("{pattern}, in other case"),
                _ => continue,
            };
            out.push(format!("line {}: {why}", i + 1));
        }
    }
    out
}

/// OpenSSH's host pattern match: `*` any run of characters, `?` any one.
fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Appends `name <key>` to `known_hosts` (created if missing, with its directory), on a line
/// of its own, and syncs it to disk.
fn pin(known_hosts: &Path, name: &str, key: &PublicKey) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom, Write};
    if let Some(dir) = known_hosts.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(known_hosts)
        .map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut last = [b'\n'];
    if len > 0 {
        file.seek(SeekFrom::End(-1))
            .and_then(|_| file.read_exact(&mut last))
            .map_err(|e| e.to_string())?;
    }
    let key = key.to_openssh().map_err(|e| e.to_string())?;
    let sep = if last[0] == b'\n' { "" } else { "\n" };
    file.write_all(format!("{sep}{name} {key}\n").as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|e| e.to_string())
}

#[derive(Debug)]
enum CheckError {
    Ssh(russh::Error),
    HostKey(String),
}

impl From<russh::Error> for CheckError {
    fn from(e: russh::Error) -> Self {
        CheckError::Ssh(e)
    }
}

/// The client handler: verifies the server's key.
struct HostCheck {
    target: String,
    host: String,
    port: u16,
    known_hosts: PathBuf,
    policy: HostKeyPolicy,
    on_pin: Option<OnPin>,
    /// Keys pinned by this connection, for the caller of `session_noting_pins`.
    pinned: Arc<Mutex<Vec<PinnedKey>>>,
    lock: Arc<Mutex<()>>,
}

/// What `known_hosts` says about a key.
enum Verdict {
    Known,
    Unknown,
    /// Recorded keys for this host, none of them this one: `(line, algorithm)` of each.
    Changed(Vec<(usize, String)>),
}

impl HostCheck {
    fn lookup(&self, key: &PublicKey) -> Result<Verdict, String> {
        let recorded = known_host_keys_path(&self.host, self.port, &self.known_hosts)
            .map_err(|e| format!("cannot read {}: {e}", self.known_hosts.display()))?;
        if recorded.is_empty() {
            Ok(Verdict::Unknown)
        } else if recorded.iter().any(|(_, k)| k.key_data() == key.key_data()) {
            Ok(Verdict::Known)
        } else {
            // russh numbers the lines that are not comments; report the file's own numbers.
            let text = std::fs::read_to_string(&self.known_hosts).unwrap_or_default();
            let physical: Vec<usize> = text
                .split_inclusive('\n')
                .enumerate()
                .filter(|(_, l)| !l.starts_with('#'))
                .map(|(i, _)| i + 1)
                .collect();
            Ok(Verdict::Changed(
                recorded
                    .iter()
                    .map(|(line, k)| {
                        let line = physical.get(line - 1).copied().unwrap_or(*line);
                        (line, k.algorithm().to_string())
                    })
                    .collect(),
            ))
        }
    }

    fn verify(&self, key: &PublicKey) -> Result<(), String> {
        let name = known_hosts_name(&self.host, self.port);
        let file = self.known_hosts.display();
        let presented = format!("{} {}", key.algorithm(), fingerprint(key));
        // Held across check and pin so two connections cannot both pin (or pin twice).
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        match self.lookup(key)? {
            Verdict::Known => Ok(()),
            Verdict::Changed(lines) => {
                let lines: Vec<String> = lines
                    .iter()
                    .map(|(line, alg)| format!("line {line} ({alg})"))
                    .collect();
                Err(format!(
                    "the server presented {presented}, which differs from the key recorded for \
                     {name} in {file} at {}: the host key CHANGED (possible man-in-the-middle); \
                     if the host was reinstalled, verify the new fingerprint out of band and \
                     replace the old entry",
                    lines.join(", ")
                ))
            }
            Verdict::Unknown => match self.policy {
                HostKeyPolicy::Strict => Err(format!(
                    "the server presented {presented}, which is not in {file} for {name} \
                     (host_key_policy = \"strict\"): verify the fingerprint out of band and add \
                     the key"
                )),
                HostKeyPolicy::AcceptNew => {
                    let text = std::fs::read_to_string(&self.known_hosts).unwrap_or_default();
                    let unevaluated = unevaluated_entries(&text, &name);
                    if !unevaluated.is_empty() {
                        return Err(format!(
                            "the server presented {presented}, which is not recorded for {name} \
                             in {file}, and {file} has entries for it that ferry cannot check a \
                             key against ({}): not pinned under accept-new; record the host's \
                             key as a plain `{name} <key>` line",
                            unevaluated.join("; ")
                        ));
                    }
                    pin(&self.known_hosts, &name, key)
                        .map_err(|e| format!("cannot pin {presented} for {name} in {file}: {e}"))?;
                    tracing::warn!(
                        host = %self.target,
                        fingerprint = %fingerprint(key),
                        "pinned a new host key (accept-new) in {file}"
                    );
                    if let Some(f) = &self.on_pin {
                        f(&self.target, &fingerprint(key));
                    }
                    self.pinned
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(PinnedKey {
                            host: self.target.clone(),
                            fingerprint: fingerprint(key),
                            key_type: key.algorithm().to_string(),
                        });
                    Ok(())
                }
            },
        }
    }
}

impl client::Handler for HostCheck {
    type Error = CheckError;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                self.verify(key).map_err(CheckError::HostKey)?;
                Ok(true)
            }
            PublicKeyOrCertificate::Certificate(cert) => Err(CheckError::HostKey(format!(
                "the server presented a host certificate (key {}), and host certificates are \
                 not supported",
                cert.public_key().fingerprint(HashAlg::Sha256)
            ))),
        }
    }
}

/// An authenticated SSH session to one host.
pub struct SshTransport {
    host: String,
    handle: client::Handle<HostCheck>,
}

impl SshTransport {
    fn io(&self, what: &str) -> impl Fn(&dyn fmt::Display) -> Error + '_ {
        let what = what.to_string();
        move |e| Error::Io {
            host: self.host.clone(),
            reason: format!("{what}: {e}"),
        }
    }
}

/// A session channel's sending half that closes the channel when dropped before the host
/// closed it, so that the host's [`super::scripts::WATCH`] stops the script.
struct CloseOnDrop(Option<russh::ChannelWriteHalf<client::Msg>>);

impl CloseOnDrop {
    fn get(&self) -> &russh::ChannelWriteHalf<client::Msg> {
        self.0.as_ref().expect("present until dropped or disarmed")
    }

    /// The host closed the channel: nothing to do on drop.
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let (Some(writer), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = writer.eof().await;
                let _ = writer.close().await;
            });
        }
    }
}

/// Is `k` a plain shell variable name made of `[A-Z_][A-Z0-9_]*`?
fn valid_name(k: &str) -> bool {
    let mut chars = k.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// `s` as one single-quoted shell word: nothing inside is interpreted.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The command line sent to the host: `export K='v';` for each variable, then
/// `exec sh -c '<WATCH>' ferry '<script>'` (see [`super::scripts::WATCH`]).
pub fn command_line(script: &str, env: &[(String, String)]) -> Result<String, String> {
    let mut cmd = String::new();
    for (k, v) in env {
        if !valid_name(k) {
            return Err(format!("invalid environment variable name {k:?}"));
        }
        if v.contains('\0') {
            return Err(format!("environment variable {k} contains a NUL byte"));
        }
        cmd.push_str(&format!("export {k}={};\n", shell_quote(v)));
    }
    cmd.push_str("exec sh -c ");
    cmd.push_str(&shell_quote(super::scripts::WATCH));
    cmd.push_str(" ferry ");
    cmd.push_str(&shell_quote(script));
    Ok(cmd)
}

/// Splits a byte stream into lines as chunks arrive, logging each complete line.
struct Lines {
    stream: &'static str,
    pending: Vec<u8>,
    text: String,
}

impl Lines {
    fn new(stream: &'static str) -> Lines {
        Lines {
            stream,
            pending: Vec::new(),
            text: String::new(),
        }
    }

    fn push(&mut self, data: &[u8], log: LogFn<'_>) {
        self.pending.extend_from_slice(data);
        while let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=i).collect();
            self.line(&line[..i], log);
        }
    }

    fn line(&mut self, bytes: &[u8], log: LogFn<'_>) {
        let line = String::from_utf8_lossy(bytes);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        log(self.stream, line);
        self.text.push_str(line);
        self.text.push('\n');
    }

    fn finish(mut self, log: LogFn<'_>) -> String {
        if !self.pending.is_empty() {
            let rest = std::mem::take(&mut self.pending);
            self.line(&rest, log);
        }
        self.text
    }
}

/// Renames the uploaded `.part` over the target: `rename(2)`, atomic (SFTP's own rename refuses
/// to replace an existing file).
const FINISH_UPLOAD: &str = r#"set -eu
mv -f -- "$FERRY_UPLOAD_PART" "$FERRY_UPLOAD_TARGET"
"#;

#[async_trait]
impl Transport for SshTransport {
    fn host(&self) -> &str {
        &self.host
    }

    async fn exec(
        &self,
        script: &str,
        env: &[(String, String)],
        log: LogFn<'_>,
    ) -> Result<Output, Error> {
        let cmd = command_line(script, env).map_err(|reason| Error::Io {
            host: self.host.clone(),
            reason,
        })?;
        let (mut channel, writer) = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| self.io("open a session channel")(&e))?
            .split();
        // The session's input stays open while this call lives: when it is dropped (the lease
        // was lost, exec_bounded gave up), the guard closes the channel and the host kills the
        // script (scripts::WATCH; the script itself reads /dev/null).
        let writer = CloseOnDrop(Some(writer));
        writer
            .get()
            .exec(true, cmd)
            .await
            .map_err(|e| self.io("start the command")(&e))?;
        let (mut stdout, mut stderr) = (Lines::new("stdout"), Lines::new("stderr"));
        let mut status = None;
        let mut signal = None;
        let mut closed = false;
        // Keep reading after ExitStatus: output may still follow, until the channel closes.
        while let Some(msg) = channel.wait().await {
            match msg {
                ChannelMsg::Data { data } => stdout.push(&data, log),
                ChannelMsg::ExtendedData { data, ext: 1 } => stderr.push(&data, log),
                ChannelMsg::ExitStatus { exit_status } => {
                    status = Some(i32::try_from(exit_status).unwrap_or(i32::MAX))
                }
                ChannelMsg::ExitSignal {
                    signal_name,
                    error_message,
                    ..
                } => signal = Some(format!("{signal_name:?} {error_message}")),
                ChannelMsg::Failure => {
                    return Err(self.io("start the command")(
                        &"the server refused to run it",
                    ))
                }
                ChannelMsg::Close => {
                    closed = true;
                    break;
                }
                _ => {}
            }
        }
        if closed {
            writer.disarm();
        }
        let (stdout, mut stderr) = (stdout.finish(log), stderr.finish(log));
        if let Some(signal) = signal {
            let line = format!("killed by signal {}", signal.trim());
            log("stderr", &line);
            stderr.push_str(&line);
            stderr.push('\n');
        } else if status.is_none() && !closed {
            return Err(self.io("run the command")(&"the connection was lost"));
        }
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    async fn upload(&self, local: &Path, remote: &str) -> Result<(), Error> {
        if !remote.starts_with('/') {
            return Err(self.io("upload")(&format!(
                "remote path {remote:?} is not absolute"
            )));
        }
        let part = format!("{remote}.part");
        let what = format!("upload {} to {part}", local.display());
        let io = self.io(&what);
        let mut src = tokio::fs::File::open(local).await.map_err(|e| io(&e))?;
        let channel = self
            .handle
            .channel_open_session()
            .await
            .map_err(|e| io(&e))?;
        channel
            .request_subsystem(true, "sftp")
            .await
            .map_err(|e| io(&e))?;
        let sftp = russh_sftp::client::SftpSession::new(channel.into_stream())
            .await
            .map_err(|e| io(&e))?;
        let mut dst = sftp.create(part.as_str()).await.map_err(|e| io(&e))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = src.read(&mut buf).await.map_err(|e| io(&e))?;
            if n == 0 {
                break;
            }
            dst.write_all(&buf[..n]).await.map_err(|e| io(&e))?;
        }
        dst.flush().await.map_err(|e| io(&e))?;
        dst.shutdown().await.map_err(|e| io(&e))?;
        drop(dst);
        let _ = sftp.close().await;
        let env = vec![
            ("FERRY_UPLOAD_PART".to_string(), part.clone()),
            ("FERRY_UPLOAD_TARGET".to_string(), remote.to_string()),
        ];
        let out = self.exec(FINISH_UPLOAD, &env, &|_, _| {}).await?;
        if !out.success() {
            return Err(self.io(&format!("rename {part} to {remote}"))(
                &out.last_line(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_the_lookup_does_not_evaluate_are_found() {
        let text = "\
# a comment naming web1
web2 ssh-ed25519 AAAA
@revoked web1 ssh-ed25519 BBBB
*.example.com ssh-ed25519 CCCC
!web1,web3 ssh-ed25519 DDDD
WEB1 ssh-ed25519 EEEE
[web1]:2222 ssh-ed25519 FFFF
|1|salt=|hash= ssh-ed25519 GGGG
@cert-authority *.internal ssh-ed25519 HHHH
";
        assert_eq!(
            unevaluated_entries(text, "web1"),
            [
                "line 3: a @revoked marker",
                "line 5: a negated pattern",
                "line 6: WEB1, in other case"
            ]
        );
        assert_eq!(
            unevaluated_entries(text, "db.example.com"),
            ["line 4: the wildcard pattern *.example.com"]
        );
        assert_eq!(
            unevaluated_entries(text, "[a.internal]:2222"),
            Vec::<String>::new(),
            "the port form is its own name"
        );
        assert_eq!(
            unevaluated_entries(text, "a.internal"),
            ["line 9: a @cert-authority marker"]
        );
        assert!(unevaluated_entries(text, "web2").is_empty());
        assert!(glob("w?b*", "web1") && glob("*", "") && !glob("w?b", "web1"));
    }

    #[test]
    fn quoting_keeps_every_byte_literal() {
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        let cmd = command_line("echo hi", &[("FERRY_TAG".into(), "a'b$c`d`\ne".into())]).unwrap();
        assert_eq!(
            cmd,
            format!(
                "export FERRY_TAG='a'\\''b$c`d`\ne';\nexec sh -c {} ferry 'echo hi'",
                shell_quote(crate::deploy::scripts::WATCH)
            )
        );
    }

    #[test]
    fn names_are_checked() {
        for bad in ["", "1A", "a", "A-B", "A B", "A;B", "A=B"] {
            assert!(
                command_line("", &[(bad.into(), "v".into())]).is_err(),
                "{bad:?}"
            );
        }
        assert!(command_line("", &[("_A1".into(), "v".into())]).is_ok());
        assert!(command_line("", &[("A".into(), "v\0".into())]).is_err());
    }

    #[test]
    fn lines_split_across_chunks() {
        let seen = Mutex::new(Vec::new());
        let log = |s: &str, l: &str| seen.lock().unwrap().push(format!("{s}:{l}"));
        let mut lines = Lines::new("stdout");
        lines.push(b"ab", &log);
        lines.push(b"c\nd\r\ne", &log);
        assert_eq!(lines.finish(&log), "abc\nd\ne\n");
        assert_eq!(
            *seen.lock().unwrap(),
            ["stdout:abc", "stdout:d", "stdout:e"]
        );
    }
}
