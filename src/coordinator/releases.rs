//! The releases an environment has had: its deploys that succeeded, newest first, each with
//! the artifact it shipped. The API lists them and picks rollback targets from them; the
//! artifact retention keeps the artifacts of the newest two.
//!
//! An environment's deploys run in job id order (newer ones supersede queued older ones and wait
//! for a running one), so the newest successful deploy is what `current` points to.

use crate::coordinator::plan::deploy_step;
use crate::domain::{JobState, StepStatus};
use crate::store::{environment_index, Error, Store, StreamId};
use ferry_proto::{ArtifactRef, JobId};

/// The deploy jobs of `environment` of `project` that succeeded and shipped an artifact, from
/// jobs older than `before` (all when `None`), newest first, those `matching`, at most `limit`.
/// Reads no job past the `limit`-th match.
pub async fn releases(
    store: &dyn Store,
    project: &str,
    environment: &str,
    before: Option<JobId>,
    limit: usize,
    matching: impl Fn(&JobState, &ArtifactRef) -> bool,
) -> Result<Vec<(JobState, ArtifactRef)>, Error> {
    let step = deploy_step(environment);
    let mut ids = store
        .indexed(&environment_index(project, environment))
        .await?;
    ids.retain(|id| before.is_none_or(|b| *id < b));
    ids.reverse();
    let mut out = Vec::new();
    for id in ids {
        if out.len() >= limit {
            break;
        }
        let Some(job) = fold(store, id).await? else {
            continue;
        };
        let succeeded = job
            .step(&step)
            .is_some_and(|s| matches!(s.status, StepStatus::Succeeded { .. }));
        if !succeeded {
            continue;
        }
        if let Some(artifact) = job.artifact() {
            if matching(&job, &artifact) {
                out.push((job, artifact));
            }
        }
    }
    Ok(out)
}

/// The fold of job `id`'s stream; `None` when it has no events.
pub async fn fold(store: &dyn Store, id: JobId) -> Result<Option<JobState>, Error> {
    let stream = store.read_stream(&StreamId::Job(id), 0).await?;
    if stream.is_empty() {
        return Ok(None);
    }
    let mut job = JobState::new(id);
    for stored in &stream {
        job.evolve(&stored.decode()?, stored.envelope.at_ms);
    }
    Ok(Some(job))
}
