//! A stand-in for GitLab's REST API that follows `gitlab/contract.md` §5, status codes
//! included: commit statuses, deployments and the paginated tag list (`Link` header),
//! `PRIVATE-TOKEN` auth, GitLab-shaped errors, and
//! faults on demand (409, 429 with `Retry-After`, 500, ... for the next N calls). It records every
//! call it receives.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One request the mock received and what it answered.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    pub path: String,
    /// The `PRIVATE-TOKEN` header, as sent.
    pub token: Option<String>,
    pub body: Value,
    pub answer: u16,
    pub at: Instant,
}

impl Call {
    pub fn field(&self, name: &str) -> Option<&str> {
        self.body.get(name).and_then(Value::as_str)
    }
}

#[derive(Default)]
struct Mock {
    token: String,
    /// The status the next `n` calls are answered with, whatever they ask.
    fault: Option<(u16, usize)>,
    /// `Retry-After` seconds sent with a 429.
    retry_after: u64,
    calls: Vec<Call>,
    /// The current state of each `(project, sha, name, ref)`.
    statuses: HashMap<(String, String, String, String), String>,
    deployments: HashMap<u64, Value>,
    next_id: u64,
    /// Each project's tags, as `GET /projects/:id/repository/tags` lists them.
    tags: HashMap<String, Vec<Value>>,
    /// The base URL, for `Link` headers.
    url: String,
}

/// A running mock GitLab on `127.0.0.1:<free port>`.
pub struct GitlabMock {
    /// `http://127.0.0.1:<port>`: the instance URL (the API is under `/api/v4`).
    pub url: String,
    state: Arc<Mutex<Mock>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GitlabMock {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GitlabMock {
    /// Starts a mock that accepts `token`.
    pub async fn start(token: &str) -> GitlabMock {
        let state = Arc::new(Mutex::new(Mock {
            token: token.to_string(),
            retry_after: 1,
            next_id: 1,
            ..Default::default()
        }));
        let app = Router::new()
            .route("/api/v4/projects/{id}/statuses/{sha}", post(post_status))
            .route("/api/v4/projects/{id}/deployments", post(create_deployment))
            .route(
                "/api/v4/projects/{id}/deployments/{deployment}",
                put(update_deployment),
            )
            .route("/api/v4/projects/{id}/repository/tags", get(list_tags))
            .fallback(not_found)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        state.lock().unwrap().url = url.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        GitlabMock { url, state, task }
    }

    pub fn base(&self) -> url::Url {
        self.url.parse().unwrap()
    }

    /// Answers the next `n` calls with `status` (409, 429, 500, ...) instead of handling them.
    pub fn fail_next(&self, status: u16, n: usize) {
        self.state.lock().unwrap().fault = Some((status, n));
    }

    /// The `Retry-After` (seconds) a 429 carries.
    pub fn set_retry_after(&self, secs: u64) {
        self.state.lock().unwrap().retry_after = secs;
    }

    /// Sets project `id`'s tags (GitLab's tag entities: `name`, `target`, `commit`, ...).
    pub fn set_tags(&self, id: u64, tags: Vec<Value>) {
        self.state.lock().unwrap().tags.insert(id.to_string(), tags);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.state.lock().unwrap().calls.clone()
    }

    /// Commit-status calls answered 201, in order.
    pub fn accepted_statuses(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.path.contains("/statuses/") && c.answer == 201)
            .collect()
    }
}

type Shared = Arc<Mutex<Mock>>;

fn answer(status: u16, body: Value) -> Response {
    (StatusCode::from_u16(status).unwrap(), axum::Json(body)).into_response()
}

/// Auth, then injected faults. `Some` is the answer to give instead of handling the call.
fn gate(mock: &mut Mock, headers: &HeaderMap) -> Option<Response> {
    let token = headers.get("private-token").and_then(|v| v.to_str().ok());
    if token != Some(mock.token.as_str()) {
        return Some(answer(401, json!({"message": "401 Unauthorized"})));
    }
    let (status, left) = mock.fault?;
    mock.fault = (left > 1).then(|| (status, left - 1));
    Some(match status {
        409 => answer(
            409,
            json!({"message": "Another update to this commit status is in progress"}),
        ),
        429 => (
            StatusCode::TOO_MANY_REQUESTS,
            [
                ("retry-after", mock.retry_after.to_string()),
                ("ratelimit-limit", "600".to_string()),
                ("ratelimit-remaining", "0".to_string()),
            ],
            "Retry later\n",
        )
            .into_response(),
        500 => answer(500, json!({"message": "500 Internal Server Error"})),
        other => answer(other, json!({"message": format!("{other} injected")})),
    })
}

fn record(
    mock: &mut Mock,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
    r: &Response,
) {
    mock.calls.push(Call {
        method: method.to_string(),
        path: uri.path().to_string(),
        token: headers
            .get("private-token")
            .and_then(|v| v.to_str().ok())
            .map(String::from),
        body: serde_json::from_slice(body).unwrap_or(Value::Null),
        answer: r.status().as_u16(),
        at: Instant::now(),
    });
}

fn text(body: &Value, key: &str) -> Option<String> {
    body.get(key).and_then(Value::as_str).map(String::from)
}

async fn post_status(
    State(state): State<Shared>,
    Path((project, sha)): Path<(String, String)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut mock = state.lock().unwrap();
    let response = gate(&mut mock, &headers).unwrap_or_else(|| {
        let Ok(params) = serde_json::from_slice::<Value>(&body) else {
            return answer(400, json!({"error": "400 Bad request"}));
        };
        status_answer(&mut mock, &project, &sha, &params)
    });
    record(&mut mock, &method, &uri, &headers, &body, &response);
    response
}

fn status_answer(mock: &mut Mock, project: &str, sha: &str, params: &Value) -> Response {
    let Some(state) = text(params, "state") else {
        return answer(400, json!({"error": "state is missing"}));
    };
    let event = match state.as_str() {
        "pending" => "enqueue",
        "running" => "run",
        "success" => "success",
        "failed" => "drop",
        "canceled" => "cancel",
        "skipped" => "skip",
        _ => return answer(400, json!({"error": "state does not have a valid value"})),
    };
    if sha.is_empty() || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
        return answer(404, json!({"message": "404 Commit Not Found"}));
    }
    // Without a ref GitLab looks on the default branch, where a tagged commit may not be.
    let Some(git_ref) = text(params, "ref") else {
        return answer(
            404,
            json!({"message": "404 References for commit Not Found"}),
        );
    };
    let name = text(params, "name")
        .or_else(|| text(params, "context"))
        .unwrap_or_else(|| "default".into());
    if let Some(url) = text(params, "target_url") {
        let ok = (url.starts_with("http://") || url.starts_with("https://"))
            && url.chars().count() <= 255;
        if !ok {
            return answer(
                400,
                json!({"message": {"target_url": ["is blocked: Only allowed schemes are http, https"]}}),
            );
        }
    }
    if text(params, "description").is_some_and(|d| d.chars().count() > 255) {
        return answer(
            400,
            json!({"message": {"description": ["is too long (maximum is 255 characters)"]}}),
        );
    }
    let key = (
        project.to_string(),
        sha.to_string(),
        name.clone(),
        git_ref.clone(),
    );
    if mock.statuses.get(&key) == Some(&state) {
        return answer(
            400,
            json!({"message": format!("Cannot transition status via :{event} from :{state}")}),
        );
    }
    mock.statuses.insert(key, state.clone());
    let id = mock.next_id;
    mock.next_id += 1;
    answer(
        201,
        json!({
            "id": id,
            "sha": sha,
            "ref": git_ref,
            "status": state,
            "name": name,
            "target_url": params.get("target_url"),
            "description": params.get("description"),
            "created_at": "2025-01-01T00:00:00.000Z",
            "allow_failure": false,
        }),
    )
}

async fn create_deployment(
    State(state): State<Shared>,
    Path(_project): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut mock = state.lock().unwrap();
    let response = gate(&mut mock, &headers).unwrap_or_else(|| {
        let params: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        for key in ["environment", "sha", "ref", "tag", "status"] {
            if params.get(key).is_none() {
                return answer(400, json!({"error": format!("{key} is missing")}));
            }
        }
        let status = text(&params, "status").unwrap_or_default();
        if !["running", "success", "failed", "canceled"].contains(&status.as_str()) {
            return answer(400, json!({"error": "status does not have a valid value"}));
        }
        let id = mock.next_id;
        mock.next_id += 1;
        let entity = json!({
            "id": id,
            "iid": id,
            "ref": params["ref"],
            "sha": params["sha"],
            "status": status,
            "environment": {"name": params["environment"]},
        });
        mock.deployments.insert(id, entity.clone());
        answer(201, entity)
    });
    record(&mut mock, &method, &uri, &headers, &body, &response);
    response
}

async fn update_deployment(
    State(state): State<Shared>,
    Path((_project, deployment)): Path<(String, u64)>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut mock = state.lock().unwrap();
    let response = gate(&mut mock, &headers).unwrap_or_else(|| {
        let params: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let Some(status) = text(&params, "status") else {
            return answer(400, json!({"error": "status is missing"}));
        };
        match mock.deployments.get_mut(&deployment) {
            None => answer(404, json!({"message": "404 Not found"})),
            Some(entity) => {
                entity["status"] = json!(status);
                answer(200, entity.clone())
            }
        }
    });
    record(&mut mock, &method, &uri, &headers, &body, &response);
    response
}

/// `GET /projects/:id/repository/tags?page=&per_page=`: a page of tags, with a `Link` header
/// naming the next page (and the first) as GitLab does.
async fn list_tags(
    State(state): State<Shared>,
    Path(project): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let mut mock = state.lock().unwrap();
    let response = gate(&mut mock, &headers).unwrap_or_else(|| {
        let Some(tags) = mock.tags.get(&project) else {
            return answer(404, json!({"message": "404 Project Not Found"}));
        };
        let query: HashMap<String, String> =
            url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
                .into_owned()
                .collect();
        let num = |k: &str, default: usize| {
            query
                .get(k)
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(default)
        };
        let (page, per_page) = (num("page", 1).max(1), num("per_page", 20).clamp(1, 100));
        let items: Vec<Value> = tags
            .iter()
            .skip((page - 1) * per_page)
            .take(per_page)
            .cloned()
            .collect();
        let link = |p: usize, rel: &str| {
            format!(
                "<{}{}?page={p}&per_page={per_page}>; rel=\"{rel}\"",
                mock.url,
                uri.path()
            )
        };
        let mut links = Vec::new();
        if page * per_page < tags.len() {
            links.push(link(page + 1, "next"));
        }
        links.push(link(1, "first"));
        let mut r = answer(200, Value::Array(items));
        r.headers_mut()
            .insert("link", links.join(", ").parse().unwrap());
        r
    });
    record(&mut mock, &method, &uri, &headers, &Bytes::new(), &response);
    response
}

async fn not_found() -> Response {
    answer(404, json!({"error": "404 Not Found"}))
}
