//! SQLite-specific tests: opening files that are not ferry's (never reinitialised), data that
//! outlives the process that wrote it, and several processes on one file.

use crate::harness::{wait_for, DEADLINE};
use ferry::store::sqlite::{SqliteStore, APPLICATION_ID, SCHEMA_VERSION};
use ferry::store::{
    Append, Appended, Error, EventLog, Feed, LeaderLock, LogPos, StreamId, WorkQueue,
};
use ferry_proto::{Event, JobId, StepQueued, WebhookReceived};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

fn webhook(n: usize) -> Event {
    Event::WebhookReceived(WebhookReceived {
        event: "Tag Push Hook".into(),
        action: format!("build-{n}"),
        reason: Some("x".repeat(200)),
        ..Default::default()
    })
}

/// Opening `path` must fail, naming the path; returns the error message.
fn refused(path: &Path) -> Error {
    let err = SqliteStore::open(path).expect_err("ferry must refuse this file");
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "the error names the file: {msg}"
    );
    err
}

/// A ferry database at `path` holding `n` webhook events; every handle is closed on return.
async fn ferry_db(path: &Path, n: usize) {
    let store = SqliteStore::open(path).unwrap();
    for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
        let events = chunk.iter().map(|i| webhook(*i)).collect();
        store
            .append(Append::new(StreamId::Webhooks, events))
            .await
            .unwrap();
    }
}

#[test]
fn a_file_that_is_not_a_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.db");
    let garbage: Vec<u8> = b"this is not a database, it is ferry's notes\n"
        .iter()
        .cycle()
        .take(8192)
        .copied()
        .collect();
    std::fs::write(&path, &garbage).unwrap();
    match refused(&path) {
        Error::Corrupt(m) => assert!(m.contains("not a SQLite database"), "{m}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), garbage, "never overwritten");
}

#[test]
fn another_applications_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    {
        let other = rusqlite::Connection::open(&path).unwrap();
        other
            .execute_batch(
                "CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT);
                 INSERT INTO users (name) VALUES ('ada');",
            )
            .unwrap();
    }
    match refused(&path) {
        Error::Invalid(m) => assert!(
            m.contains("another application") && m.contains("users"),
            "{m}"
        ),
        other => panic!("expected Invalid, got {other:?}"),
    }
    // Untouched: still its rollback journal, its table and its row.
    let other = rusqlite::Connection::open(&path).unwrap();
    let mode: String = other
        .pragma_query_value(None, "journal_mode", |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "delete");
    let name: String = other
        .query_row("SELECT name FROM users", [], |r| r.get(0))
        .unwrap();
    assert_eq!(name, "ada");

    // A database that names another application, even without tables, is not ferry's either.
    let tagged = dir.path().join("tagged.db");
    rusqlite::Connection::open(&tagged)
        .unwrap()
        .pragma_update(None, "application_id", 0x1234_5678)
        .unwrap();
    match refused(&tagged) {
        Error::Invalid(m) => assert!(m.contains("0x12345678"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn a_database_of_a_newer_ferry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.db");
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "application_id", APPLICATION_ID)
        .unwrap();
    conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(conn);
    match refused(&path) {
        Error::Invalid(m) => assert!(m.contains("newer"), "{m}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_ferry_database_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.db");
    ferry_db(&path, 2_000).await;
    let full = std::fs::read(&path).unwrap();
    assert!(
        full.len() > 64 * 1024,
        "enough pages to cut: {}",
        full.len()
    );
    for keep in [full.len() / 2, full.len() - 4096, 4096 + 100, 50] {
        std::fs::write(&path, &full[..keep]).unwrap();
        match refused(&path) {
            Error::Corrupt(m) => assert!(m.contains("damaged"), "cut at {keep}: {m}"),
            other => panic!("cut at {keep}: expected Corrupt, got {other:?}"),
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            &full[..keep],
            "cut at {keep}: never overwritten"
        );
    }
    // The intact file still opens and holds everything.
    std::fs::write(&path, &full).unwrap();
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(
        store
            .read_stream(&StreamId::Webhooks, 0)
            .await
            .unwrap()
            .len(),
        2_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opening_creates_directories_and_an_empty_file_becomes_a_ferry_database() {
    let dir = tempfile::tempdir().unwrap();
    let nested = dir.path().join("a/b/c/ferry.db");
    let store = SqliteStore::open(&nested).unwrap();
    store.ping().await.unwrap();
    assert!(nested.is_file());

    let empty = dir.path().join("empty.db");
    std::fs::write(&empty, b"").unwrap();
    let store = SqliteStore::open(&empty).unwrap();
    store
        .append(Append::new(StreamId::Webhooks, vec![webhook(1)]))
        .await
        .unwrap();
    let conn = rusqlite::Connection::open(&empty).unwrap();
    let id: i32 = conn
        .pragma_query_value(None, "application_id", |r| r.get(0))
        .unwrap();
    let version: i32 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!((id, version), (APPLICATION_ID, SCHEMA_VERSION));

    match SqliteStore::open(dir.path()) {
        Err(Error::Invalid(m)) => assert!(m.contains("directory"), "{m}"),
        other => panic!("a directory is not a database: {other:?}"),
    }
}

/// Everything lives in the file: a reopened store has the log, the queues and the fencing
/// counter (tokens keep growing across restarts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_store_has_everything_and_tokens_keep_growing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.db");
    let job = JobId::new();
    let queued = |step: &str| {
        Event::StepQueued(StepQueued {
            step: step.into(),
            attempt: 1,
            pool: "linux".into(),
            priority: 0,
        })
    };
    let (log, token) = {
        let store = SqliteStore::open(&path).unwrap();
        store
            .append(Append::new(
                StreamId::Job(job),
                vec![queued("a"), queued("b")],
            ))
            .await
            .unwrap();
        let c = store
            .claim(&["linux".to_string()], &"agent".into(), DEADLINE)
            .await
            .unwrap()
            .expect("a claim");
        (store.read_log(None, 100).await.unwrap(), c.token)
    };
    let store = SqliteStore::open(&path).unwrap();
    assert_eq!(store.read_log(None, 100).await.unwrap(), log);
    assert_eq!(store.queued().await.unwrap().len(), 1);
    let t = store
        .lock_acquire("sweep", "n1", DEADLINE)
        .await
        .unwrap()
        .expect("a free lock");
    assert!(t > token, "{t} after {token}");
}

/// Positions are `0-<n>`, which `LogPos` orders numerically: past 9 they still ascend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_positions_order_numerically() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("ferry.db")).unwrap();
    let events = (0..12).map(webhook).collect();
    store
        .append(Append::new(StreamId::Webhooks, events))
        .await
        .unwrap();
    let pos: Vec<LogPos> = store
        .read_log(None, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.pos)
        .collect();
    assert_eq!(pos.len(), 12);
    assert!(pos.iter().all(|p| p.0.starts_with("0-")), "{pos:?}");
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{pos:?}");
    assert!(matches!(
        store.read_log(Some(&LogPos("17-3".into())), 10).await,
        Err(Error::Invalid(_))
    ));
}

/// Environment variable that turns this test binary into the writer process of
/// `another_process_writes_are_seen_and_survive_its_kill_9`.
const CHILD_DB: &str = "FERRY_TEST_SQLITE_CHILD_DB";
const CHILD_TEST: &str = "sqlite::another_process_writes_are_seen_and_survive_its_kill_9";

/// A second process appends to the file while this one is blocked reading the feed: the reader
/// wakes, and after the writer is killed with SIGKILL (no chance to flush or close anything)
/// its accepted event, and the dedupe key recorded with it, are in the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_process_writes_are_seen_and_survive_its_kill_9() {
    if let Ok(db) = std::env::var(CHILD_DB) {
        return child_writes_then_waits(PathBuf::from(db)).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.db");
    let store = SqliteStore::open(&path).unwrap();
    store.ensure_group("g").await.unwrap();
    let reader = {
        let store = store.clone();
        tokio::spawn(async move { store.read_new("g", "c", 10, Duration::from_secs(60)).await })
    };
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads", "1"])
        .env(CHILD_DB, &path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the writer process");
    let got = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("a blocked reader wakes for another process's write")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    let original = got[0].pos.clone();
    // The writer has printed its answer and is sleeping: kill it mid-life.
    let answer = {
        use std::io::BufRead;
        // The test harness prints its own text around ours, on the same line too.
        std::io::BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.find("written ").map(|at| l[at..].to_string()))
    };
    assert_eq!(answer, Some(format!("written {original}")));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    drop(store);
    let store = SqliteStore::open(&path).unwrap();
    let log = store.read_log(None, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].decode().unwrap(), webhook(7));
    let again = Append::new(StreamId::Webhooks, vec![webhook(8)])
        .dedupe(vec!["delivery:1".into()], Duration::from_secs(600));
    assert_eq!(
        store.append(again).await.unwrap(),
        Appended::Duplicate { original }
    );
}

async fn child_writes_then_waits(db: PathBuf) {
    let store = SqliteStore::open(&db).unwrap();
    let a = Append::new(StreamId::Webhooks, vec![webhook(7)])
        .dedupe(vec!["delivery:1".into()], Duration::from_secs(600));
    let Appended::Written { positions, .. } = store.append(a).await.unwrap() else {
        panic!("the first delivery is written");
    };
    println!("written {}", positions[0]);
    // Stay alive, store open, until the parent kills this process.
    wait_for(Duration::from_secs(120), "the parent's SIGKILL", || async {
        None::<()>
    })
    .await;
}
