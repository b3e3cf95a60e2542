//! The REST API under `/api/v1`: jobs (list, show with the reason a step waits, history,
//! cancel, retry), agents, and manual deploys, rollbacks and releases ([`releases`]).
//!
//! Reads are folds of the log computed per request ([`JobState`] for a job, the agents part of
//! [`View`] for agents) plus the store's live registry ([`Agents::live_agents`]). Writes are
//! events appended with optimistic concurrency, exactly like the coordinator's decisions: a
//! cancel is `JobCancelled` appended at the version the API folded (the store's `ClearJob`
//! effect empties the queues and revokes the running lease); a retry is a new job with the old
//! job's plan, since an ended job is immutable (retried once: a repeated POST is refused). New
//! jobs are appended as `JobCreated` alone; the coordinators queue their steps, as for a
//! webhook's job, so manual deploys go through the per-environment ordering.
//!
//! - Every request needs `Authorization: Bearer <token>` matching one of `[api] tokens`,
//!   compared in constant time (over SHA-256 digests, so lengths do not leak either). With no
//!   token configured every request is refused.
//! - Every answer is JSON. Errors are `{"error": "<what was wrong>"}`; [`ApiError`] is the one
//!   place that maps failures to status codes, and never leaks internals.
//! - Lists are `{"items": [...], "next": "<cursor>" | null}`, with `limit` (1 to 500) and
//!   `cursor` query parameters.
//! - Times are RFC 3339 with milliseconds, UTC (`2025-01-31T12:00:00.123Z`), or `null`.
//! - Secrets never appear: plans hold only secret names, and events never hold values.

use crate::config::Secret;
mod releases;

use crate::coordinator::plan::ProjectPlan;
use crate::domain::{AgentState, JobPhase, JobState, StepState, StepStatus, View};
use crate::store::{self, Agents, Append, Order, Store, Stored, StreamId};
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_proto::{
    kind_name, AgentId, AgentPaused, AgentResumed, AgentStopRequested, Event, JobCancelled,
    JobCreated, JobId, StepSpec,
};
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tracing::{error, info, warn};

/// What an answer says when the store failed: its own errors name servers and files.
const UNAVAILABLE: &str = "event store unavailable";

/// Default and largest `limit` of a list.
pub const DEFAULT_LIMIT: usize = 50;
pub const MAX_LIMIT: usize = 500;
/// Jobs folded per list request at most when filtering: a filter that matches rarely answers
/// with fewer items and a cursor to continue instead of scanning the whole history.
pub const SCAN_BUDGET: usize = 1000;
/// Jobs read at once when a list folds a page of them.
const FOLDS_AT_ONCE: usize = 32;
/// Appends retried after version conflicts before giving up.
const CONFLICT_RETRIES: usize = 16;

/// What the API's handlers share. Cheap to clone.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

#[derive(Clone)]
struct Inner {
    store: Arc<dyn Store>,
    /// The configured projects, for manual deploys and rollbacks.
    projects: Vec<ProjectPlan>,
    /// SHA-256 of every accepted bearer token: compared in constant time, whatever the lengths.
    tokens: Vec<[u8; 32]>,
    /// The agents stream as folded by earlier requests.
    agents: Arc<tokio::sync::Mutex<AgentsFold>>,
    /// Set when the server shuts down: log follows end then (a graceful shutdown waits for
    /// every open response, and a follow would last as long as its job).
    stop: Option<tokio::sync::watch::Receiver<bool>>,
}

impl ApiState {
    /// An API over `store` that accepts the bearer `tokens` (none: every request is refused).
    pub fn new(store: Arc<dyn Store>, tokens: &[Secret]) -> Self {
        ApiState {
            inner: Arc::new(Inner {
                store,
                projects: Vec::new(),
                tokens: tokens.iter().map(|t| digest(t.expose())).collect(),
                agents: Default::default(),
                stop: None,
            }),
        }
    }

    /// The projects manual deploys and rollbacks may name (none by default).
    pub fn with_projects(mut self, projects: Vec<ProjectPlan>) -> Self {
        Arc::make_mut(&mut self.inner).projects = projects;
        self
    }

    /// Log follows end when `stop` turns true (the server's shutdown signal).
    pub fn with_stop(mut self, stop: tokio::sync::watch::Receiver<bool>) -> Self {
        Arc::make_mut(&mut self.inner).stop = Some(stop);
        self
    }

    fn store(&self) -> &dyn Store {
        &*self.inner.store
    }
}

/// The routes under `/api/v1`, every one behind the bearer token check. Has no fallback of its
/// own, so it merges into the gateway's router (which answers unknown paths).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{id}", get(show_job))
        .route("/api/v1/jobs/{id}/events", get(job_events))
        .route("/api/v1/jobs/{id}/logs", get(job_logs))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/api/v1/jobs/{id}/retry", post(retry_job))
        .route("/api/v1/agents", get(list_agents))
        .route("/api/v1/agents/{name}/stop", post(stop_agent))
        .route("/api/v1/agents/{name}/pause", post(pause_agent))
        .route("/api/v1/agents/{name}/resume", post(resume_agent))
        .route("/api/v1/deploys", post(releases::deploy))
        .route("/api/v1/rollbacks", post(releases::rollback))
        .route("/api/v1/releases", get(releases::releases))
        .route_layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// Why a request failed: the one place that maps failures to status codes. Messages are
/// lowercase, name the thing, and never carry internals.
#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized(String),
    NotFound(String),
    Conflict(String),
    /// It existed and was removed on purpose (an ended job's logs after their retention).
    Gone(String),
    /// The store could not be reached (or did not answer in time).
    Unavailable,
    /// The store answered something unreadable; logged, not shown.
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            ApiError::Unauthorized(m) => {
                let mut r = error_response(StatusCode::UNAUTHORIZED, &m);
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Gone(m) => (StatusCode::GONE, m),
            ApiError::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, UNAVAILABLE.to_string()),
            ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "event store data is unreadable".to_string(),
            ),
        };
        error_response(status, &message)
    }
}

impl From<store::Error> for ApiError {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::Unavailable(_) => {
                error!(error = %e, "api request failed");
                ApiError::Unavailable
            }
            store::Error::Conflict { .. } => ApiError::Conflict(e.to_string()),
            store::Error::Invalid(m) => ApiError::BadRequest(m),
            store::Error::Stale { .. }
            | store::Error::Decode { .. }
            | store::Error::Corrupt(_)
            | store::Error::NoGroup(_) => {
                error!(error = %e, "api request failed");
                ApiError::Internal
            }
        }
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

type Answer = Result<Response, ApiError>;

fn answer(status: StatusCode, body: Value) -> Answer {
    Ok((status, Json(body)).into_response())
}

// ---------------------------------------------------------------------------------------------
// authentication

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

async fn authenticate(State(state): State<ApiState>, request: Request, next: Next) -> Response {
    match check_token(&state.inner.tokens, request.headers()) {
        Ok(()) => next.run(request).await,
        Err(e) => e.into_response(),
    }
}

fn check_token(accepted: &[[u8; 32]], headers: &HeaderMap) -> Result<(), ApiError> {
    if accepted.is_empty() {
        return Err(ApiError::Unauthorized(
            "no API token is configured: set api.tokens or api.tokens_env".into(),
        ));
    }
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| ApiError::Unauthorized("missing bearer token".into()))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::Unauthorized("malformed authorization header: expected Bearer <token>".into())
        })?;
    let presented = digest(token);
    // No early exit: every accepted token is compared.
    let matched = accepted.iter().fold(subtle::Choice::from(0), |ok, t| {
        ok | t[..].ct_eq(&presented[..])
    });
    if bool::from(matched) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("invalid bearer token".into()))
    }
}

// ---------------------------------------------------------------------------------------------
// query parameters

/// The query parameters of a request, decoded.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(raw: Option<String>) -> Params {
        Params(
            url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
                .into_owned()
                .collect(),
        )
    }

    /// The last non-empty value of `name`.
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, v)| k == name && !v.is_empty())
            .map(|(_, v)| v.as_str())
    }

    fn limit(&self) -> Result<usize, ApiError> {
        match self.get("limit") {
            None => Ok(DEFAULT_LIMIT),
            Some(v) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "invalid limit {v:?}: expected a number from 1 to {MAX_LIMIT}"
                    ))
                }),
        }
    }
}

fn parse_job_id(raw: &str) -> Result<JobId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::BadRequest(format!("invalid job id {raw:?}: expected a uuid")))
}

// ---------------------------------------------------------------------------------------------
// rendering

/// RFC 3339 with milliseconds, UTC; `null` for 0 (never set).
fn time(ms: u64) -> Value {
    if ms == 0 {
        return Value::Null;
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    Value::String(humantime::format_rfc3339_millis(t).to_string())
}

/// What a job list item carries; `show` adds plan, steps and waiting reasons.
fn job_summary(job: &JobState) -> Value {
    let plan = job.plan.as_ref();
    json!({
        "id": job.id,
        "project": plan.map(|p| &p.project),
        "project_id": plan.map(|p| p.project_id),
        "tag": plan.map(|p| &p.tag),
        "ref": plan.map(|p| &p.git_ref),
        "sha": plan.map(|p| &p.sha),
        "trigger": plan.map(|p| &p.trigger),
        "priority": plan.map(|p| p.priority),
        "state": job.phase.as_str(),
        "reason": job.reason,
        "version": job.version,
        "created_at": time(job.created_at_ms),
        "updated_at": time(job.updated_at_ms),
        "logs_expired_at": job.logs_expired_at_ms.map(time),
        "artifact_expired_at": job.artifact_expired_at_ms.map(time),
    })
}

/// The plan's steps: what runs where. Build commands and deploy hosts stay in the history
/// (`/events`); secrets are names there too.
fn plan_summary(plan: &JobCreated) -> Value {
    let steps: Vec<Value> = plan
        .steps
        .iter()
        .map(|s| {
            let (kind, environment) = match &s.spec {
                StepSpec::Build(_) => ("build", None),
                StepSpec::Deploy(d) => ("deploy", Some(&d.environment)),
                StepSpec::Noop => ("noop", None),
            };
            json!({
                "step": s.step,
                "kind": kind,
                "pool": s.pool,
                "priority": s.priority,
                "environment": environment,
            })
        })
        .collect();
    json!({ "steps": steps })
}

fn step_detail(s: &StepState) -> Value {
    let mut agent = None;
    let mut started = None;
    let mut due_at = Value::Null;
    let mut error = None;
    let mut retryable = None;
    let mut reason = None;
    let status = match &s.status {
        StepStatus::Pending => "pending",
        StepStatus::Queued { .. } => "queued",
        StepStatus::Delayed { due_ms, .. } => {
            due_at = time(*due_ms);
            "delayed"
        }
        StepStatus::Claimed {
            agent: a,
            started: st,
            ..
        } => {
            agent = Some(a.clone());
            started = Some(*st);
            if *st {
                "running"
            } else {
                "claimed"
            }
        }
        StepStatus::Interrupted { reason: r, .. } => {
            reason = Some(r.clone());
            "interrupted"
        }
        StepStatus::Succeeded { .. } => "succeeded",
        StepStatus::Failed {
            error: e,
            retryable: r,
            ..
        } => {
            error = Some(e.clone());
            retryable = Some(*r);
            "failed"
        }
    };
    let artifact = s
        .artifact
        .as_ref()
        .map(|a| json!({ "name": a.name, "key": a.key, "size": a.size, "sha256": a.sha256 }));
    json!({
        "step": s.step,
        "pool": s.pool,
        "priority": s.priority,
        "status": status,
        "attempt": s.attempt(),
        "attempts": s.attempts,
        "agent": agent,
        "started": started,
        "due_at": due_at,
        "error": error,
        "retryable": retryable,
        "reason": reason,
        "artifact": artifact,
        "hosts": s.hosts,
    })
}

/// Why each queued or delayed step of `job` waits. A pool no live agent serves (or only
/// paused ones) is said first: that is the wait nobody will end by themselves.
fn waiting(job: &JobState, registry: &Registry) -> Vec<Value> {
    let served = registry.served_pools();
    job.steps
        .iter()
        .filter_map(|s| {
            let due = match s.status {
                StepStatus::Queued { .. } => None,
                StepStatus::Delayed { due_ms, .. } => Some(due_ms),
                _ => return None,
            };
            let reason = if !served.contains(&s.pool) {
                match registry.paused_serving(&s.pool).as_slice() {
                    [] => format!("no live agent serves pool {}", s.pool),
                    paused => format!(
                        "every live agent serving pool {} is paused ({})",
                        s.pool,
                        paused.join("; ")
                    ),
                }
            } else if let Some(due) = due {
                format!("retry due at {}", time(due).as_str().unwrap_or("?"))
            } else {
                format!("queued in pool {}", s.pool)
            };
            Some(json!({ "step": s.step, "pool": s.pool, "reason": reason }))
        })
        .collect()
}

fn event_item(stored: &Stored) -> Value {
    let e = &stored.envelope;
    let (payload, undecodable) = match stored.decode() {
        Ok(event) => (serde_json::to_value(&event).unwrap_or(Value::Null), None),
        Err(err) => (Value::Null, Some(err.to_string())),
    };
    let mut item = json!({
        "pos": stored.pos.0,
        "kind": e.kind,
        "name": kind_name(e.kind),
        "version": e.version,
        "at": time(e.at_ms),
        "token": e.token,
        "payload": payload,
    });
    if let Some(why) = undecodable {
        item["undecodable"] = Value::String(why);
    }
    item
}

// ---------------------------------------------------------------------------------------------
// reads

/// Folds a job's stream; `None` when the stream is empty (no such job).
async fn fold_job(store: &dyn Store, id: JobId) -> Result<Option<JobState>, ApiError> {
    Ok(crate::coordinator::releases::fold(store, id).await?)
}

async fn load_job(store: &dyn Store, id: JobId) -> Result<JobState, ApiError> {
    fold_job(store, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("job {id} not found")))
}

/// The agents stream folded so far. The stream grows with every join, stop and loss of the
/// fleet, for good, so a request reads only what was appended since the last one.
#[derive(Default)]
struct AgentsFold {
    agents: BTreeMap<AgentId, AgentState>,
    /// Entries folded.
    version: u64,
    /// The log position of the last entry folded.
    last: Option<store::LogPos>,
}

impl AgentsFold {
    /// Folds the entries appended since the last call. The last entry folded is read again
    /// with them: a stream where it is not the one folded (a store restored from an older
    /// backup, a failover that lost the newest writes) is folded again from its start.
    async fn catch_up(&mut self, store: &dyn Store) -> Result<(), store::Error> {
        let stream = StreamId::Agents;
        let mut entries = store
            .read_stream(&stream, self.version.saturating_sub(1))
            .await?;
        let mut known = 0;
        if self.version > 0 {
            if entries.first().map(|e| &e.pos) == self.last.as_ref() {
                known = 1;
            } else {
                *self = AgentsFold::default();
                entries = store.read_stream(&stream, 0).await?;
            }
        }
        let mut view = View {
            agents: std::mem::take(&mut self.agents),
            ..View::default()
        };
        for stored in &entries[known..] {
            // Only agent events matter here; a kind this build cannot read is skipped.
            if let Ok(event) = stored.decode() {
                view.apply(
                    &stored.pos.0,
                    &stored.envelope.stream,
                    &event,
                    stored.envelope.at_ms,
                );
            }
        }
        self.agents = view.agents;
        self.version += (entries.len() - known) as u64;
        if let Some(last) = entries.last() {
            self.last = Some(last.pos.clone());
        }
        Ok(())
    }
}

/// The agents as the log knows them (joins and losses) with the store's live deadlines.
struct Registry {
    known: BTreeMap<AgentId, AgentState>,
    live: BTreeMap<AgentId, u64>,
}

impl Registry {
    async fn load(state: &ApiState) -> Result<Registry, ApiError> {
        let store = state.store();
        let known = {
            let mut fold = state.inner.agents.lock().await;
            fold.catch_up(store).await?;
            fold.agents.clone()
        };
        let live = Agents::live_agents(store).await?.into_iter().collect();
        Ok(Registry { known, live })
    }

    /// Pools served by at least one live agent that is not paused.
    fn served_pools(&self) -> BTreeSet<String> {
        self.live
            .keys()
            .filter_map(|a| self.known.get(a))
            .filter(|a| a.paused.is_none())
            .flat_map(|a| a.pools.iter().cloned())
            .collect()
    }

    /// The live agents serving `pool` that are paused, as `name: reason`.
    fn paused_serving(&self, pool: &str) -> Vec<String> {
        self.live
            .keys()
            .filter_map(|name| Some((name, self.known.get(name)?)))
            .filter(|(_, a)| a.pools.iter().any(|p| p == pool))
            .filter_map(|(name, a)| Some(format!("{name}: {}", a.paused.as_ref()?)))
            .collect()
    }
}

/// `GET /jobs?order=&project=&tag=&state=&limit=&cursor=`: job summaries, the newest first
/// unless `order=oldest`; a cursor continues in the same order. A project (by path) and a tag
/// are looked up in the tag's index; other filters are applied to the job list as it is read.
async fn list_jobs(State(state): State<ApiState>, RawQuery(raw): RawQuery) -> Answer {
    let params = Params::parse(raw);
    let limit = params.limit()?;
    let order = match params.get("order") {
        None | Some("newest") => Order::Newest,
        Some("oldest") => Order::Oldest,
        Some(o) => {
            return Err(ApiError::BadRequest(format!(
                "invalid order {o:?}: expected newest or oldest"
            )))
        }
    };
    let project = params.get("project").map(str::to_string);
    let tag = params.get("tag").map(str::to_string);
    let phase = match params.get("state") {
        None => None,
        Some(s) => Some(JobPhase::parse(s).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "invalid state {s:?}: expected queued, running, succeeded, failed, cancelled \
                 or superseded"
            ))
        })?),
    };
    let cursor = match params.get("cursor") {
        None => None,
        Some(c) => Some(c.parse::<JobId>().map_err(|_| {
            ApiError::BadRequest(format!("invalid cursor {c:?}: expected a job id"))
        })?),
    };
    let store = state.store();
    let matches = |job: &JobState| {
        let project_ok = project.as_deref().is_none_or(|p| {
            job.plan
                .as_ref()
                .is_some_and(|plan| plan.project == p || plan.project_id.to_string() == p)
        });
        let tag_ok = tag
            .as_deref()
            .is_none_or(|t| job.plan.as_ref().is_some_and(|plan| plan.tag == t));
        project_ok && tag_ok && phase.is_none_or(|ph| job.phase == ph)
    };
    // Where the jobs come from: a tag of a project named by its path has an index (a few jobs,
    // in creation order); anything else is the whole job list, read a page at a time.
    let tagged: Option<Vec<JobId>> = match (&project, &tag) {
        (Some(p), Some(t)) if !p.bytes().all(|b| b.is_ascii_digit()) => {
            let mut ids = store.indexed(&store::tag_index(p, t)).await?;
            if order == Order::Newest {
                ids.reverse();
            }
            Some(ids)
        }
        _ => None,
    };
    let page = |after: Option<JobId>, want: usize| {
        let tagged = &tagged;
        async move {
            let Some(ids) = tagged else {
                return store.jobs(after, want, order).await;
            };
            let start = match after {
                None => 0,
                Some(a) => {
                    ids.iter().position(|id| *id == a).ok_or_else(|| {
                        store::Error::Invalid(format!("job {a} is not one of this listing"))
                    })? + 1
                }
            };
            Ok(ids
                .iter()
                .skip(start)
                .take(want)
                .copied()
                .collect::<Vec<_>>())
        }
    };

    let mut items = Vec::new();
    let mut after = cursor;
    let mut scanned = 0;
    let next = loop {
        let want = (SCAN_BUDGET - scanned).min(limit.max(64));
        if want == 0 {
            break after; // budget spent: continue from here next time
        }
        let ids = match page(after, want).await {
            Err(store::Error::Invalid(_)) if after == cursor => {
                let c = cursor.map(|c| c.to_string()).unwrap_or_default();
                return Err(ApiError::BadRequest(format!(
                    "invalid cursor {c:?}: no such job"
                )));
            }
            other => other?,
        };
        let full = ids.len() == want;
        let mut filled = false;
        // A page's jobs are read concurrently (a filter that matches rarely reads up to
        // SCAN_BUDGET of them), and looked at in order.
        let folded: Vec<Option<JobState>> =
            futures_util::stream::iter(ids.iter().copied().map(|id| fold_job(store, id)))
                .buffered(FOLDS_AT_ONCE)
                .try_collect()
                .await?;
        for (id, job) in ids.into_iter().zip(folded) {
            scanned += 1;
            after = Some(id);
            if let Some(job) = job {
                if matches(&job) {
                    items.push(job_summary(&job));
                }
            }
            if items.len() == limit {
                filled = true;
                break;
            }
        }
        if filled {
            // A cursor only when something follows, so a walk ends with `next: null`.
            let more = !page(after, 1).await?.is_empty();
            break if more { after } else { None };
        }
        if !full {
            break None;
        }
    };
    answer(
        StatusCode::OK,
        json!({ "items": items, "next": next.map(|j| j.to_string()) }),
    )
}

async fn show_job(State(state): State<ApiState>, Path(id): Path<String>) -> Answer {
    let id = parse_job_id(&id)?;
    let store = state.store();
    let job = load_job(store, id).await?;
    let waits = job.steps.iter().any(|s| {
        matches!(
            s.status,
            StepStatus::Queued { .. } | StepStatus::Delayed { .. }
        )
    });
    let waiting = if waits {
        waiting(&job, &Registry::load(&state).await?)
    } else {
        Vec::new()
    };
    let mut body = job_summary(&job);
    body["plan"] = job.plan.as_ref().map(plan_summary).unwrap_or(Value::Null);
    body["steps"] = job.steps.iter().map(step_detail).collect();
    body["waiting"] = Value::Array(waiting);
    answer(StatusCode::OK, body)
}

async fn job_events(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Answer {
    let id = parse_job_id(&id)?;
    let params = Params::parse(raw);
    let limit = match params.get("limit") {
        None => MAX_LIMIT,
        Some(_) => params.limit()?,
    };
    let from: u64 = match params.get("cursor") {
        None => 0,
        Some(c) => c.parse().map_err(|_| {
            ApiError::BadRequest(format!("invalid cursor {c:?}: expected an event number"))
        })?,
    };
    let stream = state.store().read_stream(&StreamId::Job(id), from).await?;
    if stream.is_empty() {
        if from == 0 {
            return Err(ApiError::NotFound(format!("job {id} not found")));
        }
        // (a store that fails here answers 503, not "not found")
        load_job(state.store(), id).await?;
    }
    let items: Vec<Value> = stream.iter().take(limit).map(event_item).collect();
    let next = (stream.len() > limit).then(|| (from + limit as u64).to_string());
    answer(StatusCode::OK, json!({ "items": items, "next": next }))
}

/// Longest a log read may wait for new lines (`wait` parameter, ms).
const MAX_LOG_WAIT: Duration = Duration::from_secs(30);

/// `GET /jobs/{id}/logs?cursor=&limit=&wait=&follow=`: the job's output lines.
///
/// - Without `follow`: `{"items": [{pos, step, attempt, stream, line}], "next": cursor}`, where
///   `next` is the position to pass as `cursor` for the lines after these (the same cursor when
///   there are none yet). `wait` (ms, at most 30 000) long-polls for new lines.
/// - With `follow=true`: server-sent events, one `log` event per line (data: the item), until
///   the job has ended and every line was sent; then one `end` event with the job's state.
async fn job_logs(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let id = parse_job_id(&id)?;
    let params = Params::parse(raw);
    let limit = match params.get("limit") {
        None => MAX_LIMIT,
        Some(_) => params.limit()?,
    };
    let cursor = params.get("cursor").map(|c| store::LogPos(c.to_string()));
    if let Some(c) = &cursor {
        let ok =
            c.0.split_once('-')
                .is_some_and(|(a, b)| a.parse::<u64>().is_ok() && b.parse::<u64>().is_ok());
        if !ok {
            return Err(ApiError::BadRequest(format!(
                "invalid cursor {:?}: expected a log position like 1700000000000-0",
                c.0
            )));
        }
    }
    let wait = match params.get("wait") {
        None => Duration::ZERO,
        Some(w) => w
            .parse::<u64>()
            .map(Duration::from_millis)
            .ok()
            .filter(|d| *d <= MAX_LOG_WAIT)
            .ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "invalid wait {w:?}: expected milliseconds from 0 to 30000"
                ))
            })?,
    };
    let follow = match params.get("follow") {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "invalid follow {other:?}: expected true or false"
            )))
        }
    };
    let job = load_job(state.store(), id).await?;
    if let Some(at) = job.logs_expired_at_ms {
        return Err(ApiError::Gone(format!(
            "the logs of job {id} were removed at {} (kept for coordinator.keep_logs after the \
             job ended); its events are still at /api/v1/jobs/{id}/events",
            humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(at))
        )));
    }
    if follow {
        return Ok(follow_logs(state, id, cursor).into_response());
    }
    let lines = state
        .store()
        .read_logs(id, cursor.as_ref(), limit, wait)
        .await?;
    let next = lines
        .last()
        .map(|(pos, _)| pos.0.clone())
        .or_else(|| cursor.map(|c| c.0));
    let items: Vec<Value> = lines.iter().map(|(pos, l)| log_item(pos, l)).collect();
    Ok(answer(StatusCode::OK, json!({ "items": items, "next": next }))?.into_response())
}

fn log_item(pos: &store::LogPos, l: &ferry_proto::StepLog) -> Value {
    json!({
        "pos": pos.0,
        "step": l.step.as_str(),
        "attempt": l.attempt,
        "stream": l.stream,
        "line": l.line,
    })
}

/// The server-sent-event stream of `?follow=true`.
fn follow_logs(
    state: ApiState,
    id: JobId,
    cursor: Option<store::LogPos>,
) -> axum::response::sse::Sse<
    impl futures_util::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
> {
    use axum::response::sse::{Event as Sse, KeepAlive};
    let stop = state.inner.stop.clone();
    enum Phase {
        Reading(Option<store::LogPos>),
        Done,
    }
    let stream = futures_util::stream::unfold(Phase::Reading(cursor), move |phase| {
        let state = state.clone();
        async move {
            let Phase::Reading(cursor) = phase else {
                return None;
            };
            loop {
                // Whether the job had ended *before* this read: then an empty read means
                // every line has been sent.
                let ended = match fold_job(state.store(), id).await {
                    Ok(Some(job)) if job.phase.is_terminal() => Some(job.phase),
                    _ => None,
                };
                let lines = match state
                    .store()
                    .read_logs(id, cursor.as_ref(), MAX_LIMIT, Duration::from_secs(2))
                    .await
                {
                    Ok(lines) => lines,
                    Err(e) => {
                        // (said as every other answer says it: the store's own error names
                        // servers and files)
                        warn!(job = %id, error = %e, "following a job's logs failed");
                        let event = Sse::default().event("error").data(UNAVAILABLE);
                        return Some((vec![Ok(event)], Phase::Done));
                    }
                };
                if let Some((last, _)) = lines.last() {
                    let next = Phase::Reading(Some(last.clone()));
                    let events = lines
                        .iter()
                        .map(|(pos, l)| {
                            Ok(Sse::default()
                                .event("log")
                                .id(pos.0.clone())
                                .data(log_item(pos, l).to_string()))
                        })
                        .collect();
                    return Some((events, next));
                }
                if let Some(phase) = ended {
                    let end = Sse::default()
                        .event("end")
                        .data(json!({ "state": phase.as_str() }).to_string());
                    return Some((vec![Ok(end)], Phase::Done));
                }
            }
        }
    });
    let flat = futures_util::StreamExt::flat_map(stream, futures_util::stream::iter);
    // The server is shutting down: the follow ends (the client follows again from the last id
    // it got) instead of holding the shutdown until the job ends.
    let stopping = async move {
        match stop {
            Some(mut stop) => {
                let _ = stop.wait_for(|s| *s).await;
            }
            None => std::future::pending().await,
        }
    };
    let flat = futures_util::StreamExt::take_until(flat, stopping);
    axum::response::sse::Sse::new(flat).keep_alive(KeepAlive::default())
}

/// Agents that left or were lost longer ago than this are not listed unless asked for: a fleet
/// that scales agents up and down would otherwise list every agent it ever ran.
pub const GONE_LISTED: Duration = Duration::from_secs(24 * 3600);

/// `GET /agents?all=`: every agent seen, live or not, except those that left or were lost more
/// than [`GONE_LISTED`] ago (counted in `hidden`) unless `all=true`.
async fn list_agents(State(state): State<ApiState>, RawQuery(raw): RawQuery) -> Answer {
    let params = Params::parse(raw);
    let all = match params.get("all") {
        None | Some("false") => false,
        Some("true") => true,
        Some(a) => {
            return Err(ApiError::BadRequest(format!(
                "invalid all {a:?}: expected true or false"
            )))
        }
    };
    let registry = Registry::load(&state).await?;
    let long_ago = store::now_ms().saturating_sub(GONE_LISTED.as_millis() as u64);
    let names: BTreeSet<&AgentId> = registry.known.keys().chain(registry.live.keys()).collect();
    let (shown, hidden): (Vec<&AgentId>, Vec<&AgentId>) = names.into_iter().partition(|name| {
        all || registry.live.contains_key(*name)
            || registry
                .known
                .get(*name)
                .and_then(|a| a.gone_at_ms)
                .is_none_or(|at| at >= long_ago)
    });
    let items: Vec<Value> = shown
        .into_iter()
        .map(|name| {
            let known = registry.known.get(name);
            let deadline = registry.live.get(name).copied();
            json!({
                "name": name,
                "pools": known.map(|a| a.pools.clone()).unwrap_or_default(),
                "labels": known.map(|a| a.labels.clone()).unwrap_or_default(),
                "version": known.map(|a| &a.version),
                "capacity": known.map(|a| a.capacity),
                "joined_at": known.map(|a| time(a.joined_at_ms)),
                "heartbeat_deadline": deadline.map(time),
                "live": deadline.is_some(),
                // A lost agent that heartbeats again is live; its last loss stays on record.
                "lost": known.and_then(|a| a.lost.clone()).filter(|_| deadline.is_none()),
                "left": known.and_then(|a| a.left.clone()).filter(|_| deadline.is_none()),
                "stop_requested": known.and_then(|a| a.stop_requested.clone()).filter(|_| deadline.is_some()),
                "paused": known.and_then(|a| a.paused.clone()),
                "gone_at": known.and_then(|a| a.gone_at_ms).filter(|_| deadline.is_none()).map(time),
            })
        })
        .collect();
    answer(
        StatusCode::OK,
        json!({ "items": items, "next": null, "hidden": hidden.len() }),
    )
}

// ---------------------------------------------------------------------------------------------
// writes

/// `POST /api/v1/agents/{name}/stop` `{"reason"?}`: asks a live agent to stop as on SIGTERM (no
/// new work, running steps finish or are handed back after its grace period, then it records
/// `agent_left` and exits). The agent learns it with its next heartbeat (every lease TTL / 3).
/// 202 with the agent; 404 for an agent never seen; 409 for one that is not live.
async fn stop_agent(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Answer {
    let reason = reason_of(&body, "stop", "requested through the api")?;
    let (agent, registry) = known_agent(&state, &name).await?;
    if !registry.live.contains_key(&agent) {
        return Err(ApiError::Conflict(format!(
            "agent {name} is not live: there is nothing to stop"
        )));
    }
    let request = AgentStopRequested {
        agent: agent.clone(),
        reason: reason.clone(),
    };
    record_for_agents(&state, request.into()).await?;
    info!(%agent, %reason, "agent stop requested through the api");
    answer(
        StatusCode::ACCEPTED,
        json!({ "name": agent, "stop_requested": reason }),
    )
}

/// `POST /api/v1/agents/{name}/pause` `{"reason"?}`: the agent claims no new work until it is
/// resumed; running steps go on, and it stays up (a machine drained for maintenance). The
/// pause is kept across the agent's restarts; the agent hears it with its next heartbeat
/// (every lease TTL / 3). 202 with the agent (also when it was paused already: the new reason
/// replaces the old); 404 for an agent never seen.
async fn pause_agent(
    State(state): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Answer {
    let reason = reason_of(&body, "pause", "paused through the api")?;
    let (agent, _) = known_agent(&state, &name).await?;
    let paused = AgentPaused {
        agent: agent.clone(),
        reason: reason.clone(),
    };
    record_for_agents(&state, paused.into()).await?;
    info!(%agent, %reason, "agent paused through the api");
    answer(
        StatusCode::ACCEPTED,
        json!({ "name": agent, "paused": reason }),
    )
}

/// `POST /api/v1/agents/{name}/resume`: a paused agent claims work again (with its next
/// heartbeat). 202 with the agent; 404 for an agent never seen; 409 for one that is not paused.
async fn resume_agent(State(state): State<ApiState>, Path(name): Path<String>) -> Answer {
    let (agent, registry) = known_agent(&state, &name).await?;
    if registry
        .known
        .get(&agent)
        .is_none_or(|a| a.paused.is_none())
    {
        return Err(ApiError::Conflict(format!(
            "agent {name} is not paused: there is nothing to resume"
        )));
    }
    let resumed = AgentResumed {
        agent: agent.clone(),
    };
    record_for_agents(&state, resumed.into()).await?;
    info!(%agent, "agent resumed through the api");
    answer(
        StatusCode::ACCEPTED,
        json!({ "name": agent, "paused": null }),
    )
}

/// `name` as an agent the store has seen (joined or heartbeating), with the registry it was
/// found in; 404 for an agent never seen.
async fn known_agent(state: &ApiState, name: &str) -> Result<(AgentId, Registry), ApiError> {
    let registry = Registry::load(state).await?;
    let agent = AgentId::new(name);
    if !registry.known.contains_key(&agent) && !registry.live.contains_key(&agent) {
        return Err(ApiError::NotFound(format!("agent {name} not found")));
    }
    Ok((agent, registry))
}

/// Appends `event` to the `agents` stream (a stop, pause or resume the store keeps for the
/// agent's heartbeats).
async fn record_for_agents(state: &ApiState, event: Event) -> Result<(), ApiError> {
    state
        .store()
        .append(Append::new(StreamId::Agents, vec![event]))
        .await?;
    Ok(())
}

/// The body of a cancel, a stop or a pause: `{"reason"?}`, or nothing.
#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

/// The reason a `what` request body gives (at most 500 characters), or `default` when it gives
/// none; a malformed body is a bad request.
fn reason_of(body: &Bytes, what: &str, default: &str) -> Result<String, ApiError> {
    let body: ReasonBody = if body.iter().all(u8::is_ascii_whitespace) {
        ReasonBody::default()
    } else {
        serde_json::from_slice(body)
            .map_err(|e| ApiError::BadRequest(format!("malformed {what} body: {e}")))?
    };
    Ok(body
        .reason
        .map(|r| r.chars().take(500).collect::<String>())
        .filter(|r| !r.trim().is_empty())
        .unwrap_or_else(|| default.into()))
}

async fn cancel_job(State(state): State<ApiState>, Path(id): Path<String>, body: Bytes) -> Answer {
    let id = parse_job_id(&id)?;
    let reason = reason_of(&body, "cancel", "cancelled through the api")?;
    let store = state.store();
    for _ in 0..CONFLICT_RETRIES {
        let mut job = load_job(store, id).await?;
        if job.phase.is_terminal() {
            return Err(ApiError::Conflict(format!(
                "job {id} already ended ({})",
                job.phase.as_str()
            )));
        }
        let cancelled: Event = JobCancelled {
            reason: reason.clone(),
            by: "api".into(),
        }
        .into();
        let append = Append::new(StreamId::Job(id), vec![cancelled.clone()]).expect(job.version);
        let at = append.at_ms;
        match store.append(append).await {
            Ok(_) => {
                info!(job = %id, %reason, "job cancelled through the api");
                job.evolve(&cancelled, at);
                return answer(StatusCode::OK, job_summary(&job));
            }
            Err(store::Error::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict(format!(
        "job {id} kept changing while cancelling it; try again"
    )))
}

/// How long a job remembers that it was retried: a second retry of the same job within it is
/// refused (a client that repeats its POST does not start two jobs).
const RETRY_DEDUPE: Duration = Duration::from_secs(30 * 24 * 3600);

async fn retry_job(State(state): State<ApiState>, Path(id): Path<String>) -> Answer {
    let id = parse_job_id(&id)?;
    let store = state.store();
    let old = load_job(store, id).await?;
    if !old.phase.is_terminal() {
        return Err(ApiError::Conflict(format!(
            "job {id} has not ended ({}): nothing to retry",
            old.phase.as_str()
        )));
    }
    let Some(plan) = old.plan else {
        return Err(ApiError::Conflict(format!("job {id} has no plan to retry")));
    };
    // Design invariant 5: the retry is the newest job, so its deploy would land over a newer
    // tag's. Such deploys are left out of it (GitLab's "outdated deployment jobs"): the build
    // runs again, and shipping the older release on purpose is a manual deploy or a rollback.
    let mut left_out = Vec::new();
    let mut steps = Vec::with_capacity(plan.steps.len());
    for step in &plan.steps {
        if let ferry_proto::StepSpec::Deploy(d) = &step.spec {
            if let Some(newer) = newer_deploy(store, &plan.project, &d.environment, id).await? {
                left_out.push(json!({
                    "step": step.step.to_string(),
                    "environment": d.environment,
                    "newer_job": newer.id,
                    "newer_tag": newer.plan.as_ref().map(|p| p.tag.clone()),
                    "newer_state": newer.phase.as_str(),
                }));
                continue;
            }
        }
        steps.push(step.clone());
    }
    if let (true, Some(newer)) = (steps.is_empty(), left_out.first()) {
        if let (Some(a), Some(at)) = (&plan.artifact, old.artifact_expired_at_ms) {
            let release = crate::deploy::release_name(&plan.tag, &plan.sha);
            return Err(releases::expired(&release, id, a.job, at));
        }
        return Err(ApiError::Conflict(format!(
            "job {id} deploys {} to {}, where the newer job {} ({}) deploys too: a retry \
             would land the older release over it; to ship {} there on purpose use \
             `ferry deploy {} {} --env {}` (or `ferry rollback`)",
            plan.tag,
            newer["environment"].as_str().unwrap_or("?"),
            newer["newer_job"].as_str().unwrap_or("?"),
            newer["newer_state"].as_str().unwrap_or("?"),
            plan.tag,
            plan.project,
            plan.tag,
            newer["environment"].as_str().unwrap_or("?"),
        )));
    }
    let shipped = plan.artifact.clone();
    let created = JobCreated {
        job: JobId::new(),
        trigger: format!("retry:{id}"),
        steps,
        ..plan
    };
    let dedupe = (vec![format!("retry:{id}")], RETRY_DEDUPE);
    let create = async {
        if let Some(a) = &shipped {
            // A deploy or rollback ships an earlier build's artifact: not one that expired.
            if let Some(at) = load_job(store, id).await?.artifact_expired_at_ms {
                let release = crate::deploy::release_name(&created.tag, &created.sha);
                return Err(releases::expired(&release, id, a.job, at));
            }
        }
        create_job_once(store, created, Some(dedupe)).await
    };
    let fresh = match &shipped {
        Some(a) => releases::with_artifact_lock(&state, &a.key, create).await?,
        None => create.await?,
    };
    let Some(fresh) = fresh else {
        return Err(ApiError::Conflict(format!(
            "job {id} was already retried: retry the newer job instead"
        )));
    };
    info!(job = %fresh.id, retry_of = %id, "job retried through the api");
    let mut body = job_summary(&fresh);
    body["retry_of"] = json!(id);
    if !left_out.is_empty() {
        info!(job = %fresh.id, left_out = ?left_out, "deploys a newer job made outdated left out of the retry");
        body["left_out"] = json!(left_out);
    }
    answer(StatusCode::ACCEPTED, body)
}

/// The newest job after `than` that deploys to `environment` of `project` and has not failed
/// or been cancelled or superseded (queued, running or succeeded): what the deploy gate lets
/// win over `than`.
async fn newer_deploy(
    store: &dyn Store,
    project: &str,
    environment: &str,
    than: JobId,
) -> Result<Option<JobState>, ApiError> {
    let mut ids = store
        .indexed(&store::environment_index(project, environment))
        .await?;
    ids.retain(|id| *id > than);
    for id in ids.into_iter().rev() {
        let Some(job) = crate::coordinator::releases::fold(store, id).await? else {
            continue;
        };
        if matches!(
            job.phase,
            JobPhase::Queued | JobPhase::Running | JobPhase::Succeeded
        ) {
            return Ok(Some(job));
        }
    }
    Ok(None)
}

/// Appends a new job's plan and returns its state. Its steps are queued by the coordinators,
/// like a webhook's job, so that a deploy goes through the environment's ordering.
async fn create_job(store: &dyn Store, created: JobCreated) -> Result<JobState, ApiError> {
    Ok(create_job_once(store, created, None)
        .await?
        .expect("an append without dedupe keys is never a duplicate"))
}

/// [`create_job`], unless one of the `dedupe` keys was recorded within its window: then nothing
/// is written and the answer is `None`.
async fn create_job_once(
    store: &dyn Store,
    created: JobCreated,
    dedupe: Option<(Vec<String>, Duration)>,
) -> Result<Option<JobState>, ApiError> {
    let id = created.job;
    let created: Event = created.into();
    let mut append = Append::new(StreamId::Job(id), vec![created.clone()]).expect(0);
    if let Some((keys, window)) = dedupe {
        append = append.dedupe(keys, window);
    }
    let mut fresh = JobState::new(id);
    fresh.evolve(&created, append.at_ms);
    match store.append(append).await? {
        store::Appended::Written { .. } => Ok(Some(fresh)),
        store::Appended::Duplicate { .. } => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(a).unwrap());
        }
        h
    }

    fn check(tokens: &[&str], auth: Option<&str>) -> Result<(), String> {
        let accepted: Vec<[u8; 32]> = tokens.iter().map(|t| digest(t)).collect();
        check_token(&accepted, &headers(auth)).map_err(|e| match e {
            ApiError::Unauthorized(m) => m,
            other => panic!("not a 401: {other:?}"),
        })
    }

    #[test]
    fn bearer_tokens_are_checked() {
        assert_eq!(check(&["a", "s3cret"], Some("Bearer s3cret")), Ok(()));
        assert_eq!(check(&["a", "s3cret"], Some("Bearer a")), Ok(()));
        let cases = [
            (&["s3cret"][..], None, "missing bearer token"),
            (&["s3cret"], Some("Bearer s3cre"), "invalid bearer token"),
            (&["s3cret"], Some("Bearer s3crett"), "invalid bearer token"),
            (
                &["s3cret"],
                Some("Basic czNjcmV0"),
                "malformed authorization",
            ),
            (&["s3cret"], Some("Bearer "), "malformed authorization"),
            (&[], Some("Bearer s3cret"), "no API token is configured"),
        ];
        for (tokens, auth, want) in cases {
            let got = check(tokens, auth).unwrap_err();
            assert!(got.contains(want), "{auth:?}: {got}");
        }
    }

    #[test]
    fn times_are_rfc3339_millis() {
        assert_eq!(time(0), Value::Null);
        assert_eq!(time(1_700_000_000_123), json!("2023-11-14T22:13:20.123Z"));
    }

    #[test]
    fn limits_are_validated() {
        let p = |q: &str| Params::parse(Some(q.to_string())).limit();
        assert_eq!(p("").unwrap(), DEFAULT_LIMIT);
        assert_eq!(p("limit=500").unwrap(), 500);
        for bad in ["limit=0", "limit=501", "limit=x", "limit=-1"] {
            match p(bad) {
                Err(ApiError::BadRequest(m)) => assert!(m.contains("limit"), "{m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
