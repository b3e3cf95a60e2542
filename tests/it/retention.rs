//! Artifact retention's rules, one pass at a time against a Redis store and a directory of
//! artifacts (the whole flow with real binaries is in `manual.rs`): an artifact goes only when
//! every job that used it ended long enough ago, and never while its lock is held, a live job
//! ships it, or no job recorded it.

use crate::harness;
use ferry::build::artifact::artifact_key;
use ferry::build::ArtifactStore;
use ferry::coordinator::artifacts::{expire_artifacts, hold};
use ferry::store::conformance::noop_job;
use ferry::store::{now_ms, Append, Store, StreamId};
use ferry_proto::{ArtifactPublished, ArtifactRef, Event, JobId, JobSucceeded};
use std::sync::Arc;
use std::time::Duration;

const DAY_MS: u64 = 24 * 3600 * 1000;

struct Setup {
    store: Arc<dyn Store>,
    dir: tempfile::TempDir,
    artifacts: ArtifactStore,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let artifacts =
            ArtifactStore::from_url(&url::Url::from_directory_path(dir.path()).unwrap()).unwrap();
        Setup {
            store: Arc::new(harness::redis_store().await),
            dir,
            artifacts,
        }
    }

    /// Stores an artifact three days old and returns its key.
    fn object(&self, hash: &str) -> String {
        let sha = format!("{hash:0>64}");
        let key = artifact_key(&sha, "group_app.tar.gz");
        let path = self.dir.path().join(&key);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"artifact").unwrap();
        let touched = std::process::Command::new("touch")
            .args(["-d", "3 days ago"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(touched.success());
        key
    }

    /// Appends `events` to `job` as if at `at_ms`.
    async fn append(&self, job: JobId, events: Vec<Event>, at_ms: u64) {
        let mut a = Append::new(StreamId::Job(job), events);
        a.at_ms = at_ms;
        self.store.append(a).await.unwrap();
    }

    /// A build job that published `key`, created and (unless `ended_ms` is `None`) ended then.
    async fn built(&self, key: &str, created_ms: u64, ended_ms: Option<u64>) -> JobId {
        let job = JobId::new();
        let published = ArtifactPublished {
            step: "build".into(),
            attempt: 1,
            name: "group_app.tar.gz".into(),
            key: key.into(),
            size: 8,
            sha256: key.split('/').nth(2).unwrap().into(),
        };
        self.append(
            job,
            vec![
                noop_job(job, "v1", "p", &["build"]).into(),
                published.into(),
            ],
            created_ms,
        )
        .await;
        if let Some(at) = ended_ms {
            self.append(job, vec![JobSucceeded {}.into()], at).await;
        }
        job
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_goes_only_when_nothing_uses_it_and_its_lock_is_free() {
    let s = Setup::new().await;
    let now = now_ms();
    let old = now - 3 * DAY_MS;
    let keys: Vec<String> = ["a1", "b2", "c3", "d4", "e5"]
        .iter()
        .map(|h| s.object(h))
        .collect();
    let [unused, recent, shipped, unknown, locked] = <[String; 5]>::try_from(keys).unwrap();
    let done = s.built(&unused, old, Some(old + 1000)).await;
    // Built long ago, ended just now (say, its deploy was redone today).
    s.built(&recent, old, Some(now)).await;
    // Built and ended long ago, but a deploy that ships it has not ended.
    let source = s.built(&shipped, old, Some(old + 1000)).await;
    let deploy = JobId::new();
    let mut plan = noop_job(deploy, "v1", "p", &["deploy"]);
    plan.artifact = Some(ArtifactRef {
        job: source,
        name: "group_app.tar.gz".into(),
        key: shipped.clone(),
        size: 8,
        sha256: shipped.split('/').nth(2).unwrap().into(),
    });
    s.append(deploy, vec![plan.into()], old + 2000).await;
    s.built(&locked, old, Some(old + 1000)).await;
    let held = hold(&*s.store, &locked, "someone", Duration::ZERO)
        .await
        .unwrap()
        .expect("the lock is free");

    let keep = Duration::from_millis(DAY_MS);
    let pass = || expire_artifacts(&*s.store, &s.artifacts, keep, "sweeper", now, None, 100);
    let first = pass().await.unwrap();
    assert_eq!(first.deleted, std::slice::from_ref(&unused), "{first:?}");
    assert_eq!(first.kept, 4, "{first:?}");
    for key in [&recent, &shipped, &unknown, &locked] {
        assert!(s.artifacts.exists(key).await.unwrap(), "{key} stays");
    }
    assert!(!s.artifacts.exists(&unused).await.unwrap());
    let events = s.store.read_stream(&StreamId::Job(done), 0).await.unwrap();
    match events.last().unwrap().decode().unwrap() {
        Event::ArtifactExpired(e) => {
            assert_eq!(e.key, unused);
            assert_eq!(e.kept_for_ms, DAY_MS);
        }
        other => panic!("expected ArtifactExpired last, got {other:?}"),
    }

    // Once its lock is free, the locked one goes too; the rest still stays.
    held.release(&*s.store).await;
    let second = pass().await.unwrap();
    assert_eq!(second.deleted, std::slice::from_ref(&locked), "{second:?}");
    assert_eq!(second.kept, 3, "{second:?}");
}

/// A pass looks at a page of the old artifacts and says where the next goes on, from the
/// first again after the last: artifacts that stay never starve the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_page_through_the_old_artifacts_and_wrap_around() {
    let s = Setup::new().await;
    // None of them recorded by a job: each stays, and every page is full of kept ones.
    let mut keys: Vec<String> = ["f1", "f2", "f3", "f4", "f5"]
        .iter()
        .map(|h| s.object(h))
        .collect();
    keys.sort();
    let keep = Duration::from_millis(DAY_MS);
    let page = |after: Option<String>| {
        let s = &s;
        async move {
            let after = after.as_deref();
            expire_artifacts(&*s.store, &s.artifacts, keep, "sweeper", now_ms(), after, 2)
                .await
                .unwrap()
        }
    };
    let first = page(None).await;
    assert_eq!((first.deleted.len(), first.kept), (0, 2), "{first:?}");
    assert_eq!(first.next.as_deref(), Some(keys[1].as_str()));
    let second = page(first.next).await;
    assert_eq!(second.next.as_deref(), Some(keys[3].as_str()));
    let last = page(second.next).await;
    assert_eq!((last.kept, last.next), (1, None), "the last page");
    let again = page(Some(keys[4].clone())).await;
    assert_eq!(
        again.next.as_deref(),
        Some(keys[1].as_str()),
        "from the first again"
    );
    for key in &keys {
        assert!(s.artifacts.exists(key).await.unwrap(), "{key} stays");
    }
}
