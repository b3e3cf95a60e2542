//! The deploy step: rolls a built release out to an environment's hosts, in batches, resumable,
//! idempotent, fenced on the hosts, with rollback.
//!
//! Per host: probe (is the release already unpacked with this checksum?) → upload and unpack
//! (skipped when it is) → `before_switch` → atomic switch of `current` → `after_switch` → health
//! check (bounded retries) → prune old releases. Each phase reached is reported to [`Progress`],
//! which records it as an event: a deploy that resumes after its agent died skips the hosts that
//! already finished, and re-running a host is safe (every phase is idempotent).

pub mod archive;
pub mod scripts;
pub mod ssh;
pub mod transport;

use async_trait::async_trait;
use ferry_proto::{DeploySpec, FencingToken, JobId};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use transport::{Connector, Output, PinnedKey, Transport};

/// What is being deployed, and under which lease.
#[derive(Clone, Debug)]
pub struct Release<'a> {
    pub project: &'a str,
    pub tag: &'a str,
    pub sha: &'a str,
    pub job: JobId,
    pub attempt: u32,
    /// The step lease's fencing token: hosts refuse a switch from an older token than the last
    /// one that switched them.
    pub token: FencingToken,
    /// The artifact, already fetched to the agent.
    pub artifact: &'a Path,
    pub sha256: &'a str,
}

impl Release<'_> {
    /// The release directory name: `<tag>-<short sha>`, with anything outside `[A-Za-z0-9._-]`
    /// in the tag replaced by `_` (tags may contain `/`).
    pub fn name(&self) -> String {
        release_name(self.tag, self.sha)
    }
}

/// `<tag>-<short sha>`, path-safe.
pub fn release_name(tag: &str, sha: &str) -> String {
    let tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    let tag = tag.trim_start_matches('.');
    format!("{tag}-{}", &sha[..sha.len().min(7)])
}

/// A host's deploy phases, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Uploaded,
    Unpacked,
    Switched,
    Restarted,
    Healthy,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Uploaded => "uploaded",
            Phase::Unpacked => "unpacked",
            Phase::Switched => "switched",
            Phase::Restarted => "restarted",
            Phase::Healthy => "healthy",
        }
    }
}

/// How one host ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostReport {
    pub host: String,
    pub ok: bool,
    pub error: Option<String>,
    pub rolled_back: bool,
    /// Whether the upload was skipped because the release was already there.
    pub reused: bool,
    /// Never started: more than `max_failures` hosts had failed before its batch.
    pub skipped: bool,
}

/// Where progress goes. Every method may fail (the step's lease was lost): the deploy then stops
/// at once and changes nothing more.
#[async_trait]
pub trait Progress: Send + Sync {
    async fn host_started(&self, host: &str) -> Result<(), String>;
    async fn checkpoint(&self, host: &str, phase: Phase) -> Result<(), String>;
    async fn host_finished(&self, report: &HostReport) -> Result<(), String>;
    /// A host key was pinned on first use while connecting (`host_key_policy = "accept-new"`).
    async fn host_key_pinned(&self, key: &PinnedKey) -> Result<(), String>;
    fn log(&self, host: &str, stream: &str, line: &str);
}

/// The outcome of a deploy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// One report per host of this run: every host it deployed, and every host it did not start
    /// because too many had failed (`skipped`). Hosts finished in an earlier attempt are absent
    /// unless this run rolled them back.
    pub hosts: Vec<HostReport>,
}

impl Outcome {
    /// The hosts that were tried and failed (skipped hosts are not among them).
    pub fn failed(&self) -> Vec<&HostReport> {
        self.hosts.iter().filter(|h| !h.ok && !h.skipped).collect()
    }

    /// The hosts that were not started because too many had failed.
    pub fn skipped(&self) -> Vec<&HostReport> {
        self.hosts.iter().filter(|h| h.skipped).collect()
    }
}

/// Why a deploy stopped before every host had an outcome.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("deploy aborted: {0}")]
    Aborted(String),
    #[error(transparent)]
    Archive(#[from] archive::Error),
}

/// Deploys `release` per `spec`. `done` are hosts that finished successfully in an earlier
/// attempt of this step (from its checkpoint events); they are not touched again.
///
/// Hosts go in batches of `max_parallel`; once more than `max_failures` hosts failed no further
/// batch starts, and the hosts left are reported finished as `skipped` (never started), so every
/// host gets an outcome. Then, with `rollback_on_failure`, every host this deploy switched goes
/// back to its previous release and reruns `after_switch` there.
pub async fn deploy(
    spec: &DeploySpec,
    release: &Release<'_>,
    connector: &dyn Connector,
    done: &BTreeSet<String>,
    progress: &dyn Progress,
) -> Result<Outcome, Error> {
    let file = std::fs::File::open(release.artifact).map_err(archive::Error::Read)?;
    archive::check(std::io::BufReader::new(file))?;

    let todo: Vec<&String> = spec.hosts.iter().filter(|h| !done.contains(*h)).collect();
    let mut reports: Vec<HostReport> = Vec::new();
    let mut switched: Vec<String> = Vec::new();
    let batch = spec.max_parallel.max(1) as usize;
    for hosts in todo.chunks(batch) {
        let results = futures_util::future::join_all(
            hosts
                .iter()
                .map(|h| deploy_host(spec, release, connector, h, progress)),
        )
        .await;
        for (host, result) in hosts.iter().zip(results) {
            let (report, did_switch) = result?;
            if did_switch {
                switched.push((*host).clone());
            }
            reports.push(report);
        }
        let failures = reports.iter().filter(|r| !r.ok).count();
        if failures > spec.max_failures as usize {
            break;
        }
    }
    let failures = reports.iter().filter(|r| !r.ok).count();
    // Every host gets an outcome: those no batch reached are reported as skipped.
    let skipped: Vec<&String> = todo
        .iter()
        .filter(|h| !reports.iter().any(|r| &r.host == **h))
        .copied()
        .collect();
    for host in skipped {
        let report = HostReport {
            host: host.clone(),
            ok: false,
            error: Some(format!(
                "not deployed: {failures} host(s) failed, more than max_failures = {}, so no \
                 further batch started",
                spec.max_failures
            )),
            rolled_back: false,
            reused: false,
            skipped: true,
        };
        progress
            .host_finished(&report)
            .await
            .map_err(Error::Aborted)?;
        reports.push(report);
    }
    if failures > spec.max_failures as usize && spec.rollback_on_failure {
        // Roll back every host this deploy switched — the failed ones and the healthy ones —
        // plus hosts finished in earlier attempts, so the environment is on one release again.
        let mut back: Vec<String> = switched;
        back.extend(done.iter().cloned());
        for host in back {
            let rolled = rollback_host(spec, release, connector, &host, progress).await;
            let report = match reports.iter_mut().find(|r| r.host == host) {
                Some(r) => r,
                None => {
                    reports.push(HostReport {
                        host: host.clone(),
                        ok: true,
                        error: None,
                        rolled_back: false,
                        reused: true,
                        skipped: false,
                    });
                    reports.last_mut().expect("just pushed")
                }
            };
            match rolled {
                Ok(()) => report.rolled_back = true,
                // Half rolled back (switched back but not restarted, say), or not at all: the
                // host is in no known state, so it is not counted as done, and the next
                // attempt deploys it again.
                Err(e) => {
                    report.ok = false;
                    let prior = report
                        .error
                        .take()
                        .map(|p| format!("{p}; "))
                        .unwrap_or_default();
                    report.error = Some(format!("{prior}rollback failed: {e}"));
                }
            }
            progress
                .host_finished(report)
                .await
                .map_err(Error::Aborted)?;
        }
    }
    Ok(Outcome { hosts: reports })
}

/// The environment every script on host `t` gets; with `FERRY_TIMEOUT` where the transport
/// leaves what a dropped script started running (SSH): the host then stops a command itself at
/// `command_timeout` ([`scripts::COMMAND`]).
fn host_env(spec: &DeploySpec, release: &Release<'_>, t: &dyn Transport) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("FERRY_PATH".into(), spec.path.clone()),
        ("FERRY_RELEASE".into(), release.name()),
        ("FERRY_SHA256".into(), release.sha256.to_string()),
        ("FERRY_TOKEN".into(), release.token.0.to_string()),
        ("FERRY_KEEP".into(), spec.keep_releases.max(1).to_string()),
        ("FERRY_PROJECT".into(), release.project.to_string()),
        ("FERRY_TAG".into(), release.tag.to_string()),
        ("FERRY_SHA".into(), release.sha.to_string()),
        ("FERRY_JOB_ID".into(), release.job.to_string()),
        ("FERRY_ATTEMPT".into(), release.attempt.to_string()),
        ("FERRY_ENVIRONMENT".into(), spec.environment.clone()),
    ];
    if !t.kills_on_drop() {
        let secs = command_timeout(spec).as_secs();
        env.push(("FERRY_TIMEOUT".into(), secs.to_string()));
    }
    env
}

fn command_timeout(spec: &DeploySpec) -> Duration {
    Duration::from_secs(spec.command_timeout_secs.max(1))
}

/// Runs `script` on `t`, giving up when it runs past the spec's `command_timeout` (and a margin,
/// so that the host's own `timeout`, in [`scripts::COMMAND`], stops it first and says so). A
/// command in the foreground that never ends would otherwise hold the host, the step and every
/// newer deploy to the environment for good.
async fn exec_bounded(
    spec: &DeploySpec,
    t: &dyn Transport,
    script: &str,
    env: &[(String, String)],
    log: transport::LogFn<'_>,
) -> Result<Output, transport::Error> {
    let limit = command_timeout(spec);
    match tokio::time::timeout(limit + TIMEOUT_MARGIN, t.exec(script, env, log)).await {
        Ok(out) => out,
        Err(_) => Err(transport::Error::TimedOut {
            host: t.host().to_string(),
            secs: limit.as_secs(),
        }),
    }
}

/// How long after `command_timeout` the agent stops waiting for a command the host's
/// `timeout` should have stopped.
const TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// A script that ran but failed, as an error message.
fn failed(what: &str, out: &Output) -> String {
    match out.status {
        // (what `timeout` gives a command it stopped with SIGTERM, or SIGKILL)
        Some(code @ (124 | 137)) => format!(
            "{what} exited with status {code} (stopped at command_timeout?): {}",
            out.last_line()
        ),
        Some(code) => format!("{what} exited with status {code}: {}", out.last_line()),
        None => format!("{what} was killed: {}", out.last_line()),
    }
}

/// One host, start to finish. Returns its report and whether `current` was switched (so a
/// rollback knows where to go). `Err` only when progress could not be recorded (lease lost).
async fn deploy_host(
    spec: &DeploySpec,
    release: &Release<'_>,
    connector: &dyn Connector,
    host: &str,
    progress: &dyn Progress,
) -> Result<(HostReport, bool), Error> {
    progress.host_started(host).await.map_err(Error::Aborted)?;
    let mut report = HostReport {
        host: host.to_string(),
        ok: false,
        error: None,
        rolled_back: false,
        reused: false,
        skipped: false,
    };
    let mut switched = false;
    let result = run_host(
        spec,
        release,
        connector,
        host,
        progress,
        &mut report,
        &mut switched,
    )
    .await;
    match result {
        Ok(()) => report.ok = true,
        Err(HostFailure::Aborted(e)) => return Err(Error::Aborted(e)),
        Err(HostFailure::Failed(e)) => report.error = Some(e),
    }
    progress
        .host_finished(&report)
        .await
        .map_err(Error::Aborted)?;
    Ok((report, switched))
}

/// Connects to `host`, recording every host key pinned on the way (before the connection's own
/// outcome: a pin stays in `known_hosts` even when the connection then fails).
async fn connect(
    connector: &dyn Connector,
    host: &str,
    progress: &dyn Progress,
) -> Result<Box<dyn Transport>, HostFailure> {
    let (result, pins) = connector.connect_noting_pins(host).await;
    for key in &pins {
        progress
            .host_key_pinned(key)
            .await
            .map_err(HostFailure::Aborted)?;
    }
    result.map_err(|e| HostFailure::Failed(e.to_string()))
}

enum HostFailure {
    /// Progress could not be recorded: stop everything.
    Aborted(String),
    /// The host failed; others go on.
    Failed(String),
}

async fn run_host(
    spec: &DeploySpec,
    release: &Release<'_>,
    connector: &dyn Connector,
    host: &str,
    progress: &dyn Progress,
    report: &mut HostReport,
    switched: &mut bool,
) -> Result<(), HostFailure> {
    use HostFailure::{Aborted, Failed};
    let t = connect(connector, host, progress).await?;
    let env = host_env(spec, release, &*t);
    let log = |stream: &str, line: &str| progress.log(host, stream, line);
    let run = |script: &'static str, extra: Vec<(String, String)>| {
        let mut env = env.clone();
        env.extend(extra);
        let t: &dyn Transport = &*t;
        async move { exec_bounded(spec, t, script, &env, &log).await }
    };
    let check =
        |what: &str, out: Result<Output, transport::Error>| -> Result<Output, HostFailure> {
            let out = out.map_err(|e| match e {
                transport::Error::TimedOut { .. } => Failed(format!("{what}: {e}")),
                e => Failed(e.to_string()),
            })?;
            if out.success() {
                Ok(out)
            } else {
                Err(Failed(failed(what, &out)))
            }
        };
    let checkpoint =
        |phase: Phase| async move { progress.checkpoint(host, phase).await.map_err(Aborted) };

    // Upload and unpack, unless the release is already there with this checksum.
    let probe = check("probe", run(scripts::PROBE, vec![]).await)?;
    if probe.stdout.trim() == "present" {
        report.reused = true;
    } else {
        check("prepare", run(scripts::PREPARE, vec![]).await)?;
        let remote = format!("{}/.incoming/{}.tar.gz", spec.path, release.sha256);
        t.upload(release.artifact, &remote)
            .await
            .map_err(|e| Failed(format!("upload: {e}")))?;
        checkpoint(Phase::Uploaded).await?;
        check("unpack", run(scripts::UNPACK, vec![]).await)?;
    }
    checkpoint(Phase::Unpacked).await?;

    let release_dir = format!("{}/releases/{}", spec.path, release.name());
    let current = format!("{}/current", spec.path);
    let command = |cmd: &str, dir: &str| {
        vec![
            ("FERRY_COMMAND".to_string(), cmd.to_string()),
            ("FERRY_WORKDIR".to_string(), dir.to_string()),
        ]
    };
    for cmd in &spec.before_switch {
        check(
            &format!("before_switch command {cmd:?}"),
            run(scripts::COMMAND, command(cmd, &release_dir)).await,
        )?;
    }
    check("switch", run(scripts::SWITCH, vec![]).await)?;
    *switched = true;
    checkpoint(Phase::Switched).await?;
    for cmd in &spec.after_switch {
        check(
            &format!("after_switch command {cmd:?}"),
            run(scripts::COMMAND, command(cmd, &current)).await,
        )?;
    }
    checkpoint(Phase::Restarted).await?;
    if let Some(health) = &spec.health_check {
        let mut attempts = 0;
        loop {
            let out = run(scripts::COMMAND, command(health, &current)).await;
            match check(&format!("health check {health:?}"), out) {
                Ok(_) => break,
                Err(Aborted(e)) => return Err(Aborted(e)),
                Err(Failed(e)) if attempts >= spec.health_check_retries => {
                    return Err(Failed(format!("{e} (after {} attempts)", attempts + 1)))
                }
                Err(Failed(_)) => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(spec.health_check_interval_ms)).await;
                }
            }
        }
    }
    checkpoint(Phase::Healthy).await?;
    check("prune", run(scripts::PRUNE, vec![]).await)?;
    Ok(())
}

/// Switches a host back to the release this deploy replaced and reruns `after_switch` there.
async fn rollback_host(
    spec: &DeploySpec,
    release: &Release<'_>,
    connector: &dyn Connector,
    host: &str,
    progress: &dyn Progress,
) -> Result<(), String> {
    let t = connect(connector, host, progress)
        .await
        .map_err(|e| match e {
            HostFailure::Aborted(e) | HostFailure::Failed(e) => e,
        })?;
    let env = host_env(spec, release, &*t);
    let log = |stream: &str, line: &str| progress.log(host, stream, line);
    let out = exec_bounded(spec, &*t, scripts::ROLLBACK, &env, &log)
        .await
        .map_err(|e| format!("rollback: {e}"))?;
    if !out.success() {
        return Err(failed("rollback", &out));
    }
    let current = format!("{}/current", spec.path);
    for cmd in &spec.after_switch {
        let mut env = env.clone();
        env.push(("FERRY_COMMAND".into(), cmd.clone()));
        env.push(("FERRY_WORKDIR".into(), current.clone()));
        let out = exec_bounded(spec, &*t, scripts::COMMAND, &env, &log)
            .await
            .map_err(|e| format!("after_switch command {cmd:?}: {e}"))?;
        if !out.success() {
            return Err(failed(&format!("after_switch command {cmd:?}"), &out));
        }
    }
    Ok(())
}
