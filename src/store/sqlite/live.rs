//! One transaction and the helpers every operation shares: writing events, the queue effects,
//! lease checks and the fencing counter. The SQLite twin of the Redis `prelude.lua`: the same
//! steps in the same order, so both backends derive the same live structures from the same
//! events.

use crate::store::{queue_score, Error, LogPos, Result, Stored, Version, LIVE};
use ferry_proto::{Envelope, JobId};
use rusqlite::{params, OptionalExtension, Row};
use std::collections::BTreeSet;

/// Why a transaction failed: a refusal decided by ferry (conflict, stale token, bad input), or
/// an error from SQLite that the caller turns into a store error naming the operation.
pub(super) enum Fail {
    Store(Error),
    Sql(rusqlite::Error),
}

impl From<rusqlite::Error> for Fail {
    fn from(e: rusqlite::Error) -> Self {
        Fail::Sql(e)
    }
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Store(e)
    }
}

pub(super) type TxResult<T> = std::result::Result<T, Fail>;

/// What a committed transaction must wake up.
#[derive(Default)]
pub(super) struct Wake {
    /// The global log grew (feed readers).
    pub log: bool,
    /// Steps became ready in these pools (`wait_for_work`).
    pub pools: BTreeSet<String>,
    /// These jobs' step logs grew (`read_logs` followers).
    pub lines: BTreeSet<JobId>,
}

/// An open transaction, the store-clock time it runs at, and what to wake after its commit.
pub(super) struct Tx<'c> {
    pub tx: rusqlite::Transaction<'c>,
    /// Store clock: this process's wall clock, read once the transaction holds its lock.
    pub now: u64,
    pub wake: Wake,
}

/// The columns of `log` that make a [`Stored`], in the order [`stored`] reads them.
pub(super) const EVENT_COLUMNS: &str = "pos, stream, kind, version, at_ms, token, payload, seq";

/// A log position is `0-<pos>`: it parses as the numeric `<ms>-<seq>` form that [`LogPos`]
/// orders numerically, so positions order exactly as `pos` does.
pub(super) fn position(pos: i64) -> LogPos {
    LogPos(format!("0-{pos}"))
}

/// The `pos` of a position this store handed out; anything else is the caller's mistake.
pub(super) fn parse_position(p: &LogPos) -> Result<i64> {
    p.0.strip_prefix("0-")
        .and_then(|n| n.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "log position {p} was not issued by the sqlite store (expected 0-<n>)"
            ))
        })
}

/// Reads a row of [`EVENT_COLUMNS`].
pub(super) fn stored(row: &Row<'_>) -> rusqlite::Result<Stored> {
    let token: Option<i64> = row.get(5)?;
    Ok(Stored {
        pos: position(row.get(0)?),
        seq: Some(row.get::<_, i64>(7)? as Version),
        envelope: Envelope {
            stream: row.get(1)?,
            kind: row.get(2)?,
            version: row.get(3)?,
            at_ms: row.get::<_, i64>(4)? as u64,
            token: token.map(|t| t as u64),
            payload: row.get(6)?,
        },
    })
}

pub(super) fn parse_job(s: &str) -> TxResult<JobId> {
    s.parse()
        .map_err(|_| Fail::Store(Error::Corrupt(format!("job id {s:?} is not a uuid"))))
}

/// Milliseconds as stored: SQLite integers are signed, so times saturate at `i64::MAX`.
pub(super) fn sql_ms(ms: u64) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

impl Tx<'_> {
    pub fn now_sql(&self) -> i64 {
        sql_ms(self.now)
    }

    /// `now + ttl` on the store clock.
    pub fn after(&self, ttl_ms: u64) -> i64 {
        sql_ms(self.now.saturating_add(ttl_ms))
    }

    /// The number of events in `stream`.
    pub fn version(&self, stream: &str) -> TxResult<u64> {
        let v: i64 = self
            .tx
            .prepare_cached("SELECT COALESCE(MAX(seq), 0) FROM log WHERE stream = ?1")?
            .query_row([stream], |r| r.get(0))?;
        Ok(v as u64)
    }

    /// Writes one event as number `seq` of `stream` and returns its `pos`.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_event(
        &mut self,
        stream: &str,
        seq: u64,
        kind: u16,
        version: u16,
        at_ms: u64,
        token: Option<u64>,
        payload: &[u8],
    ) -> TxResult<i64> {
        self.tx
            .prepare_cached(
                "INSERT INTO log (stream, seq, kind, version, at_ms, token, payload) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                stream,
                seq as i64,
                kind,
                version,
                at_ms as i64,
                token.map(|t| t as i64),
                payload
            ])?;
        self.wake.log = true;
        Ok(self.tx.last_insert_rowid())
    }

    /// Appends one event at the end of `stream` (the events the store writes itself:
    /// `step_claimed`, `lease_expired`, `step_released`, `step_queued` on promotion,
    /// `agent_lost`), stamped with the store clock.
    pub fn emit(
        &mut self,
        stream: &str,
        event: &ferry_proto::Event,
        token: Option<u64>,
    ) -> TxResult<i64> {
        let seq = self.version(stream)? + 1;
        let (kind, version, payload) = (event.kind(), event.version(), event.encode_payload());
        let now = self.now;
        self.insert_event(stream, seq, kind, version, now, token, &payload)
    }

    /// The next fencing token: every lease and lock token comes from this one counter.
    pub fn next_token(&self) -> TxResult<u64> {
        let t: i64 = self
            .tx
            .prepare_cached("UPDATE fence SET last = last + 1 WHERE id = 1 RETURNING last")?
            .query_row([], |r| r.get(0))?;
        Ok(t as u64)
    }

    /// A job whose stream holds a terminal event never waits or runs again.
    pub fn ended(&self, job: &str) -> TxResult<bool> {
        Ok(self
            .tx
            .prepare_cached("SELECT 1 FROM ended WHERE job = ?1")?
            .query_row([job], |_| Ok(()))
            .optional()?
            .is_some())
    }

    /// Removes any queue entry (ready or delayed) of the step.
    pub fn unqueue(&self, job: &str, step: &str) -> TxResult<()> {
        self.tx
            .prepare_cached("DELETE FROM queue WHERE job = ?1 AND step = ?2")?
            .execute([job, step])?;
        Ok(())
    }

    pub fn drop_lease(&self, job: &str, step: &str) -> TxResult<()> {
        self.tx
            .prepare_cached("DELETE FROM leases WHERE job = ?1 AND step = ?2")?
            .execute([job, step])?;
        Ok(())
    }

    /// Puts the step in `pool`'s ready queue at `queue_score(priority, now)`, replacing any
    /// queue entry or lease it had (a requeued step's old holder is fenced out), and wakes the
    /// pool's waiters. A no-op for an ended job.
    pub fn enqueue(
        &mut self,
        job: &str,
        step: &str,
        attempt: u32,
        pool: &str,
        priority: i32,
    ) -> TxResult<()> {
        if self.ended(job)? {
            return Ok(());
        }
        self.drop_lease(job, step)?;
        let score = queue_score(priority, self.now) as i64;
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO queue (job, step, attempt, priority, pool, score, due_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL)",
            )?
            .execute(params![job, step, attempt, priority, pool, score])?;
        self.wake.pools.insert(pool.to_string());
        Ok(())
    }

    /// Puts the step in the delayed set until `due_ms`, replacing any queue entry or lease it
    /// had. A no-op for an ended job.
    pub fn schedule(
        &mut self,
        job: &str,
        step: &str,
        attempt: u32,
        pool: &str,
        priority: i32,
        due_ms: u64,
    ) -> TxResult<()> {
        if self.ended(job)? {
            return Ok(());
        }
        self.drop_lease(job, step)?;
        self.tx
            .prepare_cached(
                "INSERT OR REPLACE INTO queue (job, step, attempt, priority, pool, score, due_ms) \
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL, ?6)",
            )?
            .execute(params![job, step, attempt, priority, pool, sql_ms(due_ms)])?;
        Ok(())
    }

    /// The job is over: its queue entries and leases go, queueing it again becomes a no-op,
    /// and it leaves every `live:` index.
    ///
    /// The first end also records the job, with `at_ms` (the terminal event's envelope
    /// time), among the ended jobs whose logs are kept.
    pub fn clear_job(&self, job: &str, at_ms: u64) -> TxResult<()> {
        self.tx
            .prepare_cached("DELETE FROM queue WHERE job = ?1")?
            .execute([job])?;
        self.tx
            .prepare_cached("DELETE FROM leases WHERE job = ?1")?
            .execute([job])?;
        let first_end = self
            .tx
            .prepare_cached("INSERT OR IGNORE INTO ended (job) VALUES (?1)")?
            .execute([job])?
            == 1;
        if first_end {
            self.tx
                .prepare_cached("INSERT OR REPLACE INTO kept_logs (job, ended_ms) VALUES (?1, ?2)")?
                .execute(params![job, sql_ms(at_ms)])?;
        }
        self.tx
            .prepare_cached(
                "DELETE FROM job_index WHERE job = ?1 AND substr(name, 1, length(?2)) = ?2",
            )?
            .execute([job, LIVE])?;
        Ok(())
    }

    /// The job's output lines go, and it leaves the ended jobs whose logs are kept.
    pub fn drop_logs(&self, job: &str) -> TxResult<()> {
        self.tx
            .prepare_cached("DELETE FROM logs WHERE job = ?1")?
            .execute([job])?;
        self.tx
            .prepare_cached("DELETE FROM log_lines WHERE job = ?1")?
            .execute([job])?;
        self.tx
            .prepare_cached("DELETE FROM kept_logs WHERE job = ?1")?
            .execute([job])?;
        Ok(())
    }

    /// Records the job under each index key.
    pub fn index(&self, job: &str, keys: &[String]) -> TxResult<()> {
        let mut stmt = self
            .tx
            .prepare_cached("INSERT OR IGNORE INTO job_index (name, job) VALUES (?1, ?2)")?;
        for key in keys {
            stmt.execute([key.as_str(), job])?;
        }
        Ok(())
    }

    /// `Err(reason)` unless `token` is the live token of the step's lease: the lease exists,
    /// carries the token and has not run out (`deadline >= now`).
    pub fn check_lease(
        &self,
        job: &str,
        step: &str,
        token: u64,
    ) -> TxResult<std::result::Result<(), String>> {
        let lease: Option<(i64, i64)> = self
            .tx
            .prepare_cached("SELECT token, deadline_ms FROM leases WHERE job = ?1 AND step = ?2")?
            .query_row([job, step], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        Ok(match lease {
            None => Err("no live lease".into()),
            Some((held, _)) if held as u64 != token => {
                Err(format!("the lease is held under token {held}"))
            }
            Some((_, deadline)) if deadline < self.now_sql() => Err("the lease ran out".into()),
            Some(_) => Ok(()),
        })
    }
}
