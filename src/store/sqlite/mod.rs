//! SQLite adapter for every storage port: the embedded store that runs ferry on one machine
//! (`ferry up`, `ferry demo`) with no server to install.
//!
//! **Layout.** One file holds everything (tables in `schema.rs`, also in `proto/README.md`).
//! Every event is one row of `log`: its `pos` is its place in the global log and `(stream,
//! seq)` its place in its stream, so the two orders agree by construction. Queues, leases,
//! locks, dedupe keys and the feed's consumer groups are tables derived inside the same
//! transactions as the events, exactly as the Redis scripts derive their keys (the helpers in
//! `live.rs` mirror `prelude.lua` step by step).
//!
//! **Transactions.** Each operation is one SQLite transaction on one connection per file and
//! process, behind a mutex, run on tokio's blocking pool (`spawn_blocking`): writes use
//! `BEGIN IMMEDIATE` (they take the write lock before reading, so a check and the write that
//! depends on it can never interleave with another writer), reads a deferred transaction (one
//! consistent snapshot). Checks run before writes and a refusal rolls everything back, so
//! every error but [`Error::Unavailable`] means nothing changed.
//!
//! **Store clock.** Lease, lock, heartbeat and dedupe deadlines, queue order and due retries
//! use the wall clock of the process that runs the transaction ([`now_ms`], read once the
//! transaction holds its lock). All processes that share a file run on one machine, so they
//! share that clock; a clock stepped backwards lengthens deadlines by the step.
//!
//! **Positions.** A [`LogPos`] is `0-<pos>` (log) or `0-<id>` (step logs): the `<ms>-<seq>`
//! shape that `LogPos` orders numerically, so `0-9 < 0-10`, and ids are AUTOINCREMENT rowids
//! that are never reused.
//!
//! **Durability.** The journal is WAL with `synchronous = FULL`: a commit returns after the WAL
//! is synced to disk, so anything a port reported done — an accepted webhook above all —
//! survives `kill -9` of the process *and* a power loss or kernel crash. (`NORMAL` would
//! survive a killed process but could lose the last commits on power loss, which would break
//! "nothing accepted is lost".) The price is one fsync per write transaction.
//!
//! **Wake-ups.** `read_new(block)`, `wait_for_work` and `read_logs(block)` subscribe to an
//! in-process signal before they look at the database, and every commit signals what it
//! changed (the log, the pools it made work ready in, the jobs whose output grew), so waiters
//! in this process wake at once and never poll. Opening the same file twice in one process
//! returns handles onto one shared connection and one set of signals (a process-wide registry
//! by canonical path), so waiters wake across handles.
//!
//! **Several processes** may open the same file: SQLite's locks serialise their transactions
//! (a writer waits up to [`BUSY_TIMEOUT`] for another's lock, then the
//! operation fails with [`Error::Unavailable`]), so every guarantee above holds across
//! processes. Only wake-ups differ: a process cannot signal another, so while a waiter is
//! blocked its process checks `PRAGMA data_version` every [`OTHER_PROCESS_POLL`] and wakes its
//! waiters when another process committed. Writes from another process are therefore seen by
//! blocked waiters within about that interval instead of at once. Every transaction also
//! compares `data_version`, so no change is missed between two checks.
//!
//! **Opening** never reinitialises a file: a file that is not a SQLite database, a damaged
//! database, another application's database or a newer ferry's fails with an error naming the
//! path (see [`SqliteStore::open`]).

mod live;
mod schema;
mod signal;

pub use schema::{APPLICATION_ID, BUSY_TIMEOUT, SCHEMA_VERSION};

use crate::store::validate::{
    check_append, check_name, check_nonempty, check_pools, ms, positive_ms,
};
use crate::store::{
    effects_of, misplaced, now_ms, queued_at, Agents, Append, Appended, Capacity, Claim, Effect,
    Error, EventLog, Expected, Feed, Fence, Heard, LeaderLock, Lease, Leases, Listing, LogPos,
    Logs, Order, QueueDepths, Queued, Result, Snapshots, Stored, StreamCursor, StreamId, Trimmed,
    Usage, Version, WorkQueue, LOG_MAX_LINES,
};
use async_trait::async_trait;
use ferry_proto::{
    AgentId, AgentLost, Event, FencingToken, JobId, LeaseExpired, StepClaimed, StepId, StepLog,
    StepQueued, StepReleased,
};
use live::{
    parse_job, parse_position, position, sql_ms, stored, Fail, Tx, TxResult, Wake, EVENT_COLUMNS,
};
use rusqlite::{params, Connection, ErrorCode, OptionalExtension, TransactionBehavior};
use signal::Signals;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// How often a process with blocked waiters checks whether *another* process wrote to the
/// file. Writes from this process wake waiters at once and are never polled for.
pub const OTHER_PROCESS_POLL: Duration = Duration::from_millis(100);

/// Lines a job's log may grow past [`LOG_MAX_LINES`] before the oldest are trimmed (trimming is
/// lazy, like Redis's `MAXLEN ~`).
const LOG_TRIM_SLACK: i64 = 1_000;

/// The SQLite store. Cheap to clone; clones, and every other handle opened on the same file in
/// this process, share one connection and one set of wake-up signals.
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.shared.path)
            .finish_non_exhaustive()
    }
}

/// Everything the handles on one file share.
struct Shared {
    /// The canonical path of the file (also the registry key).
    path: PathBuf,
    /// The one connection; each operation holds it for one transaction.
    conn: Mutex<Connection>,
    /// `PRAGMA data_version` as last seen by this connection: a different value means another
    /// process committed since, and every waiter must look again.
    data_version: AtomicI64,
    /// Feed readers (`read_new` with a block time).
    log: Signals<()>,
    /// `wait_for_work`, by pool.
    work: Signals<String>,
    /// `read_logs` followers, by job.
    lines: Signals<JobId>,
    /// Blocked waiters right now; the other-process watcher runs while there are any.
    waiters: AtomicUsize,
    /// Whether the other-process watcher task is running.
    watching: Mutex<bool>,
}

/// Open files of this process, by canonical path. Weak: the last handle's drop closes the file.
static OPEN: LazyLock<Mutex<HashMap<PathBuf, Weak<Shared>>>> =
    LazyLock::new(|| Mutex::new(HashMap::new()));

impl SqliteStore {
    /// Opens the ferry database at `path`, creating the file (and its parent directories) if
    /// missing. Blocking: it opens the file and, for a new one, creates the schema.
    ///
    /// Within one process, every `open` of the same file (by canonical path) while a handle is
    /// alive returns a handle onto the same connection.
    ///
    /// A file that is not a SQLite database, or a damaged one, fails with [`Error::Corrupt`];
    /// another application's SQLite database or one written by a newer ferry with
    /// [`Error::Invalid`]; I/O and permission problems with [`Error::Unavailable`]. Each names
    /// the path and what was wrong, and ferry writes nothing to such a file. (A zero-length file
    /// is an empty database, and becomes a ferry database.)
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let key = canonical(path)?;
        let mut open = OPEN.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(shared) = open.get(&key).and_then(Weak::upgrade) {
            return Ok(SqliteStore { shared });
        }
        open.retain(|_, w| w.strong_count() > 0);
        let shared = Arc::new(Shared::new(key.clone(), schema::open(&key)?));
        open.insert(key, Arc::downgrade(&shared));
        Ok(SqliteStore { shared })
    }

    /// Opens `path` with a connection of its own, shared with no other handle: it behaves as a
    /// handle in another process would (SQLite locking between connections, other-process
    /// wake-ups by polling). For tests and tools that need that; roles use [`open`](Self::open).
    pub fn open_separate(path: &Path) -> Result<SqliteStore> {
        let key = canonical(path)?;
        let conn = schema::open(&key)?;
        Ok(SqliteStore {
            shared: Arc::new(Shared::new(key, conn)),
        })
    }

    /// The canonical path of the database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// Runs `f` in one write transaction (`BEGIN IMMEDIATE`) on the blocking pool, commits, then
    /// wakes what the transaction changed.
    async fn write<T, F>(&self, what: String, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> TxResult<T> + Send + 'static,
    {
        self.transaction(what, TransactionBehavior::Immediate, f)
            .await
    }

    /// Runs `f` in one read transaction (a consistent snapshot) on the blocking pool.
    async fn read<T, F>(&self, what: String, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> TxResult<T> + Send + 'static,
    {
        self.transaction(what, TransactionBehavior::Deferred, f)
            .await
    }

    async fn transaction<T, F>(
        &self,
        what: String,
        behavior: TransactionBehavior,
        f: F,
    ) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> TxResult<T> + Send + 'static,
    {
        let shared = self.shared.clone();
        let task = what.clone();
        tokio::task::spawn_blocking(move || shared.run(&what, behavior, f))
            .await
            .unwrap_or_else(|e| Err(Error::Unavailable(format!("{task}: {e}"))))
    }

    /// Registers a blocked waiter until the guard drops, and makes sure the other-process
    /// watcher runs meanwhile.
    fn waiting(&self) -> Waiting {
        let shared = &self.shared;
        shared.waiters.fetch_add(1, Ordering::SeqCst);
        let mut watching = shared
            .watching
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !*watching {
            *watching = true;
            tokio::spawn(watch_other_processes(Arc::downgrade(shared)));
        }
        Waiting(shared.clone())
    }
}

/// A blocked waiter, counted while it lives.
struct Waiting(Arc<Shared>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::SeqCst);
    }
}

/// While this process has blocked waiters, checks every [`OTHER_PROCESS_POLL`] whether another
/// process committed, and wakes them if so. Ends when nobody waits or every handle is gone.
async fn watch_other_processes(shared: Weak<Shared>) {
    loop {
        tokio::time::sleep(OTHER_PROCESS_POLL).await;
        let Some(s) = shared.upgrade() else { return };
        {
            let mut watching = s.watching.lock().unwrap_or_else(PoisonError::into_inner);
            if s.waiters.load(Ordering::SeqCst) == 0 {
                *watching = false;
                return;
            }
        }
        // `run` compares data_version and wakes everyone when it changed.
        let check = s.clone();
        let _ = tokio::task::spawn_blocking(move || {
            check.run(
                "check for other processes' writes",
                TransactionBehavior::Deferred,
                |_| Ok(()),
            )
        })
        .await;
    }
}

impl Shared {
    fn new(path: PathBuf, conn: Connection) -> Shared {
        let version = data_version(&conn).unwrap_or(0);
        Shared {
            path,
            conn: Mutex::new(conn),
            data_version: AtomicI64::new(version),
            log: Signals::new(),
            work: Signals::new(),
            lines: Signals::new(),
            waiters: AtomicUsize::new(0),
            watching: Mutex::new(false),
        }
    }

    /// One transaction: begin, check for other processes' writes, run `f`, commit (or roll back
    /// on any failure), then wake.
    fn run<T>(
        &self,
        what: &str,
        behavior: TransactionBehavior,
        f: impl FnOnce(&mut Tx<'_>) -> TxResult<T>,
    ) -> Result<T> {
        let (others_wrote, wake, result) = {
            let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
            let tx = conn
                .transaction_with_behavior(behavior)
                .map_err(|e| self.sql_error(what, e))?;
            let version = data_version(&tx).map_err(|e| self.sql_error(what, e))?;
            let others_wrote = self.data_version.swap(version, Ordering::SeqCst) != version;
            let mut t = Tx {
                tx,
                now: now_ms(),
                wake: Wake::default(),
            };
            let out = f(&mut t);
            let Tx { tx, wake, .. } = t;
            let result = match out {
                Ok(v) => tx.commit().map(|()| v).map_err(|e| self.sql_error(what, e)),
                Err(fail) => {
                    drop(tx); // rolls back
                    match fail {
                        Fail::Store(e) => Err(e),
                        Fail::Sql(e) => Err(self.sql_error(what, e)),
                    }
                }
            };
            (others_wrote, wake, result)
        };
        if others_wrote {
            self.log.notify_all();
            self.work.notify_all();
            self.lines.notify_all();
        }
        if result.is_ok() {
            if wake.log {
                self.log.notify(&());
            }
            for pool in &wake.pools {
                self.work.notify(pool);
            }
            for job in &wake.lines {
                self.lines.notify(job);
            }
        }
        result
    }

    /// An SQLite error during `what`: damage and unreadable values are [`Error::Corrupt`];
    /// everything else (I/O, a lock held too long by another process, a full disk) is
    /// [`Error::Unavailable`].
    fn sql_error(&self, what: &str, e: rusqlite::Error) -> Error {
        let at = self.path.display();
        let corrupt = matches!(
            e.sqlite_error_code(),
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase)
        ) || matches!(
            e,
            rusqlite::Error::FromSqlConversionFailure(..)
                | rusqlite::Error::IntegralValueOutOfRange(..)
                | rusqlite::Error::InvalidColumnType(..)
        );
        if corrupt {
            Error::Corrupt(format!("sqlite store {at}: {what}: {e}"))
        } else {
            Error::Unavailable(format!("sqlite store {at}: {what}: {e}"))
        }
    }
}

fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))
}

/// The registry key of `path`: its canonical form, creating its parent directories. A file that
/// does not exist yet is named by its canonical directory and its file name.
fn canonical(path: &Path) -> Result<PathBuf> {
    let shown = path.display();
    let name = path.file_name().ok_or_else(|| {
        Error::Invalid(format!("sqlite store path {shown:?} does not name a file"))
    })?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Unavailable(format!(
            "sqlite store {shown}: cannot create directory {}: {e}",
            dir.display()
        ))
    })?;
    let dir = dir.canonicalize().map_err(|e| {
        Error::Unavailable(format!(
            "sqlite store {shown}: cannot resolve directory {}: {e}",
            dir.display()
        ))
    })?;
    let full = dir.join(name);
    Ok(full.canonicalize().unwrap_or(full))
}

/// Reads rows of [`EVENT_COLUMNS`] from a prepared query.
fn events(
    stmt: &mut rusqlite::CachedStatement<'_>,
    params: impl rusqlite::Params,
) -> TxResult<Vec<Stored>> {
    Ok(stmt
        .query_map(params, stored)?
        .collect::<rusqlite::Result<Vec<_>>>()?)
}

fn stale(step: &StepId, token: FencingToken, reason: String) -> Fail {
    Fail::Store(Error::Stale {
        step: step.clone(),
        token,
        reason,
    })
}

fn no_group(group: &str) -> Fail {
    Fail::Store(Error::Invalid(format!(
        "consumer group {group} does not exist (ensure_group creates it)"
    )))
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// An append's effect, checked and reduced to what the transaction needs.
enum Planned {
    None,
    Enqueue {
        step: String,
        attempt: u32,
        pool: String,
        priority: i32,
    },
    Schedule {
        step: String,
        attempt: u32,
        pool: String,
        priority: i32,
        due_ms: u64,
    },
    Finish {
        step: String,
    },
    Clear,
    DropLogs,
    Index {
        keys: Vec<String>,
    },
    Leave {
        agent: String,
    },
    Join {
        agent: String,
    },
    RequestStop {
        agent: String,
        reason: String,
    },
    Pause {
        agent: String,
        reason: String,
    },
    Resume {
        agent: String,
    },
}

/// Checks an event's effect the way every backend must (names, index keys) and whether the
/// stream may carry it.
fn plan(event: &Event, stream: &StreamId) -> Result<Planned> {
    let Some(effect) = effects_of(event) else {
        return Ok(Planned::None);
    };
    if let Some(why) = misplaced(&effect, event, stream) {
        return Err(Error::Invalid(why));
    }
    Ok(match effect {
        Effect::Enqueue {
            step,
            attempt,
            pool,
            priority,
        } => {
            check_name("step", step.as_str())?;
            check_name("pool", &pool)?;
            Planned::Enqueue {
                step: step.0,
                attempt,
                pool,
                priority,
            }
        }
        Effect::Schedule {
            step,
            attempt,
            pool,
            priority,
            due_ms,
        } => {
            check_name("step", step.as_str())?;
            check_name("pool", &pool)?;
            Planned::Schedule {
                step: step.0,
                attempt,
                pool,
                priority,
                due_ms,
            }
        }
        Effect::Finish { step } => {
            check_name("step", step.as_str())?;
            Planned::Finish { step: step.0 }
        }
        Effect::ClearJob => Planned::Clear,
        Effect::DropLogs => Planned::DropLogs,
        Effect::Leave { agent } => {
            check_name("agent", agent.as_str())?;
            Planned::Leave { agent: agent.0 }
        }
        Effect::Join { agent } => {
            check_name("agent", agent.as_str())?;
            Planned::Join { agent: agent.0 }
        }
        Effect::RequestStop { agent, reason } => {
            check_name("agent", agent.as_str())?;
            Planned::RequestStop {
                agent: agent.0,
                reason,
            }
        }
        Effect::Pause { agent, reason } => {
            check_name("agent", agent.as_str())?;
            Planned::Pause {
                agent: agent.0,
                reason,
            }
        }
        Effect::Resume { agent } => {
            check_name("agent", agent.as_str())?;
            Planned::Resume { agent: agent.0 }
        }
        Effect::Index { keys } => {
            for key in &keys {
                check_nonempty("index key", key)?;
                if key.contains('\n') {
                    return Err(Error::Invalid(format!(
                        "index key {key:?} contains a newline"
                    )));
                }
            }
            Planned::Index { keys }
        }
    })
}

#[async_trait]
impl EventLog for SqliteStore {
    async fn append(&self, a: Append) -> Result<Appended> {
        let window = check_append(&a)?;
        let name = a.stream.name();
        let job = a.stream.job().map(|j| j.to_string());
        let mut events = Vec::with_capacity(a.events.len());
        for event in &a.events {
            let planned = plan(event, &a.stream)?;
            events.push((
                event.kind(),
                event.version(),
                event.encode_payload(),
                planned,
            ));
        }
        let Append {
            expected,
            fence,
            dedupe,
            forget,
            at_ms,
            ..
        } = a;

        self.write(format!("append to {name}"), move |tx| {
            // Checks, in the order of the Redis script: dedupe, version, fence.
            for key in &dedupe {
                let original: Option<String> = tx
                    .tx
                    .prepare_cached("SELECT pos FROM dedupe WHERE name = ?1 AND expires_ms > ?2")?
                    .query_row(params![key, tx.now_sql()], |r| r.get(0))
                    .optional()?;
                if let Some(original) = original {
                    return Ok(Appended::Duplicate {
                        original: LogPos(original),
                    });
                }
            }
            let len = tx.version(&name)?;
            if let Expected::Exactly(v) = expected {
                if v != len {
                    return Err(Fail::Store(Error::Conflict {
                        stream: name,
                        expected: v,
                        actual: len,
                    }));
                }
            }
            let job = job.as_deref().unwrap_or("");
            let token = match &fence {
                Some(f) => {
                    if let Err(reason) = tx.check_lease(job, f.step.as_str(), f.token.0)? {
                        return Err(stale(&f.step, f.token, reason));
                    }
                    Some(f.token.0)
                }
                None => None,
            };

            if !job.is_empty() && len == 0 {
                tx.tx
                    .prepare_cached("INSERT OR IGNORE INTO jobs (job, created_ms) VALUES (?1, ?2)")?
                    .execute(params![job, tx.now_sql()])?;
            }
            let mut positions = Vec::with_capacity(events.len());
            for (i, (kind, version, payload, planned)) in events.into_iter().enumerate() {
                let seq = len + 1 + i as u64;
                let pos = tx.insert_event(&name, seq, kind, version, at_ms, token, &payload)?;
                positions.push(pos);
                match planned {
                    Planned::None => {}
                    Planned::Enqueue {
                        step,
                        attempt,
                        pool,
                        priority,
                    } => tx.enqueue(job, &step, attempt, &pool, priority)?,
                    Planned::Schedule {
                        step,
                        attempt,
                        pool,
                        priority,
                        due_ms,
                    } => tx.schedule(job, &step, attempt, &pool, priority, due_ms)?,
                    Planned::Finish { step } => {
                        tx.drop_lease(job, &step)?;
                        tx.unqueue(job, &step)?;
                    }
                    Planned::Clear => tx.clear_job(job, at_ms)?,
                    Planned::DropLogs => tx.drop_logs(job)?,
                    Planned::Index { keys } => tx.index(job, &keys)?,
                    Planned::Leave { agent } => {
                        tx.tx
                            .prepare_cached("DELETE FROM agents WHERE name = ?1")?
                            .execute([&agent])?;
                        tx.tx
                            .prepare_cached("DELETE FROM agent_stops WHERE name = ?1")?
                            .execute([&agent])?;
                    }
                    Planned::Join { agent } => {
                        tx.tx
                            .prepare_cached("DELETE FROM agent_stops WHERE name = ?1")?
                            .execute([agent])?;
                    }
                    Planned::RequestStop { agent, reason } => {
                        tx.tx
                            .prepare_cached(
                                "INSERT OR REPLACE INTO agent_stops (name, reason) VALUES (?1, ?2)",
                            )?
                            .execute([agent, reason])?;
                    }
                    Planned::Pause { agent, reason } => {
                        tx.tx
                            .prepare_cached(
                                "INSERT OR REPLACE INTO agent_pauses (name, reason) VALUES (?1, ?2)",
                            )?
                            .execute([agent, reason])?;
                    }
                    Planned::Resume { agent } => {
                        tx.tx
                            .prepare_cached("DELETE FROM agent_pauses WHERE name = ?1")?
                            .execute([agent])?;
                    }
                }
            }

            if !dedupe.is_empty() {
                let now = tx.now_sql();
                tx.tx
                    .prepare_cached("DELETE FROM dedupe WHERE expires_ms <= ?1")?
                    .execute([now])?;
                let first = position(positions[0]).0;
                let expires = tx.after(window);
                let mut stmt = tx.tx.prepare_cached(
                    "INSERT OR REPLACE INTO dedupe (name, pos, expires_ms) VALUES (?1, ?2, ?3)",
                )?;
                for key in &dedupe {
                    stmt.execute(params![key, first, expires])?;
                }
            }
            if !forget.is_empty() {
                let mut stmt = tx
                    .tx
                    .prepare_cached("DELETE FROM dedupe WHERE name = ?1")?;
                for key in &forget {
                    stmt.execute([key])?;
                }
            }
            Ok(Appended::Written {
                version: len + positions.len() as u64,
                positions: positions.into_iter().map(position).collect(),
            })
        })
        .await
    }

    async fn read_stream(&self, stream: &StreamId, from: Version) -> Result<Vec<Stored>> {
        let name = stream.name();
        let from = i64::try_from(from).unwrap_or(i64::MAX);
        self.read(format!("read {name}"), move |tx| {
            let sql = format!(
                "SELECT {EVENT_COLUMNS} FROM log WHERE stream = ?1 AND seq > ?2 ORDER BY seq"
            );
            events(&mut tx.tx.prepare_cached(&sql)?, params![name, from])
        })
        .await
    }

    async fn read_stream_page(
        &self,
        stream: &StreamId,
        after: Option<&StreamCursor>,
        count: usize,
    ) -> Result<(Vec<Stored>, Option<StreamCursor>)> {
        if count == 0 {
            return Ok((Vec::new(), after.cloned()));
        }
        // the cursor is the last event's place in the stream
        let from: i64 = match after {
            None => 0,
            Some(c) => c.0.parse().map_err(|_| {
                Error::Invalid(format!(
                    "stream cursor {:?} was not issued by this store",
                    c.0
                ))
            })?,
        };
        let name = stream.name();
        let page = self
            .read(format!("read {name}"), move |tx| {
                let sql = format!(
                    "SELECT {EVENT_COLUMNS} FROM log WHERE stream = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3"
                );
                events(
                    &mut tx.tx.prepare_cached(&sql)?,
                    params![name, from, limit(count)],
                )
            })
            .await?;
        let next = page
            .last()
            .filter(|_| page.len() == count)
            .and_then(|e| e.seq)
            .map(|seq| StreamCursor(seq.to_string()));
        Ok((page, next))
    }

    async fn log_end(&self) -> Result<Option<LogPos>> {
        self.read("read the end of the log".into(), |tx| {
            let last: Option<i64> = tx
                .tx
                .prepare_cached("SELECT MAX(pos) FROM log")?
                .query_row([], |r| r.get(0))?;
            Ok(last.map(position))
        })
        .await
    }

    async fn log_complete_from(&self) -> Result<Option<LogPos>> {
        Ok(None)
    }

    async fn read_log(&self, after: Option<&LogPos>, count: usize) -> Result<Vec<Stored>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let after = after.map(parse_position).transpose()?.unwrap_or(0);
        self.read("read the log".into(), move |tx| {
            let sql =
                format!("SELECT {EVENT_COLUMNS} FROM log WHERE pos > ?1 ORDER BY pos LIMIT ?2");
            events(
                &mut tx.tx.prepare_cached(&sql)?,
                params![after, limit(count)],
            )
        })
        .await
    }

    async fn jobs(&self, after: Option<JobId>, limit_: usize, order: Order) -> Result<Vec<JobId>> {
        if limit_ == 0 {
            return Ok(Vec::new());
        }
        self.read("list jobs".into(), move |tx| {
            // Creation order: store-clock ms, ties by id (as the Redis zset orders members).
            let (ms, from) = match after {
                None if order == Order::Oldest => (i64::MIN, String::new()),
                // every id sorts before "~" (ids are hex digits and dashes)
                None => (i64::MAX, "~".to_string()),
                Some(j) => {
                    let id = j.to_string();
                    let ms: Option<i64> = tx
                        .tx
                        .prepare_cached("SELECT created_ms FROM jobs WHERE job = ?1")?
                        .query_row([&id], |r| r.get(0))
                        .optional()?;
                    let ms = ms.ok_or_else(|| Error::Invalid(format!("unknown job {j}")))?;
                    (ms, id)
                }
            };
            let sql = match order {
                Order::Oldest => {
                    "SELECT job FROM jobs WHERE (created_ms, job) > (?1, ?2) \
                     ORDER BY created_ms, job LIMIT ?3"
                }
                Order::Newest => {
                    "SELECT job FROM jobs WHERE (created_ms, job) < (?1, ?2) \
                     ORDER BY created_ms DESC, job DESC LIMIT ?3"
                }
            };
            let ids: Vec<String> = tx
                .tx
                .prepare_cached(sql)?
                .query_map(params![ms, from, limit(limit_)], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            ids.iter().map(|s| parse_job(s)).collect()
        })
        .await
    }

    async fn indexed(&self, key: &str) -> Result<Vec<JobId>> {
        check_nonempty("index key", key)?;
        let key = key.to_string();
        self.read("read index".into(), move |tx| {
            let ids: Vec<String> = tx
                .tx
                .prepare_cached("SELECT job FROM job_index WHERE name = ?1")?
                .query_map([&key], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let mut jobs = ids
                .iter()
                .map(|s| parse_job(s))
                .collect::<TxResult<Vec<_>>>()?;
            jobs.sort();
            Ok(jobs)
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.read("ping".into(), |tx| {
            tx.tx.query_row("SELECT 1", [], |_| Ok(()))?;
            Ok(())
        })
        .await
    }
}

impl SqliteStore {
    /// Hands up to `count` log entries the group has not seen to `consumer`, pending.
    async fn deliver_new(&self, group: &str, consumer: &str, count: usize) -> Result<Vec<Stored>> {
        let (group, consumer) = (group.to_string(), consumer.to_string());
        self.write(format!("read group {group}"), move |tx| {
            let delivered: i64 = tx
                .tx
                .prepare_cached("SELECT delivered FROM feed_groups WHERE name = ?1")?
                .query_row([&group], |r| r.get(0))
                .optional()?
                .ok_or_else(|| no_group(&group))?;
            let sql = format!("SELECT {EVENT_COLUMNS} FROM log WHERE pos > ?1 ORDER BY pos LIMIT ?2");
            let got = events(&mut tx.tx.prepare_cached(&sql)?, params![delivered, limit(count)])?;
            let Some(last) = got.last() else {
                return Ok(got);
            };
            let last = parse_position(&last.pos)?;
            let mut pend = tx.tx.prepare_cached(
                "INSERT OR REPLACE INTO feed_pending (grp, pos, consumer, delivered_ms, deliveries) \
                 VALUES (?1, ?2, ?3, ?4, 1)",
            )?;
            for e in &got {
                pend.execute(params![group, parse_position(&e.pos)?, consumer, tx.now_sql()])?;
            }
            tx.tx
                .prepare_cached("UPDATE feed_groups SET delivered = ?2 WHERE name = ?1")?
                .execute(params![group, last])?;
            Ok(got)
        })
        .await
    }
}

#[async_trait]
impl Feed for SqliteStore {
    async fn trim_log(&self, _before_ms: u64) -> Result<Trimmed> {
        // The log table is every stream's history too: there is no copy to delete.
        Ok(Trimmed::default())
    }

    async fn ensure_group(&self, group: &str) -> Result<()> {
        check_nonempty("consumer group", group)?;
        let group = group.to_string();
        self.write(format!("create group {group}"), move |tx| {
            tx.tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO feed_groups (name, delivered) VALUES (?1, 0)",
                )?
                .execute([&group])?;
            Ok(())
        })
        .await
    }

    async fn read_new(
        &self,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Stored>> {
        check_nonempty("consumer group", group)?;
        check_nonempty("consumer", consumer)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        if ms(block) == 0 {
            return self.deliver_new(group, consumer, count).await;
        }
        let until = Instant::now() + block;
        let _waiting = self.waiting();
        let mut signal = self.shared.log.subscribe([()]);
        loop {
            let got = self.deliver_new(group, consumer, count).await?;
            if !got.is_empty() || !signal.wait(until).await {
                return Ok(got);
            }
        }
    }

    async fn read_pending(&self, group: &str, consumer: &str, count: usize) -> Result<Vec<Stored>> {
        check_nonempty("consumer group", group)?;
        check_nonempty("consumer", consumer)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let (group, consumer) = (group.to_string(), consumer.to_string());
        self.write(
            format!("read pending of {consumer} in group {group}"),
            move |tx| {
                tx.tx
                    .prepare_cached("SELECT 1 FROM feed_groups WHERE name = ?1")?
                    .query_row([&group], |_| Ok(()))
                    .optional()?
                    .ok_or_else(|| no_group(&group))?;
                let sql = format!(
                    "SELECT {} FROM feed_pending p JOIN log l ON l.pos = p.pos \
                     WHERE p.grp = ?1 AND p.consumer = ?2 ORDER BY p.pos LIMIT ?3",
                    prefixed("l")
                );
                let got = events(
                    &mut tx.tx.prepare_cached(&sql)?,
                    params![group, consumer, limit(count)],
                )?;
                // Reading its own pending entries counts as a delivery, as XREADGROUP 0 does.
                let mut touch = tx.tx.prepare_cached(
                    "UPDATE feed_pending SET delivered_ms = ?3, deliveries = deliveries + 1 \
                     WHERE grp = ?1 AND pos = ?2",
                )?;
                for e in &got {
                    touch.execute(params![group, parse_position(&e.pos)?, tx.now_sql()])?;
                }
                Ok(got)
            },
        )
        .await
    }

    async fn ack(&self, group: &str, positions: &[LogPos]) -> Result<u64> {
        if positions.is_empty() {
            return Ok(0);
        }
        let positions = positions
            .iter()
            .map(parse_position)
            .collect::<Result<Vec<_>>>()?;
        let group = group.to_string();
        self.write(format!("ack in group {group}"), move |tx| {
            let mut stmt = tx
                .tx
                .prepare_cached("DELETE FROM feed_pending WHERE grp = ?1 AND pos = ?2")?;
            let mut acked = 0;
            for p in positions {
                acked += stmt.execute(params![group, p])? as u64;
            }
            Ok(acked)
        })
        .await
    }

    async fn claim_idle(
        &self,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Stored>> {
        check_nonempty("consumer group", group)?;
        check_nonempty("consumer", consumer)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let (group, consumer) = (group.to_string(), consumer.to_string());
        let min_idle = sql_ms(ms(min_idle));
        self.write(format!("claim idle entries in group {group}"), move |tx| {
            tx.tx
                .prepare_cached("SELECT 1 FROM feed_groups WHERE name = ?1")?
                .query_row([&group], |_| Ok(()))
                .optional()?
                .ok_or_else(|| no_group(&group))?;
            // Idle for at least min_idle: delivered at or before now - min_idle.
            let idle_since = tx.now_sql().saturating_sub(min_idle);
            let sql = format!(
                "SELECT {} FROM feed_pending p JOIN log l ON l.pos = p.pos \
                 WHERE p.grp = ?1 AND p.delivered_ms <= ?2 ORDER BY p.pos LIMIT ?3",
                prefixed("l")
            );
            let got = events(
                &mut tx.tx.prepare_cached(&sql)?,
                params![group, idle_since, limit(count)],
            )?;
            let mut take = tx.tx.prepare_cached(
                "UPDATE feed_pending SET consumer = ?3, delivered_ms = ?4, \
                 deliveries = deliveries + 1 WHERE grp = ?1 AND pos = ?2",
            )?;
            for e in &got {
                take.execute(params![
                    group,
                    parse_position(&e.pos)?,
                    consumer,
                    tx.now_sql()
                ])?;
            }
            Ok(got)
        })
        .await
    }
}

/// [`EVENT_COLUMNS`] qualified with a table alias.
fn prefixed(alias: &str) -> String {
    EVENT_COLUMNS
        .split(", ")
        .map(|c| format!("{alias}.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[async_trait]
impl WorkQueue for SqliteStore {
    async fn claim_many(
        &self,
        pools: &[String],
        agent: &AgentId,
        ttl: Duration,
        max: usize,
    ) -> Result<Vec<Claim>> {
        check_pools(pools)?;
        check_nonempty("agent", agent.as_str())?;
        let ttl = positive_ms("lease ttl", ttl)?;
        let (pools, agent) = (pools.to_vec(), agent.clone());
        self.write("claim".into(), move |tx| {
            let mut claims = Vec::new();
            while claims.len() < max {
                match claim_one(tx, &pools, &agent, ttl)? {
                    Some(c) => claims.push(c),
                    None => break,
                }
            }
            Ok(claims)
        })
        .await
    }

    async fn promote_due(&self, max: usize) -> Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        self.write("promote due steps".into(), move |tx| {
            let due: Vec<(String, String, u32, i32, String)> = tx
                .tx
                .prepare_cached(
                    "SELECT job, step, attempt, priority, pool FROM queue \
                     WHERE due_ms IS NOT NULL AND due_ms <= ?1 ORDER BY due_ms, job, step LIMIT ?2",
                )?
                .query_map(params![tx.now_sql(), limit(max)], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            for (job, step, attempt, priority, pool) in &due {
                let job_id = parse_job(job)?;
                tx.enqueue(job, step, *attempt, pool, *priority)?;
                let queued = Event::StepQueued(StepQueued {
                    step: StepId::new(step.as_str()),
                    attempt: *attempt,
                    pool: pool.clone(),
                    priority: *priority,
                });
                tx.emit(&StreamId::Job(job_id).name(), &queued, None)?;
            }
            Ok(due.len())
        })
        .await
    }

    async fn wait_for_work(&self, pools: &[String], timeout: Duration) -> Result<()> {
        check_pools(pools)?;
        if timeout < Duration::from_millis(1) {
            return Ok(());
        }
        let until = Instant::now() + timeout;
        let _waiting = self.waiting();
        let mut signal = self.shared.work.subscribe(pools.iter().cloned());
        // Work that became ready before we subscribed (say, between the caller's empty claim
        // and now) must not wait for the next signal.
        let pools = pools.to_vec();
        let ready = self
            .read("wait for work".into(), move |tx| {
                let mut head = tx.tx.prepare_cached(
                    "SELECT 1 FROM queue WHERE pool = ?1 AND score IS NOT NULL LIMIT 1",
                )?;
                for pool in &pools {
                    if head.query_row([pool], |_| Ok(())).optional()?.is_some() {
                        return Ok(true);
                    }
                }
                Ok(false)
            })
            .await?;
        if !ready {
            signal.wait(until).await;
        }
        Ok(())
    }

    async fn queue_depths(&self, pools: &[String]) -> Result<QueueDepths> {
        if !pools.is_empty() {
            check_pools(pools)?;
        }
        let pools = pools.to_vec();
        self.read("count queued steps".into(), move |tx| {
            let mut stmt = tx.tx.prepare_cached(
                "SELECT count(*), min(score) FROM queue WHERE pool = ?1 AND score IS NOT NULL",
            )?;
            let mut ready = Vec::with_capacity(pools.len());
            for p in &pools {
                let (n, head): (i64, Option<i64>) =
                    stmt.query_row([p], |r| Ok((r.get(0)?, r.get(1)?)))?;
                ready.push((n.max(0) as u64, head.map(|s| queued_at(s as f64))));
            }
            let delayed: i64 = tx.tx.query_row(
                "SELECT count(*) FROM queue WHERE due_ms IS NOT NULL",
                [],
                |r| r.get(0),
            )?;
            Ok(QueueDepths {
                ready,
                delayed: delayed.max(0) as u64,
            })
        })
        .await
    }

    async fn queued(&self) -> Result<Vec<Queued>> {
        self.read("list queues".into(), |tx| {
            let rows: Vec<(String, String, u32, String, i32, Option<i64>)> = tx
                .tx
                .prepare_cached(
                    "SELECT job, step, attempt, pool, priority, due_ms FROM queue ORDER BY job, step",
                )?
                .query_map([], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            rows.into_iter()
                .map(|(job, step, attempt, pool, priority, due)| {
                    Ok(Queued {
                        job: parse_job(&job)?,
                        step: StepId(step),
                        attempt,
                        pool,
                        priority,
                        due_ms: due.map(|d| d as u64),
                    })
                })
                .collect()
        })
        .await
    }
}

#[async_trait]
impl Leases for SqliteStore {
    async fn renew(
        &self,
        job: JobId,
        step: &StepId,
        token: FencingToken,
        ttl: Duration,
    ) -> Result<u64> {
        check_name("step", step.as_str())?;
        let ttl = positive_ms("lease ttl", ttl)?;
        let step = step.clone();
        self.write(format!("renew lease on {job}/{step}"), move |tx| {
            let j = job.to_string();
            if let Err(reason) = tx.check_lease(&j, step.as_str(), token.0)? {
                return Err(stale(&step, token, reason));
            }
            let deadline = tx.after(ttl);
            tx.tx
                .prepare_cached("UPDATE leases SET deadline_ms = ?3 WHERE job = ?1 AND step = ?2")?
                .execute(params![j, step.as_str(), deadline])?;
            Ok(deadline as u64)
        })
        .await
    }

    async fn release(
        &self,
        job: JobId,
        step: &StepId,
        token: FencingToken,
        reason: &str,
    ) -> Result<()> {
        check_name("step", step.as_str())?;
        let (step, reason) = (step.clone(), reason.to_string());
        self.write(format!("release lease on {job}/{step}"), move |tx| {
            let j = job.to_string();
            // A lease that ran out belongs to the sweep.
            if let Err(why) = tx.check_lease(&j, step.as_str(), token.0)? {
                return Err(stale(&step, token, why));
            }
            let (agent, attempt): (String, u32) = tx
                .tx
                .prepare_cached("SELECT agent, attempt FROM leases WHERE job = ?1 AND step = ?2")?
                .query_row([&j, step.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            tx.drop_lease(&j, step.as_str())?;
            let released = Event::StepReleased(StepReleased {
                step: step.clone(),
                attempt,
                agent: AgentId(agent),
                token,
                reason,
            });
            tx.emit(&StreamId::Job(job).name(), &released, Some(token.0))?;
            Ok(())
        })
        .await
    }

    async fn expire_due(&self, max: usize) -> Result<Vec<Lease>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        self.write("expire due leases".into(), move |tx| {
            // A lease is live while deadline >= now; it expires once deadline < now.
            let due = lease_rows(
                tx,
                "WHERE deadline_ms < ?1 ORDER BY deadline_ms, job, step LIMIT ?2",
                params![tx.now_sql(), limit(max)],
            )?;
            for l in &due {
                tx.drop_lease(&l.job.to_string(), l.step.as_str())?;
                let expired = Event::LeaseExpired(LeaseExpired {
                    step: l.step.clone(),
                    attempt: l.attempt,
                    agent: l.agent.clone(),
                    token: l.token,
                });
                tx.emit(&StreamId::Job(l.job).name(), &expired, None)?;
            }
            Ok(due)
        })
        .await
    }

    async fn leases(&self) -> Result<Vec<Lease>> {
        self.read("list leases".into(), |tx| {
            lease_rows(tx, "ORDER BY deadline_ms, job, step", ())
        })
        .await
    }

    async fn raise_fence(&self, at_least: u64) -> Result<u64> {
        let at_least = i64::try_from(at_least)
            .map_err(|_| Error::Invalid(format!("fencing token {at_least} is too large")))?;
        self.write("raise the fencing token counter".into(), move |tx| {
            let last: i64 = tx
                .tx
                .prepare_cached(
                    "UPDATE fence SET last = MAX(last, ?1) WHERE id = 1 RETURNING last",
                )?
                .query_row([at_least], |r| r.get(0))?;
            Ok(last as u64)
        })
        .await
    }
}

/// Leases selected by `filter` (a WHERE / ORDER BY / LIMIT tail).
fn lease_rows(tx: &Tx<'_>, filter: &str, params: impl rusqlite::Params) -> TxResult<Vec<Lease>> {
    let sql = format!("SELECT job, step, attempt, agent, token, deadline_ms FROM leases {filter}");
    let rows: Vec<(String, String, u32, String, i64, i64)> = tx
        .tx
        .prepare_cached(&sql)?
        .query_map(params, |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })?
        .collect::<rusqlite::Result<_>>()?;
    rows.into_iter()
        .map(|(job, step, attempt, agent, token, deadline)| {
            Ok(Lease {
                job: parse_job(&job)?,
                step: StepId(step),
                attempt,
                agent: AgentId(agent),
                token: FencingToken(token as u64),
                deadline_ms: deadline as u64,
            })
        })
        .collect()
}

#[async_trait]
impl LeaderLock for SqliteStore {
    async fn lock_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<FencingToken>> {
        check_name("lock", name)?;
        check_nonempty("lock holder", holder)?;
        let ttl = positive_ms("lock ttl", ttl)?;
        let (name, holder) = (name.to_string(), holder.to_string());
        self.write(format!("acquire lock {name}"), move |tx| {
            // A lock is held while now < expires_ms.
            let held = tx
                .tx
                .prepare_cached("SELECT 1 FROM locks WHERE name = ?1 AND expires_ms > ?2")?
                .query_row(params![name, tx.now_sql()], |_| Ok(()))
                .optional()?;
            if held.is_some() {
                return Ok(None);
            }
            let token = tx.next_token()?;
            tx.tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO locks (name, holder, token, expires_ms) \
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![name, holder, token as i64, tx.after(ttl)])?;
            Ok(Some(FencingToken(token)))
        })
        .await
    }

    async fn lock_renew(
        &self,
        name: &str,
        holder: &str,
        token: FencingToken,
        ttl: Duration,
    ) -> Result<bool> {
        check_name("lock", name)?;
        let ttl = positive_ms("lock ttl", ttl)?;
        let (name, holder) = (name.to_string(), holder.to_string());
        self.write(format!("renew lock {name}"), move |tx| {
            let n = tx
                .tx
                .prepare_cached(
                    "UPDATE locks SET expires_ms = ?4 \
                     WHERE name = ?1 AND holder = ?2 AND token = ?3 AND expires_ms > ?5",
                )?
                .execute(params![
                    name,
                    holder,
                    token.0 as i64,
                    tx.after(ttl),
                    tx.now_sql()
                ])?;
            Ok(n == 1)
        })
        .await
    }

    async fn lock_release(&self, name: &str, holder: &str, token: FencingToken) -> Result<bool> {
        check_name("lock", name)?;
        let (name, holder) = (name.to_string(), holder.to_string());
        self.write(format!("release lock {name}"), move |tx| {
            let n = tx
                .tx
                .prepare_cached(
                    "DELETE FROM locks \
                     WHERE name = ?1 AND holder = ?2 AND token = ?3 AND expires_ms > ?4",
                )?
                .execute(params![name, holder, token.0 as i64, tx.now_sql()])?;
            Ok(n == 1)
        })
        .await
    }
}

#[async_trait]
impl Snapshots for SqliteStore {
    async fn put_snapshot(&self, name: &str, bytes: &[u8]) -> Result<()> {
        check_nonempty("snapshot name", name)?;
        let (name, bytes) = (name.to_string(), bytes.to_vec());
        self.write(format!("write snapshot {name}"), move |tx| {
            tx.tx
                .prepare_cached("INSERT OR REPLACE INTO snapshots (name, bytes) VALUES (?1, ?2)")?
                .execute(params![name, bytes])?;
            Ok(())
        })
        .await
    }

    async fn get_snapshot(&self, name: &str) -> Result<Option<Vec<u8>>> {
        check_nonempty("snapshot name", name)?;
        let name = name.to_string();
        self.read(format!("read snapshot {name}"), move |tx| {
            Ok(tx
                .tx
                .prepare_cached("SELECT bytes FROM snapshots WHERE name = ?1")?
                .query_row([&name], |r| r.get(0))
                .optional()?)
        })
        .await
    }
}

#[async_trait]
impl Capacity for SqliteStore {
    async fn usage(&self) -> Result<Usage> {
        self.read("read the database's size".to_string(), move |tx| {
            let pages: i64 = tx.tx.query_row("PRAGMA page_count", [], |r| r.get(0))?;
            let size: i64 = tx.tx.query_row("PRAGMA page_size", [], |r| r.get(0))?;
            Ok(Usage {
                used_bytes: (pages.max(0) as u64).saturating_mul(size.max(0) as u64),
                limit_bytes: None,
            })
        })
        .await
    }
}

#[async_trait]
impl Logs for SqliteStore {
    async fn append_logs(&self, job: JobId, fence: &Fence, lines: &[StepLog]) -> Result<()> {
        check_name("step", fence.step.as_str())?;
        if lines.is_empty() {
            return Ok(());
        }
        let payloads = encode_lines(lines);
        let fence = fence.clone();
        self.write(format!("append logs of {job}/{}", fence.step), move |tx| {
            let j = job.to_string();
            if let Err(reason) = tx.check_lease(&j, fence.step.as_str(), fence.token.0)? {
                return Err(stale(&fence.step, fence.token, reason));
            }
            insert_log_lines(tx, job, &payloads)
        })
        .await
    }

    async fn import_logs(&self, job: JobId, lines: &[StepLog]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let payloads = encode_lines(lines);
        self.write(format!("import logs of {job}"), move |tx| {
            insert_log_lines(tx, job, &payloads)
        })
        .await
    }

    async fn read_logs(
        &self,
        job: JobId,
        after: Option<&LogPos>,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(LogPos, StepLog)>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let after = after.map(parse_position).transpose()?.unwrap_or(0);
        if ms(block) == 0 {
            return self.log_lines(job, after, count).await;
        }
        let until = Instant::now() + block;
        let _waiting = self.waiting();
        let mut signal = self.shared.lines.subscribe([job]);
        loop {
            let got = self.log_lines(job, after, count).await?;
            if !got.is_empty() || !signal.wait(until).await {
                return Ok(got);
            }
        }
    }

    async fn logs_to_expire(&self, ended_before_ms: u64, max: usize) -> Result<Vec<(JobId, u64)>> {
        if max == 0 || ended_before_ms == 0 {
            return Ok(Vec::new());
        }
        let before = sql_ms(ended_before_ms);
        self.read(
            "list ended jobs whose logs are kept".to_string(),
            move |tx| {
                let rows: Vec<(String, i64)> = tx
                    .tx
                    .prepare_cached(
                        "SELECT job, ended_ms FROM kept_logs WHERE ended_ms < ?1 \
                     ORDER BY ended_ms, job LIMIT ?2",
                    )?
                    .query_map(params![before, limit(max)], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<_>>()?;
                rows.into_iter()
                    .map(|(job, at)| {
                        let job = job.parse().map_err(|_| {
                            Fail::Store(Error::Corrupt(format!("kept_logs holds job id {job:?}")))
                        })?;
                        Ok((job, at.max(0) as u64))
                    })
                    .collect()
            },
        )
        .await
    }

    async fn list_ended_unlisted(&self, _after: Option<JobId>, _max: usize) -> Result<Listing> {
        // The upgrade to schema version 2 listed every job that had ended.
        Ok(Listing::default())
    }
}

/// Output lines as stored: rmp named `StepLog`.
fn encode_lines(lines: &[StepLog]) -> Vec<Vec<u8>> {
    lines
        .iter()
        .map(|l| rmp_serde::to_vec_named(l).expect("a log line always encodes"))
        .collect()
}

/// Adds output lines to `job`'s log, trimming it lazily to about [`LOG_MAX_LINES`], and wakes
/// its followers.
fn insert_log_lines(tx: &mut Tx<'_>, job: JobId, payloads: &[Vec<u8>]) -> TxResult<()> {
    let j = job.to_string();
    {
        let mut insert = tx
            .tx
            .prepare_cached("INSERT INTO logs (job, payload) VALUES (?1, ?2)")?;
        for p in payloads {
            insert.execute(params![j, p])?;
        }
    }
    let kept: i64 = tx
        .tx
        .prepare_cached(
            "INSERT INTO log_lines (job, kept) VALUES (?1, ?2) \
             ON CONFLICT (job) DO UPDATE SET kept = kept + ?2 RETURNING kept",
        )?
        .query_row(params![j, payloads.len() as i64], |r| r.get(0))?;
    let max = LOG_MAX_LINES as i64;
    if kept > max + LOG_TRIM_SLACK {
        tx.tx
            .prepare_cached(
                "DELETE FROM logs WHERE job = ?1 AND id IN \
                 (SELECT id FROM logs WHERE job = ?1 ORDER BY id LIMIT ?2)",
            )?
            .execute(params![j, kept - max])?;
        tx.tx
            .prepare_cached("UPDATE log_lines SET kept = ?2 WHERE job = ?1")?
            .execute(params![j, max])?;
    }
    tx.wake.lines.insert(job);
    Ok(())
}

impl SqliteStore {
    async fn log_lines(
        &self,
        job: JobId,
        after: i64,
        count: usize,
    ) -> Result<Vec<(LogPos, StepLog)>> {
        self.read(format!("read logs of job {job}"), move |tx| {
            let rows: Vec<(i64, Vec<u8>)> = tx
                .tx
                .prepare_cached(
                    "SELECT id, payload FROM logs WHERE job = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
                )?
                .query_map(params![job.to_string(), after, limit(count)], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?
                .collect::<rusqlite::Result<_>>()?;
            rows.into_iter()
                .map(|(id, payload)| {
                    let line = rmp_serde::from_slice(&payload)
                        .map_err(|e| Error::Corrupt(format!("log line {id} of job {job}: {e}")))?;
                    Ok((position(id), line))
                })
                .collect()
        })
        .await
    }
}

#[async_trait]
impl Agents for SqliteStore {
    async fn heartbeat(&self, agent: &AgentId, ttl: Duration) -> Result<Heard> {
        check_nonempty("agent", agent.as_str())?;
        let ttl = positive_ms("heartbeat ttl", ttl)?;
        let agent = agent.clone();
        self.write(format!("heartbeat of agent {agent}"), move |tx| {
            tx.tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO agents (name, deadline_ms) VALUES (?1, ?2)",
                )?
                .execute(params![agent.as_str(), tx.after(ttl)])?;
            let reason = |table: &str| -> rusqlite::Result<Option<String>> {
                tx.tx
                    .prepare_cached(&format!("SELECT reason FROM {table} WHERE name = ?1"))?
                    .query_row([agent.as_str()], |r| r.get(0))
                    .optional()
            };
            Ok(Heard {
                stop: reason("agent_stops")?,
                pause: reason("agent_pauses")?,
            })
        })
        .await
    }

    async fn live_agents(&self) -> Result<Vec<(AgentId, u64)>> {
        self.read("list live agents".into(), |tx| {
            let rows: Vec<(String, i64)> = tx
                .tx
                .prepare_cached(
                    "SELECT name, deadline_ms FROM agents WHERE deadline_ms >= ?1 \
                     ORDER BY deadline_ms, name",
                )?
                .query_map([tx.now_sql()], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(rows
                .into_iter()
                .map(|(a, d)| (AgentId(a), d as u64))
                .collect())
        })
        .await
    }

    async fn expire_agents(&self, max: usize) -> Result<Vec<AgentId>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        self.write("expire lost agents".into(), move |tx| {
            // Lost once deadline < now; live_agents counts deadline >= now as live.
            let due: Vec<String> = tx
                .tx
                .prepare_cached(
                    "SELECT name FROM agents WHERE deadline_ms < ?1 \
                     ORDER BY deadline_ms, name LIMIT ?2",
                )?
                .query_map(params![tx.now_sql(), limit(max)], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            let stream = StreamId::Agents.name();
            for name in &due {
                tx.tx
                    .prepare_cached("DELETE FROM agents WHERE name = ?1")?
                    .execute([name])?;
                let lost = Event::AgentLost(AgentLost {
                    agent: AgentId(name.clone()),
                    reason: "heartbeat expired".into(),
                });
                tx.emit(&stream, &lost, None)?;
            }
            Ok(due.into_iter().map(AgentId).collect())
        })
        .await
    }
}

/// Claims the best ready step over `pools` for `agent` inside `tx` (see `claim_many`).
fn claim_one(
    tx: &mut Tx<'_>,
    pools: &[String],
    agent: &AgentId,
    ttl: u64,
) -> TxResult<Option<Claim>> {
    // The lowest (score, member) head across the pools: priority, then enqueue time,
    // ties by `<job>/<step>`.
    let mut best: Option<(i64, String, String, String, u32, String)> = None;
    {
        let mut head = tx.tx.prepare_cached(
            "SELECT score, job, step, attempt FROM queue \
                 WHERE pool = ?1 AND score IS NOT NULL ORDER BY score, job, step LIMIT 1",
        )?;
        for pool in pools {
            let row: Option<(i64, String, String, u32)> = head
                .query_row([pool], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
                .optional()?;
            if let Some((score, job, step, attempt)) = row {
                let member = format!("{job}/{step}");
                let better = match &best {
                    None => true,
                    Some((s, m, ..)) => (score, &member) < (*s, m),
                };
                if better {
                    best = Some((score, member, job, step, attempt, pool.clone()));
                }
            }
        }
    }
    let Some((_, _, job, step, attempt, pool)) = best else {
        return Ok(None);
    };
    let job_id = parse_job(&job)?;
    tx.unqueue(&job, &step)?;
    let token = tx.next_token()?;
    let deadline = tx.after(ttl);
    tx.tx
        .prepare_cached(
            "INSERT OR REPLACE INTO leases \
                 (job, step, token, agent, attempt, deadline_ms, pool) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            job,
            step,
            token as i64,
            agent.as_str(),
            attempt,
            deadline,
            pool
        ])?;
    let claimed = Event::StepClaimed(StepClaimed {
        step: StepId::new(step.as_str()),
        attempt,
        agent: agent.clone(),
        token: FencingToken(token),
        lease_ttl_ms: ttl,
    });
    let stream = StreamId::Job(job_id).name();
    tx.emit(&stream, &claimed, Some(token))?;
    let sql = format!("SELECT {EVENT_COLUMNS} FROM log WHERE stream = ?1 ORDER BY seq");
    let history = events(&mut tx.tx.prepare_cached(&sql)?, params![stream])?;
    Ok(Some(Claim {
        job: job_id,
        step: StepId(step),
        attempt,
        pool,
        token: FencingToken(token),
        deadline_ms: deadline as u64,
        history,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_is_one_connection_per_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ferry.db");
        let a = SqliteStore::open(&path).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let b = SqliteStore::open(&dir.path().join("sub/../ferry.db")).unwrap();
        assert!(
            Arc::ptr_eq(&a.shared, &b.shared),
            "same file, same connection"
        );
        assert_eq!(a.path(), b.path());
        let separate = SqliteStore::open_separate(&path).unwrap();
        assert!(!Arc::ptr_eq(&a.shared, &separate.shared));
        let weak = Arc::downgrade(&a.shared);
        drop((a, b));
        assert!(weak.upgrade().is_none(), "the last handle closes the file");
        let again = SqliteStore::open(&path).unwrap();
        assert!(!Arc::ptr_eq(&again.shared, &separate.shared));
    }
}
