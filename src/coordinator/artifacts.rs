//! Artifact retention (`artifacts.keep`): the sweep leader deletes artifacts that nothing uses
//! any more, after recording it.
//!
//! An artifact (a content-addressed object, `sha256/…`) may go when all of these hold:
//!
//! - jobs of this installation recorded it: the store indexes every job that published it
//!   (`ArtifactPublished`) or ships it (a deploy or rollback whose plan carries it) under
//!   [`artifact_index`]; an object no job recorded (written by an older build, or by hand) is
//!   never deleted;
//! - each of those jobs has ended, the last of them longer than `keep` ago;
//! - no environment that one of them deployed to runs it now or ran it just before (the two
//!   newest successful deploys of the environment: what `current` points to and what a
//!   rollback goes back to).
//!
//! Then each of those jobs gets `ArtifactExpired` (the API no longer offers it to deploy or
//! roll back to), and the object is deleted.
//!
//! **Races.** Deciding and deleting happen under a lock per artifact (`artifact:<sha256>`,
//! [`hold`]), the same lock an agent holds while it checks that the artifact it built (or
//! found already stored) is there and records `ArtifactPublished`, and the API holds while it
//! creates a deploy or rollback that ships one. So a job that starts using an artifact either
//! comes before the decision (it is indexed and live, so the artifact stays) or after the
//! deletion (the agent finds the object gone and its attempt is retried, building it again;
//! the API finds the artifact expired and says so).

use crate::build::artifact::key_sha256;
use crate::build::ArtifactStore;
use crate::coordinator::releases::releases;
use crate::domain::JobState;
use crate::store::{artifact_index, Append, Error, Store, StreamId};
use ferry_proto::{ArtifactExpired, FencingToken, JobId, StepSpec};
use std::collections::BTreeSet;
use std::time::Duration;
use tracing::{debug, info, warn};

/// How long a holder may keep an artifact's lock: far more than checking an object and one
/// append, or recording an expiry and deleting one object, take.
const LOCK_TTL: Duration = Duration::from_secs(60);

/// Releases that an environment keeps deployable: the one it runs and the one before it.
const KEPT_RELEASES: usize = 2;

/// An artifact's lock, held.
#[derive(Debug)]
pub struct Held {
    name: String,
    holder: String,
    token: FencingToken,
}

impl Held {
    pub async fn release(self, store: &dyn Store) {
        if let Err(e) = store
            .lock_release(&self.name, &self.holder, self.token)
            .await
        {
            // It lapses by itself after LOCK_TTL.
            warn!(lock = %self.name, error = %e, "releasing an artifact lock failed");
        }
    }
}

/// Takes the lock of the artifact stored under `key`, waiting up to `wait` while someone else
/// holds it. `Ok(None)`: still held by another after `wait`, or `key` is not an artifact key
/// (nothing to serialise with).
pub async fn hold(
    store: &dyn Store,
    key: &str,
    holder: &str,
    wait: Duration,
) -> Result<Option<Held>, Error> {
    let Some(sha) = key_sha256(key) else {
        return Ok(None);
    };
    let name = format!("artifact:{sha}");
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(token) = store.lock_acquire(&name, holder, LOCK_TTL).await? {
            return Ok(Some(Held {
                name,
                holder: holder.to_string(),
                token,
            }));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    /// Artifacts deleted.
    pub deleted: Vec<String>,
    /// Artifacts old enough but kept: in use, used recently, deployed, locked, or unknown.
    pub kept: usize,
    /// The last artifact looked at, where the next pass goes on (`None`: it looked at every
    /// old one): kept artifacts never stop a pass from reaching the others.
    pub next: Option<String>,
}

/// One pass of the retention over at most `max` of the artifacts written longer than `keep`
/// ago, in key order after `after` (from the first again once past the last); what is deleted
/// is decided under each artifact's lock (see the module's comment). `now_ms` is the wall
/// clock (a parameter, so tests can look ahead).
pub async fn expire_artifacts(
    store: &dyn Store,
    artifacts: &ArtifactStore,
    keep: Duration,
    holder: &str,
    now_ms: u64,
    after: Option<&str>,
    max: usize,
) -> Result<Expired, Error> {
    let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
    let cutoff = now_ms.saturating_sub(keep_ms);
    let old = artifacts
        .written_before(cutoff)
        .await
        .map_err(|e| Error::Unavailable(format!("listing the artifact store: {e}")))?;
    let start = after.map_or(0, |a| old.partition_point(|k| k.as_str() <= a));
    let start = if start >= old.len() { 0 } else { start };
    let mut out = Expired::default();
    let batch: Vec<String> = old[start..].iter().take(max).cloned().collect();
    if start + batch.len() < old.len() {
        out.next = batch.last().cloned();
    }
    for key in batch {
        let Some(held) = hold(store, &key, holder, Duration::ZERO).await? else {
            debug!(%key, "artifact in use (locked) or not an artifact key: kept");
            out.kept += 1;
            continue;
        };
        let decided = expirable(store, &key, cutoff).await;
        let result = match decided {
            Ok(Some(jobs)) => expire(store, artifacts, &key, keep_ms, &jobs).await,
            Ok(None) => Ok(false),
            Err(e) => Err(e),
        };
        held.release(store).await;
        match result? {
            true => out.deleted.push(key),
            false => out.kept += 1,
        }
    }
    if !out.deleted.is_empty() {
        info!(
            deleted = out.deleted.len(),
            kept = out.kept,
            "deleted artifacts unused for over {}",
            humantime::format_duration(keep)
        );
    }
    Ok(out)
}

/// The jobs that used the artifact under `key`, when it may go: they all ended before
/// `cutoff`, and no environment they deployed to runs it or ran it just before.
async fn expirable(
    store: &dyn Store,
    key: &str,
    cutoff: u64,
) -> Result<Option<Vec<JobState>>, Error> {
    let ids = store.indexed(&artifact_index(key)).await?;
    if ids.is_empty() {
        debug!(%key, "no job recorded this artifact: kept");
        return Ok(None);
    }
    let mut jobs = Vec::with_capacity(ids.len());
    for id in ids {
        let job = fold(store, id).await?;
        if !job.phase.is_terminal() || job.updated_at_ms >= cutoff {
            debug!(%key, job = %id, "artifact used by a live or recent job: kept");
            return Ok(None);
        }
        jobs.push(job);
    }
    let mut environments = BTreeSet::new();
    for job in &jobs {
        let Some(plan) = &job.plan else { continue };
        for step in &plan.steps {
            if let StepSpec::Deploy(d) = &step.spec {
                environments.insert((plan.project.clone(), d.environment.clone()));
            }
        }
    }
    for (project, environment) in environments {
        if kept_releases(store, &project, &environment)
            .await?
            .iter()
            .any(|k| k == key)
        {
            debug!(%key, %project, %environment, "artifact of a release the environment keeps: kept");
            return Ok(None);
        }
    }
    Ok(Some(jobs))
}

/// The artifact keys of the newest [`KEPT_RELEASES`] successful deploys of `environment`.
async fn kept_releases(
    store: &dyn Store,
    project: &str,
    environment: &str,
) -> Result<Vec<String>, Error> {
    let kept = releases(store, project, environment, None, KEPT_RELEASES, |_, _| {
        true
    })
    .await?;
    Ok(kept.into_iter().map(|(_, a)| a.key).collect())
}

/// Records `ArtifactExpired` on each job that used the artifact, then deletes it. Returns
/// whether the object is gone.
async fn expire(
    store: &dyn Store,
    artifacts: &ArtifactStore,
    key: &str,
    keep_ms: u64,
    jobs: &[JobState],
) -> Result<bool, Error> {
    for job in jobs.iter().filter(|j| j.artifact_expired_at_ms.is_none()) {
        let expired = ArtifactExpired {
            key: key.to_string(),
            kept_for_ms: keep_ms,
        };
        // Two sweepers during a lock handover record it once.
        let once = vec![format!(
            "artifact-expired:{}:{}",
            job.id,
            key_sha256(key).unwrap_or(key)
        )];
        store
            .append(
                Append::new(StreamId::Job(job.id), vec![expired.into()])
                    .dedupe(once, Duration::from_secs(3600)),
            )
            .await?;
    }
    match artifacts.delete(key).await {
        Ok(()) => {
            info!(%key, jobs = jobs.len(), "artifact expired and deleted");
            Ok(true)
        }
        Err(e) => {
            // Recorded already: the next pass deletes it (the jobs are marked, nothing else
            // may start using it).
            warn!(%key, error = %e, "deleting an expired artifact failed; retried next time");
            Ok(false)
        }
    }
}

async fn fold(store: &dyn Store, id: JobId) -> Result<JobState, Error> {
    Ok(super::releases::fold(store, id)
        .await?
        .unwrap_or_else(|| JobState::new(id)))
}
