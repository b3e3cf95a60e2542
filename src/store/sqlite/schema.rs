//! The SQLite table layout and opening a database file: recognising a ferry database, refusing
//! anything else, creating the schema in a fresh file, and the connection settings.
//!
//! | table | rows | content |
//! |---|---|---|
//! | `log` | one per event | `pos` (INTEGER PRIMARY KEY AUTOINCREMENT: the global order, never reused), `stream`, `seq` (1-based place in its stream; the stream's version is its largest `seq`), `kind`, `version`, `at_ms`, `token` (NULL when unfenced), `payload` (rmp named) |
//! | `jobs` | one per job stream | `job`, `created_ms` (store clock, at the stream's first append) |
//! | `queue` | one per queued step | `job`, `step`, `attempt`, `priority` (as given), `pool`, and either `score` = `queue_score(priority, enqueue ms)` (ready) or `due_ms` (delayed) |
//! | `leases` | one per live lease | `job`, `step`, `token`, `agent`, `attempt`, `deadline_ms`, `pool` |
//! | `fence` | one | `last`: the last fencing token issued to a lease or a lock |
//! | `locks` | one per held lock | `name`, `holder`, `token`, `expires_ms` |
//! | `dedupe` | one per dedupe key | `name`, `pos` (the original event's position), `expires_ms` |
//! | `job_index` | one per (index key, job) | `name` (`live:tag:…`, `env:…`, `live:env:…`), `job`; `live:` rows go when the job ends |
//! | `ended` | one per ended job | `job`: queueing effects on it are no-ops |
//! | `kept_logs` | one per ended job whose log is kept | `job`, `ended_ms` (its first terminal event's `at_ms`); the row goes with `logs_expired` (since schema version 2) |
//! | `logs` | one per output line | `id` (INTEGER PRIMARY KEY AUTOINCREMENT), `job`, `payload` (rmp named `StepLog`) |
//! | `log_lines` | one per job with output | `job`, `kept`: lines kept, for lazy trimming |
//! | `snapshots` | one per name | `name`, `bytes` |
//! | `agents` | one per registered agent | `name`, `deadline_ms` (heartbeat deadline, store clock); deleted with `agent_left` or `agent_lost` |
//! | `agent_stops` | one per pending stop request | `name`, `reason`: set by `agent_stop_requested`, deleted by the agent's `agent_joined` or `agent_left` (since schema version 3) |
//! | `agent_pauses` | one per paused agent | `name`, `reason`: set by `agent_paused`, deleted by `agent_resumed` (since schema version 4) |
//! | `feed_groups` | one per consumer group | `name`, `delivered`: the last log `pos` handed to the group |
//! | `feed_pending` | one per delivered, unacknowledged entry | `grp`, `pos`, `consumer`, `delivered_ms`, `deliveries` |
//!
//! The file carries `PRAGMA application_id` = [`APPLICATION_ID`] and `PRAGMA user_version` =
//! [`SCHEMA_VERSION`], both written in the transaction that creates the tables. A file of an
//! earlier version is upgraded when it is opened, in one transaction ([`UPGRADES`]).

use crate::store::{Error, Result};
use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior};
use std::path::Path;
use std::time::Duration;

/// `PRAGMA application_id` of a ferry database: ASCII `FRRY`.
pub const APPLICATION_ID: i32 = 0x4652_5259;

/// `PRAGMA user_version` of the layout this build reads and writes.
pub const SCHEMA_VERSION: i32 = 4;

/// `UPGRADES[v - 1]` turns a version `v` file into version `v + 1`.
const UPGRADES: &[&str] = &[
    // 1 → 2: the ended jobs whose logs are kept, for log retention; every job that ended
    // before the upgrade joins it with the time of its first terminal event.
    "CREATE TABLE kept_logs (
    job TEXT PRIMARY KEY,
    ended_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX kept_logs_by_end ON kept_logs (ended_ms);
INSERT INTO kept_logs (job, ended_ms)
    SELECT e.job, COALESCE((SELECT l.at_ms FROM log l WHERE l.stream = 'job:' || e.job
        AND l.kind IN (11, 12, 13, 14) ORDER BY l.seq LIMIT 1), 0)
    FROM ended e;",
    // 2 → 3: pending stop requests of agents (`agent_stop_requested`).
    "CREATE TABLE agent_stops (
    name TEXT PRIMARY KEY,
    reason TEXT NOT NULL
) WITHOUT ROWID;",
    // 3 → 4: paused agents (`agent_paused`).
    "CREATE TABLE agent_pauses (
    name TEXT PRIMARY KEY,
    reason TEXT NOT NULL
) WITHOUT ROWID;",
];

/// How long a statement waits for another process's write lock before the store reports
/// itself unavailable.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Prepared statements kept per connection (the store uses about 50 distinct ones).
const STATEMENT_CACHE: usize = 128;

/// Every table of the layout, for the check on open.
const TABLES: &[&str] = &[
    "agent_pauses",
    "agent_stops",
    "agents",
    "dedupe",
    "ended",
    "feed_groups",
    "feed_pending",
    "fence",
    "job_index",
    "jobs",
    "kept_logs",
    "leases",
    "locks",
    "log",
    "log_lines",
    "logs",
    "queue",
    "snapshots",
];

const SCHEMA: &str = "
CREATE TABLE log (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    stream TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    version INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    token INTEGER,
    payload BLOB NOT NULL,
    UNIQUE (stream, seq)
);
CREATE TABLE jobs (
    job TEXT PRIMARY KEY,
    created_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX jobs_by_creation ON jobs (created_ms, job);
CREATE TABLE queue (
    job TEXT NOT NULL,
    step TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    priority INTEGER NOT NULL,
    pool TEXT NOT NULL,
    score INTEGER,
    due_ms INTEGER,
    PRIMARY KEY (job, step),
    CHECK ((score IS NULL) <> (due_ms IS NULL))
) WITHOUT ROWID;
CREATE INDEX queue_ready ON queue (pool, score, job, step) WHERE score IS NOT NULL;
CREATE INDEX queue_delayed ON queue (due_ms, job, step) WHERE due_ms IS NOT NULL;
CREATE TABLE leases (
    job TEXT NOT NULL,
    step TEXT NOT NULL,
    token INTEGER NOT NULL,
    agent TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    deadline_ms INTEGER NOT NULL,
    pool TEXT NOT NULL,
    PRIMARY KEY (job, step)
) WITHOUT ROWID;
CREATE INDEX leases_by_deadline ON leases (deadline_ms, job, step);
CREATE TABLE fence (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last INTEGER NOT NULL
);
INSERT INTO fence (id, last) VALUES (1, 0);
CREATE TABLE locks (
    name TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE dedupe (
    name TEXT PRIMARY KEY,
    pos TEXT NOT NULL,
    expires_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX dedupe_by_expiry ON dedupe (expires_ms);
CREATE TABLE job_index (
    name TEXT NOT NULL,
    job TEXT NOT NULL,
    PRIMARY KEY (name, job)
) WITHOUT ROWID;
CREATE INDEX job_index_by_job ON job_index (job);
CREATE TABLE ended (
    job TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE kept_logs (
    job TEXT PRIMARY KEY,
    ended_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX kept_logs_by_end ON kept_logs (ended_ms);
CREATE TABLE logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    payload BLOB NOT NULL
);
CREATE INDEX logs_by_job ON logs (job, id);
CREATE TABLE log_lines (
    job TEXT PRIMARY KEY,
    kept INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE snapshots (
    name TEXT PRIMARY KEY,
    bytes BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE agents (
    name TEXT PRIMARY KEY,
    deadline_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX agents_by_deadline ON agents (deadline_ms, name);
CREATE TABLE agent_stops (
    name TEXT PRIMARY KEY,
    reason TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE agent_pauses (
    name TEXT PRIMARY KEY,
    reason TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE feed_groups (
    name TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE feed_pending (
    grp TEXT NOT NULL,
    pos INTEGER NOT NULL,
    consumer TEXT NOT NULL,
    delivered_ms INTEGER NOT NULL,
    deliveries INTEGER NOT NULL,
    PRIMARY KEY (grp, pos)
) WITHOUT ROWID;
CREATE INDEX feed_pending_by_consumer ON feed_pending (grp, consumer, pos);
";

/// What a file turned out to hold.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    /// An empty database (a new or zero-length file): ferry creates its schema.
    Fresh,
    /// A ferry database with this schema version.
    Ferry(i32),
    /// Some other application's database.
    Foreign {
        application_id: i32,
        tables: Vec<String>,
    },
}

fn identify(application_id: i32, user_version: i32, tables: Vec<String>) -> Found {
    if application_id == APPLICATION_ID {
        Found::Ferry(user_version)
    } else if application_id == 0 && user_version == 0 && tables.is_empty() {
        Found::Fresh
    } else {
        Found::Foreign {
            application_id,
            tables,
        }
    }
}

/// Opens (creating if missing) the ferry database at `path`, which must already be the
/// canonical path of the file. Nothing is written to a file that is not an empty database or a
/// ferry database: such files fail with [`Error::Corrupt`] (not a database, damaged) or
/// [`Error::Invalid`] (another application's database, a newer ferry's schema), naming `path`.
pub(super) fn open(path: &Path) -> Result<Connection> {
    let shown = path.display();
    if path.is_dir() {
        return Err(Error::Invalid(format!(
            "sqlite store {shown} is a directory, not a database file"
        )));
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| opening(path, "cannot open the file", e))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|e| opening(path, "cannot set the busy timeout", e))?;

    // Every operation's statements stay prepared.
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);

    // Identify the file before writing anything to it (not even the journal mode).
    let found = inspect(&conn).map_err(|e| opening(path, "cannot read the database header", e))?;
    match found {
        Found::Fresh | Found::Ferry(1..=SCHEMA_VERSION) => {}
        Found::Ferry(v) if v > SCHEMA_VERSION => {
            return Err(Error::Invalid(format!(
                "sqlite store {shown} has ferry schema version {v}, newer than the version \
                 {SCHEMA_VERSION} this build knows; use a newer ferry"
            )))
        }
        Found::Ferry(v) => {
            return Err(Error::Corrupt(format!(
                "sqlite store {shown} is marked as a ferry database but has schema version \
                 {v}, which no ferry ever wrote"
            )))
        }
        Found::Foreign {
            application_id,
            tables,
        } => {
            let tables = if tables.is_empty() {
                "no tables".to_string()
            } else {
                format!("tables {}", tables.join(", "))
            };
            return Err(Error::Invalid(format!(
                "sqlite store {shown} is a SQLite database of another application \
                 (application_id {application_id:#x}, {tables}); ferry will not use or change it"
            )));
        }
    }

    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))
        .map_err(|e| opening(path, "cannot switch to the WAL journal", e))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(Error::Unavailable(format!(
            "sqlite store {shown}: the journal mode stayed {mode:?} instead of WAL"
        )));
    }
    // FULL: every commit syncs the WAL, so a transaction that returned survives a crash of the
    // process and of the machine (see the module docs).
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| opening(path, "cannot set synchronous = FULL", e))?;

    if found == Found::Fresh {
        create_if_fresh(&conn).map_err(|e| opening(path, "cannot create the schema", e))?;
    } else if found != Found::Ferry(SCHEMA_VERSION) {
        upgrade(&conn).map_err(|e| opening(path, "cannot upgrade the schema", e))?;
    }
    check_tables(&conn, path)?;
    Ok(conn)
}

/// The application id, schema version and table names of the database.
fn inspect(conn: &Connection) -> rusqlite::Result<Found> {
    let application_id: i32 = conn.pragma_query_value(None, "application_id", |r| r.get(0))?;
    let user_version: i32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_schema WHERE type = 'table' \
         AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
    )?;
    let tables = stmt
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(identify(application_id, user_version, tables))
}

/// Creates the schema in one transaction if the database is still empty (another process may
/// have created it since [`inspect`]).
fn create_if_fresh(conn: &Connection) -> rusqlite::Result<()> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    if inspect(&tx)? == Found::Fresh {
        tx.execute_batch(SCHEMA)?;
        tx.pragma_update(None, "application_id", APPLICATION_ID)?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    tx.commit()
}

/// Brings a ferry file of an earlier schema version to [`SCHEMA_VERSION`], one version at a
/// time, in one transaction (another process may have upgraded it since [`inspect`]).
fn upgrade(conn: &Connection) -> rusqlite::Result<()> {
    let tx = rusqlite::Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    if let Found::Ferry(mut v) = inspect(&tx)? {
        while (1..SCHEMA_VERSION).contains(&v) {
            tx.execute_batch(UPGRADES[(v - 1) as usize])?;
            v += 1;
        }
        tx.pragma_update(None, "user_version", v)?;
    }
    tx.commit()
}

/// Every table exists and the end of each one can be read (the pages a truncated file lost
/// are usually the last ones written).
fn check_tables(conn: &Connection, path: &Path) -> Result<()> {
    let shown = path.display();
    let present: Vec<String> = match inspect(conn) {
        Ok(Found::Ferry(_)) => {
            let mut stmt = conn
                .prepare("SELECT name FROM sqlite_schema WHERE type = 'table'")
                .map_err(|e| opening(path, "cannot list the tables", e))?;
            let names = stmt
                .query_map([], |r| r.get(0))
                .and_then(|rows| rows.collect::<rusqlite::Result<Vec<String>>>())
                .map_err(|e| opening(path, "cannot list the tables", e))?;
            names
        }
        Ok(other) => {
            return Err(Error::Corrupt(format!(
                "sqlite store {shown} lost its ferry schema while being opened ({other:?})"
            )))
        }
        Err(e) => return Err(opening(path, "cannot read the schema", e)),
    };
    for table in TABLES {
        if !present.iter().any(|t| t == table) {
            return Err(Error::Corrupt(format!(
                "sqlite store {shown} is a ferry database without its table {table}"
            )));
        }
        conn.query_row(
            &format!("SELECT count(*) FROM (SELECT 1 FROM {table} LIMIT 1)"),
            [],
            |_| Ok(()),
        )
        .map_err(|e| opening(path, &format!("cannot read table {table}"), e))?;
    }
    Ok(())
}

/// An error while opening `path`: damage is [`Error::Corrupt`], anything else (permissions, a
/// lock held too long, I/O) [`Error::Unavailable`].
fn opening(path: &Path, what: &str, e: rusqlite::Error) -> Error {
    let shown = path.display();
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase) => Error::Corrupt(format!(
            "sqlite store {shown} is not a SQLite database ({what}: {e}); ferry will not \
             overwrite it"
        )),
        Some(ErrorCode::DatabaseCorrupt) => Error::Corrupt(format!(
            "sqlite store {shown} is damaged ({what}: {e}); ferry will not repair or \
             overwrite it"
        )),
        _ => Error::Unavailable(format!("sqlite store {shown}: {what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_identified_by_application_id_version_and_tables() {
        let t = |names: &[&str]| names.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(identify(0, 0, t(&[])), Found::Fresh);
        assert_eq!(identify(APPLICATION_ID, 1, t(&["log"])), Found::Ferry(1));
        assert_eq!(identify(APPLICATION_ID, 7, t(&[])), Found::Ferry(7));
        for (id, version, tables) in [(0, 0, t(&["users"])), (0, 3, t(&[])), (42, 0, t(&[]))] {
            assert!(
                matches!(identify(id, version, tables), Found::Foreign { .. }),
                "{id} {version}"
            );
        }
    }

    #[test]
    fn a_version_1_file_is_upgraded_on_open_and_its_ended_jobs_keep_their_logs_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        // A version 1 file: today's schema without what versions 2 to 4 added.
        let conn = open(&path).unwrap();
        conn.execute_batch(
            "DROP TABLE kept_logs;
             DROP TABLE agent_stops;
             DROP TABLE agent_pauses;
             INSERT INTO log (stream, seq, kind, version, at_ms, payload)
                 VALUES ('job:j1', 1, 2, 1, 100, x''), ('job:j1', 2, 11, 1, 250, x''),
                        ('job:j1', 3, 13, 1, 900, x''), ('job:j2', 1, 2, 1, 300, x'');
             INSERT INTO ended (job) VALUES ('j1');",
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        drop(conn);

        let conn = open(&path).unwrap();
        let version: i32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let kept: Vec<(String, i64)> = conn
            .prepare("SELECT job, ended_ms FROM kept_logs")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(kept, [("j1".to_string(), 250)]);
        drop(conn);
        // Opening again changes nothing.
        let conn = open(&path).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM kept_logs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn the_schema_lists_every_table() {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(SCHEMA).unwrap();
        let mut stmt = conn
            .prepare(
                "SELECT name FROM sqlite_schema WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
            )
            .unwrap();
        let names: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(names, TABLES);
    }
}
