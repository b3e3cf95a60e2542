//! Running one claimed step: what each step kind does on the agent, and how its progress and
//! output are recorded — every event and log line under the step lease's fencing token.

use crate::build::{self, ArtifactStore, BuildEnv, BuildJob};
use crate::coordinator::artifacts;
use crate::deploy::transport::{Connector, PinnedKey};
use crate::deploy::{self, HostReport, Phase, Progress, Release};
use crate::domain::JobState;
use crate::store::{Append, Claim, Error, Fence, Store, StreamId};
use crate::workdir::WorkDir;
use async_trait::async_trait;
use ferry_proto::{
    AgentId, ArtifactPublished, BuildSpec, DeployHostCheckpoint, DeployHostFinished,
    DeployHostStarted, DeploySpec, Event, HostKeyPinned, StepFailed, StepLog, StepSpec,
    StepSucceeded,
};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::warn;

/// Fetches a published artifact to a local file.
#[async_trait]
pub trait ArtifactFetch: Send + Sync {
    async fn fetch(&self, key: &str, dest: &Path) -> Result<(), String>;
}

#[async_trait]
impl ArtifactFetch for ArtifactStore {
    async fn fetch(&self, key: &str, dest: &Path) -> Result<(), String> {
        use futures_util::StreamExt;
        use object_store::ObjectStoreExt;
        use tokio::io::AsyncWriteExt;
        let path = object_store::path::Path::from(key);
        let got = self
            .object_store()
            .get(&path)
            .await
            .map_err(|e| e.to_string())?;
        let mut file = tokio::fs::File::create(dest)
            .await
            .map_err(|e| format!("create {}: {e}", dest.display()))?;
        let mut chunks = got.into_stream();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            file.write_all(&chunk)
                .await
                .map_err(|e| format!("write {}: {e}", dest.display()))?;
        }
        file.flush().await.map_err(|e| e.to_string())
    }
}

/// What steps need from the agent's machine.
pub struct Runner {
    /// Reaches deploy hosts (`local`, SSH).
    pub connector: Arc<dyn Connector>,
    /// Where artifacts come from for deploys; `None` when the agent cannot deploy.
    pub artifacts: Option<Arc<dyn ArtifactFetch>>,
    /// How builds run (mirrors, artifact store, SSH key); `None` when the agent cannot build.
    pub build: Option<BuildEnv>,
    /// Work directories live under `<data_dir>/work`.
    pub data_dir: PathBuf,
}

impl Runner {
    /// A runner that deploys only to `local` and has no artifact store: enough for no-op steps
    /// and for tests of the machinery.
    pub fn local(data_dir: impl Into<PathBuf>) -> Runner {
        Runner {
            connector: Arc::new(crate::deploy::transport::LocalOnly),
            artifacts: None,
            build: None,
            data_dir: data_dir.into(),
        }
    }
}

/// One claimed step in progress: appends and log lines go out under its fence.
pub struct StepRun<'a> {
    pub store: &'a Arc<dyn Store>,
    pub claim: &'a Claim,
    pub job: &'a JobState,
    pub agent: &'a AgentId,
    logs: LogSink,
}

impl<'a> StepRun<'a> {
    pub fn new(
        store: &'a Arc<dyn Store>,
        claim: &'a Claim,
        job: &'a JobState,
        agent: &'a AgentId,
    ) -> Self {
        StepRun {
            store,
            claim,
            job,
            agent,
            logs: LogSink::start(store.clone(), claim),
        }
    }

    /// Appends events to the job's stream under the step's lease.
    pub async fn append(&self, events: Vec<Event>) -> Result<(), Error> {
        self.store
            .append(
                Append::new(StreamId::Job(self.claim.job), events)
                    .fenced(self.claim.step.clone(), self.claim.token),
            )
            .await
            .map(|_| ())
    }

    /// Sends one output line to the job's log (batched; never blocks the step).
    pub fn log(&self, stream: &str, line: &str) {
        self.logs.send(StepLog {
            step: self.claim.step.clone(),
            attempt: self.claim.attempt,
            stream: stream.to_string(),
            line: line.to_string(),
        });
    }

    /// Waits until every line logged so far is stored (or the lease was lost).
    pub async fn flush_logs(self) {
        self.logs.close().await;
    }

    fn failed(&self, error: String, retryable: bool, exit_code: Option<i32>) -> Event {
        StepFailed {
            step: self.claim.step.clone(),
            attempt: self.claim.attempt,
            error,
            retryable,
            exit_code,
        }
        .into()
    }

    fn succeeded(&self) -> Event {
        StepSucceeded {
            step: self.claim.step.clone(),
            attempt: self.claim.attempt,
        }
        .into()
    }

    /// `host_key_pinned` for a key this step pinned under `accept-new`.
    fn pinned_event(&self, key: &PinnedKey) -> Event {
        HostKeyPinned {
            step: self.claim.step.clone(),
            attempt: self.claim.attempt,
            host: key.host.clone(),
            fingerprint: key.fingerprint.clone(),
            key_type: key.key_type.clone(),
        }
        .into()
    }
}

/// How long a build waits for an artifact's lock (held while the retention decides about the
/// artifact, or another build records the same one) before its attempt fails and is retried.
const ARTIFACT_LOCK_WAIT: Duration = Duration::from_secs(30);

/// Records `ArtifactPublished` under the artifact's lock, after checking that the object is
/// still stored: the artifact retention deletes an artifact only under the same lock, and only
/// while no live job is indexed under it, so once this append is in, the artifact stays (see
/// [`crate::coordinator::artifacts`]). `Err`: why the attempt should be retried.
async fn record_artifact(
    step: &StepRun<'_>,
    artifacts: &ArtifactStore,
    published: ArtifactPublished,
) -> Result<(), String> {
    let key = published.key.clone();
    let held = artifacts::hold(&**step.store, &key, step.agent.as_str(), ARTIFACT_LOCK_WAIT)
        .await
        .map_err(|e| format!("locking artifact {key}: {e}"))?;
    if held.is_none() && crate::build::artifact::key_sha256(&key).is_some() {
        return Err(format!(
            "artifact {key} stayed locked for {ARTIFACT_LOCK_WAIT:?}"
        ));
    }
    let result = match artifacts.exists(&key).await {
        Ok(true) => step
            .append(vec![published.into()])
            .await
            .map_err(|e| format!("recording artifact {key}: {e}")),
        Ok(false) => Err(format!(
            "artifact {key} left the store after it was published (the artifact retention \
             deleted it meanwhile); the next attempt builds it again"
        )),
        Err(e) => Err(format!("checking artifact {key}: {e}")),
    };
    if let Some(held) = held {
        held.release(&**step.store).await;
    }
    result
}

impl Runner {
    /// Runs `spec` and returns the events recording its outcome (the caller appends them under
    /// the fence). `Err` means the step could not be recorded at all (lease lost, store down):
    /// the step is abandoned and its lease will expire or has been taken.
    pub async fn run(&self, step: &StepRun<'_>, spec: &StepSpec) -> Result<Vec<Event>, Error> {
        match spec {
            StepSpec::Noop => Ok(vec![step.succeeded()]),
            StepSpec::Deploy(d) => self.deploy(step, d).await,
            StepSpec::Build(b) => Ok(self.build(step, b).await),
        }
    }

    async fn build(&self, step: &StepRun<'_>, spec: &BuildSpec) -> Vec<Event> {
        let (Some(env), Some(plan)) = (&self.build, &step.job.plan) else {
            return vec![step.failed("this agent cannot run builds".into(), false, None)];
        };
        // Secrets are named in the plan and resolved here, where they are used.
        let mut env = env.clone();
        env.secrets = spec
            .secrets
            .iter()
            .filter_map(|name| std::env::var(name).ok().map(|v| (name.clone(), v)))
            .collect();
        let job = BuildJob {
            project: &plan.project,
            tag: &plan.tag,
            git_ref: &plan.git_ref,
            sha: &plan.sha,
            job_id: step.claim.job,
            attempt: step.claim.attempt,
            spec,
        };
        let log = |l: build::LogLine| step.log(l.stream.as_str(), &l.line);
        // Host keys the clone pinned are recorded with the outcome, in the same append.
        let pins = std::sync::Mutex::new(Vec::<Event>::new());
        let pinned = |key: PinnedKey| {
            pins.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(step.pinned_event(&key))
        };
        // Stopping the step drops this future, which kills the build's processes.
        let outcome = match build::run(job, &env, &log, &pinned, std::future::pending::<()>()).await
        {
            Ok(a) => {
                let published = ArtifactPublished {
                    step: step.claim.step.clone(),
                    attempt: step.claim.attempt,
                    name: a.name,
                    key: a.key,
                    size: a.size,
                    sha256: a.sha256,
                };
                match record_artifact(step, &env.artifacts, published).await {
                    Ok(()) => vec![step.succeeded()],
                    Err(why) => vec![step.failed(why, true, None)],
                }
            }
            Err(e) => vec![step.failed(e.to_string(), e.retryable(), e.exit_code())],
        };
        let mut events = pins.into_inner().unwrap_or_else(|e| e.into_inner());
        events.extend(outcome);
        events
    }

    async fn deploy(&self, step: &StepRun<'_>, spec: &DeploySpec) -> Result<Vec<Event>, Error> {
        let Some(plan) = &step.job.plan else {
            return Ok(vec![step.failed("the job has no plan".into(), false, None)]);
        };
        let Some(artifact) = step.job.artifact() else {
            return Ok(vec![step.failed(
                "no build of this job published an artifact to deploy".into(),
                false,
                None,
            )]);
        };
        let Some(artifacts) = &self.artifacts else {
            return Ok(vec![step.failed(
                "this agent has no artifact store configured".into(),
                false,
                None,
            )]);
        };
        let root = self.data_dir.join("work");
        let name = format!(
            "{}-{}-{}",
            step.claim.job,
            step.claim.step.as_str().replace(':', "_"),
            step.claim.attempt
        );
        // Removed when dropped: when the deploy ends, or this future is dropped half-way.
        let work = match WorkDir::create(&root, &name) {
            Ok(w) => w,
            Err(e) => {
                return Ok(vec![step.failed(
                    format!("cannot create {}: {e}", root.join(&name).display()),
                    true,
                    None,
                )])
            }
        };
        let local = work.path().join(&artifact.name);
        if let Err(e) = artifacts.fetch(&artifact.key, &local).await {
            return Ok(vec![step.failed(
                format!("cannot fetch artifact {}: {e}", artifact.key),
                true,
                None,
            )]);
        }
        // Hosts that finished in an earlier attempt are not deployed again.
        let done: BTreeSet<String> = step
            .job
            .step(&step.claim.step)
            .map(|s| {
                s.hosts
                    .iter()
                    // A host rolled back by an earlier attempt is on the old release again.
                    .filter(|(_, h)| h.phase == "finished" && h.ok == Some(true) && !h.rolled_back)
                    .map(|(host, _)| host.clone())
                    .collect()
            })
            .unwrap_or_default();
        let release = Release {
            project: &plan.project,
            tag: &plan.tag,
            sha: &plan.sha,
            job: step.claim.job,
            attempt: step.claim.attempt,
            token: step.claim.token,
            artifact: &local,
            sha256: &artifact.sha256,
        };
        let result = deploy::deploy(spec, &release, &*self.connector, &done, step).await;
        drop(work);
        match result {
            Ok(outcome) => {
                let failed = outcome.failed();
                if failed.len() as u32 <= spec.max_failures {
                    return Ok(vec![step.succeeded()]);
                }
                let summary: Vec<String> = failed
                    .iter()
                    .map(|h| format!("{}: {}", h.host, h.error.as_deref().unwrap_or("failed")))
                    .collect();
                // Only unreachable hosts: worth another attempt (infrastructure failure).
                let retryable = failed.iter().all(|h| {
                    h.error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("cannot connect"))
                });
                let skipped: Vec<&str> =
                    outcome.skipped().iter().map(|h| h.host.as_str()).collect();
                let skipped = if skipped.is_empty() {
                    String::new()
                } else {
                    format!("; not started: {}", skipped.join(", "))
                };
                Ok(vec![step.failed(
                    format!(
                        "deploy to {} failed on {} of {} hosts: {}{skipped}",
                        spec.environment,
                        failed.len(),
                        spec.hosts.len(),
                        summary.join("; ")
                    ),
                    retryable,
                    None,
                )])
            }
            Err(deploy::Error::Aborted(why)) => Err(Error::Stale {
                step: step.claim.step.clone(),
                token: step.claim.token,
                reason: why,
            }),
            Err(e) => Ok(vec![step.failed(e.to_string(), false, None)]),
        }
    }
}

#[async_trait]
impl Progress for StepRun<'_> {
    async fn host_started(&self, host: &str) -> Result<(), String> {
        self.append(vec![DeployHostStarted {
            step: self.claim.step.clone(),
            attempt: self.claim.attempt,
            host: host.to_string(),
        }
        .into()])
            .await
            .map_err(|e| e.to_string())
    }

    async fn checkpoint(&self, host: &str, phase: Phase) -> Result<(), String> {
        self.append(vec![DeployHostCheckpoint {
            step: self.claim.step.clone(),
            attempt: self.claim.attempt,
            host: host.to_string(),
            phase: phase.as_str().to_string(),
        }
        .into()])
            .await
            .map_err(|e| e.to_string())
    }

    async fn host_finished(&self, r: &HostReport) -> Result<(), String> {
        self.append(vec![DeployHostFinished {
            step: self.claim.step.clone(),
            attempt: self.claim.attempt,
            host: r.host.clone(),
            ok: r.ok,
            error: r.error.clone(),
            rolled_back: r.rolled_back,
        }
        .into()])
            .await
            .map_err(|e| e.to_string())
    }

    async fn host_key_pinned(&self, key: &PinnedKey) -> Result<(), String> {
        StepRun::log(
            self,
            "ferry",
            &format!(
                "[{}] pinned host key {} {} (host_key_policy = \"accept-new\")",
                key.host, key.key_type, key.fingerprint
            ),
        );
        self.append(vec![self.pinned_event(key)])
            .await
            .map_err(|e| e.to_string())
    }

    fn log(&self, host: &str, stream: &str, line: &str) {
        StepRun::log(self, stream, &format!("[{host}] {line}"));
    }
}

/// Batches a step's log lines and stores them under its fence from a task of its own, so a
/// chatty build never waits on the store.
struct LogSink {
    tx: mpsc::UnboundedSender<StepLog>,
    task: tokio::task::JoinHandle<()>,
}

impl LogSink {
    fn start(store: Arc<dyn Store>, claim: &Claim) -> LogSink {
        let (tx, mut rx) = mpsc::unbounded_channel::<StepLog>();
        let job = claim.job;
        let fence = Fence {
            step: claim.step.clone(),
            token: claim.token,
        };
        let task = tokio::spawn(async move {
            let mut batch = Vec::new();
            loop {
                let Some(first) = rx.recv().await else { break };
                batch.push(first);
                // Take whatever else is already waiting, then give late lines a moment.
                let deadline = tokio::time::sleep(Duration::from_millis(20));
                tokio::pin!(deadline);
                while batch.len() < 500 {
                    tokio::select! {
                        line = rx.recv() => match line {
                            Some(l) => batch.push(l),
                            None => break,
                        },
                        _ = &mut deadline => break,
                    }
                }
                // A store away for a moment costs no lines: the batch is tried again a few times
                // (an append that failed may have landed: a line twice beats a line lost).
                let mut pause = Duration::from_millis(250);
                for tries_left in (0..4).rev() {
                    match store.append_logs(job, &fence, &batch).await {
                        Ok(()) => break,
                        Err(e @ Error::Stale { .. }) => {
                            warn!(%job, step = %fence.step, error = %e, "log lines dropped");
                            return;
                        }
                        Err(e) if tries_left == 0 => {
                            warn!(%job, step = %fence.step, error = %e, "log lines dropped");
                        }
                        Err(_) => {
                            tokio::time::sleep(pause).await;
                            pause *= 2;
                        }
                    }
                }
                batch.clear();
            }
        });
        LogSink { tx, task }
    }

    fn send(&self, line: StepLog) {
        let _ = self.tx.send(line);
    }

    async fn close(self) {
        drop(self.tx);
        let _ = self.task.await;
    }
}
