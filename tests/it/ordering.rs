//! Deploy order per environment (design invariant 5) and tag deletion, with a real coordinator
//! on a real Redis; the test plays the agent by hand so it controls when each step ends.

use crate::harness::{self, wait_for, wait_until, DEADLINE};
use ferry::coordinator::{self, plan::ProjectPlan};
use ferry::domain::{JobPhase, JobState, StepStatus};
use ferry::store::{Append, Claim, Store, StreamId};
use ferry_proto::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

fn job(tag: &str) -> (JobId, Event) {
    let job = JobId::new();
    let steps = vec![
        StepPlan {
            step: StepId::new("build"),
            pool: "default".into(),
            priority: 0,
            spec: StepSpec::Noop,
        },
        StepPlan {
            step: StepId::new("deploy:prod"),
            pool: "default".into(),
            priority: 10,
            spec: StepSpec::Deploy(DeploySpec {
                environment: "prod".into(),
                hosts: vec!["local".into()],
                path: "/srv/app".into(),
                max_parallel: 1,
                keep_releases: 5,
                ..Default::default()
            }),
        },
    ];
    let created = JobCreated {
        artifact: None,
        job,
        project_id: 7,
        project: "group/app".into(),
        tag: tag.into(),
        git_ref: format!("refs/tags/{tag}"),
        sha: "a".repeat(40),
        priority: 0,
        trigger: "test".into(),
        steps,
    };
    (job, created.into())
}

async fn state(store: &dyn Store, job: JobId) -> JobState {
    let mut s = JobState::new(job);
    for e in store.read_stream(&StreamId::Job(job), 0).await.unwrap() {
        s.evolve(&e.decode().unwrap(), e.envelope.at_ms);
    }
    s
}

fn status(s: &JobState, step: &str) -> StepStatus {
    s.step(&StepId::new(step)).unwrap().status.clone()
}

/// Claims the named step of `job` once it is queued (other ready steps are claimed and released
/// untouched would disturb the test, so each test keeps one ready step at a time).
async fn claim(store: &dyn Store, job: JobId, step: &str) -> Claim {
    wait_for(DEADLINE, "the step to be queued", || async {
        let c = store
            .claim(
                &["default".into()],
                &AgentId::new("hand"),
                Duration::from_secs(60),
            )
            .await
            .unwrap()?;
        assert_eq!(
            (c.job, c.step.as_str()),
            (job, step),
            "claimed the wrong step"
        );
        Some(c)
    })
    .await
}

async fn succeed(store: &dyn Store, c: &Claim) {
    store
        .append(
            Append::new(
                StreamId::Job(c.job),
                vec![StepSucceeded {
                    step: c.step.clone(),
                    attempt: c.attempt,
                }
                .into()],
            )
            .fenced(c.step.clone(), c.token),
        )
        .await
        .unwrap();
}

fn start_coordinator(store: &Arc<dyn Store>) -> watch::Sender<bool> {
    let (stop, mut rx) = watch::channel(false);
    let opts = coordinator::Options {
        consumer: "c1".into(),
        sweep_interval: Duration::from_millis(100),
        projects: vec![ProjectPlan {
            id: Some(7),
            path: "group/app".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let store = store.clone();
    tokio::spawn(async move {
        coordinator::run(store, opts, async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await
        .unwrap()
    });
    stop
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn newest_deploy_wins_and_none_lands_out_of_order() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let _stop = start_coordinator(&store);
    let s = &*store;
    let create = |tag: &'static str| {
        let store = store.clone();
        async move {
            let (id, created) = job(tag);
            store
                .append(Append::new(StreamId::Job(id), vec![created]).expect(0))
                .await
                .unwrap();
            id
        }
    };

    // v0 is the oldest job; its build stays running the whole time.
    let v0 = create("v0").await;
    let v0_build = claim(s, v0, "build").await;

    // v1 builds and starts deploying.
    let v1 = create("v1").await;
    let b = claim(s, v1, "build").await;
    succeed(s, &b).await;
    let v1_deploy = claim(s, v1, "deploy:prod").await;

    // v2 builds; its deploy must wait for v1's running deploy.
    let v2 = create("v2").await;
    let b = claim(s, v2, "build").await;
    succeed(s, &b).await;
    wait_until(DEADLINE, || async {
        let st = state(s, v2).await;
        st.step(&StepId::new("build")).unwrap().status == StepStatus::Succeeded { attempt: 1 }
    })
    .await;

    // v3 builds: v2 (waiting at the gate) is superseded; v3 waits for v1.
    let v3 = create("v3").await;
    let b = claim(s, v3, "build").await;
    succeed(s, &b).await;
    wait_until(DEADLINE, || async {
        state(s, v2).await.phase == JobPhase::Superseded
    })
    .await;
    assert_eq!(
        status(&state(s, v3).await, "deploy:prod"),
        StepStatus::Pending
    );
    assert!(
        s.queued().await.unwrap().is_empty(),
        "nothing may deploy while v1 does"
    );

    // v1's deploy ends: v3 deploys (not v2).
    succeed(s, &v1_deploy).await;
    let v3_deploy = claim(s, v3, "deploy:prod").await;
    succeed(s, &v3_deploy).await;
    wait_until(DEADLINE, || async {
        state(s, v3).await.phase == JobPhase::Succeeded
    })
    .await;

    // v0's build ends last: a newer tag already deployed, so v0 never deploys.
    succeed(s, &v0_build).await;
    wait_until(DEADLINE, || async {
        state(s, v0).await.phase == JobPhase::Superseded
    })
    .await;
    assert!(s.queued().await.unwrap().is_empty());
    let v2_state = state(s, v2).await;
    assert!(
        v2_state
            .reason
            .as_deref()
            .unwrap_or("")
            .contains(&v3.to_string()),
        "{:?}",
        v2_state.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_tag_cancels_its_queued_work() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let _stop = start_coordinator(&store);
    let s = &*store;
    let (doomed, created) = job("v9");
    s.append(Append::new(StreamId::Job(doomed), vec![created]).expect(0))
        .await
        .unwrap();
    let (kept, created) = job("v10");
    s.append(Append::new(StreamId::Job(kept), vec![created]).expect(0))
        .await
        .unwrap();
    wait_until(DEADLINE, || async { s.queued().await.unwrap().len() == 2 }).await;

    let deleted = WebhookReceived {
        event: "Tag Push Hook".into(),
        project_id: Some(7),
        project_path: Some("group/app".into()),
        git_ref: Some("refs/tags/v9".into()),
        before: Some("b".repeat(40)),
        after: Some("0".repeat(40)),
        action: "delete".into(),
        ..Default::default()
    };
    s.append(Append::new(StreamId::Webhooks, vec![deleted.into()]))
        .await
        .unwrap();
    wait_until(DEADLINE, || async {
        state(s, doomed).await.phase == JobPhase::Cancelled
    })
    .await;
    let queued = s.queued().await.unwrap();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].job, kept);
    assert!(state(s, doomed)
        .await
        .reason
        .unwrap()
        .contains("tag v9 was deleted"));
}

/// A tag deleted and pushed again: the deletion's feed entry may be handled after the job of
/// the new push exists (another coordinator handled the push first, or the deletion's entry
/// came round again after a restart). It cancels the jobs of pushes before it, never that one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_deletion_spares_the_job_of_a_later_push() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let s = &*store;
    let webhook = |tag: &str, action: &str| WebhookReceived {
        event: "Tag Push Hook".into(),
        project_id: Some(7),
        project_path: Some("group/app".into()),
        git_ref: Some(format!("refs/tags/{tag}")),
        before: Some("b".repeat(40)),
        after: Some("0".repeat(40)),
        action: action.into(),
        ..Default::default()
    };
    let record = |w: WebhookReceived| async move {
        match s
            .append(Append::new(StreamId::Webhooks, vec![w.into()]))
            .await
            .unwrap()
        {
            ferry::store::Appended::Written { positions, .. } => positions[0].clone(),
            other => panic!("{other:?}"),
        }
    };
    let made_by = |tag: &str, trigger: String| {
        let (id, created) = job(tag);
        let Event::JobCreated(mut created) = created else {
            unreachable!()
        };
        created.trigger = trigger;
        (id, Event::JobCreated(created))
    };
    let before = record(webhook("v9", "ignored")).await;
    let deletion = record(webhook("v9", "delete")).await;
    let after = record(webhook("v9", "ignored")).await;
    assert!(before < deletion && deletion < after);
    let (old, old_created) = made_by("v9", format!("webhook:{before}"));
    let (new, new_created) = made_by("v9", format!("webhook:{after}"));
    let (other, other_created) = job("v10");
    for (id, created) in [
        (old, old_created),
        (new, new_created),
        (other, other_created),
    ] {
        s.append(Append::new(StreamId::Job(id), vec![created]).expect(0))
            .await
            .unwrap();
    }
    // (the v10 deletion after them says when the coordinator is past the v9 one)
    record(webhook("v10", "delete")).await;
    let _stop = start_coordinator(&store);
    wait_until(DEADLINE, || async {
        state(s, other).await.phase == JobPhase::Cancelled
    })
    .await;
    assert_eq!(state(s, old).await.phase, JobPhase::Cancelled);
    assert_ne!(state(s, new).await.phase, JobPhase::Cancelled);
}
