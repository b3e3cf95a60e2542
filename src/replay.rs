//! Replay: rebuild the [`View`] from the store's history (the global log, or where it was
//! trimmed every stream: [`History`]; optionally from a snapshot), and verify it against the
//! live projection the store keeps — each job's own stream, the queues and the leases.
//! `ferry replay` drives this.

use crate::domain::view::{leases_of, queue_of, LeaseEntry, QueueEntry};
use crate::domain::{JobState, View};
use crate::store::{self, LogPos, Store, Stored, StreamCursor, StreamId};
use ferry_proto::JobId;
use futures_util::{StreamExt, TryStreamExt};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// Name under which `ferry replay --save-snapshot` stores the view, followed by the fold's
/// version ([`snapshot_name`]).
pub const SNAPSHOT: &str = "view";

/// The snapshot's name for this build's fold: `view-fold<FOLD_VERSION>`. A snapshot of another
/// fold (saved under another name; the first ones under `view` alone) is not read.
pub fn snapshot_name() -> String {
    format!("{SNAPSHOT}-fold{}", crate::domain::FOLD_VERSION)
}

const BATCH: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Store(#[from] store::Error),
    #[error("snapshot {name} is unreadable: {reason}")]
    Snapshot { name: String, reason: String },
}

/// Folds every event not yet in `view` into it: from just after `view.position` to the end of
/// the global log. Where the log was trimmed past that position (`Feed::trim_log`), `view` is
/// folded again from the start, stream by stream ([`History`]); returns whether it was.
pub async fn catch_up(store: &dyn Store, view: &mut View) -> Result<bool, Error> {
    let after = view.position.clone().map(LogPos);
    let (mut history, restarted) = match History::after(store, after.as_ref()).await? {
        Some(history) => (history, false),
        None => {
            *view = View::default();
            (History::start(store).await?, true)
        }
    };
    while let Some(batch) = history.next().await? {
        for stored in &batch {
            let event = stored.decode()?;
            view.apply(
                &stored.pos.0,
                &stored.envelope.stream,
                &event,
                stored.envelope.at_ms,
            );
        }
    }
    // (stream by stream, the positions folded last are not the newest)
    if let Some(covered) = history.covered() {
        view.position = Some(covered.0.clone());
    }
    Ok(restarted)
}

/// Every event of a store, in batches, in an order consistent with each stream's own: the
/// global log's order while the log is whole. Where it was trimmed (`Feed::trim_log`: its
/// oldest entries are gone, their streams still hold them), each stream's events up to the
/// log's last entry as of the start (webhooks, agents, then every job in creation order),
/// then the log after that entry. Replay and `ferry migrate` read a store's history this way.
pub struct History<'a> {
    store: &'a dyn Store,
    phase: Phase,
    /// The log position everything handed out so far covers.
    covered: Option<LogPos>,
    /// Batches read ahead (jobs' streams are read several at once), handed out first.
    ready: VecDeque<Vec<Stored>>,
}

/// Jobs' streams read at once while a trimmed log's history is read stream by stream.
const JOBS_AT_ONCE: usize = 32;

enum Phase {
    Log,
    Streams {
        /// The log's last entry when the walk started: streams are read up to it.
        end: LogPos,
        /// The streams still to read, the next one last.
        next: Vec<StreamId>,
        /// Where the stream being read (the last of `next`) continues.
        cursor: Option<StreamCursor>,
        jobs_after: Option<JobId>,
        jobs_done: bool,
    },
    Done,
}

impl<'a> History<'a> {
    /// The whole history.
    pub async fn start(store: &'a dyn Store) -> store::Result<History<'a>> {
        let Some(complete_from) = store.log_complete_from().await? else {
            return Ok(History {
                store,
                phase: Phase::Log,
                covered: None,
                ready: VecDeque::new(),
            });
        };
        // An emptied log has no last entry: everything its streams hold was written before
        // the trim's bound.
        let end = store.log_end().await?.unwrap_or(complete_from);
        Ok(History {
            store,
            phase: Phase::Streams {
                end,
                next: vec![StreamId::Agents, StreamId::Webhooks],
                cursor: None,
                jobs_after: None,
                jobs_done: false,
            },
            covered: None,
            ready: VecDeque::new(),
        })
    }

    /// The history after log position `after` (`None`: all of it), or `None` when the log was
    /// trimmed past it (what follows `after` is no longer all in the log).
    pub async fn after(
        store: &'a dyn Store,
        after: Option<&LogPos>,
    ) -> store::Result<Option<History<'a>>> {
        let Some(after) = after else {
            return Self::start(store).await.map(Some);
        };
        if let Some(from) = store.log_complete_from().await? {
            if *after < from {
                return Ok(None);
            }
        }
        Ok(Some(History {
            store,
            phase: Phase::Log,
            covered: Some(after.clone()),
            ready: VecDeque::new(),
        }))
    }

    /// The next batch, `None` at the end.
    pub async fn next(&mut self) -> store::Result<Option<Vec<Stored>>> {
        loop {
            if let Some(batch) = self.ready.pop_front() {
                return Ok(Some(batch));
            }
            match &mut self.phase {
                Phase::Done => return Ok(None),
                Phase::Log => {
                    let batch = self.store.read_log(self.covered.as_ref(), BATCH).await?;
                    if batch.len() < BATCH {
                        self.phase = Phase::Done;
                    }
                    if let Some(last) = batch.last() {
                        self.covered = Some(last.pos.clone());
                    }
                    if !batch.is_empty() {
                        return Ok(Some(batch));
                    }
                }
                Phase::Streams {
                    end,
                    next,
                    cursor,
                    jobs_after,
                    jobs_done,
                } => {
                    if next.is_empty() && !*jobs_done {
                        let page = self
                            .store
                            .jobs(*jobs_after, BATCH, store::Order::Oldest)
                            .await?;
                        *jobs_done = page.len() < BATCH;
                        *jobs_after = page.last().copied();
                        // taken from the end: the oldest job first
                        next.extend(page.into_iter().rev().map(StreamId::Job));
                    }
                    let Some(stream) = next.last() else {
                        // every stream up to `end`: the log after it comes next
                        self.covered = Some(end.clone());
                        self.phase = Phase::Log;
                        continue;
                    };
                    if matches!(stream, StreamId::Job(_)) {
                        // Jobs' streams (each a few events, some thousands) are read whole,
                        // several at once: one round trip after another would take minutes
                        // for a million jobs.
                        let at = next.len().saturating_sub(JOBS_AT_ONCE);
                        let jobs: Vec<StreamId> = next.drain(at..).rev().collect();
                        let store = self.store;
                        let read: Vec<Vec<Stored>> = futures_util::stream::iter(
                            jobs.iter().map(|job| store.read_stream(job, 0)),
                        )
                        .buffered(JOBS_AT_ONCE)
                        .try_collect()
                        .await?;
                        for mut events in read {
                            events.retain(|e| e.pos <= *end);
                            if !events.is_empty() {
                                self.ready.push_back(events);
                            }
                        }
                        continue;
                    }
                    let (mut events, more) = self
                        .store
                        .read_stream_page(stream, cursor.as_ref(), BATCH)
                        .await?;
                    // what was appended after `end` comes from the log, in its order
                    let whole = events.len();
                    events.retain(|e| e.pos <= *end);
                    *cursor = more.filter(|_| events.len() == whole);
                    if cursor.is_none() {
                        next.pop();
                    }
                    if !events.is_empty() {
                        return Ok(Some(events));
                    }
                }
            }
        }
    }

    /// The log position that everything handed out so far covers (`None` before anything).
    pub fn covered(&self) -> Option<&LogPos> {
        self.covered.as_ref()
    }
}

/// The view rebuilt from the whole history.
pub async fn rebuild(store: &dyn Store) -> Result<View, Error> {
    let mut view = View::default();
    catch_up(store, &mut view).await?;
    Ok(view)
}

/// Stores `view` as the snapshot, with the position it reflects inside it.
pub async fn save_snapshot(store: &dyn Store, view: &View) -> Result<(), Error> {
    let bytes = rmp_serde::to_vec_named(view).map_err(|e| Error::Snapshot {
        name: snapshot_name(),
        reason: e.to_string(),
    })?;
    store.put_snapshot(&snapshot_name(), &bytes).await?;
    Ok(())
}

/// The stored snapshot of this build's fold, if there is one.
pub async fn load_snapshot(store: &dyn Store) -> Result<Option<View>, Error> {
    let Some(bytes) = store.get_snapshot(&snapshot_name()).await? else {
        return Ok(None);
    };
    rmp_serde::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Snapshot {
            name: snapshot_name(),
            reason: e.to_string(),
        })
}

/// The outcome of [`verify`].
#[derive(Debug, Default)]
pub struct Verification {
    /// Jobs compared in full.
    pub checked: usize,
    /// Jobs that changed while being verified; they are not compared.
    pub skipped: Vec<JobId>,
    /// Every difference found, most important first.
    pub differences: Vec<String>,
}

impl Verification {
    pub fn ok(&self) -> bool {
        self.differences.is_empty()
    }
}

/// Compares `view` (a fold of the global log) with the live projection: each job's stream
/// folded on its own, the store's queues, its leases, its list of ended jobs whose logs are
/// kept (`logs_to_expire`) and its tag and environment indexes (`live:` ones hold the jobs
/// that have not ended).
///
/// Every change to a job's queue entries or lease is made atomically with an append to that
/// job's stream, and streams only grow. So a job whose stream still has the version the view
/// saw did not change since, and its queue entries and lease read after the view must match
/// exactly. Jobs that did change are reported as skipped, not as differences.
pub async fn verify(store: &dyn Store, view: &View) -> Result<Verification, Error> {
    let queued = store.queued().await?;
    let leases = store.leases().await?;
    let mut kept: BTreeSet<JobId> = store
        .logs_to_expire(u64::MAX, i64::MAX as usize)
        .await?
        .into_iter()
        .map(|(job, _)| job)
        .collect();

    let mut live_queue: BTreeMap<JobId, BTreeSet<QueueEntry>> = BTreeMap::new();
    for q in queued {
        live_queue.entry(q.job).or_default().insert(QueueEntry {
            job: q.job,
            step: q.step,
            attempt: q.attempt,
            pool: q.pool,
            priority: q.priority,
            due_ms: q.due_ms,
        });
    }
    let mut live_leases: BTreeMap<JobId, BTreeSet<LeaseEntry>> = BTreeMap::new();
    for l in leases {
        live_leases.entry(l.job).or_default().insert(LeaseEntry {
            job: l.job,
            step: l.step,
            attempt: l.attempt,
            agent: l.agent,
            token: l.token,
        });
    }

    // The tag and environment indexes the view's jobs belong in (the deploy gate reads the
    // environments'), read before the streams, as the queues and leases are.
    let index_keys: BTreeSet<String> = view
        .jobs
        .values()
        .filter_map(|j| j.plan.as_ref())
        .flat_map(checked_index_keys)
        .collect();
    let indexes: BTreeMap<String, BTreeSet<JobId>> =
        futures_util::stream::iter(index_keys.into_iter().map(|key| async move {
            let members = store.indexed(&key).await?;
            Ok::<_, store::Error>((key, members.into_iter().collect()))
        }))
        .buffered(JOBS_AT_ONCE)
        .try_collect()
        .await?;

    let mut jobs: BTreeSet<JobId> = view.jobs.keys().copied().collect();
    let mut after = None;
    loop {
        let page = store.jobs(after, BATCH, store::Order::Oldest).await?;
        after = page.last().copied();
        let done = page.len() < BATCH;
        jobs.extend(page);
        if done {
            break;
        }
    }
    jobs.extend(live_queue.keys().copied());
    jobs.extend(live_leases.keys().copied());
    jobs.extend(kept.iter().copied());

    let mut out = Verification::default();
    let empty = JobState::new(JobId::default());
    // Each job's stream, several read at once, compared in order.
    let streams = futures_util::stream::iter(jobs.into_iter().map(|job| async move {
        Ok::<_, store::Error>((job, store.read_stream(&StreamId::Job(job), 0).await?))
    }))
    .buffered(JOBS_AT_ONCE);
    futures_util::pin_mut!(streams);
    while let Some(read) = streams.next().await {
        let (job, stream) = read?;
        let mut live = JobState::new(job);
        for stored in &stream {
            live.evolve(&stored.decode()?, stored.envelope.at_ms);
        }
        let logged = view.jobs.get(&job);
        let seen = logged.map_or(0, |j| j.version);
        if live.version > seen {
            let changed_after_view = match (stream.get(seen as usize), &view.position) {
                (Some(first_new), Some(pos)) => {
                    compare_pos(&first_new.pos.0, pos) == Ordering::Greater
                }
                (Some(_), None) => true,
                (None, _) => false,
            };
            if changed_after_view {
                out.skipped.push(job);
                continue;
            }
        }
        let logged = logged.unwrap_or(&empty);
        if live != *logged {
            out.differences.push(format!(
                "job {job}: the global log folds to version {} ({}), its own stream to version {} ({})",
                logged.version,
                logged.phase.as_str(),
                live.version,
                live.phase.as_str()
            ));
            continue;
        }
        // A delayed step is due on the store's clock (the delay its writer meant, from when
        // the store wrote it): a little after the event's due_ms, so it is compared by being
        // delayed, not to the millisecond.
        let key = |e: &QueueEntry| {
            let due = e.due_ms.is_some();
            (e.step.clone(), e.attempt, e.pool.clone(), e.priority, due)
        };
        let want: BTreeMap<_, QueueEntry> =
            queue_of(logged).into_iter().map(|e| (key(&e), e)).collect();
        let have: BTreeMap<_, QueueEntry> = live_queue
            .remove(&job)
            .unwrap_or_default()
            .into_iter()
            .map(|e| (key(&e), e))
            .collect();
        for (k, missing) in &want {
            if !have.contains_key(k) {
                out.differences.push(format!(
                    "job {job}: step {} attempt {} should be queued in pool {} (due {:?}) but is not",
                    missing.step, missing.attempt, missing.pool, missing.due_ms
                ));
            }
        }
        for (k, extra) in &have {
            if !want.contains_key(k) {
                out.differences.push(format!(
                    "job {job}: step {} attempt {} is queued in pool {} (due {:?}) but the log says it should not be",
                    extra.step, extra.attempt, extra.pool, extra.due_ms
                ));
            }
        }
        let want: BTreeSet<LeaseEntry> = leases_of(logged).into_iter().collect();
        let have = live_leases.remove(&job).unwrap_or_default();
        for missing in want.difference(&have) {
            out.differences.push(format!(
                "job {job}: step {} should be leased to {} with token {} but is not",
                missing.step, missing.agent, missing.token
            ));
        }
        for extra in have.difference(&want) {
            out.differences.push(format!(
                "job {job}: step {} is leased to {} with token {} but the log says it should not be",
                extra.step, extra.agent, extra.token
            ));
        }
        for key in logged.plan.iter().flat_map(checked_index_keys) {
            let live_only = key.starts_with(store::LIVE);
            let want = !live_only || !logged.phase.is_terminal();
            let have = indexes.get(&key).is_some_and(|m| m.contains(&job));
            if want != have {
                out.differences.push(if want {
                    format!("job {job}: missing from index {key}")
                } else {
                    format!("job {job}: ended, but still in index {key}")
                });
            }
        }
        let listed = kept.remove(&job);
        let ended = logged.phase.is_terminal();
        let expired = logged.logs_expired_at_ms.is_some();
        let kept_logs = ended && !expired;
        if kept_logs && !listed {
            out.differences.push(format!(
                "job {job}: ended, but not listed for log retention (its output would be kept \
                 forever; a coordinator lists jobs ended by builds before log retention in the \
                 background, so run this again once it has)"
            ));
        } else if listed && !kept_logs {
            let why = if ended {
                "its logs expired"
            } else {
                "it has not ended"
            };
            out.differences
                .push(format!("job {job}: listed for log retention, but {why}"));
        }
        out.checked += 1;
    }
    Ok(out)
}

/// The index keys of a job's plan that `verify` checks: its tag's and its environments', with
/// their `live:` twins (an artifact's index also gains the builds that publish it, by another
/// event).
fn checked_index_keys(plan: &ferry_proto::JobCreated) -> Vec<String> {
    store::index_keys(plan)
        .into_iter()
        .filter(|k| {
            let k = k.strip_prefix(store::LIVE).unwrap_or(k);
            k.starts_with("tag:") || k.starts_with("env:")
        })
        .collect()
}

/// Orders two log positions of the same store: `<ms>-<seq>` (Redis) or a plain sequence
/// number, compared part by part as numbers.
pub fn compare_pos(a: &str, b: &str) -> Ordering {
    let parts = |s: &str| -> Vec<u64> { s.split('-').map(|p| p.parse().unwrap_or(0)).collect() };
    parts(a).cmp(&parts(b))
}

/// A few lines for humans: jobs by phase, queue, leases, agents.
pub fn summary(view: &View) -> String {
    let mut s = format!(
        "{} events folded, up to log position {}\n",
        view.events,
        view.position.as_deref().unwrap_or("(none)")
    );
    let phases: Vec<String> = view
        .jobs_by_phase()
        .iter()
        .map(|(p, n)| format!("{} {n}", p.as_str()))
        .collect();
    s += &format!(
        "jobs: {} ({})\n",
        view.jobs.len(),
        if phases.is_empty() {
            "none".into()
        } else {
            phases.join(", ")
        }
    );
    s += &format!(
        "queued steps: {}\nleased steps: {}\n",
        view.queue().len(),
        view.leases().len()
    );
    let count = |f: fn(&crate::domain::view::AgentState) -> bool| {
        view.agents.values().filter(|a| f(a)).count()
    };
    s += &format!(
        "agents: {} known, {} left, {} lost\nwebhooks: {}\n",
        view.agents.len(),
        count(|a| a.left.is_some()),
        count(|a| a.left.is_none() && a.lost.is_some()),
        view.webhooks
            .iter()
            .map(|(a, n)| format!("{a} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    s
}
