//! Property tests of the fold: it is deterministic, and a snapshot plus the tail folds to the
//! same view as the whole log.

use super::view::View;
use super::{JobPhase, StepStatus};
use ferry_proto::*;
use proptest::prelude::*;

fn job(i: u8) -> JobId {
    format!("01890a5d-ac96-774b-bcce-b30209900{i:03}")
        .parse()
        .unwrap()
}

fn plan(j: JobId) -> Event {
    JobCreated {
        artifact: None,
        job: j,
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
                priority: 0,
                spec: StepSpec::Noop,
            })
            .collect(),
    }
    .into()
}

/// An arbitrary event for one of four jobs (or the agents/webhooks streams), built from small
/// numbers so that sequences hit the interesting transitions often.
fn event_from(op: u8, j: u8, s: u8, n: u32) -> (String, Event) {
    let step = StepId::new(if s.is_multiple_of(2) {
        "build"
    } else {
        "deploy:prod"
    });
    let agent = AgentId::new(format!("a{}", n % 3));
    let stream = format!("job:{}", job(j % 4));
    let e: Event = match op % 16 {
        0 => plan(job(j % 4)),
        1 => StepQueued {
            step,
            attempt: n % 4,
            pool: ["default", "gpu"][n as usize % 2].into(),
            priority: (n % 7) as i32 - 3,
        }
        .into(),
        2 => StepRetryScheduled {
            step,
            attempt: n % 4,
            pool: "default".into(),
            priority: 0,
            due_ms: n as u64 * 1000,
            reason: "r".into(),
        }
        .into(),
        3 => StepClaimed {
            step,
            attempt: n % 4,
            agent,
            token: FencingToken(n as u64),
            lease_ttl_ms: 1000,
        }
        .into(),
        4 => StepStarted {
            step,
            attempt: n % 4,
            agent,
        }
        .into(),
        5 => StepSucceeded {
            step,
            attempt: n % 4,
        }
        .into(),
        6 => StepFailed {
            step,
            attempt: n % 4,
            error: "e".into(),
            retryable: n.is_multiple_of(2),
            exit_code: None,
        }
        .into(),
        7 => LeaseExpired {
            step,
            attempt: n % 4,
            agent,
            token: FencingToken(n as u64),
        }
        .into(),
        8 => JobSucceeded {}.into(),
        9 => JobCancelled {
            reason: "r".into(),
            by: "api".into(),
        }
        .into(),
        10 => DeployHostCheckpoint {
            step,
            attempt: 1,
            host: format!("h{}", n % 3),
            phase: "switched".into(),
        }
        .into(),
        11 => StepReleased {
            step,
            attempt: n % 4,
            agent,
            token: FencingToken(n as u64),
            reason: "bye".into(),
        }
        .into(),
        12 => {
            return (
                "agents".into(),
                AgentJoined {
                    agent,
                    pools: vec!["default".into()],
                    labels: vec![],
                    version: "1".into(),
                    capacity: 2,
                }
                .into(),
            )
        }
        13 => {
            return (
                "agents".into(),
                AgentLost {
                    agent,
                    reason: "gone".into(),
                }
                .into(),
            )
        }
        14 => {
            return (
                "webhooks".into(),
                WebhookReceived {
                    event: "Tag Push Hook".into(),
                    action: ["build", "ignored"][n as usize % 2].into(),
                    ..Default::default()
                }
                .into(),
            )
        }
        _ => JobSuperseded {
            by_job: job(0),
            environment: "prod".into(),
        }
        .into(),
    };
    (stream, e)
}

fn events() -> impl Strategy<Value = Vec<(String, Event)>> {
    prop::collection::vec(
        (any::<u8>(), any::<u8>(), any::<u8>(), any::<u32>())
            .prop_map(|(op, j, s, n)| event_from(op, j, s, n)),
        0..200,
    )
}

fn fold(events: &[(String, Event)], from: usize, mut view: View) -> View {
    for (i, (stream, e)) in events.iter().enumerate().skip(from) {
        view.apply(&format!("{}-0", i + 1), stream, e, 1000 + i as u64);
    }
    view
}

proptest! {
    #[test]
    fn folding_is_deterministic(events in events()) {
        prop_assert_eq!(fold(&events, 0, View::default()), fold(&events, 0, View::default()));
    }

    #[test]
    fn snapshot_plus_tail_equals_full_fold(events in events(), cut in any::<prop::sample::Index>()) {
        let cut = if events.is_empty() { 0 } else { cut.index(events.len() + 1) };
        let full = fold(&events, 0, View::default());
        let head = fold(&events[..cut], 0, View::default());
        let bytes = rmp_serde::to_vec_named(&head).unwrap();
        let snapshot: View = rmp_serde::from_slice(&bytes).unwrap();
        prop_assert_eq!(&snapshot, &head);
        prop_assert_eq!(fold(&events, cut, snapshot), full);
    }

    #[test]
    fn terminal_jobs_hold_no_queue_entries_or_leases(events in events()) {
        let view = fold(&events, 0, View::default());
        for entry in view.queue() {
            prop_assert!(!view.jobs[&entry.job].phase.is_terminal());
        }
        for lease in view.leases() {
            prop_assert!(!view.jobs[&lease.job].phase.is_terminal());
        }
    }
}

#[test]
fn a_job_moves_through_its_phases() {
    let j = job(1);
    let stream = format!("job:{j}");
    let step = StepId::new("build");
    let mut view = View::default();
    let mut at = 0;
    let mut apply = |view: &mut View, e: Event| {
        at += 1;
        view.apply(&format!("{at}-0"), &stream, &e, at);
    };
    apply(&mut view, plan(j));
    assert_eq!(view.jobs[&j].phase, JobPhase::Queued);
    apply(
        &mut view,
        StepQueued {
            step: step.clone(),
            attempt: 1,
            pool: "default".into(),
            priority: 0,
        }
        .into(),
    );
    assert_eq!(view.queue().len(), 1);
    apply(
        &mut view,
        StepClaimed {
            step: step.clone(),
            attempt: 1,
            agent: AgentId::new("a"),
            token: FencingToken(3),
            lease_ttl_ms: 1000,
        }
        .into(),
    );
    assert_eq!(view.jobs[&j].phase, JobPhase::Running);
    assert!(view.queue().is_empty());
    assert_eq!(view.leases().len(), 1);
    apply(
        &mut view,
        StepSucceeded {
            step: step.clone(),
            attempt: 1,
        }
        .into(),
    );
    assert!(view.leases().is_empty());
    assert_eq!(
        view.jobs[&j].step(&step).unwrap().status,
        StepStatus::Succeeded { attempt: 1 }
    );
    apply(&mut view, JobSucceeded {}.into());
    assert_eq!(view.jobs[&j].phase, JobPhase::Succeeded);
    assert_eq!(view.jobs[&j].version, 5);
    assert_eq!(view.jobs[&j].created_at_ms, 1);
    assert_eq!(view.jobs[&j].updated_at_ms, 5);
}

/// A `host_key_pinned` event is an audit record: folding it changes nothing but the version.
#[test]
fn a_pinned_host_key_is_tolerated_by_the_fold() {
    let j = job(1);
    let mut state = super::JobState::new(j);
    state.evolve(&plan(j), 1);
    let before = state.clone();
    let pinned: Event = HostKeyPinned {
        step: StepId::new("deploy:prod"),
        attempt: 1,
        host: "deploy@10.0.0.5:22".into(),
        fingerprint: "SHA256:x".into(),
        key_type: "ssh-ed25519".into(),
    }
    .into();
    state.evolve(&pinned, 2);
    assert_eq!(state.version, before.version + 1);
    assert_eq!(state.steps, before.steps);
    assert_eq!(state.phase, before.phase);
    let mut view = View::default();
    view.apply("1-0", &format!("job:{j}"), &plan(j), 1);
    view.apply("2-0", &format!("job:{j}"), &pinned, 2);
    assert_eq!(view.jobs[&j].steps, before.steps);
}
