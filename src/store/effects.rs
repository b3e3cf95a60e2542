//! What appending an event does to the live structures (queues, leases, live agents). Pure,
//! and shared by every backend, so that "the queues are a projection of the log" holds by
//! construction.

use super::StreamId;
use ferry_proto::{AgentId, Event, JobCreated, StepId, StepSpec};

/// A change to the live structures that an appended event implies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Put the step in its pool's ready queue (replacing any queue entry it had).
    Enqueue {
        step: StepId,
        attempt: u32,
        pool: String,
        priority: i32,
    },
    /// Put the step in the delayed set until `due_ms` (store clock), then in its ready queue.
    Schedule {
        step: StepId,
        attempt: u32,
        pool: String,
        priority: i32,
        due_ms: u64,
    },
    /// The step's attempt is over: drop its lease and any queue entry.
    Finish { step: StepId },
    /// The job is over: drop every queue entry and lease it has, and (the first time it ends)
    /// record it, with the time of this append, among the ended jobs whose logs are kept
    /// (see [`crate::store::Logs::logs_to_expire`]).
    ClearJob,
    /// The job's log goes (its output lines), and it leaves the ended jobs whose logs are kept.
    DropLogs,
    /// Record the job under these index keys (see [`index_keys`]).
    Index { keys: Vec<String> },
    /// The agent leaves the registry of live agents, and any stop request for it goes
    /// (`AgentLeft`, in the `agents` stream).
    Leave { agent: AgentId },
    /// A stop is requested of the agent, for its next heartbeat to say (`AgentStopRequested`).
    RequestStop { agent: AgentId, reason: String },
    /// The agent (re)joined: an earlier stop request no longer applies (`AgentJoined`).
    Join { agent: AgentId },
    /// The agent claims nothing until resumed; its heartbeats say so (`AgentPaused`).
    Pause { agent: AgentId, reason: String },
    /// The agent's pause ends (`AgentResumed`).
    Resume { agent: AgentId },
}

impl Effect {
    /// Whether the effect is on the agent registry (appended to the `agents` stream) rather
    /// than on a job's queues.
    fn on_agents(&self) -> bool {
        matches!(
            self,
            Effect::Leave { .. }
                | Effect::RequestStop { .. }
                | Effect::Join { .. }
                | Effect::Pause { .. }
                | Effect::Resume { .. }
        )
    }
}

/// Why `effect` may not be appended to `stream`, if it may not: the agent registry's effects
/// belong in the `agents` stream, every other effect in a job's stream.
pub fn misplaced(effect: &Effect, event: &Event, stream: &StreamId) -> Option<String> {
    let name = stream.name();
    match (effect.on_agents(), stream) {
        (true, StreamId::Agents) | (false, StreamId::Job(_)) => None,
        (true, _) => Some(format!(
            "{} belongs in the agents stream, not {name}",
            event.name()
        )),
        (false, _) => Some(format!(
            "{} changes job queues but {name} is not a job stream",
            event.name()
        )),
    }
}

/// The index keys a job is found under. Keys starting with [`LIVE`] hold only jobs that have not
/// ended (the store drops the job from them with its terminal event); the others keep every job.
/// The coordinator uses them to cancel a deleted tag's jobs and to order deploys per environment;
/// manual deploys and rollbacks use them to find a tag's artifact and an environment's releases.
pub fn index_keys(plan: &JobCreated) -> Vec<String> {
    let tag = tag_index(&plan.project, &plan.tag);
    let mut keys = vec![format!("{LIVE}{tag}"), tag];
    if let Some(artifact) = &plan.artifact {
        keys.push(artifact_index(&artifact.key));
    }
    for step in &plan.steps {
        if let StepSpec::Deploy(d) = &step.spec {
            let env = environment_index(&plan.project, &d.environment);
            keys.push(format!("{LIVE}{env}"));
            keys.push(env);
        }
    }
    keys
}

/// Prefix of index keys that only hold jobs that have not ended.
pub const LIVE: &str = "live:";

/// Index key of the jobs of one tag of one project.
pub fn tag_index(project: &str, tag: &str) -> String {
    format!("tag:{project}:{tag}")
}

/// Index key of the jobs that published or shipped the artifact stored under `key` (its
/// builds' `ArtifactPublished`, and the plans of deploys and rollbacks that carry it): what the
/// artifact retention checks before it deletes the object.
pub fn artifact_index(key: &str) -> String {
    format!("artifact:{key}")
}

/// Index key of the jobs that deploy to one environment of one project.
pub fn environment_index(project: &str, environment: &str) -> String {
    format!("env:{project}:{environment}")
}

/// The effect of appending `event` to a job's stream. Events that scripts write themselves
/// (`StepClaimed`, `LeaseExpired`, `StepReleased`) carry out their effects inside the script;
/// appended by a client (a migration replaying another store's log) they end the step's stay in
/// the queue, since no lease can come with them.
pub fn effects_of(event: &Event) -> Option<Effect> {
    Some(match event {
        Event::StepClaimed(e) => Effect::Finish {
            step: e.step.clone(),
        },
        Event::LeaseExpired(e) => Effect::Finish {
            step: e.step.clone(),
        },
        Event::StepReleased(e) => Effect::Finish {
            step: e.step.clone(),
        },
        Event::StepQueued(e) => Effect::Enqueue {
            step: e.step.clone(),
            attempt: e.attempt,
            pool: e.pool.clone(),
            priority: e.priority,
        },
        Event::StepRetryScheduled(e) => Effect::Schedule {
            step: e.step.clone(),
            attempt: e.attempt,
            pool: e.pool.clone(),
            priority: e.priority,
            due_ms: e.due_ms,
        },
        Event::StepSucceeded(e) => Effect::Finish {
            step: e.step.clone(),
        },
        Event::StepFailed(e) => Effect::Finish {
            step: e.step.clone(),
        },
        Event::JobSucceeded(_)
        | Event::JobFailed(_)
        | Event::JobCancelled(_)
        | Event::JobSuperseded(_) => Effect::ClearJob,
        Event::LogsExpired(_) => Effect::DropLogs,
        Event::AgentLeft(e) => Effect::Leave {
            agent: e.agent.clone(),
        },
        Event::AgentStopRequested(e) => Effect::RequestStop {
            agent: e.agent.clone(),
            reason: e.reason.clone(),
        },
        Event::AgentJoined(e) => Effect::Join {
            agent: e.agent.clone(),
        },
        Event::AgentPaused(e) => Effect::Pause {
            agent: e.agent.clone(),
            reason: e.reason.clone(),
        },
        Event::AgentResumed(e) => Effect::Resume {
            agent: e.agent.clone(),
        },
        Event::JobCreated(plan) => Effect::Index {
            keys: index_keys(plan),
        },
        Event::ArtifactPublished(a) => Effect::Index {
            keys: vec![artifact_index(&a.key)],
        },
        _ => return None,
    })
}

/// Priorities are clamped to this range when ordering a queue.
pub const PRIORITY_RANGE: (i32, i32) = (-100, 100);

/// The sort score of a ready entry: higher priority first, then earlier enqueue time. Exact in
/// an `f64` (Redis sorted-set scores) for any enqueue time before the year 2248.
pub fn queue_score(priority: i32, enqueued_ms: u64) -> f64 {
    let p = priority.clamp(PRIORITY_RANGE.0, PRIORITY_RANGE.1);
    let band = (PRIORITY_RANGE.1 - p) as u64; // 0 ..= 200, 0 = most urgent
    (band * (1u64 << 43) + enqueued_ms.min((1u64 << 43) - 1)) as f64
}

/// When a step with ready-queue score `score` was queued (the inverse of [`queue_score`]'s
/// time part).
pub fn queued_at(score: f64) -> u64 {
    (score as u64) % (1u64 << 43)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_score_gives_back_its_queue_time() {
        for p in [-100, -3, 0, 7, 100] {
            assert_eq!(
                queued_at(queue_score(p, 1_800_000_000_123)),
                1_800_000_000_123
            );
        }
    }

    #[test]
    fn higher_priority_sorts_first_then_older() {
        let now = 1_800_000_000_000;
        assert!(queue_score(10, now + 1_000_000) < queue_score(0, now));
        assert!(queue_score(0, now) < queue_score(0, now + 1));
        assert!(queue_score(-100, now) < queue_score(-101, now + 1) + 1.0);
        // exact in f64
        let s = queue_score(-100, now);
        assert_eq!(s as u64 as f64, s);
        assert_eq!(s as u64 % (1 << 43), now);
    }
}
