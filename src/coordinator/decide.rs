//! What a coordinator decides for a job, as a pure function of the job's state.
//!
//! Decisions are level-triggered: [`next`] looks at where the job stands, not at which event
//! woke the coordinator. Handling a feed entry twice, or two coordinators handling the same job,
//! can therefore never double an effect: the second look sees the first decision already in the
//! stream (and optimistic concurrency makes sure only one of two racing decisions lands).

use crate::domain::{JobPhase, JobState, StepStatus};
use ferry_proto::{Event, JobFailed, JobId, JobSucceeded, StepId, StepQueued, StepRetryScheduled};
use std::time::Duration;

/// How failures are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts per step, the first included.
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles per attempt.
    pub base: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `next` (≥ 2): `base * 2^(next-2)`, capped at `max`, scaled by a
    /// jitter factor in `[0.5, 1.0)` so that steps failed together do not retry together.
    pub fn delay(&self, next: u32, jitter: f64) -> Duration {
        let exp = next.saturating_sub(2).min(30);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.max);
        raw.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// Attempts handed back by their agents that a step may have without their counting against
/// `max_attempts`: enough for rolling restarts, not for an agent that hands every claim back.
pub const FREE_RELEASES: u32 = 10;

/// The events the job needs next, given its state. `now_ms` dates retries; `jitter` in `[0, 1)`
/// spreads them. Empty when the job is waiting on something outside the coordinator (a queue,
/// an agent) or is over.
pub fn next(job: &JobState, policy: &RetryPolicy, now_ms: u64, jitter: f64) -> Vec<Event> {
    if job.phase.is_terminal() || job.plan.is_none() {
        return Vec::new();
    }
    let Some(step) = job
        .steps
        .iter()
        .find(|s| !matches!(s.status, StepStatus::Succeeded { .. }))
    else {
        return vec![JobSucceeded {}.into()];
    };
    // `delayed`: a failure the step reported backs off; an interruption (the lease expired or
    // was handed back) goes straight back to the queue, so a dead agent's step is picked up
    // again within lease TTL + one sweep. Attempts their agents handed back (a rolling restart
    // of the fleet, say) are not counted against `max_attempts`, up to FREE_RELEASES of them.
    let spent = |attempt: u32| attempt.saturating_sub(step.released.min(FREE_RELEASES));
    let retry_or_fail = |attempt: u32, why: &str, delayed: bool| -> Event {
        if spent(attempt) < policy.max_attempts && !delayed {
            StepQueued {
                step: step.step.clone(),
                attempt: attempt + 1,
                pool: step.pool.clone(),
                priority: step.priority,
            }
            .into()
        } else if spent(attempt) < policy.max_attempts {
            let next = attempt + 1;
            let delay = policy.delay(next, jitter);
            StepRetryScheduled {
                step: step.step.clone(),
                attempt: next,
                pool: step.pool.clone(),
                priority: step.priority,
                due_ms: now_ms + delay.as_millis() as u64,
                reason: why.to_string(),
            }
            .into()
        } else {
            JobFailed {
                reason: format!("step {} failed after {attempt} attempts: {why}", step.step),
                step: Some(step.step.clone()),
            }
            .into()
        }
    };
    match &step.status {
        StepStatus::Pending => vec![StepQueued {
            step: step.step.clone(),
            attempt: 1,
            pool: step.pool.clone(),
            priority: step.priority,
        }
        .into()],
        StepStatus::Queued { .. } | StepStatus::Delayed { .. } | StepStatus::Claimed { .. } => {
            Vec::new()
        }
        StepStatus::Interrupted { attempt, reason } => vec![retry_or_fail(*attempt, reason, false)],
        StepStatus::Failed {
            attempt,
            error,
            retryable: true,
        } => vec![retry_or_fail(*attempt, error, true)],
        StepStatus::Failed {
            error,
            retryable: false,
            ..
        } => vec![JobFailed {
            reason: format!("step {} failed: {error}", step.step),
            step: Some(step.step.clone()),
        }
        .into()],
        StepStatus::Succeeded { .. } => unreachable!("found the first step not succeeded"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::JobPhase;
    use ferry_proto::*;

    fn job() -> JobState {
        let id: JobId = "01890a5d-ac96-774b-bcce-b30209900001".parse().unwrap();
        let plan = JobCreated {
            artifact: None,
            job: id,
            project_id: 1,
            project: "g/app".into(),
            tag: "v1".into(),
            git_ref: "refs/tags/v1".into(),
            sha: "a".repeat(40),
            priority: 0,
            trigger: "test".into(),
            steps: ["build", "deploy:prod"]
                .into_iter()
                .map(|s| StepPlan {
                    step: StepId::new(s),
                    pool: "default".into(),
                    priority: 5,
                    spec: StepSpec::Noop,
                })
                .collect(),
        };
        let mut j = JobState::new(id);
        j.evolve(&plan.into(), 1);
        j
    }

    fn run(j: &mut JobState, events: &[Event]) {
        for e in events {
            j.evolve(e, 2);
        }
    }

    fn decide(j: &JobState) -> Vec<Event> {
        next(j, &RetryPolicy::default(), 10_000, 0.0)
    }

    fn claimed(step: &str, attempt: u32) -> Event {
        StepClaimed {
            step: StepId::new(step),
            attempt,
            agent: AgentId::new("a"),
            token: FencingToken(attempt as u64),
            lease_ttl_ms: 1000,
        }
        .into()
    }

    #[test]
    fn walks_the_plan_step_by_step_and_is_idempotent() {
        let mut j = job();
        let d = decide(&j);
        assert!(
            matches!(&d[..], [Event::StepQueued(q)] if q.step.as_str() == "build" && q.attempt == 1 && q.priority == 5)
        );
        run(&mut j, &d);
        assert!(decide(&j).is_empty(), "queued: nothing more to decide");
        run(&mut j, &[claimed("build", 1)]);
        assert!(decide(&j).is_empty());
        run(
            &mut j,
            &[StepSucceeded {
                step: StepId::new("build"),
                attempt: 1,
            }
            .into()],
        );
        let d = decide(&j);
        assert!(matches!(&d[..], [Event::StepQueued(q)] if q.step.as_str() == "deploy:prod"));
        run(&mut j, &d);
        run(
            &mut j,
            &[
                claimed("deploy:prod", 1),
                StepSucceeded {
                    step: StepId::new("deploy:prod"),
                    attempt: 1,
                }
                .into(),
            ],
        );
        let d = decide(&j);
        assert!(matches!(&d[..], [Event::JobSucceeded(_)]));
        run(&mut j, &d);
        assert_eq!(j.phase, JobPhase::Succeeded);
        assert!(decide(&j).is_empty());
    }

    #[test]
    fn an_expired_lease_requeues_at_once_until_attempts_run_out() {
        let mut j = job();
        let d = decide(&j);
        run(&mut j, &d);
        for attempt in 1..=3 {
            run(
                &mut j,
                &[
                    claimed("build", attempt),
                    LeaseExpired {
                        step: StepId::new("build"),
                        attempt,
                        agent: AgentId::new("a"),
                        token: FencingToken(attempt as u64),
                    }
                    .into(),
                ],
            );
            let d = decide(&j);
            if attempt < 3 {
                assert!(matches!(&d[..], [Event::StepQueued(q)] if q.attempt == attempt + 1));
                run(&mut j, &d);
            } else {
                assert!(matches!(&d[..], [Event::JobFailed(f)] if f.reason.contains("3 attempts")));
            }
        }
    }

    /// A stopping agent hands its running step back (`StepReleased`): a rolling restart of the
    /// fleet must not use up the step's attempts. Up to FREE_RELEASES hand-backs are free; the
    /// attempts that ended otherwise still count to `max_attempts` (3 here).
    #[test]
    fn attempts_handed_back_by_their_agents_do_not_count_up_to_a_bound() {
        let released = |attempt: u32| -> Event {
            StepReleased {
                step: StepId::new("build"),
                attempt,
                agent: AgentId::new("a"),
                token: FencingToken(attempt as u64),
                reason: "shut down".into(),
            }
            .into()
        };
        let expired = |attempt: u32| -> Event {
            LeaseExpired {
                step: StepId::new("build"),
                attempt,
                agent: AgentId::new("a"),
                token: FencingToken(attempt as u64),
            }
            .into()
        };
        let mut j = job();
        let d = decide(&j);
        run(&mut j, &d);
        // Five hand-backs, then two expiries: attempt 8 is the third that counts.
        let mut attempt = 1;
        for hand_back in [true, true, true, true, true, false, false] {
            let end = if hand_back {
                released(attempt)
            } else {
                expired(attempt)
            };
            run(&mut j, &[claimed("build", attempt), end]);
            let d = decide(&j);
            assert!(
                matches!(&d[..], [Event::StepQueued(q)] if q.attempt == attempt + 1),
                "attempt {attempt}: {d:?}"
            );
            run(&mut j, &d);
            attempt += 1;
        }
        run(&mut j, &[claimed("build", attempt), expired(attempt)]);
        assert!(
            matches!(&decide(&j)[..], [Event::JobFailed(_)]),
            "attempt {attempt}"
        );

        // Past the bound, hand-backs count like any interruption.
        let mut j = job();
        let d = decide(&j);
        run(&mut j, &d);
        let mut attempt = 1;
        loop {
            run(&mut j, &[claimed("build", attempt), released(attempt)]);
            match &decide(&j)[..] {
                [Event::StepQueued(q)] => run(&mut j, &[q.clone().into()]),
                [Event::JobFailed(_)] => break,
                other => panic!("{other:?}"),
            }
            attempt += 1;
        }
        assert_eq!(attempt, FREE_RELEASES + 3);
    }

    #[test]
    fn reported_infrastructure_failures_retry_with_backoff_then_fail() {
        let mut j = job();
        let d = decide(&j);
        run(&mut j, &d);
        for attempt in 1..=3 {
            run(
                &mut j,
                &[
                    claimed("build", attempt),
                    StepFailed {
                        step: StepId::new("build"),
                        attempt,
                        error: "clone failed".into(),
                        retryable: true,
                        exit_code: None,
                    }
                    .into(),
                ],
            );
            let d = decide(&j);
            if attempt < 3 {
                let Event::StepRetryScheduled(r) = &d[0] else {
                    panic!("expected a retry, got {d:?}")
                };
                assert_eq!(r.attempt, attempt + 1);
                assert!(r.due_ms > 10_000);
                run(&mut j, &d);
                run(
                    &mut j,
                    &[StepQueued {
                        step: StepId::new("build"),
                        attempt: attempt + 1,
                        pool: "default".into(),
                        priority: 5,
                    }
                    .into()],
                );
            } else {
                assert!(matches!(&d[..], [Event::JobFailed(f)] if f.reason.contains("3 attempts")));
            }
        }
    }

    #[test]
    fn a_command_failure_is_not_retried() {
        let mut j = job();
        let d = decide(&j);
        run(&mut j, &d);
        run(
            &mut j,
            &[
                claimed("build", 1),
                StepFailed {
                    step: StepId::new("build"),
                    attempt: 1,
                    error: "exit status 2".into(),
                    retryable: false,
                    exit_code: Some(2),
                }
                .into(),
            ],
        );
        assert!(
            matches!(&decide(&j)[..], [Event::JobFailed(f)] if f.reason.contains("exit status 2"))
        );
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let p = RetryPolicy {
            max_attempts: 10,
            base: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        assert_eq!(p.delay(2, 1.0), Duration::from_secs(1));
        assert_eq!(p.delay(3, 1.0), Duration::from_secs(2));
        assert_eq!(p.delay(4, 1.0), Duration::from_secs(4));
        assert_eq!(p.delay(9, 1.0), Duration::from_secs(5));
        assert_eq!(p.delay(3, 0.0), Duration::from_secs(1));
    }
}

/// What the deploy-order rule (design invariant 5) says about a job whose next step is a deploy
/// to one environment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeployGate {
    /// Whether this job may queue its deploy now.
    pub verdict: Verdict,
    /// Older jobs whose deploy to the environment has not started: they are superseded by this
    /// one (newest wins; an older tag never lands after a newer one).
    pub supersede: Vec<JobId>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Queue the deploy.
    Go,
    /// A newer job deploys (or deployed) to the environment: this job ends superseded.
    Superseded { by: JobId },
    /// An older job's deploy to the environment is running: one deploy per environment at a
    /// time, so wait for it to end.
    Wait { behind: JobId },
}

/// The deploy gate for `job`'s deploy step `step`, given the other jobs that deploy to the same
/// environment (newer ones from the permanent index, older ones from the live index).
///
/// Jobs are ordered by id (ids are time-ordered: the order their webhooks arrived).
pub fn deploy_gate(job: &JobState, step: &StepId, others: &[JobState]) -> DeployGate {
    let newer_alive_or_done = others
        .iter()
        .filter(|o| o.id > job.id)
        .filter(|o| {
            matches!(
                o.phase,
                JobPhase::Queued | JobPhase::Running | JobPhase::Succeeded
            )
        })
        .map(|o| o.id)
        .max();
    if let Some(by) = newer_alive_or_done {
        return DeployGate {
            verdict: Verdict::Superseded { by },
            supersede: Vec::new(),
        };
    }
    let mut supersede = Vec::new();
    let mut running = None;
    for older in others
        .iter()
        .filter(|o| o.id < job.id && !o.phase.is_terminal())
    {
        let Some(pos) = older.steps.iter().position(|s| &s.step == step) else {
            continue;
        };
        let deploy = &older.steps[pos];
        let at_gate = older.steps[..pos]
            .iter()
            .all(|s| matches!(s.status, StepStatus::Succeeded { .. }));
        match deploy.status {
            StepStatus::Claimed { .. } => running = Some(older.id),
            // (a failure that will not be retried ends the older job)
            StepStatus::Succeeded { .. }
            | StepStatus::Failed {
                retryable: false, ..
            } => {}
            StepStatus::Pending if !at_gate => {} // still building; it meets the gate later
            // A retryable failure is a deploy about to be tried again (its retry is scheduled
            // and later promoted without passing the gate again): like an interrupted one, it
            // must not land after this newer one.
            StepStatus::Pending
            | StepStatus::Queued { .. }
            | StepStatus::Delayed { .. }
            | StepStatus::Interrupted { .. }
            | StepStatus::Failed {
                retryable: true, ..
            } => supersede.push(older.id),
        }
    }
    let verdict = match running {
        Some(behind) => Verdict::Wait { behind },
        None => Verdict::Go,
    };
    DeployGate { verdict, supersede }
}

#[cfg(test)]
mod gate_tests {
    use super::*;
    use ferry_proto::*;

    fn job(n: u8, status: &[&str]) -> JobState {
        let id: JobId = format!("01890a5d-ac96-774b-bcce-b30209900{n:03}")
            .parse()
            .unwrap();
        let plan = JobCreated {
            artifact: None,
            job: id,
            project_id: 1,
            project: "g/app".into(),
            tag: format!("v{n}"),
            git_ref: format!("refs/tags/v{n}"),
            sha: "a".repeat(40),
            priority: 0,
            trigger: "test".into(),
            steps: ["build", "deploy:prod"]
                .into_iter()
                .map(|s| StepPlan {
                    step: StepId::new(s),
                    pool: "default".into(),
                    priority: 0,
                    spec: StepSpec::Noop,
                })
                .collect(),
        };
        let mut j = JobState::new(id);
        j.evolve(&plan.into(), 1);
        for (i, st) in status.iter().enumerate() {
            let step = j.steps[i].step.clone();
            let e: Event = match *st {
                "queued" => StepQueued {
                    step,
                    attempt: 1,
                    pool: "default".into(),
                    priority: 0,
                }
                .into(),
                "running" => StepClaimed {
                    step,
                    attempt: 1,
                    agent: AgentId::new("a"),
                    token: FencingToken(1),
                    lease_ttl_ms: 1,
                }
                .into(),
                "done" => StepSucceeded { step, attempt: 1 }.into(),
                other => panic!("{other}"),
            };
            j.evolve(&e, 2);
        }
        j
    }

    fn gate(me: &JobState, others: &[JobState]) -> DeployGate {
        deploy_gate(me, &StepId::new("deploy:prod"), others)
    }

    #[test]
    fn a_newer_job_supersedes_an_older_one_even_after_it_deployed() {
        let me = job(1, &["done"]);
        let newer = job(2, &["running"]);
        assert_eq!(
            gate(&me, std::slice::from_ref(&newer)).verdict,
            Verdict::Superseded { by: newer.id }
        );
        let mut done = job(2, &["done", "done"]);
        done.evolve(&JobSucceeded {}.into(), 3);
        assert_eq!(
            gate(&me, &[done.clone()]).verdict,
            Verdict::Superseded { by: done.id }
        );
        let mut failed = job(2, &[]);
        failed.evolve(
            &JobFailed {
                reason: "build".into(),
                step: None,
            }
            .into(),
            3,
        );
        assert_eq!(gate(&me, &[failed]).verdict, Verdict::Go);
    }

    #[test]
    fn older_queued_or_waiting_deploys_are_superseded_and_a_running_one_is_waited_for() {
        let me = job(5, &["done"]);
        let queued = job(1, &["done", "queued"]);
        let at_gate = job(2, &["done"]);
        let building = job(3, &["running"]);
        let deploying = job(4, &["done", "running"]);
        let g = gate(
            &me,
            &[queued.clone(), at_gate.clone(), building, deploying.clone()],
        );
        assert_eq!(
            g.verdict,
            Verdict::Wait {
                behind: deploying.id
            }
        );
        assert_eq!(g.supersede, vec![queued.id, at_gate.id]);
        assert_eq!(gate(&me, &[]).verdict, Verdict::Go);
    }

    /// An older deploy that failed and will be tried again (its coordinator has not scheduled
    /// the retry yet) is superseded: its retry would otherwise run after this newer deploy.
    /// One that failed for good is not in the way.
    #[test]
    fn an_older_deploy_about_to_be_retried_is_superseded() {
        let me = job(5, &["done"]);
        let failed_deploy = |n: u8, retryable: bool| {
            let mut j = job(n, &["done", "running"]);
            let failed = StepFailed {
                step: StepId::new("deploy:prod"),
                attempt: 1,
                error: "cannot connect".into(),
                retryable,
                exit_code: None,
            };
            j.evolve(&failed.into(), 3);
            j
        };
        let retrying = failed_deploy(1, true);
        let g = gate(&me, &[retrying.clone(), failed_deploy(2, false)]);
        assert_eq!(g.verdict, Verdict::Go);
        assert_eq!(g.supersede, vec![retrying.id]);
    }
}
