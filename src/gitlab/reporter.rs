//! The commit-status reporter: a feed consumer (group [`GROUP`]) that tells GitLab how each
//! step of each job is doing, and records every report as a `CommitStatusReported` event. Deploy
//! steps also get a GitLab deployment of the tag to their environment, created `running` when
//! the step starts and moved to its final status when it ends (`DeploymentReported`).
//!
//! It is deliberately apart from the coordinators: it reads the feed in its own consumer group,
//! decides nothing about jobs, and its appends (`Expected::Any`) never compete with decisions for
//! long: pipelines never wait for GitLab. A GitLab that is down or rate-limiting costs an entry a
//! bounded retry budget, after which the entry stays pending (nothing recorded) and is handled
//! again when it is taken over (`takeover_after`), until GitLab takes it, for a day at most (then
//! the failure is recorded and the entry acknowledged); meanwhile the client holds further calls
//! for GitLab's `Retry-After`. A refusal for good (4xx) is recorded and the entry acknowledged.
//!
//! Delivery is at least once, and several reporters may run. Effects stay idempotent because a
//! status is not posted when the job's stream already holds, after the event being handled, a
//! report for that status name at the same or a later stage (`pending` < `running` < final), or
//! an event that calls for one: a redelivered entry finds its own reports, and a slow reporter,
//! or an entry back from an outage, cannot move a finished status back to `running`. Within one reporter, the entries of one job are handled in log order; different
//! jobs are handled concurrently.

use super::client::{
    self, Client, DeploymentRequest, DeploymentStatus, Retry, StatusOutcome, StatusRequest,
    StatusState,
};
use crate::config::Secret;
use crate::domain::{JobState, StepStatus};
use crate::store::{Append, Error, LogPos, Store, Stored, StreamId};
use ferry_proto::{
    CommitStatusReported, DeploymentReported, Event, JobCreated, JobId, StepId, StepSpec,
};
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};
use url::Url;

/// The consumer group of every reporter.
pub const GROUP: &str = "gitlab-status";

/// How a reporter runs.
#[derive(Clone, Debug)]
pub struct ReporterOptions {
    /// This reporter's consumer name: unique per process, stable across a restart so that the
    /// restarted process reports its own pending entries first.
    pub consumer: String,
    /// The GitLab instance, e.g. `https://gitlab.example.com`.
    pub gitlab_url: Url,
    /// The API token (`PRIVATE-TOKEN`); it goes nowhere but that header.
    pub token: Secret,
    /// Base of the links in `target_url`: a job links to `<public_url>/api/v1/jobs/<id>`.
    pub public_url: Url,
    /// Retries of one status post; their budget bounds how long one entry can take.
    pub retry: Retry,
    /// Timeout of one HTTP request to GitLab.
    pub request_timeout: Duration,
    /// Jobs whose entries are handled at once.
    pub concurrency: usize,
    /// Feed entries read per round trip.
    pub batch: usize,
    /// A feed entry pending this long with another reporter is taken over.
    pub takeover_after: Duration,
    /// Tag reconciliation, when on.
    pub reconcile: Option<Reconciliation>,
}

/// How tags are reconciled (see [`super::reconcile`]): every `interval`, by one reporter at a
/// time (the [`RECONCILE_LOCK`] leader lock).
#[derive(Clone, Debug)]
pub struct Reconciliation {
    pub interval: Duration,
    pub window: Duration,
    /// The gateway's dedupe window, for the deliveries recorded.
    pub dedupe_window: Duration,
    pub projects: Vec<super::ReconcileProject>,
}

/// The leader lock one reporter holds while it reconciles tags.
pub const RECONCILE_LOCK: &str = "gitlab-reconcile";

impl ReporterOptions {
    /// Options with the default retry, concurrency and batch settings.
    pub fn new(consumer: String, gitlab_url: Url, token: Secret, public_url: Url) -> Self {
        ReporterOptions {
            consumer,
            gitlab_url,
            token,
            public_url,
            retry: Retry::default(),
            request_timeout: Duration::from_secs(10),
            concurrency: 16,
            batch: 128,
            // Longer than the retry budget: a live reporter still working on an entry keeps it.
            takeover_after: Duration::from_secs(60),
            reconcile: None,
        }
    }
}

/// Runs a reporter until `shutdown` resolves. Fails only when the GitLab client cannot be built
/// from the options; store trouble is retried.
pub async fn run(
    store: Arc<dyn Store>,
    opts: ReporterOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), client::Error> {
    let client = Client::with_options(
        &opts.gitlab_url,
        opts.token.clone(),
        opts.retry.clone(),
        opts.request_timeout,
    )?;
    let reporter = Reporter {
        store,
        client,
        public_url: opts.public_url.as_str().trim_end_matches('/').to_string(),
        limit: Arc::new(Semaphore::new(opts.concurrency.max(1))),
        opts: Arc::new(opts),
    };
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = reporter.store.ensure_group(GROUP) => match r {
                Ok(()) => break,
                Err(e) => crate::feed::backoff("create the gitlab-status consumer group", &e).await,
            },
        }
    }
    info!(consumer = %reporter.opts.consumer, gitlab = %reporter.opts.gitlab_url, "commit status reporter started");
    let reconciling = reporter.opts.reconcile.clone().map(|r| {
        tokio::spawn(reconcile_duty(
            reporter.store.clone(),
            reporter.client.clone(),
            reporter.opts.consumer.clone(),
            r,
        ))
    });
    tokio::select! {
        _ = &mut shutdown => {}
        _ = reporter.consume() => {}
    }
    if let Some(task) = reconciling {
        task.abort();
    }
    info!(consumer = %reporter.opts.consumer, "commit status reporter stopped");
    Ok(())
}

/// One status post that a job event calls for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    /// The status name, [`status_name`] of the step.
    pub name: String,
    pub state: StatusState,
    pub description: String,
}

/// The status name of a step: `ferry/build`, `ferry/deploy: <env>` for `deploy:<env>`, and
/// `ferry/<step>` for anything else.
pub fn status_name(step: &StepId) -> String {
    let id = step.to_string();
    match id.strip_prefix("deploy:") {
        Some(env) => format!("ferry/deploy: {env}"),
        None => format!("ferry/{id}"),
    }
}

/// The statuses to post for `event`, given the job's state just before it. Pure.
///
/// `pending` for every planned step on `JobCreated`; `running` on `StepStarted`; `success` on
/// `StepSucceeded`; `failed` on a `StepFailed` that will not be retried (a retryable failure
/// leaves the status `running` until the retry's outcome, or `JobFailed`); on `JobCancelled` and
/// `JobSuperseded`, `canceled` for every step that did not finish, and on `JobFailed`, `failed`.
pub fn transitions(before: &JobState, event: &Event) -> Vec<Transition> {
    let one = |step: &StepId, state: StatusState, description: String| {
        vec![Transition {
            name: status_name(step),
            state,
            description,
        }]
    };
    let planned = |step: &StepId| before.step(step).is_some();
    match event {
        Event::JobCreated(plan) if before.plan.is_none() => plan
            .steps
            .iter()
            .map(|s| Transition {
                name: status_name(&s.step),
                state: StatusState::Pending,
                description: "queued".into(),
            })
            .collect(),
        Event::StepStarted(e) if planned(&e.step) => one(
            &e.step,
            StatusState::Running,
            format!("running, attempt {}", e.attempt),
        ),
        Event::StepSucceeded(e) if planned(&e.step) => {
            one(&e.step, StatusState::Success, "succeeded".into())
        }
        Event::StepFailed(e) if planned(&e.step) && !e.retryable => {
            one(&e.step, StatusState::Failed, format!("failed: {}", e.error))
        }
        Event::JobFailed(e) => unfinished(before, StatusState::Failed, &e.reason),
        Event::JobCancelled(e) => unfinished(
            before,
            StatusState::Canceled,
            &format!("cancelled by {}: {}", e.by, e.reason),
        ),
        Event::JobSuperseded(e) => unfinished(
            before,
            StatusState::Canceled,
            &format!("superseded by job {} on {}", e.by_job, e.environment),
        ),
        _ => Vec::new(),
    }
}

/// `state` for each step of a job that is ending and whose step has no final status yet.
fn unfinished(before: &JobState, state: StatusState, why: &str) -> Vec<Transition> {
    if before.phase.is_terminal() {
        return Vec::new();
    }
    before
        .steps
        .iter()
        .filter(|s| {
            !matches!(
                s.status,
                StepStatus::Succeeded { .. }
                    | StepStatus::Failed {
                        retryable: false,
                        ..
                    }
            )
        })
        .map(|s| Transition {
            name: status_name(&s.step),
            state,
            description: why.to_string(),
        })
        .collect()
}

/// A change of a GitLab deployment that a job event calls for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentTransition {
    pub environment: String,
    pub status: DeploymentStatus,
    /// Whether the deployment may be created with this status when GitLab has none yet for
    /// the job and environment (the step's own outcome), or only updated (the job ending
    /// around a deploy that may never have started).
    pub create: bool,
}

/// The deployment changes for `event`, given the job's state just before it. Pure.
///
/// `running` when a deploy step starts; `success` when it succeeds; `failed` when it fails for
/// good; on `JobFailed` / `JobCancelled` / `JobSuperseded`, `failed` / `canceled` for every deploy
/// step that had not finished (only updating a deployment that exists).
pub fn deployment_transitions(before: &JobState, event: &Event) -> Vec<DeploymentTransition> {
    let environment = |step: &StepId| {
        before.plan.as_ref().and_then(|p| {
            p.steps
                .iter()
                .find(|s| &s.step == step)
                .and_then(|s| match &s.spec {
                    StepSpec::Deploy(d) => Some(d.environment.clone()),
                    _ => None,
                })
        })
    };
    let one = |step: &StepId, status: DeploymentStatus| {
        environment(step)
            .map(|environment| DeploymentTransition {
                environment,
                status,
                create: true,
            })
            .into_iter()
            .collect()
    };
    let unfinished = |status: DeploymentStatus| -> Vec<DeploymentTransition> {
        if before.phase.is_terminal() {
            return Vec::new();
        }
        before
            .steps
            .iter()
            .filter(|s| {
                !matches!(
                    s.status,
                    StepStatus::Succeeded { .. }
                        | StepStatus::Failed {
                            retryable: false,
                            ..
                        }
                )
            })
            .filter_map(|s| environment(&s.step))
            .map(|environment| DeploymentTransition {
                environment,
                status,
                create: false,
            })
            .collect()
    };
    match event {
        Event::StepStarted(e) => one(&e.step, DeploymentStatus::Running),
        Event::StepSucceeded(e) => one(&e.step, DeploymentStatus::Success),
        Event::StepFailed(e) if !e.retryable => one(&e.step, DeploymentStatus::Failed),
        Event::JobFailed(_) => unfinished(DeploymentStatus::Failed),
        Event::JobCancelled(_) | Event::JobSuperseded(_) => unfinished(DeploymentStatus::Canceled),
        _ => Vec::new(),
    }
}

/// `pending` < `running` < every final state.
fn stage(state: &str) -> u8 {
    match state {
        "pending" => 0,
        "running" => 1,
        _ => 2,
    }
}

struct Reporter {
    store: Arc<dyn Store>,
    client: Client,
    /// `public_url` without its trailing slash.
    public_url: String,
    limit: Arc<Semaphore>,
    opts: Arc<ReporterOptions>,
}

impl Reporter {
    async fn consume(&self) {
        let consumer = crate::feed::Consumer {
            group: GROUP,
            name: &self.opts.consumer,
            batch: self.opts.batch,
            takeover_after: self.opts.takeover_after,
        };
        crate::feed::consume(&*self.store, consumer, |batch| self.handle_batch(batch)).await
    }

    /// Handles a batch: entries of one job in order, jobs concurrently (at most `concurrency`
    /// at once). Acknowledges every entry handled; an entry whose handling hit a store error
    /// stays pending and comes back.
    async fn handle_batch(&self, batch: Vec<Stored>) {
        let mut done: Vec<LogPos> = Vec::with_capacity(batch.len());
        let mut per_job: Vec<(JobId, Vec<Stored>)> = Vec::new();
        let mut index: HashMap<JobId, usize> = HashMap::new();
        for stored in batch {
            match StreamId::parse(&stored.envelope.stream).and_then(|s| s.job()) {
                Some(job) if reportable(stored.envelope.kind) => {
                    let i = *index.entry(job).or_insert_with(|| {
                        per_job.push((job, Vec::new()));
                        per_job.len() - 1
                    });
                    per_job[i].1.push(stored);
                }
                _ => done.push(stored.pos),
            }
        }
        let mut tasks = tokio::task::JoinSet::new();
        for (job, entries) in per_job {
            let worker = JobReporter {
                store: self.store.clone(),
                client: self.client.clone(),
                target_url: target_url(&self.public_url, job),
                job,
            };
            let limit = self.limit.clone();
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let mut done = Vec::with_capacity(entries.len());
                for stored in entries {
                    match worker.handle(&stored).await {
                        Ok(()) => done.push(stored.pos),
                        Err(e) => {
                            // Later entries of this job wait for this one, to keep their order.
                            warn!(job = %worker.job, pos = %stored.pos, error = %e, "commit status not reported; the entry will be retried");
                            break;
                        }
                    }
                }
                done
            });
        }
        while let Some(result) = tasks.join_next().await {
            match result {
                Ok(positions) => done.extend(positions),
                Err(e) => warn!(error = %e, "a commit status task ended abnormally"),
            }
        }
        if !done.is_empty() {
            if let Err(e) = self.store.ack(GROUP, &done).await {
                warn!(error = %e, "could not acknowledge feed entries; they will be reported again");
            }
        }
    }
}

/// Kinds that may call for a status: `JobCreated`, `StepStarted`, `StepSucceeded`, `StepFailed`,
/// `JobFailed`, `JobCancelled`, `JobSuperseded`.
fn reportable(kind: u16) -> bool {
    matches!(kind, 2 | 5 | 7 | 8 | 12 | 13 | 14)
}

/// `<public_url>/api/v1/jobs/<id>`, when that is a link GitLab accepts.
fn target_url(public_url: &str, job: JobId) -> Option<String> {
    let url = format!("{public_url}/api/v1/jobs/{job}");
    match client::check_target_url(&url) {
        Ok(()) => Some(url),
        Err(why) => {
            debug!(%job, %why, "commit statuses go without a link");
            None
        }
    }
}

/// Reports the entries of one job.
struct JobReporter {
    store: Arc<dyn Store>,
    client: Client,
    target_url: Option<String>,
    job: JobId,
}

/// The deployment GitLab was told of for `environment` in `stream` (its id), and the highest
/// stage reported after the entry at `at`.
fn deployment_state(stream: &[Stored], at: usize, environment: &str) -> (Option<u64>, Option<u8>) {
    let mut known: Option<u64> = None;
    let mut reported_after: Option<u8> = None;
    for (i, s) in stream.iter().enumerate() {
        if let Ok(Event::DeploymentReported(r)) = s.decode() {
            if r.environment != environment {
                continue;
            }
            known = r.deployment_id.or(known);
            if i > at {
                let st = stage(&r.status);
                reported_after = Some(reported_after.map_or(st, |x| x.max(st)));
            }
        }
    }
    (known, reported_after)
}

/// How long the lock on creating one deployment is held at most: past a creation's retry budget
/// and request timeouts. A reporter that died holding it delays that deployment by this much.
const CREATE_LOCK_TTL: Duration = Duration::from_secs(120);

/// How long an entry GitLab does not take stays pending before its failure is recorded.
const GIVE_UP_AFTER_MS: u64 = 24 * 3600 * 1000;

/// Why an entry was not reported, and stays pending to be handled again.
#[derive(Debug, thiserror::Error)]
enum Unreported {
    #[error("{0}")]
    Store(#[from] Error),
    /// GitLab could not be reached or kept failing: the entry is tried again later.
    #[error("{0}")]
    Gitlab(client::Error),
    /// Another reporter is creating this job's deployment to the environment.
    #[error("another reporter is creating the deployment to {0}")]
    Busy(String),
}

impl JobReporter {
    async fn handle(&self, stored: &Stored) -> Result<(), Unreported> {
        let event = match stored.decode() {
            Ok(e) => e,
            Err(e) => {
                warn!(pos = %stored.pos, error = %e, "skipping an event this version cannot read");
                return Ok(());
            }
        };
        // An entry GitLab has not taken for a day is recorded as failed and acknowledged: a
        // GitLab that is gone for good (or a wrong gitlab.url) must not keep every entry pending,
        // and the log from being trimmed, for ever.
        let give_up =
            crate::store::now_ms().saturating_sub(stored.envelope.at_ms) > GIVE_UP_AFTER_MS;
        let stream_id = StreamId::Job(self.job);
        let stream = self.store.read_stream(&stream_id, 0).await?;
        let Some(at) = stream.iter().position(|s| s.pos == stored.pos) else {
            warn!(job = %self.job, pos = %stored.pos, "feed entry missing from its job stream; not reported");
            return Ok(());
        };
        let mut before = JobState::new(self.job);
        for s in &stream[..at] {
            before.evolve(&s.decode()?, s.envelope.at_ms);
        }
        let plan: Option<&JobCreated> = match &event {
            Event::JobCreated(p) => Some(p),
            _ => before.plan.as_ref(),
        };
        let Some(plan) = plan.cloned() else {
            return Ok(());
        };
        // What GitLab was told after this event, or will be told by a later entry (handled
        // by another reporter, or before this one came back from a GitLab outage): a status is
        // never moved back to an earlier stage.
        let mut reported: HashMap<String, u8> = HashMap::new();
        let mut raise = |name: &str, state: &str| {
            let st = reported.entry(name.to_string()).or_insert(0);
            *st = (*st).max(stage(state));
        };
        let mut later = before.clone();
        later.evolve(&event, stored.envelope.at_ms);
        for s in &stream[at + 1..] {
            let Ok(e) = s.decode() else { continue };
            if let Event::CommitStatusReported(r) = &e {
                raise(&r.name, &r.state);
            }
            for t in transitions(&later, &e) {
                raise(&t.name, t.state.as_str());
            }
            later.evolve(&e, s.envelope.at_ms);
        }
        for t in transitions(&before, &event) {
            if reported
                .get(&t.name)
                .is_some_and(|st| *st >= stage(t.state.as_str()))
            {
                debug!(job = %self.job, name = %t.name, state = t.state.as_str(), "already reported");
                continue;
            }
            self.report(&plan, t, give_up).await?;
        }
        for t in deployment_transitions(&before, &event) {
            self.deployment(&plan, &stream, at, t, give_up).await?;
        }
        Ok(())
    }

    /// Creates or moves the job's GitLab deployment to `t.environment` and records the outcome.
    /// Skipped when a report after this event already says as much (a redelivered entry), and
    /// when the deployment would only be updated but GitLab never got one.
    async fn deployment(
        &self,
        plan: &JobCreated,
        stream: &[Stored],
        at: usize,
        t: DeploymentTransition,
        give_up: bool,
    ) -> Result<(), Unreported> {
        let wanted = stage(t.status.as_str());
        let done = |known: Option<u64>, reported_after: Option<u8>| {
            reported_after.is_some_and(|st| st >= wanted)
                || (t.status == DeploymentStatus::Running && known.is_some())
        };
        let (mut known, mut reported_after) = deployment_state(stream, at, &t.environment);
        // Creating a deployment is not idempotent: one reporter at a time creates a job's
        // deployment to an environment (another reporter may have taken over this entry while
        // this one still works on it), and it looks again once it holds the lock.
        let mut lock = None;
        if known.is_none() && t.create && !done(known, reported_after) {
            let name = format!("gitlab-deployment:{}:{}", self.job, t.environment);
            let holder = uuid::Uuid::new_v4().to_string();
            let Some(token) = self
                .store
                .lock_acquire(&name, &holder, CREATE_LOCK_TTL)
                .await?
            else {
                return Err(Unreported::Busy(t.environment));
            };
            let fresh = match self.store.read_stream(&StreamId::Job(self.job), 0).await {
                Ok(fresh) => fresh,
                Err(e) => {
                    let _ = self.store.lock_release(&name, &holder, token).await;
                    return Err(e.into());
                }
            };
            lock = Some((name, holder, token));
            (known, reported_after) = deployment_state(&fresh, at, &t.environment);
        }
        let result = if done(known, reported_after) {
            debug!(job = %self.job, environment = %t.environment, status = t.status.as_str(), "deployment already reported");
            Ok(())
        } else {
            self.send_deployment(plan, t, known, give_up).await
        };
        // (released whatever the outcome: held on, it would keep the next try out for long)
        if let Some((name, holder, token)) = lock {
            let _ = self.store.lock_release(&name, &holder, token).await;
        }
        result
    }

    /// Creates (or moves) the deployment and records the outcome.
    async fn send_deployment(
        &self,
        plan: &JobCreated,
        t: DeploymentTransition,
        known: Option<u64>,
        give_up: bool,
    ) -> Result<(), Unreported> {
        let result = match known {
            Some(id) => {
                self.client
                    .update_deployment(plan.project_id, id, t.status)
                    .await
            }
            None if t.create => {
                let request = DeploymentRequest {
                    environment: t.environment.clone(),
                    sha: plan.sha.clone(),
                    ref_: plan.tag.clone(),
                    status: t.status,
                };
                self.client
                    .create_deployment(plan.project_id, &request)
                    .await
            }
            None => return Ok(()),
        };
        let event = match result {
            // An update is safe to send again; a creation that failed is recorded (it may have
            // reached GitLab, and creating one is not idempotent).
            Err(e @ client::Error::Held { .. }) if !give_up => return Err(Unreported::Gitlab(e)),
            Err(e @ client::Error::GaveUp { .. }) if known.is_some() && !give_up => {
                return Err(Unreported::Gitlab(e))
            }
            Ok(d) => DeploymentReported {
                environment: t.environment,
                deployment_id: Some(d.id),
                status: t.status.as_str().to_string(),
                http_status: None,
                error: None,
            },
            Err(e) => {
                warn!(job = %self.job, environment = %t.environment, status = t.status.as_str(), error = %e, "deployment not accepted by gitlab");
                DeploymentReported {
                    environment: t.environment,
                    deployment_id: known,
                    status: t.status.as_str().to_string(),
                    http_status: e.http_status(),
                    error: Some(e.to_string()),
                }
            }
        };
        self.store
            .append(Append::new(StreamId::Job(self.job), vec![event.into()]))
            .await?;
        Ok(())
    }

    /// Posts one status and records the outcome in the job's stream. When GitLab could not be
    /// reached or kept failing, nothing is recorded and the entry stays pending: the status is
    /// posted once GitLab is back.
    async fn report(
        &self,
        plan: &JobCreated,
        t: Transition,
        give_up: bool,
    ) -> Result<(), Unreported> {
        let request = StatusRequest {
            state: t.state,
            ref_: plan.tag.clone(),
            name: t.name.clone(),
            target_url: self.target_url.clone(),
            description: Some(t.description),
        };
        let (http_status, error) = match self
            .client
            .post_status(plan.project_id, &plan.sha, &request)
            .await
        {
            Ok(outcome) => {
                if let StatusOutcome::AlreadyDone { .. } = outcome {
                    debug!(job = %self.job, name = %t.name, state = t.state.as_str(), "gitlab already had this status");
                }
                (Some(outcome.http_status()), None)
            }
            Err(e @ (client::Error::GaveUp { .. } | client::Error::Held { .. })) if !give_up => {
                return Err(Unreported::Gitlab(e))
            }
            Err(e) => {
                warn!(job = %self.job, name = %t.name, state = t.state.as_str(), error = %e, "commit status not accepted by gitlab");
                (e.http_status(), Some(e.to_string()))
            }
        };
        let event = CommitStatusReported {
            name: t.name,
            state: t.state.as_str().to_string(),
            sha: plan.sha.clone(),
            http_status,
            error,
        };
        self.store
            .append(Append::new(StreamId::Job(self.job), vec![event.into()]))
            .await?;
        Ok(())
    }
}

/// Every `interval`, the reporter that takes the [`RECONCILE_LOCK`] reconciles every project's
/// tags. The lock is not released: it lapses after `interval`, so one reporter reconciles per
/// interval however many run.
async fn reconcile_duty(store: Arc<dyn Store>, client: Client, holder: String, r: Reconciliation) {
    if r.interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(r.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match store
            .lock_acquire(RECONCILE_LOCK, &holder, r.interval)
            .await
        {
            Ok(Some(_)) => {}
            Ok(None) => continue,
            Err(e) => {
                warn!(error = %e, "could not take the tag reconciliation lock");
                continue;
            }
        }
        for project in &r.projects {
            match super::reconcile_project(
                &*store,
                &client,
                project,
                r.window,
                r.dedupe_window,
                crate::store::now_ms(),
            )
            .await
            {
                Ok(done) if !done.recorded.is_empty() => {
                    info!(project = %project.path, tags = ?done.recorded, "tags without a webhook will be built")
                }
                Ok(_) => debug!(project = %project.path, "tags reconciled: nothing missing"),
                Err(e) => warn!(project = %project.path, error = %e, "tag reconciliation failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::*;

    fn plan(steps: &[&str]) -> JobCreated {
        JobCreated {
            artifact: None,
            job: "01890a5d-ac96-774b-bcce-b30209900001".parse().unwrap(),
            project_id: 7,
            project: "g/app".into(),
            tag: "v1".into(),
            git_ref: "refs/tags/v1".into(),
            sha: "a".repeat(40),
            priority: 0,
            trigger: "test".into(),
            steps: steps
                .iter()
                .map(|s| StepPlan {
                    step: StepId::new(*s),
                    pool: "default".into(),
                    priority: 0,
                    spec: StepSpec::Noop,
                })
                .collect(),
        }
    }

    /// The transitions of the last event, after folding the others.
    fn check(events: &[Event], expected: &[(&str, StatusState)]) {
        let (last, earlier) = events.split_last().unwrap();
        let p = plan(&[]);
        let before = JobState::fold(p.job, earlier.iter().map(|e| (e, 1)));
        let got: Vec<(String, StatusState)> = transitions(&before, last)
            .into_iter()
            .map(|t| (t.name, t.state))
            .collect();
        let expected: Vec<(String, StatusState)> =
            expected.iter().map(|(n, s)| (n.to_string(), *s)).collect();
        assert_eq!(got, expected, "after {events:?}");
    }

    fn created() -> Event {
        plan(&["build", "deploy:production"]).into()
    }
    fn queued(step: &str) -> Event {
        StepQueued {
            step: StepId::new(step),
            attempt: 1,
            pool: "default".into(),
            priority: 0,
        }
        .into()
    }
    fn started(step: &str) -> Event {
        StepStarted {
            step: StepId::new(step),
            attempt: 1,
            agent: AgentId::new("a"),
        }
        .into()
    }
    fn succeeded(step: &str) -> Event {
        StepSucceeded {
            step: StepId::new(step),
            attempt: 1,
        }
        .into()
    }
    fn failed(step: &str, retryable: bool) -> Event {
        StepFailed {
            step: StepId::new(step),
            attempt: 1,
            error: "exit 1".into(),
            retryable,
            exit_code: Some(1),
        }
        .into()
    }

    #[test]
    fn status_names_per_step() {
        assert_eq!(status_name(&StepId::new("build")), "ferry/build");
        assert_eq!(
            status_name(&StepId::new("deploy:production")),
            "ferry/deploy: production"
        );
    }

    #[test]
    fn each_job_event_maps_to_its_statuses() {
        use StatusState::*;
        let build = "ferry/build";
        let prod = "ferry/deploy: production";
        check(&[created()], &[(build, Pending), (prod, Pending)]);
        check(&[created(), started("build")], &[(build, Running)]);
        check(
            &[created(), started("build"), succeeded("build")],
            &[(build, Success)],
        );
        check(
            &[created(), started("build"), failed("build", false)],
            &[(build, Failed)],
        );
        // A retryable failure waits for the retry (or for JobFailed).
        check(&[created(), started("build"), failed("build", true)], &[]);
        let job_failed: Event = JobFailed {
            reason: "gave up".into(),
            step: Some(StepId::new("build")),
        }
        .into();
        check(
            &[
                created(),
                started("build"),
                failed("build", true),
                job_failed.clone(),
            ],
            &[(build, Failed), (prod, Failed)],
        );
        check(
            &[created(), failed("build", false), job_failed],
            &[(prod, Failed)],
        );
        let cancelled: Event = JobCancelled {
            reason: "tag deleted".into(),
            by: "webhook".into(),
        }
        .into();
        check(
            &[
                created(),
                queued("build"),
                started("build"),
                succeeded("build"),
                cancelled.clone(),
            ],
            &[(prod, Canceled)],
        );
        let superseded: Event = JobSuperseded {
            by_job: JobId::new(),
            environment: "production".into(),
        }
        .into();
        check(
            &[created(), superseded],
            &[(build, Canceled), (prod, Canceled)],
        );
        // An ended job reports nothing more, and steps outside the plan are not reported.
        check(&[created(), cancelled.clone(), cancelled], &[]);
        check(&[created(), started("nope")], &[]);
        check(&[started("build")], &[]);
    }
}

#[cfg(test)]
mod deployment_tests {
    use super::*;
    use ferry_proto::*;

    fn plan() -> JobCreated {
        let step = |id: &str, spec: StepSpec| StepPlan {
            step: StepId::new(id),
            pool: "default".into(),
            priority: 0,
            spec,
        };
        JobCreated {
            artifact: None,
            job: "01890a5d-ac96-774b-bcce-b30209900001".parse().unwrap(),
            project_id: 7,
            project: "g/app".into(),
            tag: "v1".into(),
            git_ref: "refs/tags/v1".into(),
            sha: "a".repeat(40),
            priority: 0,
            trigger: "test".into(),
            steps: vec![
                step("build", StepSpec::Noop),
                step(
                    "deploy:prod",
                    StepSpec::Deploy(DeploySpec {
                        environment: "prod".into(),
                        ..Default::default()
                    }),
                ),
            ],
        }
    }

    /// The deployment transitions of the last event, after folding the plan and the others.
    fn of(events: &[Event]) -> Vec<(String, DeploymentStatus, bool)> {
        let p = plan();
        let (last, earlier) = events.split_last().unwrap();
        let created: Event = p.clone().into();
        let before = JobState::fold(
            p.job,
            std::iter::once((&created, 1)).chain(earlier.iter().map(|e| (e, 1))),
        );
        deployment_transitions(&before, last)
            .into_iter()
            .map(|t| (t.environment, t.status, t.create))
            .collect()
    }

    fn started(step: &str) -> Event {
        StepStarted {
            step: StepId::new(step),
            attempt: 1,
            agent: AgentId::new("a"),
        }
        .into()
    }

    fn failed(step: &str, retryable: bool) -> Event {
        StepFailed {
            step: StepId::new(step),
            attempt: 1,
            error: "boom".into(),
            retryable,
            exit_code: None,
        }
        .into()
    }

    #[test]
    fn only_deploy_steps_make_deployments() {
        use DeploymentStatus::*;
        let prod = |s, c| vec![("prod".to_string(), s, c)];
        assert!(of(&[started("build")]).is_empty());
        assert_eq!(of(&[started("deploy:prod")]), prod(Running, true));
        let succeeded: Event = StepSucceeded {
            step: StepId::new("deploy:prod"),
            attempt: 1,
        }
        .into();
        assert_eq!(of(&[succeeded]), prod(Success, true));
        assert!(
            of(&[failed("deploy:prod", true)]).is_empty(),
            "a retryable failure leaves the deployment running"
        );
        assert_eq!(of(&[failed("deploy:prod", false)]), prod(Failed, true));
    }

    #[test]
    fn a_job_ending_early_only_updates_deployments_that_exist() {
        use DeploymentStatus::*;
        let superseded: Event = JobSuperseded {
            by_job: JobId::new(),
            environment: "prod".into(),
        }
        .into();
        assert_eq!(
            of(std::slice::from_ref(&superseded)),
            vec![("prod".to_string(), Canceled, false)]
        );
        let job_failed: Event = JobFailed {
            reason: "r".into(),
            step: None,
        }
        .into();
        assert_eq!(
            of(std::slice::from_ref(&job_failed)),
            vec![("prod".to_string(), Failed, false)]
        );
        assert!(
            of(&[job_failed, superseded]).is_empty(),
            "an ended job reports nothing more"
        );
    }
}
