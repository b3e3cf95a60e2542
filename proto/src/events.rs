//! The event vocabulary. Kind numbers are stable and never reused; see `README.md`.

use crate::{AgentId, DecodeError, FencingToken, JobId, StepId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Declares the closed set of events: `kind number => Variant(Payload), "name", current version`.
/// Generates [`Event`], its kind/name/version accessors, payload encoding, decoding and [`KINDS`].
macro_rules! events {
    ($( $kind:literal => $variant:ident, $name:literal, version $version:literal; )*) => {
        /// Every event ferry records. Each variant wraps the payload struct of the same name.
        ///
        /// `Serialize` renders the bare payload (untagged), for JSON answers such as the API's
        /// event history, which carries kind and name beside it. It is not the wire format: that
        /// stays [`Event::encode_payload`] inside an [`Envelope`](crate::Envelope).
        #[derive(Clone, Debug, PartialEq, Serialize)]
        #[serde(untagged)]
        pub enum Event {
            $( $variant($variant), )*
        }

        /// `(kind, name, current schema version)` for every event kind, in kind order.
        pub const KINDS: &[(u16, &str, u16)] = &[ $( ($kind, $name, $version), )* ];

        impl Event {
            /// The stable kind number.
            pub fn kind(&self) -> u16 {
                match self { $( Event::$variant(_) => $kind, )* }
            }

            /// The kind's name, for logs and the API.
            pub fn name(&self) -> &'static str {
                match self { $( Event::$variant(_) => $name, )* }
            }

            /// The schema version this build writes.
            pub fn version(&self) -> u16 {
                match self { $( Event::$variant(_) => $version, )* }
            }

            /// `rmp_serde::to_vec_named` of the payload.
            pub fn encode_payload(&self) -> Vec<u8> {
                match self {
                    $( Event::$variant(p) => rmp_serde::to_vec_named(p), )*
                }
                .expect("event payloads always encode")
            }

            /// Reads a payload of `kind` at schema `version`.
            pub fn decode_payload(kind: u16, version: u16, bytes: &[u8]) -> Result<Event, DecodeError> {
                let name = kind_name(kind).ok_or(DecodeError::UnknownKind(kind))?;
                let bad = |e: rmp_serde::decode::Error| DecodeError::Payload {
                    kind, name, version, reason: e.to_string(),
                };
                // Older schema versions are decoded here, before the current ones, and
                // converted with `From` into the current shape. There are none yet.
                match (kind, version) {
                    $( ($kind, $version) => rmp_serde::from_slice::<$variant>(bytes).map(Event::$variant).map_err(bad), )*
                    _ => Err(DecodeError::UnknownVersion { kind, name, version }),
                }
            }
        }

        $(
            impl From<$variant> for Event {
                fn from(p: $variant) -> Event { Event::$variant(p) }
            }
        )*
    };
}

/// The name of an event kind, if the kind exists.
pub fn kind_name(kind: u16) -> Option<&'static str> {
    KINDS
        .iter()
        .find(|(k, _, _)| *k == kind)
        .map(|(_, n, _)| *n)
}

events! {
    1 => WebhookReceived, "webhook_received", version 1;
    2 => JobCreated, "job_created", version 1;
    3 => StepQueued, "step_queued", version 1;
    4 => StepClaimed, "step_claimed", version 1;
    5 => StepStarted, "step_started", version 1;
    6 => StepLog, "step_log", version 1;
    7 => StepSucceeded, "step_succeeded", version 1;
    8 => StepFailed, "step_failed", version 1;
    9 => StepRetryScheduled, "step_retry_scheduled", version 1;
    10 => LeaseExpired, "lease_expired", version 1;
    11 => JobSucceeded, "job_succeeded", version 1;
    12 => JobFailed, "job_failed", version 1;
    13 => JobCancelled, "job_cancelled", version 1;
    14 => JobSuperseded, "job_superseded", version 1;
    15 => DeployHostStarted, "deploy_host_started", version 1;
    16 => DeployHostCheckpoint, "deploy_host_checkpoint", version 1;
    17 => DeployHostFinished, "deploy_host_finished", version 1;
    18 => AgentJoined, "agent_joined", version 1;
    19 => AgentLost, "agent_lost", version 1;
    20 => CommitStatusReported, "commit_status_reported", version 1;
    21 => ArtifactPublished, "artifact_published", version 1;
    22 => StepReleased, "step_released", version 1;
    23 => HostKeyPinned, "host_key_pinned", version 1;
    24 => DeploymentReported, "deployment_reported", version 1;
    25 => LogsExpired, "logs_expired", version 1;
    26 => AgentLeft, "agent_left", version 1;
    27 => AgentStopRequested, "agent_stop_requested", version 1;
    28 => AgentPaused, "agent_paused", version 1;
    29 => AgentResumed, "agent_resumed", version 1;
    30 => ArtifactExpired, "artifact_expired", version 1;
}

/// A webhook delivery that the gateway authenticated and stored. Written to the `webhooks`
/// stream; the coordinator turns the ones that act into jobs. Secrets never appear here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WebhookReceived {
    /// `Idempotency-Key` / `webhook-id`, when GitLab sent one.
    #[serde(default)]
    pub delivery_id: Option<String>,
    /// The `X-Gitlab-Event` header.
    pub event: String,
    /// The id of the job this delivery creates, chosen by the gateway so that handling the
    /// delivery twice creates the job once (the second append finds the stream non-empty).
    #[serde(default)]
    pub job: Option<JobId>,
    #[serde(default)]
    pub project_id: Option<u64>,
    #[serde(default)]
    pub project_path: Option<String>,
    /// The full ref, e.g. `refs/tags/v1.0.0`.
    #[serde(default, rename = "ref")]
    pub git_ref: Option<String>,
    #[serde(default)]
    pub before: Option<String>,
    #[serde(default)]
    pub after: Option<String>,
    #[serde(default)]
    pub checkout_sha: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    /// The clone URL from the payload (`project.git_http_url`).
    #[serde(default)]
    pub clone_url: Option<String>,
    /// What the gateway decided the delivery means: `build`, `delete`, `ignored`.
    pub action: String,
    /// Why a delivery is ignored or builds nothing.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A job was planned. Carries the whole plan (the project's build and deploy settings at this
/// moment) so that agents and replay never read configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCreated {
    pub job: JobId,
    pub project_id: u64,
    /// `path_with_namespace`.
    pub project: String,
    /// Short tag (or branch) name, e.g. `v1.0.0`.
    pub tag: String,
    /// Full ref, e.g. `refs/tags/v1.0.0`.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit to build: the payload's `checkout_sha`, never an annotated tag's object id.
    pub sha: String,
    pub priority: i32,
    /// What created the job: `webhook:<log id>`, `api`, `cli`.
    pub trigger: String,
    /// Steps in the order they run.
    pub steps: Vec<StepPlan>,
    /// For a job that deploys without building (a manual deploy or rollback): the artifact an
    /// earlier job published. Jobs with a build step deploy what their own build published.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<ArtifactRef>,
}

/// An artifact published by an earlier job, as a later job refers to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRef {
    /// The job whose build published it.
    pub job: JobId,
    /// File name, `<project>-<tag>-<shortsha>.tar.gz`.
    pub name: String,
    /// Key in the artifact store.
    pub key: String,
    pub size: u64,
    pub sha256: String,
}

/// One step of a job's plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepPlan {
    pub step: StepId,
    /// The agent pool that runs it.
    pub pool: String,
    pub priority: i32,
    pub spec: StepSpec,
}

/// What a step does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepSpec {
    Build(BuildSpec),
    Deploy(DeploySpec),
    /// Does nothing and succeeds: used by benchmarks and tests of the machinery.
    Noop,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BuildSpec {
    pub clone_url: String,
    pub commands: Vec<String>,
    pub artifacts: Vec<String>,
    pub timeout_secs: u64,
    /// Plain (non-secret) environment for the commands.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Names of secrets, resolved by the agent where it runs the step. Values never enter the log.
    #[serde(default)]
    pub secrets: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploySpec {
    pub environment: String,
    /// `user@host:port`, or `local`.
    pub hosts: Vec<String>,
    pub path: String,
    #[serde(default)]
    pub before_switch: Vec<String>,
    #[serde(default)]
    pub after_switch: Vec<String>,
    #[serde(default)]
    pub health_check: Option<String>,
    pub max_parallel: u32,
    #[serde(default)]
    pub max_failures: u32,
    pub keep_releases: u32,
    #[serde(default = "yes")]
    pub rollback_on_failure: bool,
    /// Health-check retries after the first failed check.
    #[serde(default = "default_health_retries")]
    pub health_check_retries: u32,
    /// Pause between health checks.
    #[serde(default = "default_health_interval_ms")]
    pub health_check_interval_ms: u64,
    /// How long any one command on a host may run (a configured command, a health check, or
    /// one of ferry's own scripts): past it the host fails. Plans recorded before the setting
    /// existed get the default.
    #[serde(default = "default_command_timeout_secs")]
    pub command_timeout_secs: u64,
}

impl Default for DeploySpec {
    fn default() -> Self {
        DeploySpec {
            environment: String::new(),
            hosts: Vec::new(),
            path: String::new(),
            before_switch: Vec::new(),
            after_switch: Vec::new(),
            health_check: None,
            max_parallel: 1,
            max_failures: 0,
            keep_releases: 5,
            rollback_on_failure: true,
            health_check_retries: default_health_retries(),
            health_check_interval_ms: default_health_interval_ms(),
            command_timeout_secs: default_command_timeout_secs(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_health_retries() -> u32 {
    5
}

fn default_health_interval_ms() -> u64 {
    2000
}

/// Ten minutes: a command that runs longer (a service started in the foreground, a health
/// check against an address that drops packets) would otherwise hold the environment for good.
pub fn default_command_timeout_secs() -> u64 {
    600
}

/// A step was put in its pool's ready queue (attempt 1, a retry whose delay passed, or a manual
/// retry).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepQueued {
    pub step: StepId,
    pub attempt: u32,
    pub pool: String,
    pub priority: i32,
}

/// An agent claimed a step: the claim script popped it, granted a lease and issued `token`.
/// Written by the claim script itself (with `cmsgpack`), never by a client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepClaimed {
    pub step: StepId,
    pub attempt: u32,
    pub agent: AgentId,
    pub token: FencingToken,
    pub lease_ttl_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepStarted {
    pub step: StepId,
    pub attempt: u32,
    pub agent: AgentId,
}

/// One line of step output. Lives in the job's separate, trimmed log stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: StepId,
    pub attempt: u32,
    /// `stdout`, `stderr` or `ferry` (the agent's own progress lines).
    pub stream: String,
    pub line: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSucceeded {
    pub step: StepId,
    pub attempt: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepFailed {
    pub step: StepId,
    pub attempt: u32,
    pub error: String,
    /// Infrastructure failures (clone, SSH, lost lease) are retryable; a command that exits
    /// non-zero is not.
    pub retryable: bool,
    #[serde(default)]
    pub exit_code: Option<i32>,
}

/// A failed attempt will be retried: `attempt` is the next attempt's number, queued at `due_ms`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRetryScheduled {
    pub step: StepId,
    pub attempt: u32,
    pub pool: String,
    pub priority: i32,
    pub due_ms: u64,
    pub reason: String,
}

/// A lease ran out without renewal; its token is dead. Written by the sweep script.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseExpired {
    pub step: StepId,
    pub attempt: u32,
    pub agent: AgentId,
    pub token: FencingToken,
}

/// The holder gave a step's lease back without finishing it (shutdown, cancellation).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepReleased {
    pub step: StepId,
    pub attempt: u32,
    pub agent: AgentId,
    pub token: FencingToken,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct JobSucceeded {}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobFailed {
    pub reason: String,
    #[serde(default)]
    pub step: Option<StepId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCancelled {
    pub reason: String,
    /// Who asked: `api`, `cli`, `webhook` (tag deleted).
    pub by: String,
}

/// A newer tag's deploy to the same environment made this job's queued deploy pointless.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSuperseded {
    pub by_job: JobId,
    pub environment: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployHostStarted {
    pub step: StepId,
    pub attempt: u32,
    pub host: String,
}

/// A host reached a phase: `uploaded`, `unpacked`, `switched`, `restarted`, `healthy`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployHostCheckpoint {
    pub step: StepId,
    pub attempt: u32,
    pub host: String,
    pub phase: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployHostFinished {
    pub step: StepId,
    pub attempt: u32,
    pub host: String,
    pub ok: bool,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub rolled_back: bool,
}

/// Under `host_key_policy = "accept-new"`, a deploy met a host whose key `known_hosts` did not
/// list, and pinned it there (trust on first use). A later different key for the host is
/// refused like under `strict`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKeyPinned {
    pub step: StepId,
    pub attempt: u32,
    /// The host as configured (`user@host:port`).
    pub host: String,
    /// `SHA256:<base64>`, as `ssh-keygen -l` prints it.
    pub fingerprint: String,
    /// The key's algorithm, e.g. `ssh-ed25519`.
    pub key_type: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentJoined {
    pub agent: AgentId,
    pub pools: Vec<String>,
    #[serde(default)]
    pub labels: Vec<String>,
    pub version: String,
    pub capacity: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentLost {
    pub agent: AgentId,
    pub reason: String,
}

/// An agent stopped on purpose (it was told to stop, and its running steps finished or were
/// handed back). Written by the agent itself to the `agents` stream; the store removes it from
/// the live agents in the same atomic append, so it is never reported lost for that stop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentLeft {
    pub agent: AgentId,
    pub reason: String,
}

/// Someone asked a live agent to stop (`POST /api/v1/agents/{name}/stop`): it takes no new work,
/// lets its running steps finish (handing them back after its grace period), records
/// `AgentLeft` and exits, as on SIGTERM. The store keeps the request for the agent's next
/// heartbeat; the agent's next `AgentJoined` (or `AgentLeft`) clears it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStopRequested {
    pub agent: AgentId,
    pub reason: String,
}

/// Someone paused an agent (`POST /api/v1/agents/{name}/pause`): it claims no new work until it
/// is resumed, lets its running steps finish, and stays up, heartbeating (a machine drained for
/// maintenance, GitLab's paused runner). The store keeps the pause, across the agent's restarts,
/// for its heartbeats to return, until `AgentResumed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPaused {
    pub agent: AgentId,
    pub reason: String,
}

/// A paused agent may claim work again (`POST /api/v1/agents/{name}/resume`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentResumed {
    pub agent: AgentId,
}

/// ferry told GitLab about a job's state (or tried to).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitStatusReported {
    /// The status name, e.g. `ferry/build`, `ferry/deploy: production`.
    pub name: String,
    pub state: String,
    pub sha: String,
    #[serde(default)]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub error: Option<String>,
}

/// A build's artifact is in the artifact store under a content-addressed key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactPublished {
    pub step: StepId,
    pub attempt: u32,
    /// File name, `<project>-<tag>-<shortsha>.tar.gz`.
    pub name: String,
    /// Key in the artifact store.
    pub key: String,
    pub size: u64,
    pub sha256: String,
}

/// ferry told GitLab about a deploy of a job to an environment (or tried to): a deployment was
/// created (`running`, or directly a final status) or moved to its final status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentReported {
    pub environment: String,
    /// GitLab's id of the deployment, once GitLab created one.
    #[serde(default)]
    pub deployment_id: Option<u64>,
    /// `running`, `success`, `failed` or `canceled`.
    pub status: String,
    #[serde(default)]
    pub http_status: Option<u16>,
    #[serde(default)]
    pub error: Option<String>,
}

/// The job's output lines were removed: it had ended longer ago than the log retention
/// (`coordinator.keep_logs`). Appended by the coordinator holding the sweep lock; the store
/// deletes the job's log in the same atomic append. The job's events stay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsExpired {
    /// The retention that applied, in milliseconds after the job's end.
    pub kept_for_ms: u64,
}

/// The artifact the job published or shipped was deleted from the artifact store: every job
/// that used it had ended longer ago than the artifact retention (`artifacts.keep`), and no
/// environment runs it or may roll back to it. Appended by the coordinator holding the sweep
/// lock to each such job, before the object is deleted. The job's events stay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactExpired {
    /// The artifact's key in the store.
    pub key: String,
    /// The retention that applied, in milliseconds after the last job that used it ended.
    pub kept_for_ms: u64,
}
