//! What a coordinator remembers of recent jobs: the last exact fold of each, so that feed
//! entries continuing it need no read of the job's stream.
//!
//! Bounded by count in two generations: new states go into `recent`; when `recent` is full it
//! becomes `older` (the previous `older` is dropped). A lookup checks both, so the most recent
//! `per_generation` jobs are always kept and at most twice that many are held. A backlog
//! larger than that costs re-reads, never wrong decisions: a forgotten job is read again.
//! A job whose end the coordinator has seen in the feed is forgotten at once ([`forget`]), so
//! the bound is spent on jobs still running.
//!
//! [`forget`]: Remembered::forget

use crate::domain::JobState;
use ferry_proto::JobId;
use std::collections::HashMap;

pub(super) struct Remembered {
    per_generation: usize,
    recent: HashMap<JobId, JobState>,
    older: HashMap<JobId, JobState>,
}

/// Jobs per generation by default: up to 2 × 16,384 jobs remembered.
pub(super) const PER_GENERATION: usize = 16_384;

impl Default for Remembered {
    fn default() -> Self {
        Remembered::new(PER_GENERATION)
    }
}

impl Remembered {
    pub(super) fn new(per_generation: usize) -> Self {
        Remembered {
            per_generation: per_generation.max(1),
            recent: HashMap::new(),
            older: HashMap::new(),
        }
    }

    pub(super) fn get(&self, job: &JobId) -> Option<&JobState> {
        self.recent.get(job).or_else(|| self.older.get(job))
    }

    /// Remembers `state`, an exact fold of its job's first `state.version` events.
    pub(super) fn put(&mut self, state: &JobState) {
        self.older.remove(&state.id);
        if self.recent.len() >= self.per_generation && !self.recent.contains_key(&state.id) {
            self.older = std::mem::take(&mut self.recent);
        }
        self.recent.insert(state.id, state.clone());
    }

    pub(super) fn forget(&mut self, job: &JobId) {
        self.recent.remove(job);
        self.older.remove(job);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.recent.len() + self.older.len()
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
        let mut r = Remembered::new(4);
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

    #[test]
    fn a_forgotten_job_is_gone_from_both_generations() {
        let mut r = Remembered::new(2);
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
