//! Manual deploys and rollbacks, and the releases an environment has had.
//!
//! Both are new jobs that ship an artifact an earlier job built, through the same path as every
//! deploy: `JobCreated` with one `deploy:<env>` step and the source job's artifact in its plan
//! ([`plan_deploy`]), then the coordinator's newest-wins ordering per environment and an agent's
//! deploy step. A release still on the hosts (every deploy keeps the current and the previous
//! one) is found by its completion marker and only switched back, not uploaded again.
//!
//! - `POST /api/v1/deploys` `{"project", "tag", "environment"}`: deploys the newest artifact built
//!   for the tag.
//! - `POST /api/v1/rollbacks` `{"project", "environment", "to"?}`: deploys the release that was
//!   live before the current one, or the tag `to`.
//! - `GET /api/v1/releases?project=&environment=`: the releases the environment has had, newest
//!   first, from the deploys that succeeded.
//!
//! An environment's deploys run in job id order (newer ones supersede queued older ones, and wait
//! for a running one), so "newest successful deploy" is what `current` points to.

use super::{answer, fold_job, job_summary, time, Answer, ApiError, ApiState, Params};
use crate::build::artifact::key_sha256;
use crate::coordinator::artifacts;
use crate::coordinator::plan::{plan_deploy, ProjectPlan};
use crate::coordinator::releases;
use crate::deploy::release_name;
use crate::domain::JobState;
use crate::store::{tag_index, Store};
use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use ferry_proto::{ArtifactRef, JobId};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tracing::info;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployBody {
    project: String,
    tag: String,
    environment: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    project: String,
    environment: String,
    #[serde(default)]
    to: Option<String>,
}

/// One release an environment had: a deploy job that succeeded, and what it shipped.
struct Deployed {
    job: JobState,
    artifact: ArtifactRef,
}

impl Deployed {
    /// 410 Gone when the artifact retention deleted what this job shipped.
    fn check_kept(&self) -> Result<(), ApiError> {
        match self.job.artifact_expired_at_ms {
            None => Ok(()),
            Some(at) => Err(expired(&self.release(), self.job.id, self.artifact.job, at)),
        }
    }

    fn release(&self) -> String {
        let plan = self.job.plan.as_ref().expect("deployed jobs have a plan");
        release_name(&plan.tag, &plan.sha)
    }

    fn tag(&self) -> &str {
        &self
            .job
            .plan
            .as_ref()
            .expect("deployed jobs have a plan")
            .tag
    }

    fn render(&self, current: bool) -> Value {
        let plan = self.job.plan.as_ref().expect("deployed jobs have a plan");
        json!({
            "job": self.job.id,
            "tag": plan.tag,
            "sha": plan.sha,
            "release": self.release(),
            "trigger": plan.trigger,
            "artifact": { "job": self.artifact.job, "name": self.artifact.name, "sha256": self.artifact.sha256, "size": self.artifact.size },
            "deployed_at": time(self.job.updated_at_ms),
            "artifact_expired_at": self.job.artifact_expired_at_ms.map(time),
            "current": current,
        })
    }
}

fn parse_body<T: DeserializeOwned>(body: &Bytes, what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("malformed {what}: {e}")))
}

/// The configured project named by its path or numeric id.
fn project<'a>(state: &'a ApiState, name: &str) -> Result<&'a ProjectPlan, ApiError> {
    state
        .inner
        .projects
        .iter()
        .find(|p| p.path == name || p.id.is_some_and(|id| name.parse() == Ok(id)))
        .ok_or_else(|| ApiError::NotFound(format!("unknown project {name:?}")))
}

fn environment_known(project: &ProjectPlan, environment: &str) -> Result<(), ApiError> {
    if project
        .environments
        .iter()
        .any(|(_, e)| e.environment == environment)
    {
        return Ok(());
    }
    Err(ApiError::NotFound(format!(
        "project {} has no environment {environment:?}",
        project.path
    )))
}

/// The newest job of `project` that built (or shipped) an artifact for `tag` at the commit the
/// tag points to now: that of the tag's newest job. A tag moved to another commit whose build
/// has no artifact (failed, or still running) is a conflict, not a reason to ship the commit
/// the tag left.
async fn built(store: &dyn Store, project: &str, tag: &str) -> Result<Deployed, ApiError> {
    let mut ids = store.indexed(&tag_index(project, tag)).await?;
    ids.reverse();
    let mut newest: Option<JobState> = None;
    for id in ids {
        let Some(job) = fold_job(store, id).await? else {
            continue;
        };
        let sha = |j: &JobState| j.plan.as_ref().map(|p| p.sha.clone());
        match &newest {
            None => newest = Some(job.clone()),
            Some(n) if sha(n) != sha(&job) => continue,
            Some(_) => {}
        }
        if let Some(artifact) = job.artifact() {
            let built = Deployed { job, artifact };
            built.check_kept()?;
            return Ok(built);
        }
    }
    match newest {
        Some(n) => Err(ApiError::Conflict(format!(
            "tag {tag} of {project} points to {} since job {} ({}), which has built no \
             artifact: wait for its build to succeed (or push the tag again)",
            n.plan.as_ref().map_or("?", |p| p.sha.as_str()),
            n.id,
            n.phase.as_str()
        ))),
        None => Err(ApiError::NotFound(format!(
            "tag {tag} of {project} has no built artifact: build it first (push the tag)"
        ))),
    }
}

/// The releases `environment` of `project` had that are `matching`, newest first, from deploy
/// jobs older than `before` (all when `None`), at most `limit`. Stops reading at `limit`.
async fn deployed(
    store: &dyn Store,
    project: &str,
    environment: &str,
    before: Option<JobId>,
    limit: usize,
    matching: impl Fn(&Deployed) -> bool,
) -> Result<Vec<Deployed>, ApiError> {
    let found = releases::releases(
        store,
        project,
        environment,
        before,
        limit,
        |job, artifact| {
            matching(&Deployed {
                job: job.clone(),
                artifact: artifact.clone(),
            })
        },
    )
    .await?;
    Ok(found
        .into_iter()
        .map(|(job, artifact)| Deployed { job, artifact })
        .collect())
}

/// Appends the new job's plan (and its first decision) and answers 202 with it.
async fn start(
    state: &ApiState,
    project: &ProjectPlan,
    environment: &str,
    source: &Deployed,
    trigger: String,
    extra: Value,
) -> Answer {
    let job = with_artifact_lock(
        state,
        &source.artifact.key,
        create_locked(state, project, environment, source, trigger),
    )
    .await?;
    let mut body = job_summary(&job);
    body["environment"] = json!(environment);
    body["source_job"] = json!(source.job.id);
    body["release"] = json!(source.release());
    if let (Value::Object(body), Value::Object(extra)) = (&mut body, extra) {
        body.extend(extra);
    }
    answer(StatusCode::ACCEPTED, body)
}

/// 410 Gone: the artifact `release` of `job` shipped (built by `built_by`) was deleted at `at`.
pub(super) fn expired(release: &str, job: JobId, built_by: JobId, at: u64) -> ApiError {
    ApiError::Gone(format!(
        "the artifact of {release} (job {job}) was deleted at {} (artifacts.keep): build the tag \
         again (retry job {built_by}, which built it) to deploy it",
        time(at).as_str().unwrap_or("?")
    ))
}

/// Holds the lock of the artifact under `key` while `f` runs, so that the artifact retention
/// cannot delete it between `f`'s check and the job `f` creates, which ships it (see
/// [`crate::coordinator::artifacts`]).
pub(super) async fn with_artifact_lock<T>(
    state: &ApiState,
    key: &str,
    f: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    let held = artifacts::hold(state.store(), key, "api", ARTIFACT_LOCK_WAIT).await?;
    if held.is_none() && key_sha256(key).is_some() {
        return Err(ApiError::Unavailable);
    }
    let result = f.await;
    if let Some(held) = held {
        held.release(state.store()).await;
    }
    result
}

/// How long a deploy or rollback request waits for its artifact's lock.
const ARTIFACT_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Creates the deploy job of `source`'s artifact, unless the artifact expired meanwhile (the
/// caller holds the artifact's lock).
async fn create_locked(
    state: &ApiState,
    project: &ProjectPlan,
    environment: &str,
    source: &Deployed,
    trigger: String,
) -> Result<JobState, ApiError> {
    let fresh = fold_job(state.store(), source.job.id).await?;
    if let Some(job) = fresh {
        Deployed {
            job,
            artifact: source.artifact.clone(),
        }
        .check_kept()?;
    }
    let plan = source.job.plan.as_ref().expect("deployed jobs have a plan");
    let id = JobId::new();
    let created = plan_deploy(
        project,
        environment,
        plan,
        source.artifact.clone(),
        id,
        trigger,
    )
    .map_err(ApiError::NotFound)?;
    super::create_job(state.store(), created).await
}

pub(super) async fn deploy(State(state): State<ApiState>, body: Bytes) -> Answer {
    let body: DeployBody = parse_body(&body, "deploy request")?;
    let project = project(&state, &body.project)?;
    environment_known(project, &body.environment)?;
    let source = built(state.store(), &project.path, &body.tag).await?;
    let answer = start(
        &state,
        project,
        &body.environment,
        &source,
        format!("deploy:{}", body.environment),
        json!({}),
    )
    .await?;
    info!(project = %project.path, tag = %body.tag, environment = %body.environment, "manual deploy requested through the api");
    Ok(answer)
}

pub(super) async fn rollback(State(state): State<ApiState>, body: Bytes) -> Answer {
    let body: RollbackBody = parse_body(&body, "rollback request")?;
    let project = project(&state, &body.project)?;
    environment_known(project, &body.environment)?;
    let store = state.store();
    let env = &body.environment;
    let Some(current) = deployed(store, &project.path, env, None, 1, |_| true)
        .await?
        .pop()
    else {
        return Err(ApiError::Conflict(format!(
            "{env} of {} has never been deployed: nothing to roll back",
            project.path
        )));
    };
    // The newest earlier release that is the one asked for (or, by default, any other than the
    // current one); a tag this environment never ran is taken from its build.
    let wanted = |d: &Deployed| match &body.to {
        Some(tag) => d.tag() == tag,
        None => d.release() != current.release(),
    };
    let earlier = deployed(store, &project.path, env, Some(current.job.id), 1, wanted)
        .await?
        .pop();
    let target = match (earlier, &body.to) {
        (Some(d), _) => d,
        (None, Some(tag)) => built(store, &project.path, tag).await?,
        (None, None) => {
            return Err(ApiError::Conflict(format!(
                "{env} of {} has had no release before {}: nothing to roll back to",
                project.path,
                current.release()
            )))
        }
    };
    if target.release() == current.release() {
        return Err(ApiError::Conflict(format!(
            "{} of {} already runs {}",
            body.environment,
            project.path,
            current.release()
        )));
    }
    let answer = start(
        &state,
        project,
        &body.environment,
        &target,
        format!("rollback:{}", body.environment),
        json!({ "rolled_back_from": current.release() }),
    )
    .await?;
    info!(project = %project.path, environment = %body.environment, from = %current.release(), to = %target.release(), "rollback requested through the api");
    Ok(answer)
}

pub(super) async fn releases(State(state): State<ApiState>, RawQuery(q): RawQuery) -> Answer {
    let params = Params::parse(q);
    let limit = params.limit()?;
    let (Some(name), Some(environment)) = (params.get("project"), params.get("environment")) else {
        return Err(ApiError::BadRequest(
            "releases need the project and environment query parameters".into(),
        ));
    };
    let before = params.get("cursor").map(super::parse_job_id).transpose()?;
    let project = project(&state, name)?;
    environment_known(project, environment)?;
    let mut history = deployed(
        state.store(),
        &project.path,
        environment,
        before,
        limit + 1,
        |_| true,
    )
    .await?;
    let more = history.len() > limit;
    history.truncate(limit);
    let items: Vec<Value> = history
        .iter()
        .enumerate()
        .map(|(i, d)| d.render(before.is_none() && i == 0))
        .collect();
    let next = more.then(|| history.last().map(|d| d.job.id)).flatten();
    answer(StatusCode::OK, json!({ "items": items, "next": next }))
}
