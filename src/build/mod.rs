//! The build step executor: check a tag out of a per-project mirror, run the job's commands in
//! their own process group, pack the artifact paths into a deterministic tar.gz and publish it to
//! the artifact store under a content-addressed key.
//!
//! The agent calls [`run`] once per claimed build step and turns the result into events
//! (`ArtifactPublished` + `StepSucceeded`, or `StepFailed` with [`Error::retryable`] and
//! [`Error::exit_code`]). Everything that touches git, processes or the artifact store lives
//! here; nothing here touches the event store.
//!
//! Invariants kept here (design.md):
//! - **8 (untrusted input)**: the tag, ref, sha and project travel to commands only as
//!   `FERRY_*` environment variables; commands are the job's own strings run with `sh -c`.
//!   Artifact paths that are absolute, contain `..` or resolve outside the checkout are refused.
//!   The tag and project appear in file names only after [`artifact::file_name_part`].
//! - **10 (secrets)**: every line the commands print is masked ([`mask::Masker`]) before it
//!   reaches `log`.
//! - **4 (effects land once)**: the artifact key is the sha256 of its bytes, and packing is
//!   deterministic, so a re-run that builds the same bytes reuses the stored object.

pub mod artifact;
mod command;
mod git;
pub mod mask;
mod pins;

pub use artifact::{Artifact, ArtifactStore};
pub use git::read_ca_certs;

use crate::deploy::transport::PinnedKey;
use crate::workdir::WorkDir;
use ferry_proto::{BuildSpec, JobId};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The job facts a build step needs, borrowed from the job's plan (`JobCreated`).
#[derive(Clone, Copy, Debug)]
pub struct BuildJob<'a> {
    /// `path_with_namespace`, e.g. `group/app`.
    pub project: &'a str,
    /// Short tag name, e.g. `v1.0.0`. Untrusted: reaches commands only as `FERRY_TAG`.
    pub tag: &'a str,
    /// Full ref, e.g. `refs/tags/v1.0.0`.
    pub git_ref: &'a str,
    /// The commit the job was planned for (full hex id).
    pub sha: &'a str,
    pub job_id: JobId,
    pub attempt: u32,
    pub spec: &'a BuildSpec,
}

/// What the agent provides to every build: where to keep mirrors and work directories, where to
/// publish artifacts, its secrets and its SSH key.
#[derive(Clone, Debug)]
pub struct BuildEnv {
    /// Mirrors live in `<data_dir>/mirrors`, work directories in `<data_dir>/work`.
    pub data_dir: PathBuf,
    pub artifacts: ArtifactStore,
    /// `(name, value)`: resolved secrets. A build gets the ones its spec names, by name; every
    /// value is masked in every build's output.
    pub secrets: Vec<(String, String)>,
    /// Private key for `ssh://` and `user@host:path` clone URLs.
    pub ssh_key: Option<PathBuf>,
    /// The agent's `known_hosts` (the deploys' one), checked for ssh clone URLs.
    pub known_hosts: Option<PathBuf>,
    /// `host_key_policy = "accept-new"`: unknown host keys are added, changed ones still fail.
    pub accept_new_host_keys: bool,
    /// CA certificates trusted for `https://` clone URLs besides the system's roots
    /// (`agent.git_ca_file`, read once at start with [`read_ca_certs`]).
    pub git_ca_certs: Vec<reqwest_gix::Certificate>,
}

/// Which stream a log line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
    /// The executor's own progress lines.
    Ferry,
}

impl Stream {
    /// The name used in `StepLog::stream`.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Ferry => "ferry",
        }
    }
}

/// One line of build output, already masked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    pub stream: Stream,
    pub line: String,
}

/// Why a build failed. [`Error::retryable`] separates infrastructure failures (worth another
/// attempt, maybe on another agent) from failures of the build itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("fetching {url} failed: {reason}")]
    Fetch { url: String, reason: String },
    #[error("checking out {tag} failed: {reason}")]
    Checkout { tag: String, reason: String },
    #[error("tag {tag} does not exist at {url}")]
    TagNotFound { tag: String, url: String },
    #[error("tag {tag} moved: it now points to {now}, the job was planned for {planned}")]
    TagMoved {
        tag: String,
        now: String,
        planned: String,
    },
    #[error("secret {name} is not configured on this agent")]
    MissingSecret { name: String },
    #[error("starting command {index} failed: {source}")]
    Spawn {
        index: usize,
        source: std::io::Error,
    },
    #[error("command {index} ({command}) {how}")]
    CommandFailed {
        index: usize,
        command: String,
        /// `exited with code 2` or `was killed by signal 9`.
        how: String,
        code: Option<i32>,
    },
    #[error("build timed out after {}s", .after.as_secs())]
    TimedOut { after: Duration },
    #[error("build cancelled")]
    Cancelled,
    #[error("artifact path {path} {why}")]
    PathRefused { path: String, why: String },
    #[error("artifact path {path} does not exist in the checkout")]
    NoArtifacts { path: String },
    #[error("the build spec lists no artifact paths")]
    NoArtifactPaths,
    #[error("packing artifact {name} failed: {source}")]
    Pack {
        name: String,
        source: std::io::Error,
    },
    #[error("artifact store {url}: {reason}")]
    Store { url: String, reason: String },
    #[error("artifact store url {url} is not supported: {why}")]
    UnsupportedStore { url: String, why: String },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Error {
    /// Infrastructure failures (clone or fetch, the artifact store, local disk) are retryable; a
    /// command that failed or timed out, a moved tag and a refused path are not: another attempt
    /// would fail the same way.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            Error::Fetch { .. }
                | Error::Checkout { .. }
                | Error::Spawn { .. }
                | Error::Pack { .. }
                | Error::Store { .. }
                | Error::Io { .. }
        )
    }

    /// The exit code of the command that failed, when one exited with a code.
    pub fn exit_code(&self) -> Option<i32> {
        match self {
            Error::CommandFailed { code, .. } => *code,
            _ => None,
        }
    }
}

/// Runs one build: checkout, commands, artifact. Lines of output go to `log` as they come.
///
/// `cancel` resolving stops the build: a running fetch is interrupted and the commands' process
/// group is killed. Dropping the returned future does the same (best effort: the group is killed
/// by the drop guard, a fetch stops at its next interrupt check). The work directory
/// `<data_dir>/work/<job>-<attempt>` is removed at the end whatever the outcome; the mirror is
/// kept for the next build.
pub async fn run(
    job: BuildJob<'_>,
    env: &BuildEnv,
    log: &(dyn Fn(LogLine) + Send + Sync),
    pinned: &(dyn Fn(PinnedKey) + Send + Sync),
    cancel: impl Future<Output = ()>,
) -> Result<Artifact, Error> {
    let root = env.data_dir.join("work");
    let name = format!("{}-{}", job.job_id, job.attempt);
    // Dropped (so removed) when the build ends, and when this future is dropped half-way
    // (the agent lost its lease); an agent that was killed leaves it to the next agent's start.
    let path = root.join(&name);
    let dir = tokio::task::spawn_blocking(move || WorkDir::create(&root, &name))
        .await
        .map_err(join_error)?
        .map_err(|source| Error::Io {
            what: "creating work directory",
            path,
            source,
        })?;
    let work = dir.path().to_path_buf();
    tokio::pin!(cancel);
    let result = run_in(job, env, log, pinned, &work, cancel.as_mut()).await;
    // A checkout can be large: removed off the async threads.
    let _ = tokio::task::spawn_blocking(move || drop(dir)).await;
    result
}

async fn run_in(
    job: BuildJob<'_>,
    env: &BuildEnv,
    log: &(dyn Fn(LogLine) + Send + Sync),
    pinned: &(dyn Fn(PinnedKey) + Send + Sync),
    work: &Path,
    mut cancel: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Result<Artifact, Error> {
    let ferry = |line: String| {
        log(LogLine {
            stream: Stream::Ferry,
            line,
        })
    };
    let spec = job.spec;
    if spec.artifacts.is_empty() {
        return Err(Error::NoArtifactPaths);
    }
    // Refuse bad artifact paths before spending time on a checkout.
    for p in &spec.artifacts {
        artifact::check_relative(p)?;
    }
    let secrets = resolve_secrets(spec, env)?;
    let masker = mask::Masker::new(
        env.secrets
            .iter()
            .map(|(_, v)| v.clone())
            // (vars_os: an agent started with a variable that is not UTF-8 must not panic;
            // such values are not ferry's secrets)
            .chain(mask::secret_values_from_env(
                std::env::vars_os()
                    .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))),
            )),
    );

    let src = work.join("src");
    // `build.timeout` bounds the whole step from here: the checkout as well as the commands.
    let deadline = (spec.timeout_secs > 0).then(|| {
        let after = Duration::from_secs(spec.timeout_secs);
        (tokio::time::Instant::now() + after, after)
    });

    ferry(format!("fetching {}", masker.mask(&spec.clone_url)));
    let interrupt = Arc::new(AtomicBool::new(false));
    let _interrupt_on_drop = SetOnDrop(interrupt.clone());
    // Read before the fetch starts: ssh may add a key the moment it connects.
    let watched = pins::before(
        &spec.clone_url,
        env.known_hosts.as_deref(),
        env.accept_new_host_keys,
    );
    let checkout = {
        let req = git::Checkout {
            mirrors: env.data_dir.join("mirrors"),
            project: job.project.to_string(),
            url: spec.clone_url.clone(),
            tag: job.tag.to_string(),
            git_ref: job.git_ref.to_string(),
            sha: job.sha.to_string(),
            dest: src.clone(),
            ssh_key: env.ssh_key.clone(),
            known_hosts: env.known_hosts.clone(),
            accept_new_host_keys: env.accept_new_host_keys,
            ca_certs: env.git_ca_certs.clone(),
            stall: git::FETCH_STALL,
        };
        let interrupt = interrupt.clone();
        tokio::task::spawn_blocking(move || git::checkout(&req, &interrupt))
    };
    let checked_out = tokio::select! {
        r = checkout => r.map_err(join_error),
        _ = cancel.as_mut() => {
            interrupt.store(true, Ordering::Relaxed);
            return Err(Error::Cancelled);
        }
        _ = command::sleep_until(deadline) => {
            interrupt.store(true, Ordering::Relaxed);
            // Retryable: a stuck server or a slow link, not the build's own commands.
            Ok(Err(Error::Fetch {
                url: masker.mask(&spec.clone_url),
                reason: format!(
                    "the checkout did not finish within the build's timeout ({}s)",
                    spec.timeout_secs
                ),
            }))
        }
    };
    // Reported whatever the fetch's outcome: a pinned key stays in known_hosts either way.
    for key in watched.iter().flat_map(pins::Before::pinned) {
        ferry(format!(
            "pinned host key {} {} of {} (host_key_policy = \"accept-new\")",
            key.key_type, key.fingerprint, key.host
        ));
        pinned(key);
    }
    let checked_out = checked_out??;
    ferry(format!(
        "checked out {} at {} ({} files, mirror {})",
        job.tag,
        job.sha,
        checked_out.files,
        if checked_out.mirror_created {
            "created"
        } else {
            "updated"
        }
    ));
    match &checked_out.collected {
        Some(Ok((before, after))) => ferry(format!(
            "mirror collected: {before} packs into {after} (more than {} after fetches)",
            git::MAX_PACKS
        )),
        Some(Err(e)) => ferry(format!("mirror not collected (the build goes on): {e}")),
        None => {}
    }

    let mut vars: Vec<(String, String)> = Vec::new();
    vars.push((
        "PATH".into(),
        std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into()),
    ));
    if let Ok(home) = std::env::var("HOME") {
        vars.push(("HOME".into(), home));
    }
    vars.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    vars.extend(secrets);
    // The job's facts last, so no spec entry can override them.
    vars.extend([
        ("FERRY_PROJECT".into(), job.project.into()),
        ("FERRY_TAG".into(), job.tag.into()),
        ("FERRY_REF".into(), job.git_ref.into()),
        ("FERRY_SHA".into(), job.sha.into()),
        ("FERRY_JOB_ID".into(), job.job_id.to_string()),
        ("FERRY_ATTEMPT".into(), job.attempt.to_string()),
    ]);
    command::run_all(
        &spec.commands,
        &src,
        &vars,
        deadline,
        &masker,
        log,
        cancel.as_mut(),
    )
    .await?;

    let name = artifact::file_name(job.project, job.tag, job.sha);
    ferry(format!("packing {name}"));
    let packed = {
        let (src, paths, out) = (src.clone(), spec.artifacts.clone(), work.join(&name));
        let name = name.clone();
        tokio::task::spawn_blocking(move || artifact::pack(&src, &paths, &out, &name))
    };
    let packed = tokio::select! {
        r = packed => r.map_err(join_error)??,
        _ = cancel.as_mut() => return Err(Error::Cancelled),
    };
    let published = tokio::select! {
        r = env.artifacts.publish(&packed, &name) => r?,
        _ = cancel.as_mut() => return Err(Error::Cancelled),
    };
    ferry(format!(
        "artifact {} ({} bytes, sha256 {}) {}",
        published.key,
        published.size,
        published.sha256,
        if published.reused {
            "already stored"
        } else {
            "published"
        }
    ));
    Ok(published)
}

/// The `(name, value)` pairs of the secrets the spec names. A missing secret is an error: running
/// the build without it would only fail later and less clearly.
fn resolve_secrets(spec: &BuildSpec, env: &BuildEnv) -> Result<Vec<(String, String)>, Error> {
    spec.secrets
        .iter()
        .map(|name| {
            env.secrets
                .iter()
                .find(|(n, _)| n == name)
                .map(|(n, v)| (n.clone(), v.clone()))
                .ok_or_else(|| Error::MissingSecret { name: name.clone() })
        })
        .collect()
}

fn join_error(e: tokio::task::JoinError) -> Error {
    Error::Io {
        what: "build task",
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    }
}

/// Interrupts a running fetch if the build future is dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
