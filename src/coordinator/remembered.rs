//! What a coordinator remembers of recent jobs: the last exact fold of each, so that feed
//! entries continuing it need no read of the job's stream.
//!
//! Bounded in two generations: new states go into `recent`; when `recent` is full — it holds
//! `per_generation` jobs, or its states weigh `bytes_per_generation` (a rough estimate of their
//! size: a deploy to a thousand hosts weighs hundreds of times a build) — it becomes `older`
//! (the previous `older` is dropped). A lookup checks both, so the most recent jobs are always
//! kept, and at most two generations are held. A backlog larger than that costs re-reads,
//! never wrong decisions: a forgotten job is read again. A job whose end the coordinator has
//! seen in the feed is forgotten at once ([`forget`]), so the bound is spent on jobs still
//! running.
//!
//! [`forget`]: Remembered::forget

use crate::domain::JobState;
use ferry_proto::{JobId, StepSpec};
use std::collections::HashMap;

pub(super) struct Remembered {
    per_generation: usize,
    bytes_per_generation: usize,
    recent: HashMap<JobId, (JobState, usize)>,
    recent_bytes: usize,
    older: HashMap<JobId, (JobState, usize)>,
}

/// Jobs per generation by default: up to 2 × 16,384 jobs remembered.
pub(super) const PER_GENERATION: usize = 16_384;

/// Estimated bytes per generation by default: up to about 2 × 64 MiB of remembered states.
pub(super) const BYTES_PER_GENERATION: usize = 64 << 20;

impl Default for Remembered {
    fn default() -> Self {
        Remembered::new(PER_GENERATION, BYTES_PER_GENERATION)
    }
}

/// A rough size in bytes of a remembered state, counting what grows with a job: its plan's
/// steps, commands and hosts, and its steps' per-host progress. Meant to bound memory, not to
/// account for it exactly.
pub(super) fn weight(state: &JobState) -> usize {
    let texts = |v: &[String]| v.iter().map(|t| t.len() + 32).sum::<usize>();
    let plan: usize = state.plan.as_ref().map_or(0, |p| {
        p.steps
            .iter()
            .map(|step| {
                192 + match &step.spec {
                    StepSpec::Build(b) => {
                        texts(&b.commands) + texts(&b.artifacts) + texts(&b.secrets)
                    }
                    StepSpec::Deploy(d) => {
                        texts(&d.hosts) + texts(&d.before_switch) + texts(&d.after_switch)
                    }
                    StepSpec::Noop => 0,
                }
            })
            .sum()
    });
    let steps: usize = state
        .steps
        .iter()
        .map(|s| 160 + s.hosts.keys().map(|h| h.len() + 128).sum::<usize>())
        .sum();
    512 + plan + steps
}

impl Remembered {
    pub(super) fn new(per_generation: usize, bytes_per_generation: usize) -> Self {
        Remembered {
            per_generation: per_generation.max(1),
            bytes_per_generation: bytes_per_generation.max(1),
            recent: HashMap::new(),
            recent_bytes: 0,
            older: HashMap::new(),
        }
    }

    pub(super) fn get(&self, job: &JobId) -> Option<&JobState> {
        self.recent
            .get(job)
            .or_else(|| self.older.get(job))
            .map(|(s, _)| s)
    }

    /// Remembers `state`, an exact fold of its job's first `state.version` events.
    pub(super) fn put(&mut self, state: &JobState) {
        self.older.remove(&state.id);
        if let Some((_, w)) = self.recent.remove(&state.id) {
            self.recent_bytes -= w;
        }
        let w = weight(state);
        let full = self.recent.len() >= self.per_generation
            || (self.recent_bytes + w > self.bytes_per_generation && !self.recent.is_empty());
        if full {
            self.older = std::mem::take(&mut self.recent);
            self.recent_bytes = 0;
        }
        self.recent.insert(state.id, (state.clone(), w));
        self.recent_bytes += w;
    }

    pub(super) fn forget(&mut self, job: &JobId) {
        if let Some((_, w)) = self.recent.remove(job) {
            self.recent_bytes -= w;
        }
        self.older.remove(job);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.recent.len() + self.older.len()
    }

    /// The estimated bytes held, both generations.
    #[cfg(test)]
    pub(super) fn bytes(&self) -> usize {
        self.recent_bytes + self.older.values().map(|(_, w)| w).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(version: u64) -> JobState {
        let mut s = JobState::new(JobId::new());
        s.version = version;
        s
    }

    #[test]
    fn the_most_recent_jobs_stay_and_at_most_two_generations_are_held() {
        let mut r = Remembered::new(4, usize::MAX);
        let states: Vec<JobState> = (0..10).map(state).collect();
        for s in &states {
            r.put(s);
            assert!(r.len() <= 8, "{} states held", r.len());
        }
        // The last `per_generation` are always there, with what was put last.
        for s in &states[6..] {
            assert_eq!(r.get(&s.id).map(|k| k.version), Some(s.version));
        }
        assert!(
            r.get(&states[0].id).is_none(),
            "the oldest generation was dropped"
        );

        // Putting a job again replaces its state (in whichever generation it was).
        let mut again = states[6].clone();
        again.version = 100;
        r.put(&again);
        assert_eq!(r.get(&again.id).map(|k| k.version), Some(100));
    }

    /// A deploy job to many hosts weighs far more than a build; the bytes bound holds however
    /// few jobs there are.
    #[test]
    fn heavy_states_are_bounded_by_their_weight() {
        use crate::domain::job::HostProgress;
        use crate::domain::{StepState, StepStatus};
        let heavy = |hosts: usize| {
            let mut s = state(1);
            s.steps.push(StepState {
                step: "deploy:prod".into(),
                pool: "default".into(),
                priority: 0,
                status: StepStatus::Pending,
                attempts: 0,
                released: 0,
                artifact: None,
                hosts: (0..hosts)
                    .map(|h| {
                        (
                            format!("web-{h:05}.example.internal"),
                            HostProgress::default(),
                        )
                    })
                    .collect(),
            });
            s
        };
        let one = weight(&heavy(1000));
        assert!(
            one > 100 * weight(&state(1)),
            "a 1000-host deploy weighs {one}"
        );
        let budget = 5 * one;
        let mut r = Remembered::new(1_000_000, budget);
        let states: Vec<JobState> = (0..40).map(|_| heavy(1000)).collect();
        for s in &states {
            r.put(s);
            assert!(r.bytes() <= 2 * budget, "{} bytes held", r.bytes());
        }
        assert!(r.len() <= 10, "{} states held", r.len());
        let last = states.last().unwrap();
        assert!(r.get(&last.id).is_some(), "the newest is kept");
        // Replacing and forgetting keep the count of bytes exact.
        r.put(last);
        r.forget(&last.id);
        let held: usize = states
            .iter()
            .filter(|s| r.get(&s.id).is_some())
            .map(weight)
            .sum();
        assert_eq!(r.bytes(), held);
    }

    #[test]
    fn a_forgotten_job_is_gone_from_both_generations() {
        let mut r = Remembered::new(2, usize::MAX);
        let (a, b, c) = (state(1), state(2), state(3));
        r.put(&a);
        r.put(&b);
        r.put(&c); // a and b move to the older generation
        r.forget(&a.id);
        r.forget(&c.id);
        assert!(r.get(&a.id).is_none());
        assert!(r.get(&c.id).is_none());
        assert_eq!(r.get(&b.id).map(|k| k.version), Some(2));
        assert_eq!(r.len(), 1);
    }
}
