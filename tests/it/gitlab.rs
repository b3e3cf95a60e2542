//! The GitLab client against a mock that follows the contract, and the commit-status reporter end
//! to end: a real Redis store, a coordinator and an agent running no-op jobs in this process.

use crate::gitlab_mock::GitlabMock;
use crate::harness::{self, wait_for, wait_until, DEADLINE};
use ferry::agent;
use ferry::config::Secret;
use ferry::coordinator::{self, decide::RetryPolicy};
use ferry::domain::JobPhase;
use ferry::gitlab::{
    self, Client, DeploymentRequest, DeploymentStatus, Error, ReporterOptions, Retry,
    StatusOutcome, StatusRequest, StatusState,
};
use ferry::replay;
use ferry::store::{Append, Order, Store, StreamId};
use ferry_proto::*;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

const TOKEN: &str = "glpat-mock-token-0123456789";
const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn fast_retry(attempts: u32) -> Retry {
    Retry {
        attempts,
        base: Duration::from_millis(20),
        max_delay: Duration::from_millis(200),
        budget: Duration::from_secs(20),
    }
}

fn client(mock: &GitlabMock, token: &str) -> Client {
    Client::with_options(
        &mock.base(),
        Secret::new(token),
        fast_retry(4),
        Duration::from_secs(5),
    )
    .unwrap()
}

fn status(state: StatusState) -> StatusRequest {
    StatusRequest {
        state,
        ref_: "v1.0.0".into(),
        name: "ferry/build".into(),
        target_url: Some("http://ferry.test/api/v1/jobs/1".into()),
        description: Some("building".into()),
    }
}

#[tokio::test]
async fn a_status_is_created_and_posting_the_same_state_again_counts_as_done() {
    let mock = GitlabMock::start(TOKEN).await;
    let c = client(&mock, TOKEN);
    let created = c.post_status(7, SHA, &status(StatusState::Running)).await;
    assert_eq!(
        created.unwrap(),
        StatusOutcome::Created { http_status: 201 }
    );
    match c
        .post_status(7, SHA, &status(StatusState::Running))
        .await
        .unwrap()
    {
        StatusOutcome::AlreadyDone {
            http_status: 400,
            message,
        } => assert!(message.contains("Cannot transition status"), "{message}"),
        other => panic!("expected already done, got {other:?}"),
    }
    let calls = mock.calls();
    assert_eq!(calls.len(), 2);
    let first = &calls[0];
    assert_eq!(first.path, format!("/api/v4/projects/7/statuses/{SHA}"));
    assert_eq!(first.token.as_deref(), Some(TOKEN));
    assert_eq!(first.field("state"), Some("running"));
    assert_eq!(first.field("ref"), Some("v1.0.0"));
    assert_eq!(first.field("name"), Some("ferry/build"));
    assert_eq!(
        first.field("target_url"),
        Some("http://ferry.test/api/v1/jobs/1")
    );
}

#[tokio::test]
async fn a_409_is_retried_until_gitlab_accepts() {
    let mock = GitlabMock::start(TOKEN).await;
    mock.fail_next(409, 2);
    let outcome = client(&mock, TOKEN)
        .post_status(7, SHA, &status(StatusState::Pending))
        .await;
    assert_eq!(
        outcome.unwrap(),
        StatusOutcome::Created { http_status: 201 }
    );
    let answers: Vec<u16> = mock.calls().iter().map(|c| c.answer).collect();
    assert_eq!(answers, [409, 409, 201]);
}

#[tokio::test]
async fn a_429_waits_for_retry_after_then_succeeds() {
    let mock = GitlabMock::start(TOKEN).await;
    mock.set_retry_after(1);
    mock.fail_next(429, 1);
    let outcome = client(&mock, TOKEN)
        .post_status(7, SHA, &status(StatusState::Pending))
        .await;
    assert_eq!(
        outcome.unwrap(),
        StatusOutcome::Created { http_status: 201 }
    );
    let calls = mock.calls();
    assert_eq!(
        calls.iter().map(|c| c.answer).collect::<Vec<_>>(),
        [429, 201]
    );
    // The backoff alone would have waited at most 200 ms.
    assert!(
        calls[1].at.duration_since(calls[0].at) >= Duration::from_secs(1),
        "the retry came before Retry-After"
    );
}

#[tokio::test]
async fn a_500_is_retried_and_a_lasting_one_gives_up_after_the_attempts() {
    let mock = GitlabMock::start(TOKEN).await;
    mock.fail_next(500, 2);
    let c = client(&mock, TOKEN);
    let outcome = c.post_status(7, SHA, &status(StatusState::Pending)).await;
    assert_eq!(
        outcome.unwrap(),
        StatusOutcome::Created { http_status: 201 }
    );
    assert_eq!(mock.calls().len(), 3);

    mock.fail_next(500, 1000);
    match c.post_status(7, SHA, &status(StatusState::Running)).await {
        Err(Error::GaveUp {
            attempts: 4,
            status: Some(500),
            ..
        }) => {}
        other => panic!("expected to give up after 4 attempts, got {other:?}"),
    }
    assert_eq!(mock.calls().len(), 3 + 4);
}

#[tokio::test]
async fn a_bad_token_is_a_permanent_failure_that_does_not_show_the_token() {
    let mock = GitlabMock::start(TOKEN).await;
    let wrong = "glpat-wrong-token-9876543210";
    let err = client(&mock, wrong)
        .post_status(7, SHA, &status(StatusState::Pending))
        .await
        .unwrap_err();
    match &err {
        Error::Rejected {
            status: 401,
            message,
            ..
        } => assert_eq!(message, "401 Unauthorized"),
        other => panic!("expected a 401 rejection, got {other:?}"),
    }
    assert_eq!(mock.calls().len(), 1, "a 401 is not retried");
    let shown = format!("{err} {err:?} {:?}", client(&mock, wrong));
    assert!(!shown.contains(wrong), "the token leaked: {shown}");
}

/// A redirect is not followed: the token would go along to wherever it points (reqwest drops
/// only `Authorization` and `Cookie` on a change of host). It fails, naming where it pointed.
#[tokio::test]
async fn a_redirect_is_not_followed_with_the_token() {
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::any;
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let elsewhere = {
        let seen = seen.clone();
        axum::Router::new().fallback(any(move |headers: HeaderMap| {
            let seen = seen.clone();
            async move {
                let token = headers
                    .get("private-token")
                    .map(|v| v.to_str().unwrap().to_string());
                seen.lock().unwrap().push(token.unwrap_or_default());
                StatusCode::CREATED
            }
        }))
    };
    let serve = |router: axum::Router| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        port
    };
    let other = serve(elsewhere).await;
    let target = format!("http://127.0.0.1:{other}/collect");
    let redirecting = {
        let target = target.clone();
        axum::Router::new().fallback(any(move || {
            let target = target.clone();
            async move { (StatusCode::TEMPORARY_REDIRECT, [("location", target)]) }
        }))
    };
    let port = serve(redirecting).await;
    let base = format!("http://127.0.0.1:{port}").parse().unwrap();
    let c = Client::with_options(
        &base,
        Secret::new(TOKEN),
        fast_retry(3),
        Duration::from_secs(5),
    )
    .unwrap();
    match c.post_status(7, SHA, &status(StatusState::Pending)).await {
        Err(Error::Rejected {
            status: 307,
            message,
            ..
        }) => assert!(
            message.contains(&format!("redirected to {target}")),
            "{message}"
        ),
        other => panic!("expected the redirect to be refused, got {other:?}"),
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "followed: {:?}",
        seen.lock().unwrap()
    );
}

#[tokio::test]
async fn a_gitlab_that_is_down_is_given_up_on_in_bounded_time() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port(); // the listener is dropped: connections are refused
    let base = format!("http://127.0.0.1:{port}").parse().unwrap();
    let c = Client::with_options(
        &base,
        Secret::new(TOKEN),
        fast_retry(3),
        Duration::from_secs(2),
    )
    .unwrap();
    let outcome = tokio::time::timeout(
        Duration::from_secs(30),
        c.post_status(7, SHA, &status(StatusState::Pending)),
    )
    .await
    .expect("the client gives up on its own");
    match outcome {
        Err(Error::GaveUp {
            attempts: 3,
            status: None,
            last,
            ..
        }) => assert!(last.contains("cannot connect"), "{last}"),
        other => panic!("expected to give up, got {other:?}"),
    }
}

#[tokio::test]
async fn a_bad_target_url_is_refused_before_sending_and_long_descriptions_are_cut() {
    let mock = GitlabMock::start(TOKEN).await;
    let c = client(&mock, TOKEN);
    for url in [
        "ftp://ferry.test/jobs/1".to_string(),
        format!("https://ferry.test/{}", "x".repeat(250)),
    ] {
        let mut req = status(StatusState::Pending);
        req.target_url = Some(url);
        let err = c.post_status(7, SHA, &req).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::Invalid {
                    field: "target_url",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    assert!(mock.calls().is_empty());

    let mut req = status(StatusState::Pending);
    req.description = Some("é".repeat(300));
    let outcome = c.post_status(7, SHA, &req).await.unwrap();
    assert_eq!(outcome, StatusOutcome::Created { http_status: 201 });
    let sent = mock.calls()[0].field("description").unwrap().to_string();
    assert_eq!(sent.chars().count(), 255);
}

#[tokio::test]
async fn deployments_are_created_for_tags_and_updated() {
    let mock = GitlabMock::start(TOKEN).await;
    let c = client(&mock, TOKEN);
    mock.fail_next(500, 1);
    let created = c
        .create_deployment(
            7,
            &DeploymentRequest {
                environment: "production".into(),
                sha: SHA.into(),
                ref_: "v1.0.0".into(),
                status: DeploymentStatus::Running,
            },
        )
        .await
        .unwrap();
    assert_eq!(created.status, "running");
    let updated = c
        .update_deployment(7, created.id, DeploymentStatus::Success)
        .await
        .unwrap();
    assert_eq!(
        (updated.id, updated.status.as_str()),
        (created.id, "success")
    );
    let calls = mock.calls();
    assert_eq!(calls.len(), 3);
    assert_eq!(calls[1].path, "/api/v4/projects/7/deployments");
    assert_eq!(calls[1].body["tag"], serde_json::json!(true));
    assert_eq!(calls[1].field("ref"), Some("v1.0.0"));
    assert_eq!(calls[2].method, "PUT");
    assert_eq!(
        calls[2].path,
        format!("/api/v4/projects/7/deployments/{}", created.id)
    );

    let err = c
        .update_deployment(7, 999_999, DeploymentStatus::Failed)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Rejected { status: 404, .. }),
        "{err:?}"
    );
}

/// A coordinator, an agent and a reporter in this process, until `stop`.
struct Roles {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Roles {
    fn start(store: &Arc<dyn Store>, reporter: ReporterOptions) -> Roles {
        let (stop, rx) = watch::channel(false);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let coordinator_opts = coordinator::Options {
            consumer: "c0".into(),
            policy: RetryPolicy {
                max_attempts: 3,
                base: Duration::from_millis(50),
                max: Duration::from_millis(200),
            },
            sweep_interval: Duration::from_millis(100),
            ..Default::default()
        };
        let agent_opts = agent::Options {
            concurrency: 4,
            ..agent::Options::new("agent-0", &["default"])
        };
        let tasks = vec![
            tokio::spawn({
                let (store, rx) = (store.clone(), rx.clone());
                async move {
                    coordinator::run(store, coordinator_opts, until(rx))
                        .await
                        .unwrap()
                }
            }),
            tokio::spawn({
                let (store, rx) = (store.clone(), rx.clone());
                async move { agent::run(store, agent_opts, until(rx)).await.unwrap() }
            }),
            tokio::spawn({
                let store = store.clone();
                async move { gitlab::run(store, reporter, until(rx)).await.unwrap() }
            }),
        ];
        Roles { stop, tasks }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

fn reporter_options(mock: &GitlabMock, attempts: u32) -> ReporterOptions {
    let mut opts = ReporterOptions::new(
        "r0".into(),
        mock.base(),
        Secret::new(TOKEN),
        "http://ferry.test:8080/".parse().unwrap(),
    );
    opts.retry = fast_retry(attempts);
    opts
}

/// Appends a no-op job with a build and a production deploy for project 42, tag `v1.2.3`.
async fn noop_job(store: &Arc<dyn Store>) -> JobId {
    let job = JobId::new();
    let created = JobCreated {
        artifact: None,
        job,
        project_id: 42,
        project: "group/app".into(),
        tag: "v1.2.3".into(),
        git_ref: "refs/tags/v1.2.3".into(),
        sha: SHA.into(),
        priority: 0,
        trigger: "test".into(),
        steps: ["build", "deploy:production"]
            .into_iter()
            .map(|s| StepPlan {
                step: StepId::new(s),
                pool: "default".into(),
                priority: 0,
                spec: StepSpec::Noop,
            })
            .collect(),
    };
    store
        .append(Append::new(StreamId::Job(job), vec![created.into()]).expect(0))
        .await
        .unwrap();
    job
}

/// The events of `job`'s stream that `pick` keeps.
async fn picked<T>(
    store: &Arc<dyn Store>,
    job: JobId,
    pick: impl Fn(Event) -> Option<T>,
) -> Vec<T> {
    store
        .read_stream(&StreamId::Job(job), 0)
        .await
        .unwrap()
        .iter()
        .filter_map(|s| pick(s.decode().unwrap()))
        .collect()
}

async fn reports(store: &Arc<dyn Store>, job: JobId) -> Vec<CommitStatusReported> {
    picked(store, job, |e| match e {
        Event::CommitStatusReported(r) => Some(r),
        _ => None,
    })
    .await
}

async fn deployment_reports(store: &Arc<dyn Store>, job: JobId) -> Vec<DeploymentReported> {
    picked(store, job, |e| match e {
        Event::DeploymentReported(r) => Some(r),
        _ => None,
    })
    .await
}

async fn phase(store: &Arc<dyn Store>, job: JobId) -> Option<JobPhase> {
    let view = replay::rebuild(&**store).await.unwrap();
    view.jobs.get(&job).map(|j| j.phase)
}

const NAMES: [&str; 2] = ["ferry/build", "ferry/deploy: production"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_step_goes_pending_running_success_on_the_tagged_commit() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let mock = GitlabMock::start(TOKEN).await;
    let roles = Roles::start(&store, reporter_options(&mock, 4));
    let job = noop_job(&store).await;

    wait_until(DEADLINE * 3, || async {
        let accepted = mock.accepted_statuses();
        NAMES.iter().all(|n| {
            accepted
                .iter()
                .any(|c| c.field("name") == Some(*n) && c.field("state") == Some("success"))
        })
    })
    .await;
    let recorded = wait_for(DEADLINE, "both successes recorded", || async {
        let r = reports(&store, job).await;
        let done = NAMES
            .iter()
            .all(|n| r.iter().any(|r| r.name == *n && r.state == "success"));
        done.then_some(r)
    })
    .await;
    // The last step's success is reported when it succeeds; the job ends a moment later.
    wait_until(DEADLINE, || async {
        phase(&store, job).await == Some(JobPhase::Succeeded)
    })
    .await;
    roles.stop().await;

    let calls = mock.calls();
    assert!(calls.iter().all(|c| c.answer == 201), "{calls:?}");
    for name in NAMES {
        let states: Vec<&str> = calls
            .iter()
            .filter(|c| c.field("name") == Some(name))
            .map(|c| c.field("state").unwrap())
            .collect();
        assert_in_order(&states, name);
    }
    let link = format!("http://ferry.test:8080/api/v1/jobs/{job}");
    for c in &calls {
        assert_eq!(c.path, format!("/api/v4/projects/42/statuses/{SHA}"));
        assert_eq!(c.field("ref"), Some("v1.2.3"));
        assert_eq!(c.field("target_url"), Some(link.as_str()));
        assert_eq!(c.token.as_deref(), Some(TOKEN));
    }
    assert_eq!(recorded.len(), calls.len(), "{recorded:?}");
    for r in &recorded {
        assert_eq!(
            (r.sha.as_str(), r.http_status, &r.error),
            (SHA, Some(201), &None)
        );
    }
    // Secrets never enter the log.
    for stored in store.read_stream(&StreamId::Job(job), 0).await.unwrap() {
        let bytes = &stored.envelope.payload;
        assert!(
            !bytes.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()),
            "the token is in the job's stream"
        );
    }
}

/// A status's states as GitLab got them: `pending`, `running`, `success` in that order, ending
/// with `success`; a state may be left out (a step over before its start was reported: a
/// status never goes back to an earlier stage).
fn assert_in_order(states: &[&str], name: &str) {
    let order = ["pending", "running", "success"];
    let ranks: Vec<usize> = states
        .iter()
        .map(|s| order.iter().position(|o| o == s).expect("a known state"))
        .collect();
    assert!(ranks.windows(2).all(|w| w[0] < w[1]), "{name}: {states:?}");
    assert_eq!(states.last(), Some(&"success"), "{name}: {states:?}");
}

/// GitLab down (500 to every call) does not stall the pipeline, and nothing is recorded as
/// reported meanwhile; once GitLab is back, every status reaches its final state there, none
/// moved back to an earlier one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gitlab_that_was_down_gets_every_final_status_once_it_is_back() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let mock = GitlabMock::start(TOKEN).await;
    mock.fail_next(500, usize::MAX);
    let mut options = reporter_options(&mock, 2);
    options.takeover_after = Duration::from_millis(500);
    let roles = Roles::start(&store, options);
    let job = noop_job(&store).await;

    wait_until(DEADLINE * 3, || async {
        phase(&store, job).await == Some(JobPhase::Succeeded)
    })
    .await;
    // Every status was tried, and given up on for now.
    wait_until(DEADLINE, || async { mock.calls().len() >= 4 }).await;
    assert!(mock.accepted_statuses().is_empty());
    assert!(reports(&store, job).await.is_empty());

    mock.fail_next(500, 0);
    let recorded = wait_for(DEADLINE * 3, "both successes recorded", || async {
        let r = reports(&store, job).await;
        let done = NAMES
            .iter()
            .all(|n| r.iter().any(|r| r.name == *n && r.state == "success"));
        done.then_some(r)
    })
    .await;
    roles.stop().await;
    for r in &recorded {
        assert_eq!((r.http_status, &r.error), (Some(201), &None), "{r:?}");
    }
    let accepted = mock.accepted_statuses();
    for name in NAMES {
        let states: Vec<&str> = accepted
            .iter()
            .filter(|c| c.field("name") == Some(name))
            .map(|c| c.field("state").unwrap())
            .collect();
        assert_in_order(&states, name);
    }
}

/// An entry handled after later events of its job are in the stream (a reporter behind, or an
/// entry back from a GitLab outage) posts no state those events have gone past: GitLab gets
/// `success` alone, never `pending` or `running` after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_entry_does_not_post_a_state_its_job_has_gone_past() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let mock = GitlabMock::start(TOKEN).await;
    let job = noop_job(&store).await;
    let build = StepId::new("build");
    let later: Vec<Event> = vec![
        StepStarted {
            step: build.clone(),
            attempt: 1,
            agent: AgentId::new("a"),
        }
        .into(),
        StepSucceeded {
            step: build,
            attempt: 1,
        }
        .into(),
    ];
    store
        .append(Append::new(StreamId::Job(job), later))
        .await
        .unwrap();
    let (stop, rx) = watch::channel(false);
    let reporter = tokio::spawn(gitlab::run(
        store.clone(),
        reporter_options(&mock, 2),
        async move {
            let mut rx = rx;
            let _ = rx.wait_for(|s| *s).await;
        },
    ));
    wait_until(DEADLINE * 3, || async {
        reports(&store, job)
            .await
            .iter()
            .any(|r| r.name == NAMES[0])
    })
    .await;
    let _ = stop.send(true);
    reporter.await.unwrap().unwrap();
    let states: Vec<String> = mock
        .calls()
        .iter()
        .filter(|c| c.field("name") == Some(NAMES[0]))
        .map(|c| c.field("state").unwrap().to_string())
        .collect();
    assert_eq!(states, ["success"]);
}

/// A 429 whose `Retry-After` is past the retry budget: the client sends nothing more until
/// then (the other entries do not hammer a GitLab that asked to wait), and the statuses go
/// once it has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_reporter_waits_for_retry_after_and_then_reports() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let mock = GitlabMock::start(TOKEN).await;
    mock.set_retry_after(3);
    mock.fail_next(429, 1);
    let mut options = reporter_options(&mock, 2);
    options.retry.budget = Duration::from_secs(1);
    options.takeover_after = Duration::from_millis(500);
    let roles = Roles::start(&store, options);
    let job = noop_job(&store).await;
    wait_for(DEADLINE * 3, "both successes recorded", || async {
        let r = reports(&store, job).await;
        let done = NAMES
            .iter()
            .all(|n| r.iter().any(|r| r.name == *n && r.state == "success"));
        done.then_some(r)
    })
    .await;
    roles.stop().await;
    let calls = mock.calls();
    assert_eq!(calls[0].answer, 429, "{calls:?}");
    // The next call waited for the Retry-After (3 s) the 429 asked for.
    let waited = calls[1].at.duration_since(calls[0].at);
    assert!(waited >= Duration::from_secs(3), "{waited:?} {calls:?}");
}

/// Deploy steps become GitLab deployments of the tag: created `running` when the step starts,
/// updated to `success` when it ends, and `canceled` when the job is cancelled mid-deploy. Each
/// outcome is recorded as `DeploymentReported` with GitLab's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_steps_become_gitlab_deployments_created_running_then_finished() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let mock = GitlabMock::start(TOKEN).await;
    let (stop, rx) = watch::channel(false);
    let reporter = tokio::spawn({
        let store = store.clone();
        let opts = reporter_options(&mock, 4);
        let mut rx = rx;
        async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            gitlab::run(store, opts, stop).await.unwrap()
        }
    });
    let job = JobId::new();
    let deploy = |env: &str| StepPlan {
        step: StepId::new(format!("deploy:{env}")),
        pool: "nobody".into(),
        priority: 0,
        spec: StepSpec::Deploy(DeploySpec {
            environment: env.into(),
            ..Default::default()
        }),
    };
    let created = JobCreated {
        artifact: None,
        job,
        project_id: 42,
        project: "group/app".into(),
        tag: "v1.2.3".into(),
        git_ref: "refs/tags/v1.2.3".into(),
        sha: SHA.into(),
        priority: 0,
        trigger: "test".into(),
        steps: vec![deploy("staging"), deploy("production")],
    };
    let append = |events: Vec<Event>| {
        let store = store.clone();
        async move {
            store
                .append(Append::new(StreamId::Job(job), events))
                .await
                .unwrap();
        }
    };
    let started = |env: &str| -> Event {
        StepStarted {
            step: StepId::new(format!("deploy:{env}")),
            attempt: 1,
            agent: AgentId::new("a"),
        }
        .into()
    };
    let deployments = || {
        mock.calls()
            .into_iter()
            .filter(|c| c.path.contains("/deployments"))
            .collect::<Vec<_>>()
    };
    let recorded = || deployment_reports(&store, job);

    append(vec![created.into(), started("staging")]).await;
    let first = wait_for(DEADLINE, "the staging deployment", || async {
        let r = recorded().await;
        (r.len() == 1).then(|| r[0].clone())
    })
    .await;
    assert_eq!(first.environment, "staging");
    assert_eq!(first.status, "running");
    let staging_id = first.deployment_id.expect("gitlab's id");
    append(vec![StepSucceeded {
        step: StepId::new("deploy:staging"),
        attempt: 1,
    }
    .into()])
    .await;
    append(vec![started("production")]).await;
    append(vec![JobCancelled {
        reason: "changed my mind".into(),
        by: "api".into(),
    }
    .into()])
    .await;
    let all = wait_for(DEADLINE, "four deployment reports", || async {
        let r = recorded().await;
        (r.len() >= 4).then_some(r)
    })
    .await;
    let _ = stop.send(true);
    reporter.await.unwrap();

    let summary: Vec<(&str, &str)> = all
        .iter()
        .map(|r| (r.environment.as_str(), r.status.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            ("staging", "running"),
            ("staging", "success"),
            ("production", "running"),
            ("production", "canceled"),
        ]
    );
    assert!(all.iter().all(|r| r.error.is_none()), "{all:?}");
    assert_eq!(all[1].deployment_id, Some(staging_id));
    let production_id = all[2].deployment_id.unwrap();
    assert_ne!(production_id, staging_id);
    assert_eq!(all[3].deployment_id, Some(production_id));

    let calls = deployments();
    let requests: Vec<(String, String, Option<&str>)> = calls
        .iter()
        .map(|c| (c.method.clone(), c.path.clone(), c.field("status")))
        .collect();
    assert_eq!(
        requests,
        [
            (
                "POST".into(),
                "/api/v4/projects/42/deployments".into(),
                Some("running")
            ),
            (
                "PUT".into(),
                format!("/api/v4/projects/42/deployments/{staging_id}"),
                Some("success")
            ),
            (
                "POST".into(),
                "/api/v4/projects/42/deployments".into(),
                Some("running")
            ),
            (
                "PUT".into(),
                format!("/api/v4/projects/42/deployments/{production_id}"),
                Some("canceled")
            ),
        ]
    );
    for c in calls.iter().filter(|c| c.method == "POST") {
        assert_eq!(c.body["tag"], serde_json::json!(true));
        assert_eq!(c.field("ref"), Some("v1.2.3"));
        assert_eq!(c.field("sha"), Some(SHA));
    }
    assert!(calls.iter().all(|c| c.answer == 200 || c.answer == 201));
}

/// A GitLab tag entity, made `age` ago (lightweight: dated by its commit).
fn tag_entity(name: &str, age: Duration) -> serde_json::Value {
    let at = std::time::SystemTime::now() - age;
    let stamp = humantime::format_rfc3339_seconds(at).to_string();
    let commit = format!(
        "{:0>40}",
        name.bytes().map(|b| format!("{b:02x}")).collect::<String>()
    );
    serde_json::json!({
        "name": name,
        "message": null,
        "target": commit,
        "commit": {
            "id": commit,
            "short_id": &commit[..8],
            "title": "a commit",
            "created_at": stamp,
            "committed_date": stamp,
            "parent_ids": [],
        },
        "release": null,
        "protected": false,
        "created_at": null,
    })
}

/// Tags GitLab lists but no webhook reported are recorded as deliveries and become jobs, once;
/// old tags and tags whose webhook did arrive are left alone. The list is read page by page
/// through the `Link` header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_builds_recent_tags_no_webhook_reported_once() {
    use ferry::coordinator::plan::ProjectPlan;
    use ferry::gitlab::{reconcile_project, ReconcileProject};
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let mock = GitlabMock::start(TOKEN).await;
    let day = Duration::from_secs(24 * 3600);
    // 130 old tags (two pages of 100), two recent ones missed, one recent one whose webhook came.
    let mut tags: Vec<serde_json::Value> = (0..130)
        .map(|i| tag_entity(&format!("old-{i}"), day * 400))
        .collect();
    tags.insert(7, tag_entity("v2.0.0", Duration::from_secs(60)));
    tags.push(tag_entity("v2.0.1", Duration::from_secs(30)));
    let hooked = tag_entity("v1.9.0", Duration::from_secs(90));
    tags.push(hooked.clone());
    mock.set_tags(42, tags);
    // The webhook for v1.9.0 arrived, as the gateway records it.
    let delivered = WebhookReceived {
        delivery_id: Some("d-19".into()),
        event: "Tag Push Hook".into(),
        job: Some(JobId::new()),
        project_id: Some(42),
        project_path: Some("group/app".into()),
        git_ref: Some("refs/tags/v1.9.0".into()),
        before: Some("0".repeat(40)),
        after: hooked["target"].as_str().map(Into::into),
        checkout_sha: hooked["commit"]["id"].as_str().map(Into::into),
        action: "ignored".into(),
        reason: Some("the project does not build it".into()),
        ..Default::default()
    };
    let keys = ferry::gateway::dedupe_keys(&delivered);
    store
        .append(
            Append::new(StreamId::Webhooks, vec![delivered.into()])
                .dedupe(keys, Duration::from_secs(3600)),
        )
        .await
        .unwrap();

    let client = client(&mock, TOKEN);
    let project = ReconcileProject {
        id: 42,
        path: "group/app".into(),
        clone_url: Some("file:///nowhere".into()),
    };
    let now = ferry::store::now_ms();
    let first = reconcile_project(
        &*store,
        &client,
        &project,
        day,
        Duration::from_secs(3600),
        now,
    )
    .await
    .unwrap();
    assert_eq!(first.listed, 133);
    assert_eq!(first.recent, 3);
    assert_eq!(first.recorded, ["v2.0.0", "v2.0.1"]);
    let pages = mock
        .calls()
        .iter()
        .filter(|c| c.path.ends_with("/repository/tags"))
        .count();
    assert_eq!(pages, 2, "followed the Link header to the second page");

    // A coordinator turns the recorded deliveries into jobs.
    let (stop, rx) = watch::channel(false);
    let coordinator = tokio::spawn({
        let store = store.clone();
        let mut rx = rx;
        let opts = coordinator::Options {
            consumer: "c-reconcile".into(),
            projects: vec![ProjectPlan {
                id: Some(42),
                path: "group/app".into(),
                // (as configured: reconciliation records the configured clone_url)
                clone_url: Some("file:///nowhere".into()),
                auto_build: true,
                build_pool: "nobody".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        async move {
            coordinator::run(store, opts, async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .unwrap()
        }
    });
    let jobs = wait_for(DEADLINE, "two jobs", || async {
        let jobs = store.jobs(None, 10, Order::Oldest).await.unwrap();
        (jobs.len() == 2).then_some(jobs)
    })
    .await;
    let mut built = Vec::new();
    for job in jobs {
        match store.read_stream(&StreamId::Job(job), 0).await.unwrap()[0]
            .decode()
            .unwrap()
        {
            Event::JobCreated(p) => built.push((p.tag, p.sha)),
            other => panic!("{other:?}"),
        }
    }
    built.sort();
    let sha = |t: &str| {
        tag_entity(t, Duration::ZERO)["commit"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        built,
        [
            ("v2.0.0".to_string(), sha("v2.0.0")),
            ("v2.0.1".to_string(), sha("v2.0.1"))
        ]
    );

    // Again: nothing new.
    let again = reconcile_project(
        &*store,
        &client,
        &project,
        day,
        Duration::from_secs(3600),
        now,
    )
    .await
    .unwrap();
    assert!(again.recorded.is_empty(), "{again:?}");
    let _ = stop.send(true);
    coordinator.await.unwrap();
    assert_eq!(store.jobs(None, 10, Order::Oldest).await.unwrap().len(), 2);
}

/// A job of project 42 whose one step deploys to `env`, its step started, appended at `at_ms`.
async fn started_deploy(store: &Arc<dyn Store>, env: &str, at_ms: u64) -> JobId {
    let job = JobId::new();
    let step = StepId::new(format!("deploy:{env}"));
    let created = JobCreated {
        artifact: None,
        job,
        project_id: 42,
        project: "group/app".into(),
        tag: "v1.2.3".into(),
        git_ref: "refs/tags/v1.2.3".into(),
        sha: SHA.into(),
        priority: 0,
        trigger: "test".into(),
        steps: vec![StepPlan {
            step: step.clone(),
            pool: "nobody".into(),
            priority: 0,
            spec: StepSpec::Deploy(DeploySpec {
                environment: env.into(),
                ..Default::default()
            }),
        }],
    };
    let started = StepStarted {
        step,
        attempt: 1,
        agent: AgentId::new("a"),
    };
    let mut append = Append::new(StreamId::Job(job), vec![created.into(), started.into()]);
    append.at_ms = at_ms;
    store.append(append).await.unwrap();
    job
}

/// A deployment whose creation comes while the client holds its calls (a 429 asked to wait) is
/// created once the hold is over, not recorded as failed and lost; and an entry GitLab has not
/// taken for a day is recorded as failed and acknowledged, not kept pending for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_deployments_are_created_later_and_day_old_entries_are_given_up() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let mock = GitlabMock::start(TOKEN).await;
    mock.set_retry_after(5);
    mock.fail_next(429, 1);
    let mut options = reporter_options(&mock, 2);
    options.retry.budget = Duration::from_millis(500);
    options.takeover_after = Duration::from_millis(500);
    let (stop, rx) = watch::channel(false);
    let reporter = tokio::spawn(gitlab::run(store.clone(), options, async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    }));
    // A job whose first status gets the 429; then, while the client holds, a job whose only
    // call is its deployment's creation (its running status was already reported).
    noop_job(&store).await;
    wait_until(DEADLINE, || async {
        mock.calls().iter().any(|c| c.answer == 429)
    })
    .await;
    let job = started_deploy(&store, "production", ferry::store::now_ms()).await;
    let reported = CommitStatusReported {
        name: NAMES[1].into(),
        state: "running".into(),
        sha: SHA.into(),
        http_status: Some(201),
        error: None,
    };
    store
        .append(Append::new(StreamId::Job(job), vec![reported.into()]))
        .await
        .unwrap();
    let created = wait_for(DEADLINE * 3, "the deployment created", || async {
        deployment_reports(&store, job)
            .await
            .into_iter()
            .find(|r| r.error.is_none())
    })
    .await;
    assert!(created.deployment_id.is_some(), "{created:?}");
    assert!(
        deployment_reports(&store, job)
            .await
            .iter()
            .all(|r| r.error.is_none()),
        "no failure recorded on the way"
    );

    // GitLab down for good, and an entry from two days ago: recorded as failed, let go.
    mock.fail_next(500, usize::MAX);
    let old = started_deploy(
        &store,
        "staging",
        ferry::store::now_ms() - 2 * 24 * 3600 * 1000,
    )
    .await;
    let failed = wait_for(DEADLINE * 3, "the old entry's failure recorded", || async {
        let r = reports(&store, old).await;
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert!(failed[0].error.is_some(), "{failed:?}");
    let _ = stop.send(true);
    reporter.await.unwrap().unwrap();
}

/// One reporter at a time creates a job's deployment to an environment: while another holds
/// the creation lock (a reporter that took the entry over while this one still works on it),
/// nothing is created; once it is free, the deployment is created once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deployment_is_created_by_one_reporter_at_a_time() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let mock = GitlabMock::start(TOKEN).await;
    let mut options = reporter_options(&mock, 2);
    options.takeover_after = Duration::from_millis(500);
    let job = started_deploy(&store, "production", ferry::store::now_ms()).await;
    let lock = format!("gitlab-deployment:{job}:production");
    let token = store
        .lock_acquire(&lock, "another-reporter", Duration::from_secs(60))
        .await
        .unwrap()
        .unwrap();
    let (stop, rx) = watch::channel(false);
    let reporter = tokio::spawn(gitlab::run(store.clone(), options, async move {
        let mut rx = rx;
        let _ = rx.wait_for(|s| *s).await;
    }));
    // The entry got as far as the deployment: its running status is reported.
    wait_until(DEADLINE, || async {
        reports(&store, job)
            .await
            .iter()
            .any(|r| r.name == NAMES[1] && r.state == "running")
    })
    .await;
    let posts = || {
        mock.calls()
            .into_iter()
            .filter(|c| c.path.ends_with("/deployments") && c.method == "POST")
            .count()
    };
    // An absence, watched over a few takeovers of the entry (cannot fail on correct code
    // whatever the machine's speed).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(posts(), 0, "created while another reporter held the lock");
    assert!(deployment_reports(&store, job).await.is_empty());
    assert!(store
        .lock_release(&lock, "another-reporter", token)
        .await
        .unwrap());
    let created = wait_for(DEADLINE * 3, "the deployment created", || async {
        deployment_reports(&store, job).await.into_iter().next()
    })
    .await;
    assert!(
        created.deployment_id.is_some() && created.error.is_none(),
        "{created:?}"
    );
    let _ = stop.send(true);
    reporter.await.unwrap().unwrap();
    assert_eq!(posts(), 1);
}
