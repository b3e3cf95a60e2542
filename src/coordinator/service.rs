//! The coordinator's loop: feed → decisions → appends, plus the singleton sweep duty.

use super::decide::{deploy_gate, next, RetryPolicy, Verdict};
use super::plan::{plan_job, ProjectPlan};
use super::remembered::Remembered;
use crate::domain::JobState;
use crate::store::{
    self, environment_index, now_ms, Append, Error, LogPos, Store, Stored, StreamId, Trimmed, LIVE,
};
use ferry_proto::{Event, FencingToken, JobCancelled, JobId, JobSuperseded, StepSpec};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{debug, info, warn};

use crate::metrics::COORDINATOR as METRICS;

/// The consumer group every coordinator joins.
pub const GROUP: &str = "coordinators";
/// The leader lock that guards the sweep duty.
pub const SWEEP_LOCK: &str = "sweeper";

#[derive(Clone, Debug)]
pub struct Options {
    /// This coordinator's consumer name: unique per process, stable across a restart if the
    /// restarted process should pick up its own pending entries first.
    pub consumer: String,
    pub policy: RetryPolicy,
    /// How often the leader expires leases and promotes due retries.
    pub sweep_interval: Duration,
    /// A feed entry pending this long with another coordinator is taken over (its owner is
    /// presumed dead; handling is idempotent, so a slow owner does no harm).
    pub takeover_after: Duration,
    pub projects: Vec<ProjectPlan>,
    /// Feed entries read per round trip.
    pub batch: usize,
    /// How long an ended job's output lines are kept (`None`: forever); the sweep duty
    /// expires older ones.
    pub keep_logs: Option<Duration>,
    /// The artifact store's directory, when it is one (`file://`): the sweep leader reports
    /// the free space of its filesystem.
    pub artifacts_dir: Option<std::path::PathBuf>,
    /// The artifact store and how long an unused artifact is kept there (`artifacts.keep`;
    /// see [`super::artifacts`]); `None`: the sweep deletes no artifact.
    pub artifact_retention: Option<(crate::build::ArtifactStore, Duration)>,
    /// How often the sweep leader looks for artifacts to delete (it lists the store).
    pub artifacts_every: Duration,
    /// How long the global log keeps an event that every consumer group handled
    /// (`coordinator.keep_feed`; `None`: for good). Each event stays in its own stream
    /// whatever this says: the log is the feed and a second copy.
    pub keep_feed: Option<Duration>,
    /// How often the sweep leader trims the global log.
    pub trim_every: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            consumer: format!("coordinator-{}", std::process::id()),
            policy: RetryPolicy::default(),
            sweep_interval: Duration::from_secs(1),
            takeover_after: Duration::from_secs(5),
            projects: Vec::new(),
            batch: 256,
            // the configuration's default, written once there
            keep_logs: Some(
                humantime::parse_duration(crate::config::defaults::KEEP_LOGS)
                    .expect("the default keep_logs is a duration"),
            ),
            artifacts_dir: None,
            artifact_retention: None,
            artifacts_every: Duration::from_secs(600),
            keep_feed: Some(
                humantime::parse_duration(crate::config::defaults::KEEP_FEED)
                    .expect("the default keep_feed is a duration"),
            ),
            trim_every: Duration::from_secs(60),
        }
    }
}

/// How often it repeats that a consumer group holds the trim back.
const HELD_WARNING_EVERY: Duration = Duration::from_secs(3600);

/// Runs a coordinator until `shutdown` resolves.
pub async fn run(
    store: Arc<dyn Store>,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let coordinator = Coordinator {
        store: store.clone(),
        opts: Arc::new(opts),
        known: Mutex::default(),
    };
    with_retry("create the consumer group", || {
        coordinator.store.ensure_group(GROUP)
    })
    .await;
    info!(consumer = %coordinator.opts.consumer, "coordinator started");
    let _ = &*METRICS;

    let mut pools: Vec<String> = coordinator
        .opts
        .projects
        .iter()
        .flat_map(|p| {
            std::iter::once(&p.build_pool).chain(p.environments.iter().map(|(pool, _)| pool))
        })
        .cloned()
        .collect();
    pools.sort();
    pools.dedup();
    let duty = tokio::spawn(sweep_duty(store.clone(), coordinator.opts.clone(), pools));
    tokio::select! {
        _ = shutdown => {}
        _ = coordinator.consume() => {}
    }
    duty.abort();
    info!(consumer = %coordinator.opts.consumer, "coordinator stopped");
    Ok(())
}

struct Coordinator {
    store: Arc<dyn Store>,
    opts: Arc<Options>,
    /// The last state this coordinator folded, produced or extended from the feed for recent
    /// jobs: each an exact fold of its stream's first `version` events (see `handle_job`).
    known: Mutex<Remembered>,
}

/// The entries of one job in a feed batch, in log order, and the positions of those that may
/// need a decision (acknowledged only once the job was handled).
#[derive(Default)]
struct JobEntries {
    events: Vec<(Stored, Event)>,
    waking: Vec<LogPos>,
}

impl Coordinator {
    /// Handles the feed until the future is dropped.
    async fn consume(&self) {
        let consumer = crate::feed::Consumer {
            group: GROUP,
            name: &self.opts.consumer,
            batch: self.opts.batch,
            takeover_after: self.opts.takeover_after,
        };
        crate::feed::consume(&*self.store, consumer, |batch| self.handle_batch(batch)).await
    }

    /// Handles a batch and acknowledges the entries handled. An entry whose handling failed
    /// stays pending and comes back (to us after a restart, or to another coordinator).
    ///
    /// Decisions are level-triggered, so all the entries of one job in a batch need one
    /// reconcile of that job, and different jobs are reconciled concurrently: a burst costs
    /// round trips per job, not per event, and not one after another.
    async fn handle_batch(&self, batch: Vec<Stored>) {
        let started = std::time::Instant::now();
        let mut done: Vec<LogPos> = Vec::with_capacity(batch.len());
        let mut jobs: BTreeMap<JobId, JobEntries> = BTreeMap::new();
        for stored in batch {
            let event = match stored.decode() {
                Ok(e) => e,
                Err(e) => {
                    // A newer node wrote a kind this build does not know: not ours to act on.
                    warn!(pos = %stored.pos, error = %e, "skipping an event this version cannot read");
                    done.push(stored.pos);
                    continue;
                }
            };
            let handled = match StreamId::parse(&stored.envelope.stream) {
                Some(StreamId::Job(job)) => {
                    let entries = jobs.entry(job).or_default();
                    if wakes_coordinator(&event) {
                        entries.waking.push(stored.pos.clone());
                    } else {
                        done.push(stored.pos.clone());
                    }
                    entries.events.push((stored, event));
                    continue;
                }
                Some(StreamId::Webhooks) => match &event {
                    Event::WebhookReceived(w) if w.action == "build" => {
                        self.create(&stored.pos, w).await
                    }
                    Event::WebhookReceived(w) if w.action == "delete" => {
                        self.cancel_deleted_tag(&stored.pos, w).await
                    }
                    _ => Ok(()),
                },
                _ => Ok(()),
            };
            match handled {
                Ok(()) => done.push(stored.pos),
                Err(e) => {
                    warn!(pos = %stored.pos, error = %e, "feed entry not handled; it will be retried")
                }
            }
        }
        let results =
            futures_util::future::join_all(jobs.into_iter().map(|(job, entries)| async move {
                let result = self.handle_job(job, &entries).await;
                (job, entries.waking, result)
            }))
            .await;
        for (job, positions, result) in results {
            match result {
                Ok(()) => done.extend(positions),
                Err(e) => {
                    warn!(%job, error = %e, "job not reconciled; its feed entries will be retried")
                }
            }
        }
        if !done.is_empty() {
            match self.store.ack(GROUP, &done).await {
                // (what this coordinator acknowledged: an entry another one took over and
                // acknowledged first is not counted twice)
                Ok(acked) => METRICS.feed_entries.inc_by(acked),
                Err(e) => {
                    warn!(error = %e, "could not acknowledge feed entries; they will be handled again")
                }
            }
        }
        METRICS
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// Handles the feed entries of one job in a batch.
    ///
    /// The coordinator remembers the last state of each recent job that it folded or produced
    /// (an exact fold of the stream's first `version` events). Entries that continue that state
    /// without a gap (each entry carries its place in the stream) extend it without reading
    /// the stream; entries it already includes are skipped. Only when the entries leave a gap
    /// (another coordinator took some, or this one never saw the job) does deciding need a read.
    ///
    /// Decisions are level-triggered: with waking entries present, the job is brought one
    /// decision further from that state. When the state has nothing to decide, nothing is read
    /// or written: anything appended after it arrives through the feed on its own.
    async fn handle_job(&self, job: JobId, entries: &JobEntries) -> Result<(), Error> {
        let known = self
            .known
            .lock()
            .expect("known-state lock")
            .get(&job)
            .cloned();
        let mut current = known;
        let mut extended = false;
        for (stored, event) in &entries.events {
            current = match (stored.seq, current) {
                (Some(n), Some(state)) if n <= state.version => Some(state),
                (Some(n), Some(mut state)) if n == state.version + 1 => {
                    state.evolve(event, stored.envelope.at_ms);
                    extended = true;
                    Some(state)
                }
                (Some(1), None) => {
                    let mut state = JobState::new(job);
                    state.evolve(event, stored.envelope.at_ms);
                    extended = true;
                    Some(state)
                }
                // A gap, or an entry written before entries recorded their place.
                _ => None,
            };
        }
        if let (true, Some(state)) = (extended, &current) {
            self.remember(state);
        }
        if entries.waking.is_empty() {
            return Ok(());
        }
        let state = match current {
            Some(state) if next(&state, &self.opts.policy, now_ms(), 0.0).is_empty() => state,
            known => self.reconcile_from(job, known).await?,
        };
        let frees = entries.events.iter().any(|(stored, e)| {
            entries.waking.contains(&stored.pos) && frees_environment(&state, e)
        });
        if frees {
            self.wake_environments(&state).await?;
        }
        // The job's end has come through the feed and been handled: nothing waking is left to
        // come for it, so its memory goes to jobs still running. (An end this coordinator
        // appended just now is still remembered: its own feed entry is yet to come.)
        if entries
            .events
            .iter()
            .any(|(_, e)| crate::domain::job::ends_job(e))
        {
            self.known.lock().expect("known-state lock").forget(&job);
        }
        Ok(())
    }

    /// Remembers `state`, an exact fold of its job's first `state.version` events.
    fn remember(&self, state: &JobState) {
        self.known.lock().expect("known-state lock").put(state);
    }

    /// Creates the job a webhook asks for. The job id was chosen by the gateway, so a second
    /// delivery of the same feed entry finds the stream non-empty and only reconciles.
    async fn create(
        &self,
        pos: &LogPos,
        webhook: &ferry_proto::WebhookReceived,
    ) -> Result<(), Error> {
        let Some(job) = webhook.job else {
            warn!(%pos, "build webhook without a job id; ignoring it");
            return Ok(());
        };
        let project = self.opts.projects.iter().find(|p| {
            p.id.is_some_and(|id| Some(id) == webhook.project_id)
                || Some(&p.path) == webhook.project_path.as_ref()
        });
        let Some(project) = project else {
            warn!(%pos, project = ?webhook.project_path, "webhook for a project this coordinator does not know");
            return Ok(());
        };
        let plan = match plan_job(project, webhook, job, format!("webhook:{pos}")) {
            Ok(plan) => plan,
            Err(why) => {
                info!(%pos, %why, "webhook builds nothing");
                return Ok(());
            }
        };
        let created: Event = plan.into();
        let mut planned = JobState::new(job);
        planned.evolve(&created, now_ms());
        let mut events = vec![created];
        events.extend(next(&planned, &self.opts.policy, now_ms(), jitter()));
        let append = Append::new(StreamId::Job(job), events.clone()).expect(0);
        let at_ms = append.at_ms;
        match self.store.append(append).await {
            Ok(store::Appended::Written { .. }) => {
                decided(&events);
                let mut state = JobState::new(job);
                for e in &events {
                    state.evolve(e, at_ms);
                }
                self.remember(&state);
                info!(%job, "job created");
                Ok(())
            }
            Ok(store::Appended::Duplicate { .. }) => Ok(()),
            Err(Error::Conflict { .. }) => {
                METRICS.conflicts.inc();
                self.reconcile(job).await.map(|_| ())
            }
            Err(e) => Err(e),
        }
    }

    /// Brings a job one decision further, if it needs one, and returns its state. Losing a race
    /// to another coordinator just means re-reading and deciding again.
    async fn reconcile(&self, job: JobId) -> Result<JobState, Error> {
        self.reconcile_from(job, None).await
    }

    /// [`Coordinator::reconcile`], deciding first from `known` (an exact fold of the job's
    /// first `version` events) instead of reading the stream; a conflict means reading it.
    async fn reconcile_from(&self, job: JobId, known: Option<JobState>) -> Result<JobState, Error> {
        let mut known = known;
        for _ in 0..16 {
            let state = match known.take() {
                Some(state) => state,
                None => self.fold(job).await?,
            };
            let mut events = next(&state, &self.opts.policy, now_ms(), jitter());
            if let Some((step, environment)) = deploy_to_queue(&state, &events) {
                let others = self.environment_jobs(&state, &environment).await?;
                let gate = deploy_gate(&state, &step, &others);
                let mut verdict = gate.verdict;
                for older in gate.supersede {
                    // An older deploy that an agent claimed after we read it can no longer be
                    // superseded: this one waits for it instead of running beside it.
                    if !self.supersede(older, job, &environment, None).await? {
                        verdict = Verdict::Wait { behind: older };
                    }
                }
                match verdict {
                    Verdict::Go => {}
                    Verdict::Superseded { by } => {
                        events = vec![JobSuperseded {
                            by_job: by,
                            environment,
                        }
                        .into()]
                    }
                    Verdict::Wait { behind } => {
                        debug!(%job, %behind, %environment, "deploy waits for the running one");
                        return Ok(state);
                    }
                }
            }
            if events.is_empty() {
                return Ok(state);
            }
            let append = Append::new(StreamId::Job(job), events.clone()).expect(state.version);
            let at_ms = append.at_ms;
            match self.store.append(append).await {
                Ok(appended) => {
                    // The append landed at exactly the version we folded: the new state is the
                    // old one plus our events, no need to read the stream again.
                    let mut state = state;
                    for e in &events {
                        state.evolve(e, at_ms);
                    }
                    if let store::Appended::Written { .. } = appended {
                        decided(&events);
                        self.remember(&state);
                    }
                    debug!(%job, events = ?events.iter().map(Event::name).collect::<Vec<_>>(), "decided");
                    return Ok(state);
                }
                Err(Error::Conflict { .. }) => {
                    METRICS.conflicts.inc();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable(format!(
            "job {job}: gave up after 16 version conflicts in a row"
        )))
    }

    async fn fold(&self, job: JobId) -> Result<JobState, Error> {
        let stream = self.store.read_stream(&StreamId::Job(job), 0).await?;
        let mut state = JobState::new(job);
        for stored in &stream {
            state.evolve(&stored.decode()?, stored.envelope.at_ms);
        }
        self.remember(&state);
        Ok(state)
    }

    /// The other jobs that matter to `job`'s deploy to `environment`: every newer one (from the
    /// permanent index) and the older ones that have not ended (from the live index).
    async fn environment_jobs(
        &self,
        job: &JobState,
        environment: &str,
    ) -> Result<Vec<JobState>, Error> {
        let project = job.plan.as_ref().map_or("", |p| p.project.as_str());
        let key = environment_index(project, environment);
        let mut ids: Vec<JobId> = self.store.indexed(&key).await?;
        ids.retain(|id| *id > job.id);
        let mut older = self.store.indexed(&format!("{LIVE}{key}")).await?;
        older.retain(|id| *id < job.id);
        ids.extend(older);
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.fold(id).await?);
        }
        Ok(out)
    }

    /// Ends an older job whose deploy to `environment` has not started, because `by` is newer.
    /// Returns `false` when that deploy is running (an agent claimed it after the gate read
    /// it): it cannot be superseded, and the newer one must wait. The append is made at the
    /// version folded (first `known`, when given, then fresh reads), so a claim landing in
    /// between makes it conflict and be looked at again.
    async fn supersede(
        &self,
        older: JobId,
        by: JobId,
        environment: &str,
        known: Option<JobState>,
    ) -> Result<bool, Error> {
        let mut known = known;
        for _ in 0..16 {
            let state = match known.take() {
                Some(state) => state,
                None => self.fold(older).await?,
            };
            let deploy = state
                .steps
                .iter()
                .find(|s| s.step == super::plan::deploy_step(environment))
                .map(|s| &s.status);
            if state.phase.is_terminal()
                || matches!(deploy, Some(crate::domain::StepStatus::Succeeded { .. }))
            {
                return Ok(true);
            }
            if matches!(deploy, Some(crate::domain::StepStatus::Claimed { .. })) {
                return Ok(false);
            }
            let event = JobSuperseded {
                by_job: by,
                environment: environment.to_string(),
            };
            match self
                .store
                .append(Append::new(StreamId::Job(older), vec![event.into()]).expect(state.version))
                .await
            {
                Ok(_) => {
                    METRICS
                        .decisions
                        .with_label_values(&["job_superseded"])
                        .inc();
                    info!(job = %older, %by, %environment, "superseded by a newer deploy");
                    return Ok(true);
                }
                Err(Error::Conflict { .. }) => {
                    METRICS.conflicts.inc();
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable(format!(
            "job {older}: gave up superseding after 16 version conflicts in a row"
        )))
    }

    /// A deploy ended or a job ended: the jobs waiting for its environments may go now.
    async fn wake_environments(&self, job: &JobState) -> Result<(), Error> {
        let Some(plan) = &job.plan else {
            return Ok(());
        };
        for step in &plan.steps {
            if let StepSpec::Deploy(d) = &step.spec {
                let key = format!("{LIVE}{}", environment_index(&plan.project, &d.environment));
                for other in self.store.indexed(&key).await? {
                    if other != job.id {
                        self.reconcile(other).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A tag was deleted: its jobs that have not ended are cancelled (their queued steps leave
    /// the queues, running ones lose their leases), and nothing is built. A job made by a later
    /// webhook (the tag pushed again after the deletion, whose entry another coordinator may
    /// handle first, or which was handled before this entry came round again after a restart)
    /// is not the deletion's to cancel.
    async fn cancel_deleted_tag(
        &self,
        pos: &LogPos,
        webhook: &ferry_proto::WebhookReceived,
    ) -> Result<(), Error> {
        let project = self.opts.projects.iter().find(|p| {
            p.id.is_some_and(|id| Some(id) == webhook.project_id)
                || Some(&p.path) == webhook.project_path.as_ref()
        });
        let (Some(project), Some(git_ref)) = (project, &webhook.git_ref) else {
            return Ok(());
        };
        let tag = super::plan::short_ref(git_ref);
        let key = format!("{LIVE}{}", store::tag_index(&project.path, tag));
        for job in self.store.indexed(&key).await? {
            for _ in 0..16 {
                let state = self.fold(job).await?;
                if state.phase.is_terminal() || made_after(&state, pos) {
                    break;
                }
                let cancelled = JobCancelled {
                    reason: format!("tag {tag} was deleted"),
                    by: format!("webhook:{pos}"),
                };
                match self
                    .store
                    .append(
                        Append::new(StreamId::Job(job), vec![cancelled.into()])
                            .expect(state.version),
                    )
                    .await
                {
                    Ok(_) => {
                        METRICS
                            .decisions
                            .with_label_values(&["job_cancelled"])
                            .inc();
                        info!(%job, %tag, "cancelled: its tag was deleted");
                        break;
                    }
                    Err(Error::Conflict { .. }) => {
                        METRICS.conflicts.inc();
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

/// Whether `job` was made by a webhook whose feed entry comes after `pos`.
fn made_after(job: &JobState, pos: &LogPos) -> bool {
    job.plan
        .as_ref()
        .and_then(|p| p.trigger.strip_prefix("webhook:"))
        .is_some_and(|made| LogPos(made.to_string()) > *pos)
}

/// If `events` queue a deploy step, that step and its environment.
fn deploy_to_queue(job: &JobState, events: &[Event]) -> Option<(ferry_proto::StepId, String)> {
    let [Event::StepQueued(q)] = events else {
        return None;
    };
    let plan = job.plan.as_ref()?;
    plan.steps
        .iter()
        .find(|s| s.step == q.step)
        .and_then(|s| match &s.spec {
            StepSpec::Deploy(d) => Some((q.step.clone(), d.environment.clone())),
            _ => None,
        })
}

/// Whether `event` may have freed one of the job's environments for a waiting deploy.
fn frees_environment(job: &JobState, event: &Event) -> bool {
    let is_deploy = |step: &ferry_proto::StepId| {
        job.plan.as_ref().is_some_and(|p| {
            p.steps
                .iter()
                .any(|s| &s.step == step && matches!(s.spec, StepSpec::Deploy(_)))
        })
    };
    match event {
        Event::StepSucceeded(e) => is_deploy(&e.step),
        Event::StepFailed(e) => is_deploy(&e.step),
        Event::LeaseExpired(e) => is_deploy(&e.step),
        Event::StepReleased(e) => is_deploy(&e.step),
        _ => job.phase.is_terminal(),
    }
}

/// Job events after which the coordinator may have something to decide.
fn wakes_coordinator(event: &Event) -> bool {
    matches!(
        event,
        Event::JobCreated(_)
            | Event::StepSucceeded(_)
            | Event::StepFailed(_)
            | Event::LeaseExpired(_)
            | Event::StepReleased(_)
    ) || crate::domain::job::ends_job(event)
}

/// One coordinator at a time expires leases, promotes due retries, records agents whose
/// heartbeat lapsed as lost, expires the logs of jobs that ended longer than `keep_logs` ago
/// (after listing, a page per tick, the jobs that builds before log retention ended),
/// and reports the queues (ready steps of `pools`, the projects' pools, and how long the head
/// of each has waited; the delayed retries), the store's size and the free space of a
/// `file://` artifact store's filesystem. The scripts are atomic and idempotent, so a
/// second sweeper during a lock handover costs work, never correctness.
async fn sweep_duty(store: Arc<dyn Store>, opts: Arc<Options>, pools: Vec<String>) {
    let (holder, every, keep_logs) = (opts.consumer.clone(), opts.sweep_interval, opts.keep_logs);
    let artifacts_dir = &opts.artifacts_dir;
    let mut artifacts_due = tokio::time::Instant::now();
    let mut artifacts_after: Option<String> = None;
    let ttl = every * 3;
    let mut token: Option<FencingToken> = None;
    let mut trim_due = tokio::time::Instant::now();
    let mut held_warned: Option<tokio::time::Instant> = None;
    // Where the walk that lists jobs ended by earlier builds for log retention continues;
    // `None` once it is complete.
    let mut listing: Option<Option<JobId>> = Some(None);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        token = match token {
            Some(t) => match store.lock_renew(SWEEP_LOCK, &holder, t, ttl).await {
                Ok(true) => Some(t),
                Ok(false) => {
                    warn!(%holder, "lost the sweep lock");
                    None
                }
                Err(e) => {
                    warn!(error = %e, "could not renew the sweep lock");
                    None
                }
            },
            None => match store.lock_acquire(SWEEP_LOCK, &holder, ttl).await {
                Ok(Some(t)) => {
                    info!(%holder, token = %t, "holding the sweep lock");
                    Some(t)
                }
                Ok(None) => None,
                Err(e) => {
                    warn!(error = %e, "could not acquire the sweep lock");
                    None
                }
            },
        };
        METRICS.sweep_leader.set(i64::from(token.is_some()));
        if token.is_none() {
            // Only the leader reports queue depths, so that they are not counted twice.
            METRICS.steps_ready.reset();
            METRICS.ready_wait.reset();
            METRICS.log_trim_held.reset();
            METRICS.steps_delayed.set(0);
            METRICS.store_used.set(0);
            METRICS.store_limit.set(0);
            METRICS.artifacts_disk_free.set(0);
            METRICS.artifacts_disk_size.set(0);
            continue;
        }
        if let Some(dir) = &artifacts_dir {
            match crate::workdir::disk_space(dir) {
                Ok((free, size)) => {
                    METRICS.artifacts_disk_free.set(clamp_i64(free));
                    METRICS.artifacts_disk_size.set(clamp_i64(size));
                }
                Err(e) => {
                    debug!(error = %e, path = %dir.display(), "reading the artifact directory's free space failed")
                }
            }
        }
        match store.usage().await {
            Ok(usage) => {
                METRICS.store_used.set(clamp_i64(usage.used_bytes));
                METRICS
                    .store_limit
                    .set(clamp_i64(usage.limit_bytes.unwrap_or(0)));
            }
            Err(e) => warn!(error = %e, "reading the store's size failed"),
        }
        match store.queue_depths(&pools).await {
            Ok(depths) => {
                let now = now_ms();
                for (pool, (n, head)) in pools.iter().zip(depths.ready) {
                    let pool = pool.as_str();
                    METRICS.steps_ready.with_label_values(&[pool]).set(n as i64);
                    let waited = head.map_or(0, |at| now.saturating_sub(at));
                    METRICS
                        .ready_wait
                        .with_label_values(&[pool])
                        .set(waited as f64 / 1000.0);
                }
                METRICS.steps_delayed.set(depths.delayed as i64);
            }
            Err(e) => warn!(error = %e, "counting queued steps failed"),
        }
        match store.expire_due(256).await {
            Ok(expired) => {
                METRICS.leases_expired.inc_by(expired.len() as u64);
                for l in &expired {
                    warn!(job = %l.job, step = %l.step, agent = %l.agent, token = %l.token, "lease expired");
                }
            }
            Err(e) => {
                METRICS.sweep_failures.inc();
                warn!(error = %e, "lease sweep failed")
            }
        }
        match store.promote_due(256).await {
            Ok(n) => METRICS.retries_promoted.inc_by(n as u64),
            Err(e) => {
                METRICS.sweep_failures.inc();
                warn!(error = %e, "promoting due retries failed");
            }
        }
        match store.expire_agents(256).await {
            Ok(lost) => {
                METRICS.agents_lost.inc_by(lost.len() as u64);
                for agent in &lost {
                    warn!(%agent, "agent lost: heartbeat expired");
                }
            }
            Err(e) => {
                METRICS.sweep_failures.inc();
                warn!(error = %e, "agent sweep failed")
            }
        }
        if let (Some(_), Some(after)) = (keep_logs, listing) {
            match store.list_ended_unlisted(after, 256).await {
                Ok(l) => {
                    if l.listed > 0 {
                        info!(
                            jobs = l.listed,
                            "listed jobs that an earlier build ended, for log retention"
                        );
                    }
                    listing = l.next.map(Some);
                }
                Err(e) => {
                    METRICS.sweep_failures.inc();
                    warn!(error = %e, "listing jobs ended by an earlier build failed");
                }
            }
        }
        if let Some((artifacts, keep)) = &opts.artifact_retention {
            if tokio::time::Instant::now() >= artifacts_due {
                artifacts_due = tokio::time::Instant::now() + opts.artifacts_every;
                let pass = super::artifacts::expire_artifacts(
                    &*store,
                    artifacts,
                    *keep,
                    &holder,
                    now_ms(),
                    artifacts_after.as_deref(),
                    256,
                )
                .await;
                match pass {
                    Ok(e) => {
                        METRICS.artifacts_expired.inc_by(e.deleted.len() as u64);
                        artifacts_after = e.next;
                    }
                    Err(e) => {
                        METRICS.sweep_failures.inc();
                        warn!(error = %e, "expiring old artifacts failed");
                    }
                }
            }
        }
        if let Some(keep) = opts
            .keep_feed
            .filter(|_| trim_due.elapsed() > Duration::ZERO)
        {
            trim_due = tokio::time::Instant::now() + opts.trim_every;
            let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
            match trim_log(&*store, now_ms().saturating_sub(keep_ms)).await {
                Ok((trimmed, more)) => {
                    if trimmed.deleted > 0 {
                        debug!(entries = trimmed.deleted, "trimmed the global log");
                    }
                    if more {
                        // a backlog (a busy fleet writes faster than one call deletes): on
                        // at the next tick
                        trim_due = tokio::time::Instant::now();
                    }
                    METRICS.log_trim_held.reset();
                    if let Some(group) = trimmed.held_by {
                        METRICS.log_trim_held.with_label_values(&[&group]).set(1);
                        if held_warned.is_none_or(|at| at.elapsed() > HELD_WARNING_EVERY) {
                            held_warned = Some(tokio::time::Instant::now());
                            warn!(
                                %group,
                                "consumer group {group} has not handled entries of the global log older than coordinator.keep_feed, so they are kept; a group nothing reads any more keeps them for good (remove it with XGROUP DESTROY)"
                            );
                        }
                    }
                }
                Err(e) => {
                    METRICS.sweep_failures.inc();
                    warn!(error = %e, "trimming the global log failed");
                }
            }
        }
        if let Some(keep) = keep_logs {
            match expire_logs(&*store, keep, 256).await {
                Ok(n) => METRICS.logs_expired.inc_by(n as u64),
                Err(e) => {
                    METRICS.sweep_failures.inc();
                    warn!(error = %e, "expiring old job logs failed");
                }
            }
        }
    }
}

/// Calls of the trim per sweep tick, at most (each deletes up to 100 nodes of the log).
const TRIM_CALLS: usize = 16;

/// Trims the global log of entries older than `before_ms` that every group handled, a bounded
/// number of calls per tick (`TRIM_CALLS`): what they deleted together, the group the last
/// one named, and whether that call still deleted something (more may be due).
async fn trim_log(store: &dyn Store, before_ms: u64) -> Result<(Trimmed, bool), Error> {
    let mut pass = Trimmed::default();
    let mut more = false;
    for _ in 0..TRIM_CALLS {
        let trimmed = store.trim_log(before_ms).await?;
        METRICS.log_trimmed.inc_by(trimmed.deleted);
        pass.deleted += trimmed.deleted;
        pass.held_by = trimmed.held_by;
        more = trimmed.deleted > 0;
        if !more {
            break;
        }
    }
    Ok((pass, more))
}

fn clamp_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Counts decisions the coordinator appended, by event.
fn decided(events: &[Event]) {
    for e in events {
        let name = e.name();
        let label = if crate::metrics::DECISIONS.contains(&name) {
            name
        } else {
            "other"
        };
        METRICS.decisions.with_label_values(&[label]).inc();
    }
}

/// Records `LogsExpired` for up to `max` jobs that ended more than `keep` ago and still have
/// their logs; each append deletes that job's log with it. Returns how many were expired.
pub async fn expire_logs(store: &dyn Store, keep: Duration, max: usize) -> Result<usize, Error> {
    let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
    let before = now_ms().saturating_sub(keep_ms);
    let due = store.logs_to_expire(before, max).await?;
    for (job, ended_ms) in &due {
        let expired = ferry_proto::LogsExpired {
            kept_for_ms: keep_ms,
        };
        // Two sweepers during a lock handover record it once.
        let once = vec![format!("logs-expired:{job}")];
        store
            .append(
                Append::new(StreamId::Job(*job), vec![expired.into()])
                    .dedupe(once, Duration::from_secs(3600)),
            )
            .await?;
        debug!(%job, ended_ms, "job logs expired");
    }
    if !due.is_empty() {
        info!(
            jobs = due.len(),
            "expired the logs of jobs that ended over {} ago",
            humantime::format_duration(keep)
        );
    }
    Ok(due.len())
}

fn jitter() -> f64 {
    rand::random::<f64>()
}

async fn with_retry<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = store::Result<()>>,
{
    loop {
        match f().await {
            Ok(()) => return,
            Err(e) => crate::feed::backoff(what, &e).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::noop_job;
    use crate::store::sqlite::SqliteStore;
    use ferry_proto::{StepStarted, StepSucceeded};

    /// A coordinator with default options and nothing remembered.
    fn fresh_coordinator(store: &Arc<dyn Store>) -> Coordinator {
        Coordinator {
            store: store.clone(),
            opts: Arc::new(Options::default()),
            known: Mutex::default(),
        }
    }

    fn two_step_job(job: JobId) -> Event {
        noop_job(job, "v1", "linux", &["a", "b"]).into()
    }

    /// The job's entries from version `from` on, as the feed would hand them over.
    async fn entries(store: &Arc<dyn Store>, job: JobId, from: u64) -> JobEntries {
        let mut out = JobEntries::default();
        for stored in store.read_stream(&StreamId::Job(job), from).await.unwrap() {
            let event = stored.decode().unwrap();
            if wakes_coordinator(&event) {
                out.waking.push(stored.pos.clone());
            }
            out.events.push((stored, event));
        }
        out
    }

    /// The version of the state `coordinator` remembers for `job`.
    fn remembered(coordinator: &Coordinator, job: JobId) -> u64 {
        coordinator.known.lock().unwrap().get(&job).unwrap().version
    }

    fn queued(events: &[Stored], step: &str) -> usize {
        events
            .iter()
            .filter(
                |s| matches!(s.decode().unwrap(), Event::StepQueued(q) if q.step.as_str() == step),
            )
            .count()
    }

    /// A coordinator decides from the state it remembers, extended by gap-free feed entries.
    /// When that state is stale (another coordinator decided meanwhile, and its entry has not
    /// reached this one), the decision conflicts and is made again from the stream: nothing is
    /// decided twice.
    #[tokio::test]
    async fn a_stale_remembered_state_costs_a_reread_not_a_second_decision() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("ferry.db")).unwrap());
        let coordinator = fresh_coordinator(&store);
        let job = JobId::new();
        let stream = StreamId::Job(job);
        store
            .append(Append::new(stream.clone(), vec![two_step_job(job)]).expect(0))
            .await
            .unwrap();

        // JobCreated reaches this coordinator: it queues step a from the entry alone.
        coordinator
            .handle_job(job, &entries(&store, job, 0).await)
            .await
            .unwrap();
        let history = store.read_stream(&stream, 0).await.unwrap();
        assert_eq!((history.len(), queued(&history, "a")), (2, 1));

        // Step a runs and succeeds; another coordinator sees that first and queues step b.
        let claim = store
            .claim(
                &["linux".to_string()],
                &"agent".into(),
                Duration::from_secs(60),
            )
            .await
            .unwrap()
            .expect("step a is queued");
        let ran: Vec<Event> = vec![
            StepStarted {
                step: claim.step.clone(),
                attempt: 1,
                agent: "agent".into(),
            }
            .into(),
            StepSucceeded {
                step: claim.step.clone(),
                attempt: 1,
            }
            .into(),
        ];
        store
            .append(Append::new(stream.clone(), ran).fenced(claim.step.clone(), claim.token))
            .await
            .unwrap();
        let other = fresh_coordinator(&store);
        other.reconcile(job).await.unwrap();
        assert_eq!(
            queued(&store.read_stream(&stream, 0).await.unwrap(), "b"),
            1
        );

        // This coordinator now gets the entries up to StepSucceeded only: they continue its
        // remembered state without a gap, so it decides without reading, to queue b again. The
        // append conflicts, it reads the stream, and there is nothing left to decide.
        let mut late = entries(&store, job, 2).await;
        late.events.truncate(3);
        late.waking
            .retain(|p| late.events.iter().any(|(s, _)| &s.pos == p));
        coordinator.handle_job(job, &late).await.unwrap();
        let history = store.read_stream(&stream, 0).await.unwrap();
        assert_eq!(queued(&history, "b"), 1, "step b is queued once");
        assert_eq!(history.len(), 6);
        assert_eq!(
            remembered(&coordinator, job),
            6,
            "the re-read state is remembered"
        );

        // Waking entries after a gap (this coordinator remembers nothing of the job, and the
        // feed brings entries 5 and 6) mean a read; still nothing to decide.
        coordinator.known.lock().unwrap().forget(&job);
        coordinator
            .handle_job(job, &entries(&store, job, 4).await)
            .await
            .unwrap();
        assert_eq!(store.read_stream(&stream, 0).await.unwrap().len(), 6);
        assert_eq!(remembered(&coordinator, job), 6);
    }

    /// The memory goes to running jobs: a job this coordinator ends stays remembered until its
    /// end comes back through the feed (that entry wakes the coordinator, and deciding from
    /// memory needs no read), and is forgotten once that entry is handled.
    #[tokio::test]
    async fn an_ended_job_is_forgotten_once_its_end_comes_through_the_feed() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("ferry.db")).unwrap());
        let coordinator = fresh_coordinator(&store);
        let job = JobId::new();
        let stream = StreamId::Job(job);
        let created: Event = noop_job(job, "v1", "linux", &["a"]).into();
        store
            .append(Append::new(stream.clone(), vec![created]).expect(0))
            .await
            .unwrap();
        coordinator
            .handle_job(job, &entries(&store, job, 0).await)
            .await
            .unwrap();
        let claim = store
            .claim(
                &["linux".to_string()],
                &"agent".into(),
                Duration::from_secs(60),
            )
            .await
            .unwrap()
            .expect("step a is queued");
        let ran: Vec<Event> = vec![StepSucceeded {
            step: claim.step.clone(),
            attempt: 1,
        }
        .into()];
        store
            .append(Append::new(stream.clone(), ran).fenced(claim.step.clone(), claim.token))
            .await
            .unwrap();

        // StepClaimed and StepSucceeded arrive: the coordinator ends the job and remembers that.
        coordinator
            .handle_job(job, &entries(&store, job, 2).await)
            .await
            .unwrap();
        let history = store.read_stream(&stream, 0).await.unwrap();
        assert!(matches!(
            history.last().unwrap().decode().unwrap(),
            Event::JobSucceeded(_)
        ));
        assert_eq!(remembered(&coordinator, job), 5);

        // Its own JobSucceeded comes through the feed: handled from memory, then forgotten.
        coordinator
            .handle_job(job, &entries(&store, job, 4).await)
            .await
            .unwrap();
        assert!(coordinator.known.lock().unwrap().get(&job).is_none());
        assert_eq!(store.read_stream(&stream, 0).await.unwrap().len(), 5);
    }

    /// A newer tag's deploy supersedes an older one that is still queued, but an agent may claim
    /// the older deploy between the coordinator's read and its JobSuperseded. That append was
    /// made at the version read, so it conflicts; the re-read shows the deploy running, and the
    /// older job is left to finish (the newer one waits for it) instead of being ended under a
    /// running deploy.
    #[tokio::test]
    async fn a_deploy_claimed_after_the_read_is_not_superseded() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("ferry.db")).unwrap());
        let coordinator = fresh_coordinator(&store);
        let deploy = crate::coordinator::plan::deploy_step("prod");
        let deploy_job = |job: JobId, tag: &str| -> Event {
            noop_job(job, tag, "linux", &["deploy:prod"]).into()
        };
        let (older, newer) = (JobId::new(), JobId::new());
        for (job, tag) in [(older, "v1"), (newer, "v2")] {
            store
                .append(Append::new(StreamId::Job(job), vec![deploy_job(job, tag)]).expect(0))
                .await
                .unwrap();
        }
        // The older job's deploy is queued; the coordinator reads it so.
        coordinator.reconcile(older).await.unwrap();
        let read = coordinator.fold(older).await.unwrap();
        assert!(matches!(
            read.steps[0].status,
            crate::domain::StepStatus::Queued { .. }
        ));

        // An agent claims it before the coordinator's JobSuperseded lands.
        let claim = store
            .claim(
                &["linux".to_string()],
                &"agent".into(),
                Duration::from_secs(60),
            )
            .await
            .unwrap()
            .expect("the older deploy is queued");
        assert_eq!((claim.job, &claim.step), (older, &deploy));

        let superseded = coordinator
            .supersede(older, newer, "prod", Some(read))
            .await
            .unwrap();
        assert!(!superseded, "a running deploy cannot be superseded");
        let history: Vec<Event> = store
            .read_stream(&StreamId::Job(older), 0)
            .await
            .unwrap()
            .iter()
            .map(|s| s.decode().unwrap())
            .collect();
        assert!(
            !history.iter().any(|e| matches!(e, Event::JobSuperseded(_))),
            "{history:?}"
        );
        // The older deploy finishes under its lease.
        store
            .append(
                Append::new(
                    StreamId::Job(older),
                    vec![StepSucceeded {
                        step: deploy.clone(),
                        attempt: 1,
                    }
                    .into()],
                )
                .fenced(deploy.clone(), claim.token),
            )
            .await
            .unwrap();
    }
}
