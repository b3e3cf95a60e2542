//! Storage ports: the event log (with its consumer-group feed), the work queue, step leases, the
//! leader lock, snapshots and the agent registry. Each is a narrow trait whose doc comment is its
//! contract; every backend implements all of them and passes the one conformance suite
//! ([`conformance`]). Backends: [`redis`] (the distributed engine) and [`sqlite`] (the embedded
//! one, for a single machine).
//!
//! The store keeps two kinds of data: the **log** (streams of events: the truth) and **live
//! structures** (ready and delayed queues, leases) that the store derives from the events it
//! appends, inside the same atomic operation. Callers never touch queues directly: appending a
//! `StepQueued` event is what enqueues a step ([`effects_of`]). So the live structures can always
//! be checked against a fold of the log (`ferry replay --verify`).

pub mod conformance;
mod effects;
pub mod redis;
pub mod sqlite;
mod validate;

pub use effects::{
    artifact_index, effects_of, environment_index, index_keys, misplaced, queue_score, queued_at,
    tag_index, Effect, LIVE, PRIORITY_RANGE,
};

use async_trait::async_trait;
use ferry_proto::{AgentId, DecodeError, Envelope, Event, FencingToken, JobId, StepId, StepLog};
use std::fmt;
use std::time::Duration;

/// The number of events in a stream. A stream that was never written has version 0.
pub type Version = u64;

/// A position in the global log (or in a job's step log), opaque to callers and ordered by the
/// store. Redis uses the stream entry id (`<ms>-<seq>`); SQLite uses `0-<rowid>`, the same
/// shape with a zero first part. Positions of that shape order numerically (`1-9 < 1-10`,
/// `0-9 < 0-10`), anything else by its text. A position is only meaningful to the backend that
/// issued it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct LogPos(pub String);

impl LogPos {
    fn numeric(&self) -> Option<(u64, u64)> {
        let (ms, seq) = self.0.split_once('-')?;
        Some((ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl Ord for LogPos {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self.numeric(), other.numeric()) {
            (Some(a), Some(b)) => a.cmp(&b).then_with(|| self.0.cmp(&other.0)),
            _ => self.0.cmp(&other.0),
        }
    }
}

impl PartialOrd for LogPos {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for LogPos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A named event stream. Every job has its own; webhooks and agents have one each.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StreamId {
    Job(JobId),
    Webhooks,
    Agents,
}

impl StreamId {
    /// The name written into envelopes: `job:<uuid>`, `webhooks`, `agents`.
    pub fn name(&self) -> String {
        match self {
            StreamId::Job(j) => format!("job:{j}"),
            StreamId::Webhooks => "webhooks".into(),
            StreamId::Agents => "agents".into(),
        }
    }

    pub fn parse(name: &str) -> Option<StreamId> {
        match name {
            "webhooks" => Some(StreamId::Webhooks),
            "agents" => Some(StreamId::Agents),
            _ => name
                .strip_prefix("job:")
                .and_then(|j| j.parse().ok())
                .map(StreamId::Job),
        }
    }

    pub fn job(&self) -> Option<JobId> {
        match self {
            StreamId::Job(j) => Some(*j),
            _ => None,
        }
    }
}

/// What the writer believes the stream's version is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Append whatever the version (agents' facts, sweeps).
    Any,
    /// Append only if the stream holds exactly this many events (decisions).
    Exactly(Version),
}

/// The lease an append is made under. The store rejects the append unless `token` is the live
/// lease's token for `step` of this job and the lease has not run out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    pub step: StepId,
    pub token: FencingToken,
}

/// One atomic append.
#[derive(Clone, Debug)]
pub struct Append {
    pub stream: StreamId,
    pub expected: Expected,
    pub fence: Option<Fence>,
    /// Dedupe keys: if any of them was recorded within its window, nothing is written and the
    /// log position recorded under it is returned. Otherwise all are recorded, pointing at the
    /// first new event, for `dedupe_window`.
    pub dedupe: Vec<String>,
    pub dedupe_window: Duration,
    /// Dedupe keys this append ends, when it is written: what they recorded counts no more (a
    /// tag's deletion ends its creation's key, so the same tag pushed again at the same commit
    /// is a new delivery).
    pub forget: Vec<String>,
    /// Wall-clock ms written into the envelopes.
    pub at_ms: u64,
    pub events: Vec<Event>,
}

impl Append {
    /// An append of `events` to `stream` with no conditions.
    pub fn new(stream: StreamId, events: Vec<Event>) -> Self {
        Append {
            stream,
            expected: Expected::Any,
            fence: None,
            dedupe: Vec::new(),
            dedupe_window: Duration::ZERO,
            forget: Vec::new(),
            at_ms: now_ms(),
            events,
        }
    }

    pub fn expect(mut self, version: Version) -> Self {
        self.expected = Expected::Exactly(version);
        self
    }

    pub fn fenced(mut self, step: StepId, token: FencingToken) -> Self {
        self.fence = Some(Fence { step, token });
        self
    }

    pub fn dedupe(mut self, keys: Vec<String>, window: Duration) -> Self {
        self.dedupe = keys;
        self.dedupe_window = window;
        self
    }

    pub fn forget(mut self, keys: Vec<String>) -> Self {
        self.forget = keys;
        self
    }
}

/// What an append did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Appended {
    /// The events were written; `version` is the stream's new version and `positions` their
    /// places in the global log, in order.
    Written {
        version: Version,
        positions: Vec<LogPos>,
    },
    /// A dedupe key matched: nothing was written. `original` is the first event of the append
    /// that recorded the key.
    Duplicate { original: LogPos },
}

/// An event as read back from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stored {
    /// Its place in the global log.
    pub pos: LogPos,
    /// Its place in its own stream: 1 for the first event, so after it the stream's version
    /// is `seq`. `None` only for Redis entries written before entries recorded it.
    pub seq: Option<Version>,
    pub envelope: Envelope,
}

impl Stored {
    pub fn decode(&self) -> Result<Event, Error> {
        self.envelope.decode().map_err(|source| Error::Decode {
            pos: self.pos.clone(),
            source,
        })
    }
}

/// A step the claim script handed to an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub job: JobId,
    pub step: StepId,
    pub attempt: u32,
    pub pool: String,
    pub token: FencingToken,
    /// Store-clock ms at which the lease runs out unless renewed.
    pub deadline_ms: u64,
    /// The job's stream as of the claim, its `StepClaimed` last: what `read_stream(job, 0)`
    /// would return, read in the same atomic operation (the agent finds the plan here). A
    /// backend may read the part of a long stream beyond its first entries after the claim,
    /// up to the `StepClaimed` entry: the same entries, since streams only grow.
    pub history: Vec<Stored>,
}

/// What [`WorkQueue::queue_depths`] reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueDepths {
    /// Per pool asked, in order: ready steps, and when the step at the head of the queue (the
    /// next to be claimed) was queued, store-clock ms (`None` when the queue is empty).
    pub ready: Vec<(u64, Option<u64>)>,
    /// Steps in the delayed set.
    pub delayed: u64,
}

/// A step waiting in a queue.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Queued {
    pub job: JobId,
    pub step: StepId,
    pub attempt: u32,
    pub pool: String,
    pub priority: i32,
    /// `Some(due)` while the step waits in the delayed set, `None` once it is ready.
    pub due_ms: Option<u64>,
}

/// A live step lease.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lease {
    pub job: JobId,
    pub step: StepId,
    pub attempt: u32,
    pub agent: AgentId,
    pub token: FencingToken,
    pub deadline_ms: u64,
}

/// Errors every port may return. An operation that returns an error may or may not have taken
/// effect only when the error is [`Error::Unavailable`]; all other errors mean it did not.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("version conflict on {stream}: expected {expected}, found {actual}")]
    Conflict {
        stream: String,
        expected: Version,
        actual: Version,
    },
    #[error("stale fencing token {token} for step {step}: {reason}")]
    Stale {
        step: StepId,
        token: FencingToken,
        reason: String,
    },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("cannot decode event at {pos}: {source}")]
    Decode { pos: LogPos, source: DecodeError },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// A consumer group the call names does not exist (a Redis that restarted without the data
    /// that held it): the feed creates it again.
    #[error("no such consumer group: {0}")]
    NoGroup(String),
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Where [`EventLog::read_stream_page`] continues (what it means is the store's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamCursor(pub String);

/// Which end of the job list [`EventLog::jobs`] starts from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Order {
    /// Creation order: the oldest job first.
    #[default]
    Oldest,
    /// The newest job first.
    Newest,
}

/// **Event log.** Streams of events with optimistic concurrency, and the global log.
///
/// - `append` is atomic: either every event is written (to its stream and, in the same order,
///   to the global log) and every effect of [`effects_of`] is applied, or nothing is.
/// - With `Expected::Exactly(v)` the append fails with [`Error::Conflict`] unless the stream
///   holds exactly `v` events. Of two writers that read the same version, exactly one wins.
/// - With a [`Fence`], the append fails with [`Error::Stale`] unless the job's lease on that step
///   is live and carries that token.
/// - Dedupe keys make the append a no-op returning [`Appended::Duplicate`] (see [`Append`]).
/// - A stream's events come back in append order; the global log is totally ordered and its
///   order is consistent with every stream's order.
#[async_trait]
pub trait EventLog: Send + Sync {
    async fn append(&self, append: Append) -> Result<Appended>;
    /// The events of one stream from version `from` (0 = the start), in order.
    async fn read_stream(&self, stream: &StreamId, from: Version) -> Result<Vec<Stored>>;
    /// Up to `count` events of one stream after `after` (`None`: from its start), in order,
    /// and where the next page starts (`None` after the last page): a long stream read a page
    /// at a time.
    async fn read_stream_page(
        &self,
        stream: &StreamId,
        after: Option<&StreamCursor>,
        count: usize,
    ) -> Result<(Vec<Stored>, Option<StreamCursor>)>;
    /// Up to `count` global-log events after `after` (`None` = from the start), in order.
    async fn read_log(&self, after: Option<&LogPos>, count: usize) -> Result<Vec<Stored>>;
    /// The position of the global log's last event (`None`: the log is empty).
    async fn log_end(&self) -> Result<Option<LogPos>>;
    /// `Some(pos)` once [`Feed::trim_log`] deleted entries: the log holds every event from
    /// `pos` on, and may lack older ones (their streams still hold them). `None`: the log is
    /// whole.
    async fn log_complete_from(&self) -> Result<Option<LogPos>>;
    /// At most `limit` job ids in creation order ([`Order::Oldest`]) or its reverse
    /// ([`Order::Newest`]), from just past `after` in that order (`None` = from the first).
    /// Jobs created in the same store-clock millisecond order by id. An `after` the store does
    /// not know is [`Error::Invalid`].
    async fn jobs(&self, after: Option<JobId>, limit: usize, order: Order) -> Result<Vec<JobId>>;
    /// The jobs recorded under an index key (see [`index_keys`]: every `JobCreated` indexes its
    /// job atomically with the append), in id order — ids are time-ordered, so creation order.
    async fn indexed(&self, key: &str) -> Result<Vec<JobId>>;
    /// The store answers.
    async fn ping(&self) -> Result<()>;
}

/// **Feed.** The global log delivered through consumer groups (at least once).
///
/// - A group created with `ensure_group` starts at the beginning of the log; creating it again
///   is a no-op.
/// - `read_new` delivers entries no consumer of the group has seen yet, and marks them pending
///   for `consumer` until acknowledged; it waits up to `block` when there are none.
/// - `read_pending` delivers `consumer`'s own pending entries (a restarted consumer reads these
///   first).
/// - `claim_idle` moves to `consumer` the pending entries of any consumer idle for at least
///   `min_idle` (a dead consumer's work) and returns them.
#[async_trait]
pub trait Feed: Send + Sync {
    async fn ensure_group(&self, group: &str) -> Result<()>;
    async fn read_new(
        &self,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Stored>>;
    async fn read_pending(&self, group: &str, consumer: &str, count: usize) -> Result<Vec<Stored>>;
    /// Acknowledges `positions` in `group`; returns how many were pending (an entry another
    /// consumer already acknowledged counts 0).
    async fn ack(&self, group: &str, positions: &[LogPos]) -> Result<u64>;
    async fn claim_idle(
        &self,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Stored>>;
    /// Deletes global-log entries written before `before_ms` (store clock) that every consumer
    /// group has handled: none pending, none not yet delivered. Every event stays in its own
    /// stream, so the store's history loses nothing; readers of all of it
    /// (`crate::replay::History`) read the streams where the log is incomplete (see
    /// [`EventLog::log_complete_from`]). Entries may stay behind for a later call. The
    /// embedded store keeps one table for the log and the streams: it deletes nothing.
    async fn trim_log(&self, before_ms: u64) -> Result<Trimmed>;
}

/// What [`Feed::trim_log`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Log entries deleted.
    pub deleted: u64,
    /// The consumer group whose pending or undelivered entries kept older ones, if one did.
    pub held_by: Option<String>,
}

/// **Work queue.** Ready queues per pool ordered by priority (higher first) then enqueue time
/// (older first); a delayed set ordered by due time. Steps enter them only through the effects of
/// appended events.
///
/// - `claim_many` atomically pops up to `max` of the best ready steps over `pools`, best first,
///   grants `agent` a lease of `ttl` on each with a fresh fencing token, and appends
///   `StepClaimed` to each job's stream. Each queued step is claimed at most once. Each claim
///   carries its job's stream up to its `StepClaimed` (`history`). An error means the caller
///   holds nothing: nothing was claimed, or what was claimed has been handed back
///   (`StepReleased`: a store that claims and reads the histories separately tries the read
///   again for a third of `ttl`, then releases), or, when the store became unreachable during
///   the call ([`Error::Unavailable`]), leases it may have granted run out (`LeaseExpired`).
///   `claim` is `claim_many` with `max` = 1.
/// - `promote_due` moves delayed steps whose due time passed (store clock) to their ready queue,
///   appending `StepQueued` for each.
/// - `wait_for_work` returns when work may have arrived for one of `pools`, or after `timeout`.
///   It may return early without work; it never busy-polls the store.
#[async_trait]
pub trait WorkQueue: Send + Sync {
    async fn claim_many(
        &self,
        pools: &[String],
        agent: &AgentId,
        ttl: Duration,
        max: usize,
    ) -> Result<Vec<Claim>>;
    async fn claim(
        &self,
        pools: &[String],
        agent: &AgentId,
        ttl: Duration,
    ) -> Result<Option<Claim>> {
        Ok(self.claim_many(pools, agent, ttl, 1).await?.pop())
    }
    async fn promote_due(&self, max: usize) -> Result<usize>;
    async fn wait_for_work(&self, pools: &[String], timeout: Duration) -> Result<()>;
    /// Everything waiting, ready and delayed, in no particular order.
    async fn queued(&self) -> Result<Vec<Queued>>;
    /// The depth of each of `pools`' ready queue, in that order, and how many steps wait in
    /// the delayed set (retries not due yet, all pools). Cheap whatever the queues' length: for
    /// gauges read every few seconds.
    async fn queue_depths(&self, pools: &[String]) -> Result<QueueDepths>;
}

/// **Leases** on claimed steps. Deadlines use the store's clock, never the caller's.
///
/// - `renew` extends the lease by `ttl` from now if `token` is still the live token and the lease
///   has not run out; otherwise [`Error::Stale`].
/// - `release` gives the lease back (compare-and-release) and appends `StepReleased`.
/// - `expire_due` ends leases whose deadline passed and appends `LeaseExpired` for each. Their
///   tokens are dead from that moment: renewals and fenced appends with them fail.
#[async_trait]
pub trait Leases: Send + Sync {
    async fn renew(
        &self,
        job: JobId,
        step: &StepId,
        token: FencingToken,
        ttl: Duration,
    ) -> Result<u64>;
    async fn release(
        &self,
        job: JobId,
        step: &StepId,
        token: FencingToken,
        reason: &str,
    ) -> Result<()>;
    async fn expire_due(&self, max: usize) -> Result<Vec<Lease>>;
    async fn leases(&self) -> Result<Vec<Lease>>;
    /// Raises the fencing-token counter to at least `at_least` (never lowers it) and returns
    /// its value: a store that takes over another's history (`ferry migrate`) must issue tokens
    /// above every token that history and the deploy hosts have seen.
    async fn raise_fence(&self, at_least: u64) -> Result<u64>;
}

/// **Leader lock** for singleton duties (the lease sweep, delayed promotion).
///
/// - `lock_acquire` succeeds for one holder at a time and returns a fencing token larger than any
///   issued before for any lock or lease.
/// - `lock_renew` and `lock_release` succeed only for the current holder with its token.
/// - An unrenewed lock lapses after `ttl` and can then be acquired by anyone.
#[async_trait]
pub trait LeaderLock: Send + Sync {
    async fn lock_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<FencingToken>>;
    async fn lock_renew(
        &self,
        name: &str,
        holder: &str,
        token: FencingToken,
        ttl: Duration,
    ) -> Result<bool>;
    async fn lock_release(&self, name: &str, holder: &str, token: FencingToken) -> Result<bool>;
}

/// **Snapshots**: named blobs (a projection and the log position it reflects). Last write wins.
#[async_trait]
pub trait Snapshots: Send + Sync {
    async fn put_snapshot(&self, name: &str, bytes: &[u8]) -> Result<()>;
    async fn get_snapshot(&self, name: &str) -> Result<Option<Vec<u8>>>;
}

/// **Step logs**: each job's output lines in a stream of their own, outside the event log (the
/// fold never needs them), bounded to about [`LOG_MAX_LINES`] lines per job (oldest trimmed).
///
/// - `append_logs` writes lines under the step's lease and is refused with [`Error::Stale`]
///   unless `fence.token` is the live lease's token: a fenced-out agent's output never mixes
///   with its successor's.
/// - `read_logs` returns up to `count` lines after `after` (`None` = the oldest kept), in order;
///   when there are none it waits up to `block` for new ones (zero = do not wait).
#[async_trait]
pub trait Logs: Send + Sync {
    async fn append_logs(&self, job: JobId, fence: &Fence, lines: &[StepLog]) -> Result<()>;
    async fn read_logs(
        &self,
        job: JobId,
        after: Option<&LogPos>,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(LogPos, StepLog)>>;
    /// Appends `lines` to `job`'s log without a lease, trimmed like `append_logs`. Only for
    /// `ferry migrate`, which copies a job's output from another store (the lines were fenced
    /// when they were first written).
    async fn import_logs(&self, job: JobId, lines: &[StepLog]) -> Result<()>;
    /// Up to `max` jobs that ended before `ended_before_ms` and whose logs are still kept,
    /// oldest end first, each with its end time (the `at_ms` of its first terminal event).
    /// A job joins this list atomically with its first terminal event and leaves it with
    /// `LogsExpired`, which deletes its log in the same append (effects `ClearJob` and
    /// `DropLogs`). Jobs that builds before `LogsExpired` existed ended are listed by
    /// `list_ended_unlisted`.
    async fn logs_to_expire(&self, ended_before_ms: u64, max: usize) -> Result<Vec<(JobId, u64)>>;
    /// Lists for `logs_to_expire` the jobs that an earlier build ended without listing them
    /// (Redis installations upgraded from builds before `LogsExpired`, whose logs would
    /// otherwise stay forever). Walks up to `max` jobs after `after`, in creation order, and
    /// lists each one whose stream holds a terminal event and no `LogsExpired`, with the
    /// `at_ms` of its first terminal event, unless the stream grew while it was read (a job
    /// that ends or expires meanwhile lists or unlists itself). Returns how many it listed and
    /// the job to continue after; `next: None` once the walk passed the last job, and the
    /// store then remembers that the listing is complete: every later call returns at once.
    /// The SQLite store listed them when it upgraded its file (schema version 2) and answers
    /// complete at once.
    async fn list_ended_unlisted(&self, after: Option<JobId>, max: usize) -> Result<Listing>;
}

/// What one call of [`Logs::list_ended_unlisted`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listing {
    /// Jobs it listed.
    pub listed: usize,
    /// The job to continue after; `None`: every job has been walked.
    pub next: Option<JobId>,
}

/// Lines kept per job log (approximately: trimming is lazy).
pub const LOG_MAX_LINES: usize = 10_000;

/// **Agent registry**: which agents are alive, by heartbeat. Deadlines use the store's clock.
///
/// - `heartbeat` marks `agent` live until now + `ttl` (replacing any earlier deadline, also one
///   that already passed: an agent that comes back is live again), and returns the reason of a
///   pending stop request (`AgentStopRequested`, cleared by the agent's next `AgentJoined` or
///   `AgentLeft`) and that of a pause (`AgentPaused`, kept across the agent's restarts until
///   `AgentResumed`), if there are.
/// - `live_agents` lists the agents whose deadline has not passed, with their deadline (store
///   clock ms), in no particular order. An agent whose deadline passed is not live even before
///   `expire_agents` ran.
/// - `expire_agents` removes up to `max` agents whose deadline passed and, in the same atomic
///   operation, appends `AgentLost { agent, reason: "heartbeat expired" }` for each to the
///   `agents` stream (and the global log). An agent is reported lost once per lapse: a second
///   call does not report it again unless it heartbeated and lapsed again in between.
///
/// Registration facts (pools, labels, version, capacity) are events (`AgentJoined`) in the
/// `agents` stream; the registry only keeps deadlines. An agent that stops on purpose appends
/// `AgentLeft` there, which takes it out of the registry in the same append (an effect, see
/// [`effects_of`]): it is not live from then on and `expire_agents` never reports it.
#[async_trait]
pub trait Agents: Send + Sync {
    async fn heartbeat(&self, agent: &AgentId, ttl: Duration) -> Result<Heard>;
    async fn live_agents(&self) -> Result<Vec<(AgentId, u64)>>;
    async fn expire_agents(&self, max: usize) -> Result<Vec<AgentId>>;
}

/// How much the store holds, and the most it may hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes in use: Redis's `used_memory` on the server that holds the namespace (every
    /// namespace and database on that server counts); SQLite's database file (its pages).
    pub used_bytes: u64,
    /// Redis's `maxmemory` on that server, past which it refuses writes (with
    /// `maxmemory-policy noeviction`, as ferry needs): `None` when it has none (0), and for
    /// SQLite, which grows until the disk is full.
    pub limit_bytes: Option<u64>,
}

/// **Capacity**: the store's size, for gauges read every few seconds and alerts that fire
/// before a full store refuses every write. Cheap: one round trip (Redis `INFO memory` on the
/// server holding the namespace's hash slot, also in a cluster) or one read.
#[async_trait]
pub trait Capacity: Send + Sync {
    async fn usage(&self) -> Result<Usage>;
}

/// What an agent's heartbeat brings back.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Heard {
    /// The reason of a pending stop request (`AgentStopRequested`).
    pub stop: Option<String>,
    /// The reason the agent is paused (`AgentPaused`, until `AgentResumed`).
    pub pause: Option<String>,
}

/// Every port, as one object that roles share.
pub trait Store:
    EventLog + Feed + WorkQueue + Leases + LeaderLock + Snapshots + Logs + Agents + Capacity
{
}
impl<
        T: EventLog + Feed + WorkQueue + Leases + LeaderLock + Snapshots + Logs + Agents + Capacity,
    > Store for T
{
}

/// Wall-clock milliseconds since the Unix epoch, for envelope timestamps only.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::LogPos;

    #[test]
    fn log_positions_order_numerically() {
        let p = |s: &str| LogPos(s.to_string());
        assert!(p("1700000000000-9") < p("1700000000000-10"));
        assert!(p("999-5") < p("1000-0"));
        assert!(p("5-1") < p("5-2"));
        // the sqlite form
        assert!(p("0-9") < p("0-10"));
        assert!(p("0-99") < p("0-100"));
        assert_eq!(p("5-1").cmp(&p("5-1")), std::cmp::Ordering::Equal);
    }
}
