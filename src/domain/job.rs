//! One job's state: `evolve(state, event)` over the job's stream.

use ferry_proto::{
    AgentId, ArtifactPublished, ArtifactRef, Event, FencingToken, JobCreated, JobId, StepId,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a job stands, as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobPhase {
    /// Planned; no step has been claimed yet.
    Queued,
    /// At least one step was claimed and the job has not ended.
    Running,
    Succeeded,
    Failed,
    Cancelled,
    Superseded,
}

impl JobPhase {
    pub fn is_terminal(self) -> bool {
        !matches!(self, JobPhase::Queued | JobPhase::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobPhase::Queued => "queued",
            JobPhase::Running => "running",
            JobPhase::Succeeded => "succeeded",
            JobPhase::Failed => "failed",
            JobPhase::Cancelled => "cancelled",
            JobPhase::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<JobPhase> {
        [
            JobPhase::Queued,
            JobPhase::Running,
            JobPhase::Succeeded,
            JobPhase::Failed,
            JobPhase::Cancelled,
            JobPhase::Superseded,
        ]
        .into_iter()
        .find(|p| p.as_str() == s)
    }
}

/// Where one step stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum StepStatus {
    /// Waiting for an earlier step.
    Pending,
    /// In its pool's ready queue.
    Queued {
        attempt: u32,
    },
    /// Waiting for a retry's due time (store clock ms).
    Delayed {
        attempt: u32,
        due_ms: u64,
    },
    /// Held by an agent under a lease.
    Claimed {
        attempt: u32,
        agent: AgentId,
        token: FencingToken,
        started: bool,
    },
    /// The attempt ended without an outcome (lease expired or released); the coordinator
    /// decides what next.
    Interrupted {
        attempt: u32,
        reason: String,
    },
    Succeeded {
        attempt: u32,
    },
    Failed {
        attempt: u32,
        error: String,
        retryable: bool,
    },
}

/// Progress of one host of a deploy step.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct HostProgress {
    /// Last checkpoint reached: `started`, `uploaded`, `unpacked`, `switched`, `restarted`,
    /// `healthy`, or `finished`.
    pub phase: String,
    pub ok: Option<bool>,
    pub error: Option<String>,
    pub rolled_back: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    pub step: StepId,
    pub pool: String,
    pub priority: i32,
    pub status: StepStatus,
    /// Highest attempt number seen (0 before the first queueing).
    pub attempts: u32,
    /// Attempts handed back by their agent (`StepReleased`: a stopping agent, a claim it could
    /// not read). Retries do not count them against `max_attempts`, up to a bound.
    #[serde(default)]
    pub released: u32,
    pub artifact: Option<ArtifactPublished>,
    pub hosts: BTreeMap<String, HostProgress>,
}

impl StepState {
    /// The attempt the step is on, if it has one.
    pub fn attempt(&self) -> Option<u32> {
        match &self.status {
            StepStatus::Pending => None,
            StepStatus::Queued { attempt }
            | StepStatus::Delayed { attempt, .. }
            | StepStatus::Claimed { attempt, .. }
            | StepStatus::Interrupted { attempt, .. }
            | StepStatus::Succeeded { attempt }
            | StepStatus::Failed { attempt, .. } => Some(*attempt),
        }
    }
}

/// The terminal job events: after one, a job's phase is terminal.
pub fn ends_job(event: &Event) -> bool {
    matches!(
        event,
        Event::JobSucceeded(_)
            | Event::JobFailed(_)
            | Event::JobCancelled(_)
            | Event::JobSuperseded(_)
    )
}

/// The state of one job: a fold of its stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    pub id: JobId,
    /// Number of events folded (= the stream's version).
    pub version: u64,
    /// The plan, once `JobCreated` was folded.
    pub plan: Option<JobCreated>,
    pub phase: JobPhase,
    /// Steps in plan order.
    pub steps: Vec<StepState>,
    /// Why the job ended, when it ended other than by succeeding.
    pub reason: Option<String>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    /// When the job's output lines were removed (`LogsExpired`), if they were.
    #[serde(default)]
    pub logs_expired_at_ms: Option<u64>,
    /// When the artifact the job published or shipped was deleted (`ArtifactExpired`), if it
    /// was: it can be neither deployed nor rolled back to.
    #[serde(default)]
    pub artifact_expired_at_ms: Option<u64>,
}

impl JobState {
    pub fn new(id: JobId) -> Self {
        JobState {
            id,
            version: 0,
            plan: None,
            phase: JobPhase::Queued,
            steps: Vec::new(),
            reason: None,
            created_at_ms: 0,
            updated_at_ms: 0,
            logs_expired_at_ms: None,
            artifact_expired_at_ms: None,
        }
    }

    /// Folds a whole stream.
    pub fn fold<'a>(id: JobId, events: impl IntoIterator<Item = (&'a Event, u64)>) -> Self {
        let mut state = JobState::new(id);
        for (event, at_ms) in events {
            state.evolve(event, at_ms);
        }
        state
    }

    pub fn step(&self, step: &StepId) -> Option<&StepState> {
        self.steps.iter().find(|s| &s.step == step)
    }

    /// The artifact this job's deploys ship: what its own build published, else the earlier
    /// job's artifact its plan names (a manual deploy or rollback).
    pub fn artifact(&self) -> Option<ArtifactRef> {
        let own = self.steps.iter().find_map(|s| s.artifact.as_ref());
        match own {
            Some(a) => Some(ArtifactRef {
                job: self.id,
                name: a.name.clone(),
                key: a.key.clone(),
                size: a.size,
                sha256: a.sha256.clone(),
            }),
            None => self.plan.as_ref().and_then(|p| p.artifact.clone()),
        }
    }

    fn step_mut(&mut self, step: &StepId) -> Option<&mut StepState> {
        self.steps.iter_mut().find(|s| &s.step == step)
    }

    /// Applies one stored event. Never fails: an event was validated when it was decided, and a
    /// stored event that no longer fits (a step the plan lacks) changes nothing but the version.
    pub fn evolve(&mut self, event: &Event, at_ms: u64) {
        self.version += 1;
        match event {
            // Housekeeping after the end: not an update of the job itself.
            Event::LogsExpired(_) => {
                self.logs_expired_at_ms = Some(at_ms);
                return;
            }
            Event::ArtifactExpired(_) => {
                self.artifact_expired_at_ms = Some(at_ms);
                return;
            }
            _ => {}
        }
        self.updated_at_ms = at_ms;
        if self.phase.is_terminal() {
            // An ended job is frozen: nothing of it may wait or run again. The store mirrors
            // this: queueing effects on an ended job are no-ops.
            return;
        }
        match event {
            Event::JobCreated(plan) => {
                self.created_at_ms = at_ms;
                self.steps = plan
                    .steps
                    .iter()
                    .map(|p| StepState {
                        step: p.step.clone(),
                        pool: p.pool.clone(),
                        priority: p.priority,
                        status: StepStatus::Pending,
                        attempts: 0,
                        released: 0,
                        artifact: None,
                        hosts: BTreeMap::new(),
                    })
                    .collect();
                self.plan = Some(plan.clone());
            }
            Event::StepQueued(e) => {
                self.route(&e.step, &e.pool, e.priority);
                self.set(
                    &e.step,
                    e.attempt,
                    StepStatus::Queued { attempt: e.attempt },
                )
            }
            Event::StepRetryScheduled(e) => {
                self.route(&e.step, &e.pool, e.priority);
                self.set(
                    &e.step,
                    e.attempt,
                    StepStatus::Delayed {
                        attempt: e.attempt,
                        due_ms: e.due_ms,
                    },
                )
            }
            Event::StepClaimed(e) => {
                if self.phase == JobPhase::Queued {
                    self.phase = JobPhase::Running;
                }
                self.set(
                    &e.step,
                    e.attempt,
                    StepStatus::Claimed {
                        attempt: e.attempt,
                        agent: e.agent.clone(),
                        token: e.token,
                        started: false,
                    },
                )
            }
            Event::StepStarted(e) => {
                if let Some(StepStatus::Claimed { started, .. }) =
                    self.step_mut(&e.step).map(|s| &mut s.status)
                {
                    *started = true;
                }
            }
            Event::StepSucceeded(e) => self.set(
                &e.step,
                e.attempt,
                StepStatus::Succeeded { attempt: e.attempt },
            ),
            Event::StepFailed(e) => self.set(
                &e.step,
                e.attempt,
                StepStatus::Failed {
                    attempt: e.attempt,
                    error: e.error.clone(),
                    retryable: e.retryable,
                },
            ),
            Event::LeaseExpired(e) => self.set(
                &e.step,
                e.attempt,
                StepStatus::Interrupted {
                    attempt: e.attempt,
                    reason: format!("lease {} of agent {} expired", e.token, e.agent),
                },
            ),
            Event::StepReleased(e) => {
                self.set(
                    &e.step,
                    e.attempt,
                    StepStatus::Interrupted {
                        attempt: e.attempt,
                        reason: format!("released by agent {}: {}", e.agent, e.reason),
                    },
                );
                if let Some(s) = self.step_mut(&e.step) {
                    s.released += 1;
                }
            }
            Event::ArtifactPublished(e) => {
                if let Some(s) = self.step_mut(&e.step) {
                    s.artifact = Some(e.clone());
                }
            }
            Event::DeployHostStarted(e) => self.host(&e.step, &e.host, |h| {
                *h = HostProgress {
                    phase: "started".into(),
                    ..HostProgress::default()
                }
            }),
            Event::DeployHostCheckpoint(e) => {
                self.host(&e.step, &e.host, |h| h.phase = e.phase.clone())
            }
            Event::DeployHostFinished(e) => self.host(&e.step, &e.host, |h| {
                h.phase = "finished".into();
                h.ok = Some(e.ok);
                h.error = e.error.clone();
                h.rolled_back = e.rolled_back;
            }),
            Event::JobSucceeded(_) => self.end(JobPhase::Succeeded, None),
            Event::JobFailed(e) => self.end(JobPhase::Failed, Some(e.reason.clone())),
            Event::JobCancelled(e) => self.end(JobPhase::Cancelled, Some(e.reason.clone())),
            Event::JobSuperseded(e) => self.end(
                JobPhase::Superseded,
                Some(format!(
                    "superseded by job {} on {}",
                    e.by_job, e.environment
                )),
            ),
            // Recorded for the audit trail (which key was trusted on first use); the job's
            // state does not depend on it.
            Event::HostKeyPinned(_)
            | Event::WebhookReceived(_)
            | Event::StepLog(_)
            | Event::AgentJoined(_)
            | Event::AgentLost(_)
            | Event::AgentLeft(_)
            | Event::AgentStopRequested(_)
            | Event::AgentPaused(_)
            | Event::AgentResumed(_)
            | Event::CommitStatusReported(_)
            | Event::DeploymentReported(_)
            | Event::LogsExpired(_)
            | Event::ArtifactExpired(_) => {}
        }
    }

    fn set(&mut self, step: &StepId, attempt: u32, status: StepStatus) {
        if let Some(s) = self.step_mut(step) {
            s.attempts = s.attempts.max(attempt);
            s.status = status;
        }
    }

    /// A queueing event names the pool and priority it queues with; they win over the plan's.
    fn route(&mut self, step: &StepId, pool: &str, priority: i32) {
        if let Some(s) = self.step_mut(step) {
            s.pool = pool.to_string();
            s.priority = priority;
        }
    }

    fn host(&mut self, step: &StepId, host: &str, f: impl FnOnce(&mut HostProgress)) {
        if let Some(s) = self.step_mut(step) {
            f(s.hosts.entry(host.to_string()).or_default());
        }
    }

    /// A terminal event: the job is over, so nothing of it waits in a queue or holds a lease
    /// (the store's `ClearJob` effect does the same to the live structures).
    fn end(&mut self, phase: JobPhase, reason: Option<String>) {
        self.phase = phase;
        self.reason = reason;
        for s in &mut self.steps {
            if matches!(
                s.status,
                StepStatus::Queued { .. } | StepStatus::Delayed { .. } | StepStatus::Claimed { .. }
            ) {
                s.status = StepStatus::Interrupted {
                    attempt: s.attempt().unwrap_or(0),
                    reason: format!("job {}", phase.as_str()),
                };
            }
        }
    }
}
