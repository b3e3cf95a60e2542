//! Checkout with gix (blocking API: call from `spawn_blocking`). One bare mirror per project,
//! fetched incrementally with explicit refspecs, then the tag's tree exported into a plain
//! directory after checking that the tag still points at the commit the job was planned for;
//! past [`MAX_PACKS`] packs the mirror is collected with `git gc`.
//!
//! Transports: `file://` and plain paths (gix runs `git upload-pack`, so `git` must be on `PATH`),
//! `git://` and `http(s)://` (pure Rust; TLS through rustls with the ring provider), and ssh
//! (`ssh://`, `user@host:path`) through the `ssh` program with the agent's key.

use super::Error;
use gix::remote::Direction;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Every branch and tag, force-updated: the mirror follows the remote, moved tags included.
/// (A bare clone saves no fetch refspec; passing them on each fetch keeps the mirror's config
/// irrelevant and lets a project's clone URL change.)
const REFSPECS: [&str; 2] = ["+refs/tags/*:refs/tags/*", "+refs/heads/*:refs/heads/*"];

/// How long a network fetch may go without a byte from the server before it fails: a git daemon or
/// web server that accepts the connection and then stays silent would otherwise hold the fetch,
/// the mirror's lock and (renewed all along) the build's lease for good. Servers send progress
/// while they count and compress, so a live fetch is never this quiet. (ssh fetches are bounded
/// by ssh's `ServerAlive` options instead; the build's own `timeout` bounds the whole checkout.)
pub(super) const FETCH_STALL: Duration = Duration::from_secs(120);

/// Every fetch that brings objects leaves one more pack in the mirror, and gix, unlike `git
/// fetch`, never collects them: past this many packs (git's own `gc.autoPackLimit`) the checkout
/// runs `git gc` on the mirror, so that a project with years of tags does not slow every object
/// lookup, or run out of file descriptors, over thousands of packs.
pub(super) const MAX_PACKS: usize = 50;

pub(super) struct Checkout {
    /// `<data_dir>/mirrors`.
    pub mirrors: PathBuf,
    pub project: String,
    pub url: String,
    pub tag: String,
    pub git_ref: String,
    pub sha: String,
    /// Created by the checkout; must not exist yet.
    pub dest: PathBuf,
    pub ssh_key: Option<PathBuf>,
    /// The agent's `known_hosts` for ssh clone URLs (else the agent user's, ssh's default).
    pub known_hosts: Option<PathBuf>,
    /// Unknown host keys are added to `known_hosts` instead of failing (changed keys still fail).
    pub accept_new_host_keys: bool,
    /// CA certificates trusted for `https://` clone URLs besides the system's roots.
    pub ca_certs: Vec<reqwest_gix::Certificate>,
    /// [`FETCH_STALL`], shorter in tests.
    pub stall: Duration,
}

pub(super) struct CheckedOut {
    pub files: usize,
    pub mirror_created: bool,
    /// The mirror was collected after the checkout: its packs before and after, or why `git
    /// gc` failed (the checkout itself succeeded either way).
    pub collected: Option<Result<(usize, usize), String>>,
}

pub(super) fn checkout(req: &Checkout, interrupt: &AtomicBool) -> Result<CheckedOut, Error> {
    install_tls_provider();
    let fetch_err = |reason: String| Error::Fetch {
        url: req.url.clone(),
        reason,
    };
    let checkout_err = |reason: String| Error::Checkout {
        tag: req.tag.clone(),
        reason,
    };
    std::fs::create_dir_all(&req.mirrors).map_err(|source| Error::Io {
        what: "creating mirror directory",
        path: req.mirrors.clone(),
        source,
    })?;
    let name = mirror_name(&req.project);
    let dir = req.mirrors.join(format!("{name}.git"));
    // Serialises fetches into one mirror across builds, threads and agent processes sharing the
    // data directory. Released when `_lock` is dropped.
    let lock_path = req.mirrors.join(format!("{name}.lock"));
    let _lock = lock_exclusive(&lock_path).map_err(|source| Error::Io {
        what: "locking mirror",
        path: lock_path.clone(),
        source,
    })?;

    // Under our lock nobody else writes the mirror: any lock file of git's in it was left by a
    // process that died while updating a ref, and would fail every later fetch.
    remove_git_locks(&dir);
    let (mut repo, mirror_created) = open_or_init(&dir).map_err(fetch_err)?;
    {
        let command = ssh_command(
            req.ssh_key.as_deref(),
            req.known_hosts.as_deref(),
            req.accept_new_host_keys,
        );
        let mut config = repo.config_snapshot_mut();
        config
            .set_value(&gix::config::tree::Core::SSH_COMMAND, command)
            .and_then(|_| config.set_value(&gix::config::tree::Ssh::VARIANT, "ssh"))
            .map_err(|e| fetch_err(format!("configuring ssh: {e}")))?;
        config
            .commit()
            .map_err(|e| fetch_err(format!("configuring ssh: {e}")))?;
    }

    let git_ref = if req.git_ref.is_empty() {
        format!("refs/tags/{}", req.tag)
    } else {
        req.git_ref.clone()
    };
    let remote = repo
        .remote_at(req.url.as_str())
        .and_then(|r| r.with_refspecs(REFSPECS, Direction::Fetch))
        .map(|r| r.with_fetch_tags(gix::remote::fetch::Tags::None))
        .map_err(|e| fetch_err(with_causes(&e)))?;
    let daemon = git_daemon(&remote, req.stall).map_err(fetch_err)?;
    let outcome = (|| {
        let mut connection = match daemon {
            Some(transport) => remote.to_connection_with_transport(transport),
            None => remote.connect(Direction::Fetch)?,
        };
        if let Some(options) = http_options(&repo, &req.url, &req.ca_certs, req.stall)? {
            connection = connection.with_transport_options(options);
        }
        connection
            .prepare_fetch(gix::progress::Discard, Default::default())?
            .receive(gix::progress::Discard, interrupt)
    })()
    .map_err(|e| fetch_err(with_causes(&e)))?;
    // The remote must still advertise the ref: a tag deleted upstream stays in the mirror.
    let advertised = outcome
        .ref_map
        .remote_refs
        .iter()
        .any(|r| r.unpack().0 == git_ref.as_bytes());
    if !advertised {
        return Err(Error::TagNotFound {
            tag: req.tag.clone(),
            url: req.url.clone(),
        });
    }

    let mut reference = repo
        .find_reference(git_ref.as_str())
        .map_err(|e| checkout_err(format!("finding {git_ref} in the mirror: {e}")))?;
    let peeled = reference
        .peel_to_id()
        .map_err(|e| checkout_err(format!("peeling {git_ref}: {e}")))?;
    if !peeled.to_string().eq_ignore_ascii_case(&req.sha) {
        return Err(Error::TagMoved {
            tag: req.tag.clone(),
            now: peeled.to_string(),
            planned: req.sha.clone(),
        });
    }
    let commit = peeled
        .object()
        .and_then(|o| o.try_into_commit())
        .map_err(|e| checkout_err(format!("{git_ref} does not point to a commit: {e}")))?;
    let tree = commit
        .tree_id()
        .map_err(|e| checkout_err(format!("reading the commit's tree: {e}")))?;
    let mut index = repo
        .index_from_tree(&tree)
        .map_err(|e| checkout_err(format!("reading tree {tree}: {e}")))?;
    let mut opts = repo
        .checkout_options(gix::worktree::stack::state::attributes::Source::IdMapping)
        .map_err(|e| checkout_err(e.to_string()))?;
    opts.destination_is_initially_empty = true;
    std::fs::create_dir_all(&req.dest).map_err(|source| Error::Io {
        what: "creating checkout directory",
        path: req.dest.clone(),
        source,
    })?;
    let objects = repo
        .objects
        .clone()
        .into_arc()
        .map_err(|e| checkout_err(e.to_string()))?;
    let done = gix::worktree::state::checkout(
        &mut index,
        &req.dest,
        objects,
        &gix::progress::Discard,
        &gix::progress::Discard,
        interrupt,
        opts,
    )
    .map_err(|e| checkout_err(e.to_string()))?;
    if let Some(first) = done.errors.first() {
        return Err(checkout_err(format!(
            "{} files failed, the first {}: {}",
            done.errors.len(),
            first.path,
            first.error
        )));
    }
    // Collected last, after every read from the mirror (gc replaces the packs gix has open).
    drop(commit);
    drop(reference);
    drop(repo);
    let collected = match packs(&dir) {
        Ok(before) if before > MAX_PACKS => Some(collect(&dir).map(|after| (before, after))),
        Ok(_) => None,
        Err(e) => Some(Err(format!("counting packs: {e}"))),
    };
    Ok(CheckedOut {
        files: done.files_updated,
        mirror_created,
        collected,
    })
}

/// The number of packs in the bare repository at `dir`.
pub(super) fn packs(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir.join("objects/pack"))? {
        if entry?.path().extension().is_some_and(|e| e == "pack") {
            n += 1;
        }
    }
    Ok(n)
}

/// `git gc` on the mirror (caller holds its lock); the packs left.
fn collect(dir: &Path) -> Result<usize, String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["gc", "--quiet"])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("running git gc: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git gc failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    packs(dir).map_err(|e| format!("counting packs: {e}"))
}

/// The mirror's directory name for a project path: injective (`group/app` and `group_app` get
/// different names) and free of path separators and `..`.
pub(super) fn mirror_name(project: &str) -> String {
    let mut out = String::with_capacity(project.len());
    for b in project.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'.' {
            out.push(b as char);
        } else {
            out.push_str(&format!("_{b:02x}"));
        }
    }
    if out.is_empty() || out.starts_with('.') {
        out.insert(0, '_');
    }
    out
}

/// The `core.sshCommand` that makes `ssh` use exactly the agent's key, check host keys against
/// the agent's `known_hosts` (the file its deploys use) when they are configured (else ssh's own
/// defaults), give up on a host that stops answering, and never prompt.
fn ssh_command(key: Option<&Path>, known_hosts: Option<&Path>, accept_new: bool) -> String {
    let quote = |p: &Path| format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"));
    let mut command = String::from("ssh");
    if let Some(key) = key {
        command += &format!(" -i {} -o IdentitiesOnly=yes", quote(key));
    }
    if let Some(file) = known_hosts {
        let checking = if accept_new { "accept-new" } else { "yes" };
        command += &format!(
            " -o UserKnownHostsFile={} -o StrictHostKeyChecking={checking} -o HashKnownHosts=no",
            quote(file)
        );
    }
    // A host that stops answering ends the fetch (about a minute) instead of holding the
    // build, its lease and the mirror's lock for good.
    command += " -o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=4";
    command += " -o BatchMode=yes";
    command
}

fn open_or_init(dir: &Path) -> Result<(gix::Repository, bool), String> {
    if dir.join("HEAD").exists() {
        match gix::open(dir) {
            Ok(repo) => return Ok((repo, false)),
            Err(e) => {
                // A half-created mirror (the agent died while creating it): start over.
                tracing::warn!(mirror = %dir.display(), error = %e, "mirror unreadable; recreating it");
                std::fs::remove_dir_all(dir)
                    .map_err(|e| format!("removing {}: {e}", dir.display()))?;
            }
        }
    } else if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    gix::init_bare(dir)
        .map(|r| (r, true))
        .map_err(|e| format!("creating mirror {}: {e}", dir.display()))
}

/// Removes git's `*.lock` files from the mirror `dir` (its top level and `refs/`), saying so.
fn remove_git_locks(dir: &Path) {
    fn walk(dir: &Path, found: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => walk(&path, found),
                Ok(t) if t.is_file() && path.extension().is_some_and(|e| e == "lock") => {
                    found.push(path)
                }
                _ => {}
            }
        }
    }
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "lock") && path.is_file() {
                found.push(path);
            }
        }
    }
    walk(&dir.join("refs"), &mut found);
    for path in found {
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::warn!(lock = %path.display(), "removed a lock file a killed fetch left in the mirror")
            }
            Err(e) => {
                tracing::warn!(lock = %path.display(), error = %e, "cannot remove a stale lock file in the mirror")
            }
        }
    }
}

/// An exclusive `flock` on `path`, held until the returned file is dropped.
fn lock_exclusive(path: &Path) -> std::io::Result<File> {
    crate::workdir::lock_file(path, true).map(|held| held.expect("a blocking lock is always taken"))
}

/// `error` and its chain of causes, so that "Transport handshake failed" says why (an unknown
/// certificate issuer, a refused connection).
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// The http transport's options for `url` (from the repository's git configuration, as gix
/// would use them): a read or write that waits longer than `stall` fails (reqwest's blocking
/// client applies its timeout to each one), and `certs` are trusted besides the system's roots.
/// `None` when `url` is not http(s).
fn http_options(
    repo: &gix::Repository,
    url: &str,
    certs: &[reqwest_gix::Certificate],
    stall: Duration,
) -> Result<Option<Box<dyn std::any::Any>>, gix::Error> {
    use gix::protocol::transport::client::blocking_io::http;
    let Some(options) = repo.transport_options(url, None)? else {
        return Ok(None);
    };
    let Ok(mut options) = options.downcast::<http::Options>() else {
        return Ok(None);
    };
    let certs = certs.to_vec();
    let backend = http::reqwest::Options {
        configure_client: Some(Box::new(move |client| {
            let client = client.timeout(stall);
            Ok(if certs.is_empty() {
                client
            } else {
                client.tls_certs_merge(certs.clone())
            })
        })),
        configure_request: None,
    };
    options.backend = Some(std::sync::Arc::new(std::sync::Mutex::new(backend)));
    Ok(Some(options))
}

/// For a `git://` remote, the connection gix would make, but on a socket whose reads and writes
/// fail after `stall` (gix's own sets no such limit); `None` for every other scheme.
fn git_daemon(
    remote: &gix::Remote<'_>,
    stall: Duration,
) -> Result<Option<Box<dyn gix::protocol::transport::client::blocking_io::Transport + Send>>, String>
{
    use gix::protocol::transport::client::git;
    let (mut url, version) = remote
        .sanitized_url_and_version(Direction::Fetch)
        .map_err(|e| with_causes(&e))?;
    if url.scheme != gix::url::Scheme::Git {
        return Ok(None);
    }
    if url.user().is_some() {
        return Err(format!(
            "{} names a user, which the git protocol has no use for",
            url.to_bstring()
        ));
    }
    let host = url
        .host()
        .ok_or_else(|| format!("{} names no host", url.to_bstring()))?
        .to_owned();
    let port = url.port;
    let addrs: Vec<_> =
        std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port.unwrap_or(9418)))
            .map_err(|e| format!("resolving {host}: {e}"))?
            .collect();
    let connect = |addr| {
        let socket = std::net::TcpStream::connect_timeout(addr, Duration::from_secs(30))?;
        socket.set_read_timeout(Some(stall))?;
        socket.set_write_timeout(Some(stall))?;
        let write = socket.try_clone()?;
        Ok::<_, std::io::Error>((socket, write))
    };
    // Each address in turn (a dual-stack name whose first address is unreachable), as gix would.
    let mut last = format!("{host} resolves to no address");
    let mut connected = None;
    for addr in &addrs {
        match connect(addr) {
            Ok(pair) => {
                connected = Some(pair);
                break;
            }
            Err(e) => last = format!("connecting to {addr}: {e}"),
        }
    }
    let (read, write) = connected.ok_or(last)?;
    let path = std::mem::take(&mut url.path);
    Ok(Some(Box::new(git::blocking_io::Connection::new(
        Stalled(read, stall),
        Stalled(write, stall),
        version,
        path,
        Some((host, port)),
        git::ConnectMode::Daemon,
        false,
    ))))
}

/// A socket with read and write timeouts whose expiry reads as what it means.
struct Stalled(std::net::TcpStream, Duration);

impl Stalled {
    fn explain(&self, e: std::io::Error) -> std::io::Error {
        match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the server has been silent for {}s", self.1.as_secs()),
            ),
            _ => e,
        }
    }
}

impl std::io::Read for Stalled {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf).map_err(|e| self.explain(e))
    }
}

impl std::io::Write for Stalled {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(|e| self.explain(e))
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(|e| self.explain(e))
    }
}

/// Reads the PEM certificates of `path` (one or more), refusing a file that holds none.
pub fn read_ca_certs(path: &Path) -> Result<Vec<reqwest_gix::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = reqwest_gix::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certs)
}

fn install_tls_provider() {
    crate::tls::install_provider();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_names_are_injective_and_safe() {
        for (project, expected) in [
            ("group/app", "group_2fapp"),
            ("group_app", "group_5fapp"),
            ("a.b-c", "a.b-c"),
            ("..", "_.."),
            ("", "_"),
            ("x/../y", "x_2f.._2fy"),
        ] {
            assert_eq!(mirror_name(project), expected, "{project}");
            assert!(!mirror_name(project).contains('/'));
        }
    }

    #[test]
    fn ssh_command_quotes_the_paths_and_never_prompts() {
        assert_eq!(
            ssh_command(Some(Path::new("/keys/it's key")), None, false).as_str(),
            ("ssh -i '/keys/it'\\''s key' -o IdentitiesOnly=yes -o ConnectTimeout=30 \
                 -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o BatchMode=yes")
        );
        assert_eq!(
            ssh_command(
                Some(Path::new("/k")),
                Some(Path::new("/etc/ferry/known hosts")),
                false
            )
            .as_str(),
            ("ssh -i '/k' -o IdentitiesOnly=yes -o UserKnownHostsFile='/etc/ferry/known hosts' \
                 -o StrictHostKeyChecking=yes -o HashKnownHosts=no -o ConnectTimeout=30 \
                 -o ServerAliveInterval=15 -o ServerAliveCountMax=4 -o BatchMode=yes")
        );
        assert_eq!(
            ssh_command(None, Some(Path::new("/kh")), true).as_str(),
            ("ssh -o UserKnownHostsFile='/kh' -o StrictHostKeyChecking=accept-new \
                 -o HashKnownHosts=no -o ConnectTimeout=30 -o ServerAliveInterval=15 \
                 -o ServerAliveCountMax=4 -o BatchMode=yes")
        );
        assert_eq!(
            ssh_command(None, None, false),
            "ssh -o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=4 \
             -o BatchMode=yes"
        );
    }

    /// A server that accepts connections and never says a word (nor closes them).
    fn silent_server() -> (u16, std::sync::mpsc::Sender<()>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while stopped.try_recv() == Err(std::sync::mpsc::TryRecvError::Empty) {
                match listener.accept() {
                    Ok((socket, _)) => held.push(socket),
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        (port, stop)
    }

    /// Runs a checkout of `url` in a thread; its result, or `None` if it has not ended after
    /// 20 s (the test then fails instead of hanging). Well past the stalls given here, short of
    /// reqwest's own default (30 s).
    fn checkout_within_20s(url: String, stall: Duration) -> Option<Result<(), Error>> {
        let dir = tempfile::tempdir().unwrap();
        let req = Checkout {
            mirrors: dir.path().join("mirrors"),
            project: "group/app".into(),
            url,
            tag: "v1".into(),
            git_ref: "refs/tags/v1".into(),
            sha: "0".repeat(40),
            dest: dir.path().join("src"),
            ssh_key: None,
            known_hosts: None,
            accept_new_host_keys: false,
            ca_certs: Vec::new(),
            stall,
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(checkout(&req, &AtomicBool::new(false)).map(|_| ()));
            drop(dir);
        });
        rx.recv_timeout(Duration::from_secs(20)).ok()
    }

    /// A git daemon or web server that stays silent fails the fetch after the stall.
    #[test]
    fn a_server_that_stays_silent_fails_the_fetch() {
        for (scheme, says) in [
            ("git", "the server has been silent for 1s"),
            ("http", "timed out"),
        ] {
            let (port, _stop) = silent_server();
            let out = checkout_within_20s(
                format!("{scheme}://127.0.0.1:{port}/repo.git"),
                Duration::from_secs(1),
            )
            .unwrap_or_else(|| panic!("the {scheme} fetch ended"));
            let err = out.unwrap_err();
            assert!(matches!(err, Error::Fetch { .. }), "{err}");
            assert!(err.to_string().contains(says), "{scheme}: {err}");
        }
    }
}
