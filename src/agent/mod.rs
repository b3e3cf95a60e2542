//! The agent role: claims steps under fenced leases, keeps the leases renewed, runs the steps
//! and appends what happened — every append carrying the lease's token.
//!
//! If a lease cannot be renewed (another holder got the step, the job was cancelled, or the
//! store was unreachable for longer than the TTL), the step's execution is dropped at once —
//! before the store could hand the step to someone else — and nothing more is appended for it.

pub mod runner;

use crate::domain::JobState;
use crate::store::{Append, Claim, Error, Store, StreamId};
use ferry_proto::{AgentId, AgentJoined, AgentLeft, StepSpec, StepStarted};
use runner::StepRun;
pub use runner::{ArtifactFetch, Runner};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Semaphore};
use tracing::{debug, error, info, warn};

use crate::metrics::AGENT as METRICS;

#[derive(Clone, Debug)]
pub struct Options {
    pub name: AgentId,
    pub pools: Vec<String>,
    pub labels: Vec<String>,
    /// Steps run at once.
    pub concurrency: usize,
    pub lease_ttl: Duration,
    /// On shutdown, how long running steps may take to finish before they are stopped and
    /// handed back (their leases released, so another agent picks them up at once).
    pub shutdown_grace: Duration,
    /// What steps need from this machine.
    pub runner: Arc<Runner>,
}

impl Options {
    /// An agent called `name` serving `pools`, with two slots, a 5 s lease, a 5 s shutdown
    /// grace and a [`Runner::local`] runner in `<temporary directory>/ferry-agent`: what tests and
    /// benchmarks of the machinery want. Roles build theirs from the configuration.
    pub fn new(name: &str, pools: &[&str]) -> Options {
        Options {
            name: AgentId::new(name),
            pools: pools.iter().map(|p| p.to_string()).collect(),
            labels: Vec::new(),
            concurrency: 2,
            lease_ttl: Duration::from_secs(5),
            shutdown_grace: Duration::from_secs(5),
            runner: Arc::new(Runner::local(std::env::temp_dir().join("ferry-agent"))),
        }
    }
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// Removes the work directories that agents killed half-way through a step left behind (each a
/// checkout or an artifact, often gigabytes); those another live agent process sharing the data
/// directory works in stay (see [`crate::workdir`]).
async fn remove_stale_work(runner: &Runner) {
    // (created now, so that its filesystem's free space can be reported from the start)
    if let Err(e) = tokio::fs::create_dir_all(&runner.data_dir).await {
        warn!(path = %runner.data_dir.display(), error = %e, "cannot create the data directory");
    }
    let mut roots = vec![runner.data_dir.join("work")];
    if let Some(build) = &runner.build {
        roots.push(build.data_dir.join("work"));
    }
    roots.dedup();
    for root in roots {
        let shown = root.display().to_string();
        let result = tokio::task::spawn_blocking(move || crate::workdir::remove_stale(&root))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match result {
            Ok(removed) if !removed.is_empty() => warn!(
                root = %shown,
                removed = ?removed,
                "removed work directories left by an agent that was killed"
            ),
            Ok(_) => {}
            Err(e) => warn!(root = %shown, error = %e, "removing stale work directories failed"),
        }
    }
}

/// Steps claimed in one call, at most.
const MAX_CLAIM: usize = 32;

/// Runs an agent until `shutdown` resolves or a stop is requested of it (`AgentStopRequested`,
/// brought back by a heartbeat); then takes no new work, waits for running steps (handing them
/// back after `shutdown_grace`) and records `AgentLeft`. While it is paused (`AgentPaused`,
/// until `AgentResumed`, also brought back by heartbeats) it claims nothing.
pub async fn run(
    store: Arc<dyn Store>,
    opts: Options,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let opts = Arc::new(opts);
    // Every series at zero before anything else, for a scrape that comes first.
    METRICS.slots.set(opts.concurrency.max(1) as i64);
    for pool in &opts.pools {
        METRICS.claims.with_label_values(&[pool.as_str()]);
    }
    remove_stale_work(&opts.runner).await;
    store
        .append(Append::new(
            StreamId::Agents,
            vec![AgentJoined {
                agent: opts.name.clone(),
                pools: opts.pools.clone(),
                labels: opts.labels.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                capacity: opts.concurrency as u32,
            }
            .into()],
        ))
        .await?;
    info!(agent = %opts.name, pools = ?opts.pools, "agent started");
    // Heard before the first claim: an agent paused through the API stays paused when it
    // restarts, and claims nothing.
    let paused = match store.heartbeat(&opts.name, opts.lease_ttl).await {
        Ok(heard) => heard.pause,
        Err(e) => {
            warn!(agent = %opts.name, error = %e, "heartbeat failed");
            None
        }
    };
    if let Some(why) = &paused {
        info!(agent = %opts.name, reason = %why, "paused; claiming no new work until resumed");
    }
    METRICS.paused.set(i64::from(paused.is_some()));
    report_disk(&opts.runner.data_dir);
    let (stop_tx, mut stop_rx) = watch::channel(None);
    let (pause_tx, mut pause_rx) = watch::channel(paused);
    let heartbeat = tokio::spawn(keep_alive(
        store.clone(),
        opts.name.clone(),
        opts.lease_ttl,
        opts.runner.data_dir.clone(),
        stop_tx,
        pause_tx,
    ));
    let slots = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let (hand_back, hand_back_rx) = watch::channel(false);
    // The agent stops when told to by its process (SIGTERM) or through the API (a stop request
    // its heartbeat brings back, with the reason).
    let stopping = async {
        tokio::select! {
            _ = shutdown => None,
            r = stop_rx.wait_for(Option::is_some) => r.ok().and_then(|r| r.clone()),
        }
    };
    tokio::pin!(stopping);
    let requested: Option<String>;
    loop {
        // Paused through the API: nothing new is claimed until it is resumed (or stopped);
        // running steps go on.
        if pause_rx.borrow().is_some() {
            tokio::select! {
                r = &mut stopping => { requested = r; break }
                _ = pause_rx.wait_for(Option::is_none) => {}
            }
        }
        let first = tokio::select! {
            r = &mut stopping => { requested = r; break }
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        // One claim call for every free slot: under load, steps are taken in batches.
        let mut permits = vec![first];
        while permits.len() < MAX_CLAIM {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        // A lease granted by this call runs out no earlier than TTL after it was sent.
        let asked = tokio::time::Instant::now();
        // A stop heard while a claim call runs lets the call finish: it may have been granted
        // leases already, and dropping it would leave their steps to wait for the leases to
        // run out (and count an attempt). What it claimed runs like any running step.
        let claim = store.claim_many(&opts.pools, &opts.name, opts.lease_ttl, permits.len());
        tokio::pin!(claim);
        let mut stop_heard = None;
        let claims = tokio::select! {
            c = &mut claim => c,
            r = &mut stopping => {
                info!(agent = %opts.name, "stop heard during a claim; finishing the claim first");
                stop_heard = Some(r);
                claim.await
            }
        };
        match claims {
            Ok(claims) if !claims.is_empty() => {
                for c in &claims {
                    METRICS.claims.with_label_values(&[c.pool.as_str()]).inc();
                }
                for (claim, permit) in claims.into_iter().zip(permits.drain(..)) {
                    let store = store.clone();
                    let opts = opts.clone();
                    let hand_back = hand_back_rx.clone();
                    tokio::spawn(async move {
                        run_step(store, opts, claim, asked, hand_back).await;
                        drop(permit);
                    });
                }
            }
            // (`stopping` has finished when the stop was heard: it cannot be awaited again)
            Ok(_) if stop_heard.is_some() => {}
            Ok(_) => {
                drop(permits);
                tokio::select! {
                    r = &mut stopping => { requested = r; break }
                    r = store.wait_for_work(&opts.pools, Duration::from_secs(1)) => {
                        if let Err(e) = r {
                            warn!(error = %e, "waiting for work failed");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
            Err(e) => {
                drop(permits);
                warn!(error = %e, "claiming work failed");
                if stop_heard.is_none() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        if let Some(r) = stop_heard {
            requested = r;
            break;
        }
    }
    info!(agent = %opts.name, grace = ?opts.shutdown_grace, "agent stopping; taking no new work");
    let all = opts.concurrency.max(1) as u32;
    let mut steps = "running steps finished";
    if tokio::time::timeout(opts.shutdown_grace, slots.acquire_many(all))
        .await
        .is_err()
    {
        info!(agent = %opts.name, "grace period over; handing running steps back");
        let _ = hand_back.send(true);
        let _ = slots.acquire_many(all).await;
        steps = "running steps handed back after the grace period";
    }
    let reason = match &requested {
        Some(why) => format!("stopped on request ({why}): {steps}"),
        None => format!("shut down: {steps}"),
    };
    heartbeat.abort();
    // Said, so that the coordinators do not report this stop as a lost agent later and the
    // agent stops counting as live at once (its pools' waiting steps say so).
    let left = AgentLeft {
        agent: opts.name.clone(),
        reason,
    };
    match store
        .append(Append::new(StreamId::Agents, vec![left.into()]))
        .await
    {
        Ok(_) => info!(agent = %opts.name, "agent left"),
        Err(e) => {
            warn!(agent = %opts.name, error = %e, "could not record that the agent left; it will be reported lost when its heartbeat lapses")
        }
    }
    Ok(())
}

/// Keeps the agent registered as live: a heartbeat at once, then every TTL/3, until aborted
/// when the agent has stopped; a stop requested through the API comes back with a heartbeat
/// and is passed to `stop`. An agent that stops heartbeating is recorded as lost by the
/// coordinators' sweep (`AgentLost`).
/// Sets the gauges of the free space of the filesystem holding `data_dir`.
fn report_disk(data_dir: &std::path::Path) {
    match crate::workdir::disk_space(data_dir) {
        Ok((free, size)) => {
            METRICS
                .disk_free
                .set(i64::try_from(free).unwrap_or(i64::MAX));
            METRICS
                .disk_size
                .set(i64::try_from(size).unwrap_or(i64::MAX));
        }
        Err(e) => {
            debug!(error = %e, path = %data_dir.display(), "reading the data directory's free space failed")
        }
    }
}

async fn keep_alive(
    store: Arc<dyn Store>,
    agent: AgentId,
    ttl: Duration,
    data_dir: std::path::PathBuf,
    stop: watch::Sender<Option<String>>,
    pause: watch::Sender<Option<String>>,
) {
    // `run` heartbeats once before the first claim: the next beat is a period later.
    let period = (ttl / 3).max(Duration::from_millis(1));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        report_disk(&data_dir);
        let heard = match store.heartbeat(&agent, ttl).await {
            Ok(heard) => heard,
            Err(e) => {
                warn!(%agent, error = %e, "heartbeat failed");
                continue;
            }
        };
        if let Some(why) = heard.stop {
            if stop.borrow().is_none() {
                info!(%agent, reason = %why, "stop requested; taking no new work");
                stop.send_replace(Some(why));
            }
        }
        pause.send_if_modified(|paused| {
            if *paused == heard.pause {
                return false;
            }
            match &heard.pause {
                Some(why) => {
                    info!(%agent, reason = %why, "paused; claiming no new work until resumed")
                }
                None => info!(%agent, "resumed; claiming work again"),
            }
            METRICS.paused.set(i64::from(heard.pause.is_some()));
            *paused = heard.pause.clone();
            true
        });
    }
}

async fn run_step(
    store: Arc<dyn Store>,
    opts: Arc<Options>,
    claim: Claim,
    asked: tokio::time::Instant,
    mut hand_back: watch::Receiver<bool>,
) {
    let (lost_tx, mut lost) = watch::channel(false);
    // Aborted when this function returns or unwinds: a renewer left behind would keep the
    // lease of a step nobody runs alive for good.
    let renewer = AbortOnDrop(tokio::spawn(keep_renewed(
        store.clone(),
        claim.clone(),
        opts.lease_ttl,
        asked,
        lost_tx,
    )));
    // The job as of the claim: the plan says what to run.
    let mut job = JobState::new(claim.job);
    let mut history = Ok(());
    for stored in &claim.history {
        match stored.decode() {
            Ok(event) => job.evolve(&event, stored.envelope.at_ms),
            Err(e) => history = Err(e),
        }
    }
    let (spec, kind) = step_spec(&job, &claim.step);
    METRICS.running.inc();
    let work = async {
        history?;
        execute(&store, &opts, &claim, &job, spec).await
    };
    // A bug that panics while running a step fails the attempt (retryable) instead of leaving
    // the step with nobody running it.
    let work = async {
        match futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(work)).await {
            Ok(r) => r,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                error!(job = %claim.job, step = %claim.step, panic = %what, "the step's run panicked");
                let failed = ferry_proto::StepFailed {
                    step: claim.step.clone(),
                    attempt: claim.attempt,
                    error: format!("the agent failed while running the step: {what}"),
                    retryable: true,
                    exit_code: None,
                };
                store
                    .append(
                        Append::new(StreamId::Job(claim.job), vec![failed.into()])
                            .fenced(claim.step.clone(), claim.token),
                    )
                    .await?;
                Ok("failed")
            }
        }
    };
    // Dropping `work` stops the step: executors kill their process groups on drop.
    let outcome = tokio::select! {
        r = work => Some(r),
        _ = until_set(&mut lost) => None,
        _ = until_set(&mut hand_back) => {
            renewer.0.abort();
            match store.release(claim.job, &claim.step, claim.token, "agent shutting down").await {
                Ok(()) => info!(job = %claim.job, step = %claim.step, "step handed back"),
                Err(e) => warn!(job = %claim.job, step = %claim.step, error = %e, "could not hand the step back; its lease will expire"),
            }
            METRICS.running.dec();
            METRICS.ended(kind, "released", asked.elapsed());
            return;
        }
    };
    renewer.0.abort();
    let label = match outcome {
        None => {
            warn!(job = %claim.job, step = %claim.step, token = %claim.token, "lease lost; step abandoned");
            "abandoned"
        }
        Some(Ok(recorded)) => recorded,
        Some(Err(e)) => {
            warn!(job = %claim.job, step = %claim.step, error = %e, "step result not recorded");
            "error"
        }
    };
    METRICS.running.dec();
    METRICS.ended(kind, label, asked.elapsed());
}

/// The claimed step's spec in its job's plan, and its kind (`build`, `deploy`, `noop`;
/// `other` when the plan lacks the step).
fn step_spec(job: &JobState, step: &ferry_proto::StepId) -> (Option<StepSpec>, &'static str) {
    let spec = job
        .plan
        .as_ref()
        .and_then(|p| p.steps.iter().find(|s| &s.step == step))
        .map(|s| s.spec.clone());
    let kind = match &spec {
        Some(StepSpec::Build(_)) => "build",
        Some(StepSpec::Deploy(_)) => "deploy",
        Some(StepSpec::Noop) => "noop",
        None => "other",
    };
    (spec, kind)
}

/// Runs the claimed step and records its outcome under the lease's token: `succeeded` or
/// `failed`, as recorded.
async fn execute(
    store: &Arc<dyn Store>,
    opts: &Options,
    claim: &Claim,
    job: &JobState,
    spec: Option<StepSpec>,
) -> Result<&'static str, Error> {
    let stream = StreamId::Job(claim.job);
    let step = StepRun::new(store, claim, job, &opts.name);
    step.append(vec![StepStarted {
        step: claim.step.clone(),
        attempt: claim.attempt,
        agent: opts.name.clone(),
    }
    .into()])
        .await?;
    let outcome = match spec {
        Some(spec) => opts.runner.run(&step, &spec).await?,
        None => vec![ferry_proto::StepFailed {
            step: claim.step.clone(),
            attempt: claim.attempt,
            error: "the job's plan has no such step".into(),
            retryable: false,
            exit_code: None,
        }
        .into()],
    };
    step.flush_logs().await;
    let succeeded = outcome
        .iter()
        .any(|e| matches!(e, ferry_proto::Event::StepSucceeded(_)));
    store
        .append(Append::new(stream, outcome).fenced(claim.step.clone(), claim.token))
        .await?;
    Ok(if succeeded { "succeeded" } else { "failed" })
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once the flag is set (the guard `wait_for` returns is dropped here, not held
/// across the caller's awaits).
async fn until_set(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|set| *set).await;
}

/// Renews every TTL/3. Signals `lost` when the store refuses the token, or when no renewal was
/// confirmed for 90 % of the TTL, counted from when the last confirmed request was sent (the
/// store's deadline is at least that late). A call still waiting for an answer (a cut
/// connection, a frozen server) counts as unconfirmed: the step is stopped before its lease can
/// run out and be granted again, however long the store client would wait.
async fn keep_renewed(
    store: Arc<dyn Store>,
    claim: Claim,
    ttl: Duration,
    asked: tokio::time::Instant,
    lost: watch::Sender<bool>,
) {
    let margin = ttl.mul_f64(0.9);
    let mut valid_until = asked + margin;
    // After a failed renewal the next comes soon, not a third of the TTL later: a store that
    // was away for a few seconds must not cost a healthy step its lease.
    let mut retry_in: Option<Duration> = None;
    loop {
        let wait = retry_in.unwrap_or(ttl / 3);
        tokio::time::sleep_until((tokio::time::Instant::now() + wait).min(valid_until)).await;
        let sent = tokio::time::Instant::now();
        if sent >= valid_until {
            warn!(job = %claim.job, step = %claim.step, "no lease renewal confirmed in time");
            let _ = lost.send(true);
            return;
        }
        let renewal = store.renew(claim.job, &claim.step, claim.token, ttl);
        match tokio::time::timeout_at(valid_until, renewal).await {
            Ok(Ok(_)) => {
                valid_until = sent + margin;
                retry_in = None;
            }
            Ok(Err(Error::Stale { reason, .. })) => {
                warn!(job = %claim.job, step = %claim.step, %reason, "lease renewal refused");
                let _ = lost.send(true);
                return;
            }
            Ok(Err(e)) => {
                warn!(job = %claim.job, step = %claim.step, error = %e, "lease renewal failed");
                let next = retry_in.map_or(Duration::from_millis(250), |d| d * 2);
                retry_in = Some(next.min(ttl / 3));
            }
            Err(_) => {
                warn!(job = %claim.job, step = %claim.step, "the store did not answer the lease renewal in time");
                let _ = lost.send(true);
                return;
            }
        }
    }
}
