//! The system view: every job's state, every agent, and — derived from them — what waits in the
//! queues and who holds which lease. A fold over the global log; snapshots store it together with
//! the log position it reflects.

use super::job::{JobPhase, JobState, StepStatus};
use ferry_proto::{AgentId, Event, FencingToken, JobId, StepId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub pools: Vec<String>,
    pub labels: Vec<String>,
    pub version: String,
    pub capacity: u32,
    pub joined_at_ms: u64,
    /// Set when the agent was recorded as lost, with the reason.
    pub lost: Option<String>,
    /// Set when the agent left on purpose (`AgentLeft`), with the reason.
    #[serde(default)]
    pub left: Option<String>,
    /// Set while a stop requested of the agent (`AgentStopRequested`) is pending, with the
    /// reason; cleared when it leaves or joins again.
    #[serde(default)]
    pub stop_requested: Option<String>,
    /// Set while the agent is paused (`AgentPaused`), with the reason; kept when it joins
    /// again, cleared by `AgentResumed`.
    #[serde(default)]
    pub paused: Option<String>,
    /// When it was last recorded lost or left (`at_ms` of that event); cleared when it joins
    /// again.
    #[serde(default)]
    pub gone_at_ms: Option<u64>,
}

/// A queued step as the log says it should be queued.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QueueEntry {
    pub job: JobId,
    pub step: StepId,
    pub attempt: u32,
    pub pool: String,
    pub priority: i32,
    /// `Some(due)` while delayed.
    pub due_ms: Option<u64>,
}

/// A lease as the log says it is held. Deadlines are not in the log (renewals are not events).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LeaseEntry {
    pub job: JobId,
    pub step: StepId,
    pub attempt: u32,
    pub agent: AgentId,
    pub token: FencingToken,
}

/// The fold of the global log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct View {
    /// The last log position folded, as the store spells it.
    pub position: Option<String>,
    /// Number of events folded.
    pub events: u64,
    pub jobs: BTreeMap<JobId, JobState>,
    pub agents: BTreeMap<AgentId, AgentState>,
    /// Webhook deliveries recorded, by action (`build`, `delete`, `ignored`, …).
    pub webhooks: BTreeMap<String, u64>,
}

impl View {
    /// Folds one event written to `stream` at `at_ms`, found at log position `pos`.
    pub fn apply(&mut self, pos: &str, stream: &str, event: &Event, at_ms: u64) {
        self.position = Some(pos.to_string());
        self.events += 1;
        if let Some(job) = stream.strip_prefix("job:").and_then(|j| j.parse().ok()) {
            self.jobs
                .entry(job)
                .or_insert_with(|| JobState::new(job))
                .evolve(event, at_ms);
            return;
        }
        match event {
            Event::WebhookReceived(w) => *self.webhooks.entry(w.action.clone()).or_default() += 1,
            Event::AgentJoined(a) => {
                let paused = self.agents.get(&a.agent).and_then(|s| s.paused.clone());
                self.agents.insert(
                    a.agent.clone(),
                    AgentState {
                        pools: a.pools.clone(),
                        labels: a.labels.clone(),
                        version: a.version.clone(),
                        capacity: a.capacity,
                        joined_at_ms: at_ms,
                        lost: None,
                        left: None,
                        stop_requested: None,
                        paused,
                        gone_at_ms: None,
                    },
                );
            }
            Event::AgentLost(a) => {
                if let Some(agent) = self.agents.get_mut(&a.agent) {
                    agent.lost = Some(a.reason.clone());
                    agent.gone_at_ms = Some(at_ms);
                }
            }
            Event::AgentLeft(a) => {
                if let Some(agent) = self.agents.get_mut(&a.agent) {
                    agent.left = Some(a.reason.clone());
                    agent.stop_requested = None;
                    agent.gone_at_ms = Some(at_ms);
                }
            }
            Event::AgentStopRequested(a) => {
                if let Some(agent) = self.agents.get_mut(&a.agent) {
                    agent.stop_requested = Some(a.reason.clone());
                }
            }
            Event::AgentPaused(a) => {
                if let Some(agent) = self.agents.get_mut(&a.agent) {
                    agent.paused = Some(a.reason.clone());
                }
            }
            Event::AgentResumed(a) => {
                if let Some(agent) = self.agents.get_mut(&a.agent) {
                    agent.paused = None;
                }
            }
            _ => {}
        }
    }

    /// Jobs per phase.
    pub fn jobs_by_phase(&self) -> BTreeMap<JobPhase, usize> {
        let mut out = BTreeMap::new();
        for j in self.jobs.values() {
            *out.entry(j.phase).or_default() += 1;
        }
        out
    }

    /// What the queues must hold: steps of live jobs that are queued or delayed.
    pub fn queue(&self) -> BTreeSet<QueueEntry> {
        self.jobs.values().flat_map(queue_of).collect()
    }

    /// Which leases must be live: steps of live jobs that are claimed.
    pub fn leases(&self) -> BTreeSet<LeaseEntry> {
        self.jobs.values().flat_map(leases_of).collect()
    }
}

/// The queue entries one job implies.
pub fn queue_of(job: &JobState) -> Vec<QueueEntry> {
    job.steps
        .iter()
        .filter_map(|s| {
            let (attempt, due_ms) = match s.status {
                StepStatus::Queued { attempt } => (attempt, None),
                StepStatus::Delayed { attempt, due_ms } => (attempt, Some(due_ms)),
                _ => return None,
            };
            Some(QueueEntry {
                job: job.id,
                step: s.step.clone(),
                attempt,
                pool: s.pool.clone(),
                priority: s.priority,
                due_ms,
            })
        })
        .collect()
}

/// The leases one job implies.
pub fn leases_of(job: &JobState) -> Vec<LeaseEntry> {
    job.steps
        .iter()
        .filter_map(|s| match &s.status {
            StepStatus::Claimed {
                attempt,
                agent,
                token,
                ..
            } => Some(LeaseEntry {
                job: job.id,
                step: s.step.clone(),
                attempt: *attempt,
                agent: agent.clone(),
                token: *token,
            }),
            _ => None,
        })
        .collect()
}
