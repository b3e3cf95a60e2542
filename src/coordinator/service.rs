//! The coordinator's loop: feed → decisions → appends, plus the singleton sweep duty.

use super::decide::{next, RetryPolicy};
use super::plan::{plan_job, ProjectPlan};
use crate::domain::JobState;
use crate::store::{self, now_ms, Append, Error, LogPos, Store, Stored, StreamId};
use ferry_proto::{Event, FencingToken, JobId};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info, warn};

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
        }
    }
}

/// Runs a coordinator until `shutdown` resolves.
pub async fn run(
    store: Arc<dyn Store>,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let coordinator = Coordinator {
        store: store.clone(),
        opts: Arc::new(opts),
    };
    with_retry("create the consumer group", || {
        coordinator.store.ensure_group(GROUP)
    })
    .await;
    info!(consumer = %coordinator.opts.consumer, "coordinator started");

    let duty = tokio::spawn(sweep_duty(
        store.clone(),
        coordinator.opts.consumer.clone(),
        coordinator.opts.sweep_interval,
    ));
    tokio::pin!(shutdown);
    let result = tokio::select! {
        _ = &mut shutdown => Ok(()),
        r = coordinator.consume() => r,
    };
    duty.abort();
    info!(consumer = %coordinator.opts.consumer, "coordinator stopped");
    result
}

struct Coordinator {
    store: Arc<dyn Store>,
    opts: Arc<Options>,
}

impl Coordinator {
    async fn consume(&self) -> Result<(), Error> {
        let me = self.opts.consumer.as_str();
        // A restarted coordinator first finishes what it had been given.
        loop {
            match self.store.read_pending(GROUP, me, self.opts.batch).await {
                Ok(batch) if batch.is_empty() => break,
                Ok(batch) => self.handle_batch(batch).await,
                Err(e) => backoff("read pending feed entries", &e).await,
            }
        }
        let mut last_takeover = tokio::time::Instant::now();
        loop {
            if last_takeover.elapsed() >= self.opts.takeover_after / 2 {
                last_takeover = tokio::time::Instant::now();
                match self
                    .store
                    .claim_idle(GROUP, me, self.opts.takeover_after, self.opts.batch)
                    .await
                {
                    Ok(batch) if !batch.is_empty() => {
                        info!(
                            entries = batch.len(),
                            "took over feed entries of an idle coordinator"
                        );
                        self.handle_batch(batch).await
                    }
                    Ok(_) => {}
                    Err(e) => backoff("take over idle feed entries", &e).await,
                }
            }
            match self
                .store
                .read_new(GROUP, me, self.opts.batch, Duration::from_millis(500))
                .await
            {
                Ok(batch) => self.handle_batch(batch).await,
                Err(e) => backoff("read the feed", &e).await,
            }
        }
    }

    /// Handles each entry and acknowledges the ones handled. An entry whose handling failed
    /// stays pending and comes back (to us after a restart, or to another coordinator).
    async fn handle_batch(&self, batch: Vec<Stored>) {
        let mut done: Vec<LogPos> = Vec::with_capacity(batch.len());
        for stored in batch {
            match self.handle(&stored).await {
                Ok(()) => done.push(stored.pos),
                Err(e) => {
                    warn!(pos = %stored.pos, error = %e, "feed entry not handled; it will be retried")
                }
            }
        }
        if !done.is_empty() {
            if let Err(e) = self.store.ack(GROUP, &done).await {
                warn!(error = %e, "could not acknowledge feed entries; they will be handled again");
            }
        }
    }

    async fn handle(&self, stored: &Stored) -> Result<(), Error> {
        let event = match stored.decode() {
            Ok(e) => e,
            Err(e) => {
                // A newer node wrote a kind this build does not know: not ours to act on.
                warn!(pos = %stored.pos, error = %e, "skipping an event this version cannot read");
                return Ok(());
            }
        };
        match StreamId::parse(&stored.envelope.stream) {
            Some(StreamId::Job(job)) if wakes_coordinator(&event) => self.reconcile(job).await,
            Some(StreamId::Webhooks) => match &event {
                Event::WebhookReceived(w) if w.action == "build" => {
                    self.create(&stored.pos, w).await
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        }
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
            Some(p.id) == webhook.project_id || Some(&p.path) == webhook.project_path.as_ref()
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
        let mut state = JobState::new(job);
        state.evolve(&created, now_ms());
        let mut events = vec![created];
        events.extend(next(&state, &self.opts.policy, now_ms(), jitter()));
        match self
            .store
            .append(Append::new(StreamId::Job(job), events).expect(0))
            .await
        {
            Ok(_) => {
                info!(%job, "job created");
                Ok(())
            }
            Err(Error::Conflict { .. }) => self.reconcile(job).await,
            Err(e) => Err(e),
        }
    }

    /// Brings a job one decision further, if it needs one. Losing a race to another
    /// coordinator just means re-reading and deciding again.
    async fn reconcile(&self, job: JobId) -> Result<(), Error> {
        for _ in 0..16 {
            let stream = self.store.read_stream(&StreamId::Job(job), 0).await?;
            let mut state = JobState::new(job);
            for stored in &stream {
                state.evolve(&stored.decode()?, stored.envelope.at_ms);
            }
            let events = next(&state, &self.opts.policy, now_ms(), jitter());
            if events.is_empty() {
                return Ok(());
            }
            let names: Vec<&str> = events.iter().map(|e| e.name()).collect();
            match self
                .store
                .append(Append::new(StreamId::Job(job), events).expect(state.version))
                .await
            {
                Ok(_) => {
                    debug!(%job, events = ?names, "decided");
                    return Ok(());
                }
                Err(Error::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(Error::Unavailable(format!(
            "job {job}: gave up after 16 version conflicts in a row"
        )))
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
    )
}

/// One coordinator at a time expires leases, promotes due retries and records agents whose
/// heartbeat lapsed as lost. The scripts are atomic
/// and idempotent, so a second sweeper during a lock handover costs work, never correctness.
async fn sweep_duty(store: Arc<dyn Store>, holder: String, every: Duration) {
    let ttl = every * 3;
    let mut token: Option<FencingToken> = None;
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
        if token.is_none() {
            continue;
        }
        match store.expire_due(256).await {
            Ok(expired) => {
                for l in &expired {
                    warn!(job = %l.job, step = %l.step, agent = %l.agent, token = %l.token, "lease expired");
                }
            }
            Err(e) => warn!(error = %e, "lease sweep failed"),
        }
        if let Err(e) = store.promote_due(256).await {
            warn!(error = %e, "promoting due retries failed");
        }
        match store.expire_agents(256).await {
            Ok(lost) => {
                for agent in &lost {
                    warn!(%agent, "agent lost: heartbeat expired");
                }
            }
            Err(e) => warn!(error = %e, "agent sweep failed"),
        }
    }
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
            Err(e) => backoff(what, &e).await,
        }
    }
}

async fn backoff(what: &str, e: &Error) {
    warn!(error = %e, "could not {what}; retrying");
    tokio::time::sleep(Duration::from_millis(500)).await;
}
