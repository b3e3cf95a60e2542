//! The GitLab REST API client: commit statuses and deployments, with the retry rules of
//! `gitlab/contract.md` §5.
//!
//! Outcomes of a call:
//! - 2xx: done.
//! - 400 whose message contains `Cannot transition status` (commit statuses only): the commit
//!   already has that state, which counts as done.
//! - 409, 429, 5xx, timeouts and connection errors: retried with exponential backoff and jitter.
//!   A 429 waits for `Retry-After`, else `RateLimit-Reset`, else the backoff. After
//!   [`Retry::attempts`] attempts, or when the next wait would pass [`Retry::budget`], the call
//!   gives up with [`Error::GaveUp`], and the client sends nothing more for the `Retry-After`
//!   (at most an hour; else [`Retry::max_delay`]): calls made meanwhile fail at once, unsent
//!   ([`Error::Held`]).
//! - 401, 403, 404 and every other 4xx: [`Error::Rejected`] at once, with GitLab's message.
//!
//! The token is only ever written into the `PRIVATE-TOKEN` header: it is not part of any URL,
//! error or log line.

use crate::config::Secret;
use serde::{Deserialize, Serialize};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tracing::{debug, warn};
use url::Url;

/// Longest `target_url` and `description` GitLab accepts.
pub const MAX_FIELD_CHARS: usize = 255;

/// What a call to GitLab came to when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// GitLab refused the request for good (401, 403, 404, a validation error, ...).
    #[error("gitlab refused {what} with {status}: {message}")]
    Rejected {
        what: String,
        status: u16,
        message: String,
    },
    /// GitLab could not be reached, or kept answering with a retryable status.
    #[error("gitlab did not accept {what} after {attempts} attempts: {last}")]
    GaveUp {
        what: String,
        attempts: u32,
        /// The last HTTP status, when GitLab answered at all.
        status: Option<u16>,
        last: String,
    },
    /// Not sent: a call gave up a moment ago, and the client holds calls until then.
    #[error("{what} not sent: gitlab failed a call just before; calls resume in {resume_ms} ms")]
    Held { what: String, resume_ms: u64 },
    /// The request itself is not valid (never sent).
    #[error("invalid {field} for {what}: {reason}")]
    Invalid {
        what: String,
        field: &'static str,
        reason: String,
    },
    /// GitLab answered 2xx with a body this client cannot read.
    #[error("unreadable gitlab answer to {what}: {reason}")]
    Unreadable { what: String, reason: String },
}

impl Error {
    /// The HTTP status GitLab last answered with, if it answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Error::Rejected { status, .. } => Some(*status),
            Error::GaveUp { status, .. } => *status,
            Error::Held { .. } | Error::Invalid { .. } | Error::Unreadable { .. } => None,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a call retries. The total time is bounded by both `attempts` and `budget`, so that a
/// GitLab that is down costs a caller a known, small amount of time.
#[derive(Clone, Debug)]
pub struct Retry {
    /// Attempts in all, the first one included (at least 1).
    pub attempts: u32,
    /// The first backoff; it doubles per attempt, with jitter (half to full).
    pub base: Duration,
    /// Cap on one backoff.
    pub max_delay: Duration,
    /// The call gives up rather than wait past this much time since its start, including a
    /// `Retry-After` that asks for longer.
    pub budget: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 5,
            base: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
            budget: Duration::from_secs(30),
        }
    }
}

impl Retry {
    /// The backoff before attempt `next` (2 = the first retry), given `jitter` in [0, 1].
    pub fn delay(&self, next: u32, jitter: f64) -> Duration {
        let exp = next.saturating_sub(2).min(30);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.max_delay);
        raw.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// A commit status state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatusState {
    Pending,
    Running,
    Success,
    Failed,
    Canceled,
    Skipped,
}

impl StatusState {
    pub fn as_str(self) -> &'static str {
        match self {
            StatusState::Pending => "pending",
            StatusState::Running => "running",
            StatusState::Success => "success",
            StatusState::Failed => "failed",
            StatusState::Canceled => "canceled",
            StatusState::Skipped => "skipped",
        }
    }

    /// `success`, `failed`, `canceled` and `skipped` end a status.
    pub fn is_final(self) -> bool {
        !matches!(self, StatusState::Pending | StatusState::Running)
    }
}

/// The body of `POST /projects/:id/statuses/:sha`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusRequest {
    pub state: StatusState,
    /// The short tag (or branch) name. Without it a commit only reachable from a tag gives 404.
    #[serde(rename = "ref")]
    pub ref_: String,
    /// A stable label per step, e.g. `ferry/build`.
    pub name: String,
    /// A link to the job: http(s) and at most 255 characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_url: Option<String>,
    /// Truncated to 255 characters when sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A posted commit status that counts as done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusOutcome {
    /// 201: GitLab recorded it.
    Created { http_status: u16 },
    /// 400 `Cannot transition status ...`: the commit already had that state.
    AlreadyDone { http_status: u16, message: String },
}

impl StatusOutcome {
    pub fn http_status(&self) -> u16 {
        match self {
            StatusOutcome::Created { http_status }
            | StatusOutcome::AlreadyDone { http_status, .. } => *http_status,
        }
    }
}

/// A deployment status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeploymentStatus {
    Running,
    Success,
    Failed,
    Canceled,
}

impl DeploymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeploymentStatus::Running => "running",
            DeploymentStatus::Success => "success",
            DeploymentStatus::Failed => "failed",
            DeploymentStatus::Canceled => "canceled",
        }
    }
}

/// The body of `POST /projects/:id/deployments`; `tag` is always `true` (ferry deploys tags).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeploymentRequest {
    /// Created by GitLab when missing.
    pub environment: String,
    pub sha: String,
    /// The short tag name.
    pub ref_: String,
    pub status: DeploymentStatus,
}

/// What GitLab answers about a deployment (the fields ferry uses).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Deployment {
    pub id: u64,
    pub status: String,
}

/// A tag as `GET /projects/:id/repository/tags` lists it (the fields ferry uses).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Tag {
    pub name: String,
    /// What the tag points at: the commit for a lightweight tag, the tag object for an
    /// annotated one (what a Tag Push webhook sends as `after`).
    pub target: String,
    pub commit: TagCommit,
    /// When an annotated tag was made (null for lightweight tags).
    #[serde(default)]
    pub created_at: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct TagCommit {
    pub id: String,
    #[serde(default)]
    pub committed_date: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
}

/// A GitLab API client. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// `{url}/api/v4`, without a trailing slash.
    api: String,
    token: Secret,
    retry: Retry,
    /// Until when calls are not sent: set when a call gave up (for GitLab's `Retry-After`, else
    /// [`Retry::max_delay`]), so that a GitLab that is down or rate-limiting is not called by
    /// every caller at once; shared by the clones.
    hold: std::sync::Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
}

impl Client {
    /// A client for the GitLab at `base` (e.g. `https://gitlab.example.com`), with the default
    /// [`Retry`] and a 10 second request timeout.
    pub fn new(base: &Url, token: Secret) -> Result<Client> {
        Self::with_options(base, token, Retry::default(), Duration::from_secs(10))
    }

    pub fn with_options(
        base: &Url,
        token: Secret,
        retry: Retry,
        request_timeout: Duration,
    ) -> Result<Client> {
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::Invalid {
                what: "the gitlab client".into(),
                field: "gitlab.url",
                reason: format!("{base}: expected http or https"),
            });
        }
        let http = reqwest::Client::builder()
            .timeout(request_timeout)
            .connect_timeout(request_timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("ferry/", env!("CARGO_PKG_VERSION")))
            // Every request carries the token in PRIVATE-TOKEN, which a followed redirect would
            // send to wherever it points (only Authorization and Cookie are dropped on a change
            // of host): a redirect is answered as an error naming where it pointed.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Invalid {
                what: "the gitlab client".into(),
                field: "http client",
                reason: e.to_string(),
            })?;
        Ok(Client {
            http,
            api: format!("{}/api/v4", base.as_str().trim_end_matches('/')),
            token,
            retry: Retry {
                attempts: retry.attempts.max(1),
                ..retry
            },
            hold: Default::default(),
        })
    }

    /// `POST /projects/:id/statuses/:sha`.
    pub async fn post_status(
        &self,
        project_id: u64,
        sha: &str,
        request: &StatusRequest,
    ) -> Result<StatusOutcome> {
        let what = format!(
            "commit status {} {} on {sha}",
            request.name,
            request.state.as_str()
        );
        if let Some(url) = &request.target_url {
            check_target_url(url).map_err(|reason| Error::Invalid {
                what: what.clone(),
                field: "target_url",
                reason,
            })?;
        }
        if sha.is_empty() || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::Invalid {
                what,
                field: "sha",
                reason: format!("{sha:?} is not a commit id"),
            });
        }
        let mut body = request.clone();
        body.description = body.description.map(|d| truncate(&d, MAX_FIELD_CHARS));
        let url = format!("{}/projects/{project_id}/statuses/{sha}", self.api);
        match self.send(&what, || self.http.post(&url).json(&body)).await {
            Ok((status, _, _)) => Ok(StatusOutcome::Created {
                http_status: status,
            }),
            Err(Error::Rejected {
                status: 400,
                message,
                ..
            }) if message.contains("Cannot transition status") => {
                debug!(%what, "gitlab already has this status");
                Ok(StatusOutcome::AlreadyDone {
                    http_status: 400,
                    message,
                })
            }
            Err(e) => Err(e),
        }
    }

    /// `POST /projects/:id/deployments` with `tag: true`.
    ///
    /// Creating is not idempotent on GitLab's side: a retry after a timeout may create a second
    /// deployment record (GitLab offers no idempotency key for it).
    pub async fn create_deployment(
        &self,
        project_id: u64,
        request: &DeploymentRequest,
    ) -> Result<Deployment> {
        let what = format!("deployment of {} to {}", request.ref_, request.environment);
        let body = serde_json::json!({
            "environment": request.environment,
            "sha": request.sha,
            "ref": request.ref_,
            "tag": true,
            "status": request.status,
        });
        let url = format!("{}/projects/{project_id}/deployments", self.api);
        let (_, bytes, _) = self
            .send(&what, || self.http.post(&url).json(&body))
            .await?;
        parse(&what, &bytes)
    }

    /// `PUT /projects/:id/deployments/:deployment_id` with the new `status`.
    pub async fn update_deployment(
        &self,
        project_id: u64,
        deployment_id: u64,
        status: DeploymentStatus,
    ) -> Result<Deployment> {
        let what = format!("deployment {deployment_id} update");
        let body = serde_json::json!({ "status": status });
        let url = format!(
            "{}/projects/{project_id}/deployments/{deployment_id}",
            self.api
        );
        let (_, bytes, _) = self.send(&what, || self.http.put(&url).json(&body)).await?;
        parse(&what, &bytes)
    }

    /// `GET /projects/:id/repository/tags`, every page: follows the `Link` header's
    /// `rel="next"` (only to this GitLab), at most `max_pages` pages of 100.
    pub async fn list_tags(&self, project_id: u64, max_pages: usize) -> Result<Vec<Tag>> {
        let what = format!("tags of project {project_id}");
        let mut url = format!(
            "{}/projects/{project_id}/repository/tags?per_page=100",
            self.api
        );
        let mut tags = Vec::new();
        for _ in 0..max_pages {
            let (_, bytes, next) = self.send(&what, || self.http.get(&url)).await?;
            tags.extend(parse::<Vec<Tag>>(&what, &bytes)?);
            match next {
                Some(next) if same_origin(&self.api, &next) => url = next,
                Some(next) => {
                    warn!(%what, %next, "not following a next page on another host");
                    break;
                }
                None => break,
            }
        }
        Ok(tags)
    }

    /// Sends the request `build` makes until it succeeds, fails for good, or the retry budget
    /// runs out. Returns the 2xx status, the body and the `Link` header's `rel="next"` URL.
    async fn send(
        &self,
        what: &str,
        build: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<(u16, Vec<u8>, Option<String>)> {
        let started = tokio::time::Instant::now();
        let held = *self.hold.lock().expect("hold lock");
        if let Some(until) = held.filter(|until| *until > started) {
            return Err(Error::Held {
                what: what.to_string(),
                resume_ms: (until - started).as_millis() as u64,
            });
        }
        let mut attempt = 1;
        loop {
            let (last_status, last, asked_wait) = match build()
                .header("PRIVATE-TOKEN", self.token.expose())
                .send()
                .await
            {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let wait = requested_wait(response.headers());
                    let location = response
                        .headers()
                        .get("location")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let next = response
                        .headers()
                        .get("link")
                        .and_then(|v| v.to_str().ok())
                        .and_then(next_link);
                    let bytes = match response.bytes().await {
                        Ok(b) => b.to_vec(),
                        Err(e) if (200..300).contains(&status) => {
                            return Err(Error::Unreadable {
                                what: what.to_string(),
                                reason: e.without_url().to_string(),
                            })
                        }
                        Err(_) => Vec::new(),
                    };
                    if (200..300).contains(&status) {
                        return Ok((status, bytes, next));
                    }
                    let message = if (300..400).contains(&status) {
                        format!(
                            "redirected to {}: ferry does not follow redirects with its token; set gitlab.url to the address GitLab answers on",
                            location.as_deref().unwrap_or("nowhere")
                        )
                    } else {
                        message_of(&bytes)
                    };
                    if !retryable(status) {
                        return Err(Error::Rejected {
                            what: what.to_string(),
                            status,
                            message,
                        });
                    }
                    let wait = if status == 429 { wait } else { None };
                    (Some(status), format!("{status}: {message}"), wait)
                }
                Err(e) => (None, describe(&e), None),
            };
            let backoff = self.retry.delay(attempt + 1, rand::random::<f64>());
            let wait = asked_wait.unwrap_or(backoff);
            let out_of_time = started.elapsed() + wait > self.retry.budget;
            if attempt >= self.retry.attempts || out_of_time {
                let until =
                    tokio::time::Instant::now() + asked_wait.unwrap_or(self.retry.max_delay);
                let mut hold = self.hold.lock().expect("hold lock");
                *hold = Some(hold.map_or(until, |h| h.max(until)));
                return Err(Error::GaveUp {
                    what: what.to_string(),
                    attempts: attempt,
                    status: last_status,
                    last,
                });
            }
            warn!(%what, attempt, wait_ms = wait.as_millis() as u64, error = %last, "gitlab call failed; retrying");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

/// The `rel="next"` URL of a `Link` header: `<url>; rel="next", <url>; rel="first"`.
pub fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|part| {
        let (url, params) = part.trim().split_once(';')?;
        let url = url.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            })
            .then(|| url.to_string())
    })
}

/// Whether `url` is on the same scheme, host and port as `base` (the token goes with it).
fn same_origin(base: &str, url: &str) -> bool {
    match (Url::parse(base), Url::parse(url)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

/// 409 (a concurrent update), 429 (rate limited) and 5xx are worth another try.
fn retryable(status: u16) -> bool {
    status == 409 || status == 429 || (500..600).contains(&status)
}

/// How long a 429 asks to wait: `Retry-After` (seconds), else `RateLimit-Reset` (a Unix time,
/// or seconds when small).
fn requested_wait(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let number = |name: &str| -> Option<u64> {
        headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok()
    };
    let secs = match number("retry-after") {
        Some(secs) => secs,
        None => {
            let reset = number("ratelimit-reset")?;
            // Anything past 2001-09-09 is a timestamp; smaller values are a delay in seconds.
            if reset >= 1_000_000_000 {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
                reset.saturating_sub(now)
            } else {
                reset
            }
        }
    };
    // (a proxy's absurd value would hold every call until a restart, or overflow the clock)
    Some(Duration::from_secs(secs.min(MAX_REQUESTED_WAIT_SECS)))
}

/// The longest wait GitLab (or a proxy before it) may ask for: an hour.
const MAX_REQUESTED_WAIT_SECS: u64 = 3600;

/// GitLab's error text: `{"message": "..."}`, `{"message": {"field": [...]}}`, `{"error": "..."}`,
/// or the start of the body.
fn message_of(body: &[u8]) -> String {
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
        let field = value.get("message").or_else(|| value.get("error"));
        match field {
            Some(serde_json::Value::String(s)) => return s.clone(),
            Some(other) => return other.to_string(),
            None => {}
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        "(no message)".into()
    } else {
        truncate(text, 200)
    }
}

/// A transport error without the URL's query (there is none with a secret, but the message
/// stays short) and with its kind.
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::Unreadable {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

/// `target_url` must be http(s) and at most 255 characters.
pub fn check_target_url(url: &str) -> Result<(), String> {
    if url.chars().count() > MAX_FIELD_CHARS {
        return Err(format!(
            "{} characters, more than {MAX_FIELD_CHARS}",
            url.chars().count()
        ));
    }
    match Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => Ok(()),
        Ok(u) => Err(format!("scheme {} is not http or https", u.scheme())),
        Err(e) => Err(format!("{url:?}: {e}")),
    }
}

/// The first `max` characters of `s`.
pub fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter() {
        let r = Retry {
            attempts: 10,
            base: Duration::from_millis(100),
            max_delay: Duration::from_millis(500),
            budget: Duration::from_secs(60),
        };
        assert_eq!(r.delay(2, 1.0), Duration::from_millis(100));
        assert_eq!(r.delay(3, 1.0), Duration::from_millis(200));
        assert_eq!(r.delay(4, 0.0), Duration::from_millis(200));
        assert_eq!(r.delay(9, 1.0), Duration::from_millis(500));
    }

    #[test]
    fn gitlab_messages_of_every_shape() {
        let check = |body: &str, expected: &str| assert_eq!(message_of(body.as_bytes()), expected);
        check(r#"{"message":"401 Unauthorized"}"#, "401 Unauthorized");
        check(r#"{"error":"state is missing"}"#, "state is missing");
        check(
            r#"{"message":{"target_url":["is blocked"]}}"#,
            r#"{"target_url":["is blocked"]}"#,
        );
        check("<html>bad gateway</html>", "<html>bad gateway</html>");
        check("", "(no message)");
    }

    #[test]
    fn a_requested_wait_is_read_and_held_to_an_hour() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = reqwest::header::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        let wait = |pairs| requested_wait(&headers(pairs));
        assert_eq!(wait(&[("retry-after", "7")]), Some(Duration::from_secs(7)));
        assert_eq!(
            wait(&[("retry-after", "999999999999")]),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(
            wait(&[("ratelimit-reset", "30")]),
            Some(Duration::from_secs(30))
        );
        assert_eq!(wait(&[]), None);
    }

    #[test]
    fn target_urls_must_be_http_and_short() {
        assert!(check_target_url("https://ferry.example/api/v1/jobs/1").is_ok());
        assert!(check_target_url("http://127.0.0.1:8080/jobs/1").is_ok());
        assert!(check_target_url("ftp://ferry.example/jobs/1").is_err());
        assert!(check_target_url("not a url").is_err());
        let long = format!("https://ferry.example/{}", "x".repeat(250));
        assert!(check_target_url(&long).is_err());
        assert_eq!(truncate("héllo", 2), "hé");
    }
}
