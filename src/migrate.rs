//! `ferry migrate --from URL --to URL`: copies the whole event log from one store to another
//! (embedded to Redis, or back), so that the target's fold is the source's.
//!
//! Events are read from the source in an order consistent with every stream's (the global
//! log's order; where the source's log was trimmed, stream by stream: see
//! [`crate::replay::History`]) and appended to the target through the ordinary append port
//! with their original `at_ms`, each job's stream at exactly the version it had in the source
//! (so every stream's order is the source's). Appending replays the effects, so the target's queues and indexes are rebuilt as the
//! source built them. What the log alone does not carry is recreated:
//!
//! - **Webhook dedupe keys** (`gateway::dedupe_keys`), so a delivery GitLab repeats after the
//!   move is still a duplicate; their window (the gateway's) starts again at the move.
//! - **Output lines** (each job's log, not events) are copied after the events, job by job in
//!   order; run again, a job's lines the target already has are skipped (an interrupted copy
//!   leaves a prefix).
//! - **The fencing-token counter** is raised to the largest token of the source's history.
//! - **Leases** cannot move: a step that was running in the source (claimed, with no outcome)
//!   gets a `lease_expired` in the target, and a coordinator runs it again (steps are
//!   idempotent). Stop the agents before migrating and there are none.
//!
//! The envelopes' fencing tokens (who wrote an event) are not carried; the payloads are, and they
//! are all the fold reads. The target's token counter is raised to the largest token of the
//! source's history: tokens only grow, and the deploy hosts hold the last one that switched
//! them.
//!
//! Refuses a target that holds events unless `force`. Then a job stream already in the target
//! (job ids are unique, so it is the same job: an interrupted migration run again) is continued,
//! not duplicated: an event at a version the target already has is skipped. The shared streams
//! (`webhooks`, `agents`) are appended to, each event under a dedupe key
//! `migrated:<stream>:<at_ms>:<digest>` (for the dedupe window), so a second run does not double
//! them either.

use crate::domain::{JobState, StepStatus};
use crate::gateway::{dedupe_keys, forget_keys};
use crate::store::{self, Append, Appended, Error, Store, Stored, StreamId};
use ferry_proto::{Event, JobId, LeaseExpired};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

const BATCH: usize = 1000;

/// What a migration did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Events read from the source.
    pub read: u64,
    /// Events written to the target.
    pub written: u64,
    /// Events the target already had (with `force`).
    pub skipped: u64,
    /// Steps that were running in the source and will run again.
    pub interrupted: Vec<(JobId, String)>,
    /// Output lines copied (jobs' logs), after the events.
    pub log_lines: u64,
    /// The target's fencing-token counter afterwards: at least the largest token of the
    /// source's history, so that the target's tokens keep growing (deploy hosts refuse a switch
    /// under a token smaller than one they saw).
    pub fence: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("the target store already holds events; pass --force to add the source's to them")]
    TargetNotEmpty,
    #[error("stream {stream}: the target holds {target} events but the source only {source_len} at this point; the stores have diverged")]
    Diverged {
        stream: String,
        target: u64,
        source_len: u64,
    },
    #[error("stream {stream}: event {index} is not the same in the source and the target (the source went on after an earlier migration, which interrupted its running steps in the target); the stores have diverged")]
    Differs { stream: String, index: u64 },
    #[error("source event at {pos} has an unknown stream {stream:?}")]
    UnknownStream { pos: String, stream: String },
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// The dedupe key of an event of a shared stream copied by a migration.
fn migrated_key(envelope: &ferry_proto::Envelope) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(envelope.kind.to_be_bytes())
        .chain_update(&envelope.payload)
        .finalize();
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("migrated:{}:{}:{hex}", envelope.stream, envelope.at_ms)
}

/// Copies every event of `from` into `to`. `dedupe_window` is how long recreated webhook dedupe
/// keys live (the gateway's window).
pub async fn migrate(
    from: &dyn Store,
    to: &dyn Store,
    force: bool,
    dedupe_window: Duration,
) -> Result<Report, MigrateError> {
    if !force && !to.read_log(None, 1).await?.is_empty() {
        return Err(MigrateError::TargetNotEmpty);
    }
    let mut report = Report::default();
    // Events of each stream seen so far in the source: the version the next one lands at.
    let mut versions: HashMap<String, u64> = HashMap::new();
    // Each job of the source, and whether it ended there (no more than that: the whole state of
    // every job of a long history would not fit in memory).
    let mut jobs: BTreeMap<JobId, bool> = BTreeMap::new();
    // Target streams read on a run again (an event the target already holds), by name.
    let mut targets: HashMap<String, Vec<Stored>> = HashMap::new();
    // The largest fencing token the source's history shows.
    let mut max_token = 0;
    let mut history = crate::replay::History::start(from).await?;
    while let Some(batch) = history.next().await? {
        for stored in &batch {
            report.read += 1;
            let name = &stored.envelope.stream;
            let stream = StreamId::parse(name).ok_or_else(|| MigrateError::UnknownStream {
                pos: stored.pos.to_string(),
                stream: name.clone(),
            })?;
            let event = stored.decode()?;
            max_token = max_token.max(stored.envelope.token.unwrap_or(0));
            if let Event::StepClaimed(c) = &event {
                max_token = max_token.max(c.token.0);
            }
            let version = versions.entry(name.clone()).or_insert(0);
            let mut append = Append::new(stream.clone(), vec![event.clone()]);
            append.at_ms = stored.envelope.at_ms;
            if stream.job().is_some() {
                append = append.expect(*version);
            } else {
                // Shared streams are appended to; a key per migrated event keeps a second run
                // from doubling them, and a webhook's own keys keep later redeliveries out.
                let mut keys = vec![migrated_key(&stored.envelope)];
                if let Event::WebhookReceived(w) = &event {
                    keys.extend(dedupe_keys(w));
                    append = append.forget(forget_keys(w));
                }
                append = append.dedupe(keys, dedupe_window);
            }
            match to.append(append).await {
                Ok(Appended::Written { .. }) => report.written += 1,
                // Its dedupe key is already in the target: the delivery is there.
                Ok(Appended::Duplicate { .. }) => report.skipped += 1,
                // The target's stream is longer: an earlier run wrote this event, unless the
                // source went on since (its event here is another than the target's).
                Err(Error::Conflict { actual, .. }) if actual > *version => {
                    // (read once per stream; a few hundred kept at most, jobs that ended in
                    // the source dropped)
                    if !targets.contains_key(name) {
                        if targets.len() >= 256 {
                            targets.clear();
                        }
                        targets.insert(name.clone(), to.read_stream(&stream, 0).await?);
                    }
                    let same = targets[name].get(*version as usize).is_some_and(|t| {
                        t.envelope.at_ms == stored.envelope.at_ms
                            && t.decode().ok().as_ref() == Some(&event)
                    });
                    if !same {
                        return Err(MigrateError::Differs {
                            stream: name.clone(),
                            index: *version,
                        });
                    }
                    report.skipped += 1
                }
                Err(Error::Conflict { actual, .. }) => {
                    return Err(MigrateError::Diverged {
                        stream: name.clone(),
                        target: actual,
                        source_len: *version,
                    })
                }
                Err(e) => return Err(e.into()),
            }
            *version += 1;
            if let StreamId::Job(job) = stream {
                let ended = crate::domain::job::ends_job(&event);
                *jobs.entry(job).or_default() |= ended;
                if ended {
                    targets.remove(name);
                }
            }
        }
    }
    report.fence = to.raise_fence(max_token).await?;
    // Leases do not move: a step still running in the target's fold is interrupted there.
    for (job, ended) in &jobs {
        if *ended {
            continue;
        }
        let stream = StreamId::Job(*job);
        let mut target = JobState::new(*job);
        for s in to.read_stream(&stream, 0).await? {
            target.evolve(&s.decode()?, s.envelope.at_ms);
        }
        let expired: Vec<Event> = target
            .steps
            .iter()
            .filter_map(|step| match &step.status {
                StepStatus::Claimed {
                    attempt,
                    agent,
                    token,
                    ..
                } => Some(
                    LeaseExpired {
                        step: step.step.clone(),
                        attempt: *attempt,
                        agent: agent.clone(),
                        token: *token,
                    }
                    .into(),
                ),
                _ => None,
            })
            .collect();
        for e in &expired {
            if let Event::LeaseExpired(l) = e {
                report.interrupted.push((*job, l.step.to_string()));
            }
        }
        if !expired.is_empty() {
            to.append(Append::new(stream, expired).expect(target.version))
                .await?;
        }
    }
    // Output lines, job by job (they are not events: each job's log is copied in order). A
    // run again (`force`) skips the lines the target's log already has: an interrupted copy
    // left a prefix of it.
    for job in jobs.keys() {
        let have = if force {
            count_lines(to, *job).await?
        } else {
            0
        };
        let mut skip = have;
        let mut cursor = None;
        loop {
            let page = from
                .read_logs(*job, cursor.as_ref(), BATCH, Duration::ZERO)
                .await?;
            let Some((last, _)) = page.last() else { break };
            cursor = Some(last.clone());
            let full = page.len() == BATCH;
            let lines: Vec<ferry_proto::StepLog> = page
                .into_iter()
                .skip(skip.min(BATCH as u64) as usize)
                .map(|(_, l)| l)
                .collect();
            skip = skip.saturating_sub(BATCH as u64);
            to.import_logs(*job, &lines).await?;
            report.log_lines += lines.len() as u64;
            if !full {
                break;
            }
        }
    }
    Ok(report)
}

/// How many output lines `job`'s log holds in `store`.
async fn count_lines(store: &dyn Store, job: JobId) -> Result<u64, MigrateError> {
    let (mut n, mut cursor) = (0u64, None);
    loop {
        let page = store
            .read_logs(job, cursor.as_ref(), BATCH, Duration::ZERO)
            .await?;
        n += page.len() as u64;
        match page.last() {
            Some((last, _)) if page.len() == BATCH => cursor = Some(last.clone()),
            _ => return Ok(n),
        }
    }
}
