//! The webhook intake. `POST /hooks/gitlab` turns one GitLab delivery into one `WebhookReceived`
//! event in the `webhooks` stream, deduplicated atomically with the append; the coordinator turns
//! the events that act into jobs. Also `GET /healthz`, `GET /readyz` and `GET /metrics`.
//!
//! A delivery goes through, in this order: size (413) → JSON (400) → project (200 `ignored`,
//! nothing stored, for a project not configured: a group hook delivers every project's events) →
//! authenticity (401) → required fields (400) → classification → append (503 when the store
//! fails). The gateway answers 2xx only after the append returned: nothing accepted is lost
//! (invariant 1). Ignored deliveries are appended too (action `ignored`), so history shows them,
//! and get 200: GitLab counts every 4xx and 5xx toward disabling the hook.
//!
//! Dedupe keys, recorded by the store in the same atomic operation as the event (invariant 2):
//! - `delivery:<project>:<id>` from `webhook-id` or `Idempotency-Key` (the same UUID on every
//!   redelivery of one event by one hook). `webhook-id` comes first: it is covered by the
//!   signature.
//! - `content:<project_id>:<ref>:<before>:<after>` for pushes: one push delivered by a project
//!   hook and a group hook carries two keys but one content.
//!
//! Tokens and signatures never enter the event (invariant 10).

pub mod auth;
pub mod hook;
mod metrics;
mod options;

pub use auth::{InvalidSigningToken, SigningKey};
pub use hook::{Decision, EventKind};
pub use metrics::{Metrics, Outcome};
pub use options::{GatewayOptions, OnTagMove, ProjectHooks, Secret};

use crate::store::{Append, Appended, Store, StreamId};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_proto::{Event, JobId, WebhookReceived};
use hook::Hook;
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tracing::{debug, error, warn};

/// Everything the gateway's handlers share. Cheap to clone.
#[derive(Clone)]
pub struct GatewayState {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn Store>,
    projects: Projects,
    options: GatewayOptions,
    metrics: Metrics,
    not_served: NotServedLog,
    /// What `/metrics` renders: the gateway's own metrics, plus whatever else the process
    /// registered in it.
    registry: prometheus::Registry,
}

/// Why a [`GatewayState`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("project {0} is listed twice")]
    DuplicateProject(String),
    #[error("cannot register gateway metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

impl GatewayState {
    /// A gateway over `store` for `projects`, with its own metrics registry.
    pub fn new(
        store: Arc<dyn Store>,
        projects: Vec<ProjectHooks>,
        options: GatewayOptions,
    ) -> Result<Self, Error> {
        Self::with_registry(store, projects, options, prometheus::Registry::new())
    }

    /// A gateway whose metrics live in `registry` (shared with the other roles of the process);
    /// `/metrics` renders the whole registry.
    pub fn with_registry(
        store: Arc<dyn Store>,
        projects: Vec<ProjectHooks>,
        options: GatewayOptions,
        registry: prometheus::Registry,
    ) -> Result<Self, Error> {
        let projects = Projects::new(projects)?;
        let metrics = Metrics::register(&registry)?;
        Ok(GatewayState {
            inner: Arc::new(Inner {
                store,
                projects,
                options,
                metrics,
                not_served: NotServedLog::default(),
                registry,
            }),
        })
    }
}

/// Says in the log, at most once a minute, that deliveries for projects the gateway does not
/// serve were ignored: a project missing from the configuration, or configured under another
/// path, would otherwise show only in `ferry_webhooks_total{outcome="unknown_project"}`.
#[derive(Default)]
struct NotServedLog {
    /// When it was said last, and how many deliveries since.
    said: Mutex<(Option<Instant>, u64)>,
}

impl NotServedLog {
    fn note(&self, reason: &str) {
        let mut said = self.said.lock().expect("not-served log lock");
        said.1 += 1;
        if said
            .0
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
        {
            warn!(
                deliveries = said.1,
                last = reason,
                "ignored webhook deliveries for projects that are not configured (a group hook's other projects, or a project missing from the configuration)"
            );
            *said = (Some(Instant::now()), 0);
        }
    }
}

/// The gateway's routes: `POST /hooks/gitlab`, `GET /healthz`, `GET /readyz`, `GET /metrics`.
pub fn router(state: GatewayState) -> Router {
    let limit = state.inner.options.max_body_bytes;
    Router::new()
        .route(
            "/hooks/gitlab",
            post(receive).layer(DefaultBodyLimit::max(limit)),
        )
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serves the gateway on `listener` until `shutdown` resolves, then finishes the requests in
/// flight.
pub async fn serve(
    listener: TcpListener,
    state: GatewayState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Header names the gateway reads.
pub mod headers {
    pub const EVENT: &str = "x-gitlab-event";
    pub const TOKEN: &str = "x-gitlab-token";
    pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
    pub const WEBHOOK_ID: &str = "webhook-id";
    pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
    pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
}

/// A delivery the gateway stored (or had already stored), or one for a project it does not
/// serve, which it stores nothing of.
#[derive(Debug)]
enum Reply {
    Accepted {
        event_id: String,
    },
    Duplicate {
        event_id: String,
    },
    Ignored {
        reason: String,
    },
    /// A group hook also delivers the events of the group's other projects, and of the group
    /// itself: answered 2xx like any ignored event (GitLab counts every 4xx toward disabling
    /// the hook, and would then drop the events of the projects ferry serves), unauthenticated
    /// (the credentials are the project's) and so not stored.
    NotServed {
        reason: String,
    },
}

/// Why a delivery was refused. The one place that maps failures to status codes; messages say
/// what was wrong with the request and never carry internals or secrets.
#[derive(Debug)]
enum Rejection {
    TooLarge(usize),
    BadRequest(String),
    Unauthorized(auth::Error),
    Unavailable,
}

impl Reply {
    fn outcome(&self) -> Outcome {
        match self {
            Reply::Accepted { .. } => Outcome::Accepted,
            Reply::Duplicate { .. } => Outcome::Duplicate,
            Reply::Ignored { .. } => Outcome::Ignored,
            Reply::NotServed { .. } => Outcome::UnknownProject,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        match self {
            Reply::Accepted { event_id } => (
                StatusCode::ACCEPTED,
                Json(json!({ "event_id": event_id, "duplicate": false })),
            ),
            Reply::Duplicate { event_id } => (
                StatusCode::OK,
                Json(json!({ "event_id": event_id, "duplicate": true })),
            ),
            Reply::Ignored { reason } | Reply::NotServed { reason } => {
                (StatusCode::OK, Json(json!({ "ignored": reason })))
            }
        }
        .into_response()
    }
}

impl Rejection {
    fn outcome(&self) -> Outcome {
        match self {
            Rejection::TooLarge(_) => Outcome::TooLarge,
            Rejection::BadRequest(_) => Outcome::BadRequest,
            Rejection::Unauthorized(_) => Outcome::Unauthorized,
            Rejection::Unavailable => Outcome::Unavailable,
        }
    }
}

impl From<hook::Error> for Rejection {
    fn from(e: hook::Error) -> Self {
        Rejection::BadRequest(e.to_string())
    }
}

impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Rejection::TooLarge(limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body exceeds {limit} bytes"),
            ),
            Rejection::BadRequest(message) => (StatusCode::BAD_REQUEST, message),
            Rejection::Unauthorized(e) => (StatusCode::UNAUTHORIZED, e.to_string()),
            Rejection::Unavailable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "event store unavailable".to_string(),
            ),
        };
        error_response(status, &message)
    }
}

fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({ "error": message }))).into_response()
}

async fn receive(
    State(state): State<GatewayState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = Instant::now();
    let kind = EventKind::from_header(header_str(&headers, headers::EVENT));
    let (outcome, response) = match state.intake(kind, &headers, body).await {
        Ok(reply) => (reply.outcome(), reply.into_response()),
        Err(rejection) => {
            debug!(event = kind.label(), ?rejection, "webhook refused");
            (rejection.outcome(), rejection.into_response())
        }
    };
    state.inner.metrics.record(kind, outcome, started.elapsed());
    response
}

impl GatewayState {
    async fn intake(
        &self,
        kind: EventKind,
        headers: &HeaderMap,
        body: Result<Bytes, BytesRejection>,
    ) -> Result<Reply, Rejection> {
        let options = &self.inner.options;
        let limit = options.max_body_bytes;
        // The body limit layer stops reading at `limit`; a declared length over it is refused
        // before reading anything.
        let declared = header_str(headers, header::CONTENT_LENGTH.as_str())
            .and_then(|n| n.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(Rejection::TooLarge(limit));
        }
        let body = body.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                Rejection::TooLarge(limit)
            } else {
                Rejection::BadRequest("cannot read request body".into())
            }
        })?;
        if body.len() > limit {
            return Err(Rejection::TooLarge(limit));
        }

        let hook = Hook::parse(&body)?;
        let project = match self.inner.projects.find(&hook) {
            Ok(project) => project,
            Err(reason) => {
                self.inner.not_served.note(&reason);
                return Ok(Reply::NotServed { reason });
            }
        };
        let creds = auth::Credentials {
            token: header_bytes(headers, headers::TOKEN),
            webhook_id: header_bytes(headers, headers::WEBHOOK_ID),
            timestamp: header_bytes(headers, headers::WEBHOOK_TIMESTAMP),
            signature: header_bytes(headers, headers::WEBHOOK_SIGNATURE),
        };
        auth::authenticate(
            project,
            &creds,
            &body,
            unix_now(),
            options.signature_tolerance,
        )
        .map_err(Rejection::Unauthorized)?;
        let decision = hook::classify(kind, &hook, project)?;
        let delivery_id = delivery_id(headers)?;

        let event = WebhookReceived {
            delivery_id: delivery_id.clone(),
            event: event_name(kind, headers),
            job: decision.builds().then(JobId::new),
            project_id: hook.project_id.or(project.id),
            // As configured: the payload may spell it in another case (or, found by id, name
            // the project by a path it has since been renamed from).
            project_path: Some(project.path.clone()),
            git_ref: hook.git_ref.clone(),
            before: hook.before.clone(),
            after: hook.after.clone(),
            checkout_sha: hook.checkout_sha.clone(),
            user: hook.user.clone(),
            // A configured URL wins over the one in the payload.
            clone_url: project.clone_url.clone().or(hook.clone_url.clone()),
            action: decision.action().to_string(),
            reason: decision.reason(),
        };
        let (keys, forget) = (dedupe_keys(&event), forget_keys(&event));
        let append = Append::new(StreamId::Webhooks, vec![Event::WebhookReceived(event)])
            .dedupe(keys, options.dedupe_window)
            .forget(forget);

        let appended = tokio::time::timeout(options.store_timeout, self.inner.store.append(append))
            .await
            .map_err(|_| {
                error!(timeout = ?options.store_timeout, "webhook not stored: event store timed out");
                Rejection::Unavailable
            })?
            .map_err(|e| {
                error!(error = %e, "webhook not stored");
                Rejection::Unavailable
            })?;
        match appended {
            Appended::Duplicate { original } => {
                debug!(%original, ?delivery_id, "duplicate webhook");
                Ok(Reply::Duplicate {
                    event_id: original.to_string(),
                })
            }
            Appended::Written { positions, .. } => {
                let event_id = positions.first().map(ToString::to_string).ok_or_else(|| {
                    error!("webhook append returned no log position");
                    Rejection::Unavailable
                })?;
                debug!(%event_id, project = %project.path, action = decision.action(), "webhook stored");
                Ok(match decision {
                    Decision::Ignore { reason } => Reply::Ignored { reason },
                    _ => Reply::Accepted { event_id },
                })
            }
        }
    }
}

/// Projects indexed by id and by lowercase path.
struct Projects {
    list: Vec<ProjectHooks>,
    by_id: HashMap<u64, usize>,
    by_path: HashMap<String, usize>,
}

impl Projects {
    fn new(list: Vec<ProjectHooks>) -> Result<Self, Error> {
        let mut by_id = HashMap::new();
        let mut by_path = HashMap::new();
        for (i, p) in list.iter().enumerate() {
            if let Some(id) = p.id {
                if by_id.insert(id, i).is_some() {
                    return Err(Error::DuplicateProject(id.to_string()));
                }
            }
            if by_path.insert(p.path.to_ascii_lowercase(), i).is_some() {
                return Err(Error::DuplicateProject(p.path.clone()));
            }
        }
        Ok(Projects {
            list,
            by_id,
            by_path,
        })
    }

    /// The project a delivery is for: by `project_id` when the project's id is configured, else
    /// by `path_with_namespace`. A project with a configured id never matches on path alone (a
    /// project deleted and recreated under the same path is another project). Otherwise why
    /// none is.
    fn find(&self, hook: &Hook) -> Result<&ProjectHooks, String> {
        if hook.project_id.is_none() && hook.project_path.is_none() {
            return Err("the delivery names no project".into());
        }
        let by_id = hook.project_id.and_then(|id| self.by_id.get(&id));
        let by_path = || {
            let path = hook.project_path.as_deref()?.to_ascii_lowercase();
            self.by_path
                .get(&path)
                .filter(|i| self.list[**i].id.is_none())
        };
        by_id
            .or_else(by_path)
            .map(|i| &self.list[*i])
            .ok_or_else(|| {
                let named = match (hook.project_id, &hook.project_path) {
                    (Some(id), Some(path)) => format!("project {id} ({path})"),
                    (Some(id), None) => format!("project {id}"),
                    (None, Some(path)) => format!("project {path}"),
                    (None, None) => unreachable!("checked above"),
                };
                format!("{named} is not configured")
            })
    }
}

/// `webhook-id`, else `Idempotency-Key`; an empty header counts as absent. A key is at most 255
/// visible ASCII characters (GitLab sends UUIDs).
fn delivery_id(headers: &HeaderMap) -> Result<Option<String>, Rejection> {
    for name in [headers::WEBHOOK_ID, headers::IDEMPOTENCY_KEY] {
        let Some(value) = header_bytes(headers, name).filter(|v| !v.is_empty()) else {
            continue;
        };
        if value.len() > 255 || !value.iter().all(|b| b.is_ascii_graphic()) {
            return Err(Rejection::BadRequest(format!("malformed {name} header")));
        }
        return Ok(Some(String::from_utf8_lossy(value).into_owned()));
    }
    Ok(None)
}

/// The dedupe keys of a delivery, from what is stored of it: `delivery:<project>:<id>` when it
/// carried an id (`<project>` is the numeric id, else the lowercased path), and
/// `content:<project_id>:<ref>:<before>:<after>` for a push that carries all four. The gateway
/// records exactly these with the append; `ferry migrate` records them again in the target, so a
/// redelivery after a move is still a duplicate.
pub fn dedupe_keys(w: &WebhookReceived) -> Vec<String> {
    let mut keys = Vec::with_capacity(2);
    let project = w
        .project_id
        .map(|id| id.to_string())
        .or_else(|| w.project_path.as_ref().map(|p| p.to_ascii_lowercase()));
    if let (Some(project), Some(id)) = (&project, &w.delivery_id) {
        keys.push(format!("delivery:{project}:{id}"));
    }
    let push = matches!(
        EventKind::from_header(Some(&w.event)),
        EventKind::TagPush | EventKind::Push
    );
    if let (true, Some(id), Some(r), Some(b), Some(a)) =
        (push, w.project_id, &w.git_ref, &w.before, &w.after)
    {
        keys.push(format!("content:{id}:{r}:{b}:{a}"));
    }
    keys
}

/// The dedupe keys a delivery ends once stored: the content key of the push that went the
/// other way (`before` and `after` swapped). A tag's deletion ends its creation's key and a
/// creation its deletion's, so a tag deleted and pushed again at the same commit (to run it
/// again) is a new delivery each time, not a duplicate of the first; likewise a tag or branch
/// moved back and forth. The gateway, reconciliation and `ferry migrate` apply them with the
/// append, as they record [`dedupe_keys`].
pub fn forget_keys(w: &WebhookReceived) -> Vec<String> {
    let push = matches!(
        EventKind::from_header(Some(&w.event)),
        EventKind::TagPush | EventKind::Push
    );
    match (push, w.project_id, &w.git_ref, &w.before, &w.after) {
        (true, Some(id), Some(r), Some(b), Some(a)) if a != b => {
            vec![format!("content:{id}:{r}:{a}:{b}")]
        }
        _ => Vec::new(),
    }
}

/// `WebhookReceived.event`: the header as sent, cut to 64 characters.
fn event_name(kind: EventKind, headers: &HeaderMap) -> String {
    match header_str(headers, headers::EVENT) {
        Some(value) if kind == EventKind::Other => value.chars().take(64).collect(),
        Some(value) => value.trim().to_string(),
        None => String::new(),
    }
}

fn header_bytes<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get(name).map(|v| v.as_bytes())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

async fn healthz() -> Response {
    (StatusCode::OK, Json(json!({ "status": "ok" }))).into_response()
}

async fn readyz(State(state): State<GatewayState>) -> Response {
    let ping = tokio::time::timeout(state.inner.options.store_timeout, state.inner.store.ping());
    match ping.await {
        Ok(Ok(())) => (StatusCode::OK, Json(json!({ "status": "ready" }))).into_response(),
        Ok(Err(e)) => {
            debug!(error = %e, "not ready");
            error_response(StatusCode::SERVICE_UNAVAILABLE, "event store unavailable")
        }
        Err(_) => error_response(StatusCode::SERVICE_UNAVAILABLE, "event store unavailable"),
    }
}

async fn render_metrics(State(state): State<GatewayState>) -> Response {
    // The gateway's own registry, after the process-wide one (the coordinator's and agent's
    // metrics when they run in this process, as under `ferry up`).
    crate::metrics::render(Some(&state.inner.registry))
}

async fn not_found() -> Response {
    error_response(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed() -> Response {
    error_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
}
