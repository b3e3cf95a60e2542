//! The webhook intake over real HTTP against a real Redis store: every fixture, every refusal,
//! dedupe, and a store that stops.

use crate::harness::{self, RedisServer};
use ferry::gateway::auth::sign;
use ferry::gateway::{
    serve, GatewayOptions, GatewayState, OnTagMove, ProjectHooks, Secret, SigningKey,
};
use ferry::store::redis::RedisStore;
use ferry::store::{Store, StreamId};
use ferry_proto::{Event, WebhookReceived};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

const TAG_CREATE: &str = include_str!("../fixtures/gitlab/tag_push_create.json");
const TAG_ANNOTATED: &str = include_str!("../fixtures/gitlab/tag_push_annotated.json");
const TAG_DELETE: &str = include_str!("../fixtures/gitlab/tag_push_delete.json");
const TAG_MOVE: &str = include_str!("../fixtures/gitlab/tag_push_move.json");
const TAG_SHA256: &str = include_str!("../fixtures/gitlab/tag_push_create_sha256.json");
const TAG_NULL_CHECKOUT: &str =
    include_str!("../fixtures/gitlab/tag_push_create_null_checkout.json");
const PUSH: &str = include_str!("../fixtures/gitlab/push.json");
const MR: &str = include_str!("../fixtures/gitlab/merge_request_open.json");

const TAG: &str = "Tag Push Hook";
const BRANCH: &str = "Push Hook";
const MERGE: &str = "Merge Request Hook";

/// The token of every token project; it must never show up in the store.
const TOKEN: &str = "tok-3f9a1c-never-stored";
const SIGNING_TOKEN: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const COMMIT: &str = "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7";
const TAG_OBJECT: &str = "5f2a0e1c9d8b7a6f5e4d3c2b1a0f9e8d7c6b5a49";
const MAX_BODY: usize = 64 * 1024;

/// The projects of the fixtures: `jsmith/example` (1, tags), `mike/diaspora` (15, builds
/// `master`), `flightjs/flight-management` (2, merge requests), and `group/signed` (7, signing
/// key only).
fn projects() -> Vec<ProjectHooks> {
    let token = |id: u64, path: &str| ProjectHooks {
        id: Some(id),
        webhook_token: Some(Secret::new(TOKEN)),
        ..ProjectHooks::new(path)
    };
    vec![
        token(1, "jsmith/example"),
        ProjectHooks {
            branches: vec!["master".into()],
            ..token(15, "mike/diaspora")
        },
        token(2, "flightjs/flight-management"),
        ProjectHooks {
            id: Some(7),
            signing_key: Some(SigningKey::from_token(SIGNING_TOKEN).unwrap()),
            on_tag_move: OnTagMove::Rebuild,
            ..ProjectHooks::new("group/signed")
        },
        // Configured without an id: found by its path, whatever its case.
        ProjectHooks {
            webhook_token: Some(Secret::new(TOKEN)),
            ..ProjectHooks::new("group/by-path")
        },
    ]
}

/// A gateway serving on a free loopback port until dropped.
struct Gateway {
    url: String,
    client: reqwest::Client,
    store: Arc<dyn Store>,
    _stop: oneshot::Sender<()>,
}

impl Gateway {
    async fn start(store: Arc<dyn Store>, options: GatewayOptions) -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = GatewayState::new(store.clone(), projects(), options).unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, state, async {
            let _ = stopped.await;
        }));
        Gateway {
            url,
            client: reqwest::Client::new(),
            store,
            _stop: stop,
        }
    }

    /// On the shared Redis, in a fresh namespace.
    async fn on_shared_redis() -> Gateway {
        let store = Arc::new(harness::redis_store().await);
        Gateway::start(store, options()).await
    }

    /// POSTs `body` as `event` with the token and a fresh `Idempotency-Key`.
    async fn deliver(&self, event: &str, body: &str) -> (StatusCode, Value) {
        self.post(
            event,
            body,
            &[("x-gitlab-token", TOKEN), ("idempotency-key", &key())],
        )
        .await
    }

    async fn post(&self, event: &str, body: &str, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let mut request = self
            .client
            .post(format!("{}/hooks/gitlab", self.url))
            .header("content-type", "application/json")
            .header("x-gitlab-event", event)
            .body(body.to_string());
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.expect("post the webhook");
        answer(response).await
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let response = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap();
        (response.status(), response.text().await.unwrap())
    }

    /// The `webhooks` stream, with each event's log position.
    async fn stored(&self) -> Vec<(String, WebhookReceived)> {
        let stored = self
            .store
            .read_stream(&StreamId::Webhooks, 0)
            .await
            .unwrap();
        for s in &stored {
            let bytes = s.envelope.to_bytes();
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(TOKEN), "the webhook token entered the log");
            assert!(!text.contains("v1,"), "a signature entered the log");
        }
        stored
            .into_iter()
            .map(|s| match s.decode().unwrap() {
                Event::WebhookReceived(w) => (s.pos.to_string(), w),
                other => panic!("unexpected event in the webhooks stream: {other:?}"),
            })
            .collect()
    }
}

fn options() -> GatewayOptions {
    GatewayOptions {
        max_body_bytes: MAX_BODY,
        store_timeout: Duration::from_secs(3),
        ..GatewayOptions::default()
    }
}

fn key() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn answer(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let text = response.text().await.unwrap();
    assert_eq!(
        content_type.as_deref(),
        Some("application/json"),
        "{status}: {text}"
    );
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {text}: {e}"));
    (status, body)
}

/// `fixture` with top-level fields replaced.
fn edit(fixture: &str, changes: &[(&str, Value)]) -> String {
    let mut body: Value = serde_json::from_str(fixture).unwrap();
    for (field, value) in changes {
        body[*field] = value.clone();
    }
    body.to_string()
}

/// The tag fixture as a delivery for the signing-key project.
fn signed_body() -> String {
    let mut body: Value = serde_json::from_str(TAG_CREATE).unwrap();
    body["project_id"] = json!(7);
    body["project"]["id"] = json!(7);
    body["project"]["path_with_namespace"] = json!("group/signed");
    body.to_string()
}

fn accepted(body: &Value) -> String {
    assert_eq!(body["duplicate"], json!(false), "{body}");
    body["event_id"].as_str().expect("event_id").to_string()
}

#[tokio::test]
async fn every_fixture_is_stored_with_its_decision() {
    let gw = Gateway::on_shared_redis().await;
    // (event, body, status, `ignored` reason or None for accepted, stored action)
    let cases: &[(&str, &str, StatusCode, Option<&str>, &str)] = &[
        (TAG, TAG_CREATE, StatusCode::ACCEPTED, None, "build"),
        (TAG, TAG_ANNOTATED, StatusCode::ACCEPTED, None, "build"),
        (TAG, TAG_SHA256, StatusCode::ACCEPTED, None, "build"),
        (TAG, TAG_DELETE, StatusCode::ACCEPTED, None, "delete"),
        (
            TAG,
            TAG_MOVE,
            StatusCode::OK,
            Some("tag moved; on_tag_move is ignore"),
            "ignored",
        ),
        (
            TAG,
            TAG_NULL_CHECKOUT,
            StatusCode::OK,
            Some("checkout_sha is null: the ref moved or vanished before gitlab built the payload"),
            "ignored",
        ),
        (BRANCH, PUSH, StatusCode::ACCEPTED, None, "build"),
        (
            MERGE,
            MR,
            StatusCode::OK,
            Some("merge request events are not acted on"),
            "ignored",
        ),
        (
            "Pipeline Hook",
            MR,
            StatusCode::OK,
            Some("x-gitlab-event is not one ferry acts on"),
            "ignored",
        ),
    ];
    let mut ids = Vec::new();
    for (event, body, status, ignored, _) in cases {
        let (got, answer) = gw.deliver(event, body).await;
        assert_eq!(got, *status, "{event}: {answer}");
        match ignored {
            Some(reason) => assert_eq!(answer, json!({ "ignored": reason }), "{event}"),
            None => ids.push(Some(accepted(&answer))),
        }
        if ignored.is_some() {
            ids.push(None);
        }
    }

    // Everything was recorded, in order, ignored deliveries included.
    let stored = gw.stored().await;
    assert_eq!(stored.len(), cases.len());
    for (((pos, w), (event, _, _, reason, action)), id) in stored.iter().zip(cases).zip(&ids) {
        assert_eq!(w.action, *action, "{event}");
        assert_eq!(w.event, *event);
        if let Some(id) = id {
            assert_eq!(id, pos, "event_id names the stored event");
        }
        if let Some(reason) = reason {
            assert_eq!(w.reason.as_deref(), Some(*reason));
        }
        // Exactly the deliveries that build carry the id of the job they create.
        assert_eq!(w.job.is_some(), *action == "build", "{event}: {w:?}");
        assert!(w.delivery_id.is_some());
    }
    // Annotated tag: the commit is recorded for building, the tag object only as `after`.
    let annotated = &stored[1].1;
    assert_eq!(annotated.checkout_sha.as_deref(), Some(COMMIT));
    assert_eq!(annotated.after.as_deref(), Some(TAG_OBJECT));
    assert_eq!(annotated.git_ref.as_deref(), Some("refs/tags/v1.1.0"));
    assert_eq!(annotated.project_id, Some(1));
    assert_eq!(annotated.project_path.as_deref(), Some("jsmith/example"));
    assert_eq!(annotated.user.as_deref(), Some("jsmith"));
    assert_eq!(
        annotated.clone_url.as_deref(),
        Some("http://example.com/jsmith/example.git")
    );
    // Two builds never share a job id.
    assert_ne!(stored[0].1.job, stored[1].1.job);
}

#[tokio::test]
async fn bad_or_missing_credentials_are_refused_and_nothing_is_stored() {
    let gw = Gateway::on_shared_redis().await;
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "missing x-gitlab-token header"),
        (&[("x-gitlab-token", "wrong")], "wrong x-gitlab-token"),
        (&[("x-gitlab-token", "")], "empty x-gitlab-token header"),
        (
            &[("x-gitlab-token", "tok-3f9a1c-never-store")],
            "wrong x-gitlab-token",
        ),
    ];
    for (headers, error) in cases {
        let (status, body) = gw.post(TAG, TAG_CREATE, headers).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(body, json!({ "error": error }));
    }
    assert!(gw.stored().await.is_empty());
}

#[tokio::test]
async fn signatures_are_checked_over_the_raw_body() {
    let gw = Gateway::on_shared_redis().await;
    let signing = SigningKey::from_token(SIGNING_TOKEN).unwrap();
    let body = signed_body();
    let signed = |id: &str, at: i64, body: &str| {
        vec![
            ("webhook-id".to_string(), id.to_string()),
            ("webhook-timestamp".to_string(), at.to_string()),
            (
                "webhook-signature".to_string(),
                sign(&signing, id, at, body.as_bytes()),
            ),
        ]
    };
    let post = |headers: Vec<(String, String)>, body: String| {
        let gw = &gw;
        async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            gw.post(TAG, &body, &headers).await
        }
    };

    // Signed over other bytes (the same JSON, re-serialized): refused.
    let reserialized =
        serde_json::to_string_pretty(&serde_json::from_str::<Value>(&body).unwrap()).unwrap();
    let (status, answer) = post(signed(&key(), now(), &reserialized), body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer,
        json!({ "error": "webhook-signature does not match" })
    );

    // Stale: right signature, timestamp ten minutes old.
    let (status, answer) = post(signed(&key(), now() - 600, &body), body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer,
        json!({ "error": "webhook-timestamp is more than 300 s in the past" })
    );

    // A token is no substitute on a signing-only project.
    let (status, answer) = gw
        .post(
            TAG,
            &body,
            &[("x-gitlab-token", TOKEN), ("idempotency-key", &key())],
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        answer,
        json!({ "error": "missing webhook-signature header" })
    );
    assert!(gw.stored().await.is_empty());

    // Good, with a second (wrong) signature beside the right one.
    let id = key();
    let mut headers = signed(&id, now(), &body);
    headers[2].1 = format!(
        "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {}",
        headers[2].1
    );
    let (status, answer) = post(headers, body.clone()).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let first = accepted(&answer);

    // A manual resend: same webhook-id, new timestamp and signature → the original event.
    let (status, answer) = post(signed(&id, now() + 1, &body), body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({ "event_id": first, "duplicate": true }));
    let stored = gw.stored().await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1.delivery_id.as_deref(), Some(id.as_str()));
}

#[tokio::test]
async fn a_delivery_counts_once() {
    let gw = Gateway::on_shared_redis().await;
    fn headers(k: &str) -> [(&str, &str); 2] {
        [("x-gitlab-token", TOKEN), ("idempotency-key", k)]
    }
    let k1 = key();

    let (status, answer) = gw.post(TAG, TAG_CREATE, &headers(&k1)).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let original = accepted(&answer);

    // The same key again (a retried delivery job, or a resend from the UI).
    let (status, answer) = gw.post(TAG, TAG_CREATE, &headers(&k1)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({ "event_id": original, "duplicate": true }));

    // The same content with a new key (a project hook and a group hook on one push).
    let (status, answer) = gw.post(TAG, TAG_CREATE, &headers(&key())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({ "event_id": original, "duplicate": true }));

    // No key at all (GitLab before 17.4): the content key works alone.
    let (status, answer) = gw.post(TAG, TAG_CREATE, &[("x-gitlab-token", TOKEN)]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({ "event_id": original, "duplicate": true }));

    // The same key for another push of the project is still a duplicate of the first.
    let (status, answer) = gw.post(TAG, TAG_ANNOTATED, &headers(&k1)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({ "event_id": original, "duplicate": true }));

    // Ignored deliveries are deduplicated too.
    let k2 = key();
    let (status, answer) = gw.post(MERGE, MR, &headers(&k2)).await;
    assert_eq!(
        (status, answer["ignored"].is_string()),
        (StatusCode::OK, true)
    );
    let (status, answer) = gw.post(MERGE, MR, &headers(&k2)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["duplicate"], json!(true));

    // Another tag is new.
    let (status, _) = gw.deliver(TAG, TAG_SHA256).await;
    assert_eq!(status, StatusCode::ACCEPTED);

    let stored = gw.stored().await;
    let actions: Vec<&str> = stored.iter().map(|(_, w)| w.action.as_str()).collect();
    assert_eq!(actions, ["build", "ignored", "build"]);
    assert_eq!(stored[0].0, original);
}

/// A tag deleted and pushed again at the same commit (to run it again) is a new delivery, not
/// a duplicate of the first push; the copy a second hook sends of the new push still is one.
/// The same for a second deletion.
#[tokio::test]
async fn a_tag_pushed_again_after_its_deletion_is_a_new_delivery() {
    let gw = Gateway::on_shared_redis().await;
    let post = |body: &'static str| {
        let gw = &gw;
        async move {
            let k = key();
            let headers = [("x-gitlab-token", TOKEN), ("idempotency-key", k.as_str())];
            gw.post(TAG, body, &headers).await
        }
    };
    let mut ids = Vec::new();
    for body in [TAG_CREATE, TAG_DELETE, TAG_CREATE, TAG_DELETE] {
        let (status, answer) = post(body).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
        let id = accepted(&answer);
        // a second hook's copy of the same push
        let (status, answer) = post(body).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(answer, json!({ "event_id": id, "duplicate": true }));
        ids.push(id);
    }
    let stored = gw.stored().await;
    let actions: Vec<&str> = stored.iter().map(|(_, w)| w.action.as_str()).collect();
    assert_eq!(actions, ["build", "delete", "build", "delete"]);
    let jobs: Vec<_> = stored.iter().filter_map(|(_, w)| w.job).collect();
    assert_eq!(jobs.len(), 2);
    assert_ne!(jobs[0], jobs[1], "each push gets its own job");
}

/// A project found by its path records the path as configured, not as the payload spells it:
/// the coordinator (and every index keyed by the path) compares it exactly.
#[tokio::test]
async fn a_project_found_by_path_is_recorded_under_its_configured_path() {
    let gw = Gateway::on_shared_redis().await;
    let body = edit(
        TAG_CREATE,
        &[
            ("project_id", json!(998)),
            (
                "project",
                json!({"id": 998, "path_with_namespace": "Group/By-Path"}),
            ),
        ],
    );
    let (status, answer) = gw.deliver(TAG, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let stored = gw.stored().await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].1.project_path.as_deref(), Some("group/by-path"));
    assert_eq!(stored[0].1.project_id, Some(998));
}

/// A group hook delivers the events of every project of the group, and the group's own: those
/// of projects ferry does not serve get 200 (GitLab disables a hook after four failures in a
/// row, and would then drop the events of the projects ferry serves), whatever their
/// credentials, and nothing is stored.
#[tokio::test]
async fn deliveries_for_projects_not_served_are_ignored_with_200() {
    let gw = Gateway::on_shared_redis().await;
    let other = edit(
        TAG_CREATE,
        &[
            ("project_id", json!(999)),
            (
                "project",
                json!({"id": 999, "path_with_namespace": "nobody/nothing"}),
            ),
        ],
    );
    let group_event = r#"{"event_name": "user_add_to_group", "group_id": 7}"#.to_string();
    let wrong_token = [("x-gitlab-token", "wrong")];
    let cases = [
        (
            TAG,
            &other,
            &[][..],
            "project 999 (nobody/nothing) is not configured",
        ),
        (
            TAG,
            &other,
            &wrong_token[..],
            "project 999 (nobody/nothing) is not configured",
        ),
        (
            "Member Hook",
            &group_event,
            &[][..],
            "the delivery names no project",
        ),
    ];
    for (event, body, headers, reason) in cases {
        let (status, answer) = gw.post(event, body, headers).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer, json!({ "ignored": reason }));
    }
    assert!(gw.stored().await.is_empty());
    let (_, text) = gw.get("/metrics").await;
    assert!(
        text.contains(
            r#"ferry_webhooks_received_total{event="tag_push",outcome="unknown_project"} 2"#
        ),
        "{text}"
    );
}

/// `(event, body, headers, status, error)`.
type Case<'a> = (
    &'a str,
    String,
    &'a [(&'a str, &'a str)],
    StatusCode,
    &'a str,
);

#[tokio::test]
async fn malformed_requests_are_refused_with_json_errors() {
    let gw = Gateway::on_shared_redis().await;
    let wrong_token = [("x-gitlab-token", "wrong")];

    let cases: Vec<Case> = vec![
        (
            TAG,
            "{not json".into(),
            &[],
            StatusCode::BAD_REQUEST,
            "body is not valid json: line 1 column 2",
        ),
        (
            TAG,
            "[1, 2]".into(),
            &[],
            StatusCode::BAD_REQUEST,
            "body is not a json object",
        ),
        // The credentials are checked before the required fields.
        (
            TAG,
            edit(TAG_CREATE, &[("ref", Value::Null)]),
            &wrong_token,
            StatusCode::UNAUTHORIZED,
            "wrong x-gitlab-token",
        ),
        (
            TAG,
            edit(TAG_CREATE, &[("ref", Value::Null)]),
            &[("x-gitlab-token", TOKEN)],
            StatusCode::BAD_REQUEST,
            "missing field ref",
        ),
        (
            TAG,
            edit(TAG_CREATE, &[("after", json!("not a sha"))]),
            &[("x-gitlab-token", TOKEN)],
            StatusCode::BAD_REQUEST,
            "field after must be a hex object id",
        ),
        (
            TAG,
            format!("{{\"pad\": \"{}\"}}", "x".repeat(MAX_BODY)),
            &[("x-gitlab-token", TOKEN)],
            StatusCode::PAYLOAD_TOO_LARGE,
            "body exceeds 65536 bytes",
        ),
    ];
    for (event, body, headers, status, error) in &cases {
        let (got, answer) = gw.post(event, body, headers).await;
        assert_eq!(got, *status, "{answer}");
        assert_eq!(answer, json!({ "error": error }));
    }

    // A chunked body declares no length: the body limit layer stops it, still with JSON.
    let (status, text) = chunked_post(&gw.url, MAX_BODY + 1).await;
    assert_eq!(status, 413, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({ "error": "body exceeds 65536 bytes" })
    );

    // Unknown routes answer JSON too.
    let (status, text) = gw.get("/hooks/nothing").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({"error": "no such route"})
    );

    assert!(gw.stored().await.is_empty());
}

/// POSTs a JSON body of `len` bytes with `Transfer-Encoding: chunked` over a raw connection, and
/// returns the status code and the response body.
async fn chunked_post(base: &str, len: usize) -> (u16, String) {
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /hooks/gitlab HTTP/1.1\r\nhost: {addr}\r\nx-gitlab-event: {TAG}\r\n\
         x-gitlab-token: {TOKEN}\r\ncontent-type: application/json\r\n\
         transfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let body = format!("{{\"pad\": \"{}\"}}", "x".repeat(len - 11));
    for chunk in body.as_bytes().chunks(8192) {
        let mut framed = format!("{:x}\r\n", chunk.len()).into_bytes();
        framed.extend_from_slice(chunk);
        framed.extend_from_slice(b"\r\n");
        // The server may answer and close before reading everything.
        if stream.write_all(&framed).await.is_err() {
            break;
        }
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let (_, body) = response.split_once("\r\n\r\n").expect("a response body");
    (status, body.to_string())
}

#[tokio::test]
async fn a_stopped_store_answers_503_and_readyz_says_so() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url(), &harness::namespace())
        .await
        .unwrap();
    let gw = Gateway::start(Arc::new(store), options()).await;

    let (status, _) = gw.get("/readyz").await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = gw.deliver(TAG, TAG_CREATE).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");

    server.stop();
    // A delivery that cannot be stored is never acknowledged: GitLab must see the failure.
    let (status, answer) = gw.deliver(TAG, TAG_ANNOTATED).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer, json!({ "error": "event store unavailable" }));
    // Ignored deliveries are stored too, so they fail the same way.
    let (status, _) = gw.deliver(MERGE, MR).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let (status, text) = gw.get("/readyz").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        json!({ "error": "event store unavailable" })
    );
    let (status, _) = gw.get("/healthz").await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the process is up even when the store is not"
    );
}

#[tokio::test]
async fn metrics_count_deliveries_by_event_and_outcome() {
    let gw = Gateway::on_shared_redis().await;
    assert_eq!(gw.deliver(TAG, TAG_CREATE).await.0, StatusCode::ACCEPTED);
    assert_eq!(gw.deliver(TAG, TAG_CREATE).await.0, StatusCode::OK);
    assert_eq!(gw.deliver("Some Future Hook", MR).await.0, StatusCode::OK);
    assert_eq!(
        gw.post(TAG, TAG_CREATE, &[]).await.0,
        StatusCode::UNAUTHORIZED
    );

    let (status, text) = gw.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        r#"ferry_webhooks_received_total{event="tag_push",outcome="accepted"} 1"#,
        r#"ferry_webhooks_received_total{event="tag_push",outcome="duplicate"} 1"#,
        r#"ferry_webhooks_received_total{event="tag_push",outcome="unauthorized"} 1"#,
        r#"ferry_webhooks_received_total{event="other",outcome="ignored"} 1"#,
        r#"ferry_webhooks_received_total{event="push",outcome="accepted"} 0"#,
        "ferry_webhook_ingest_seconds_count 4",
    ] {
        assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    }
    assert!(
        !text.contains("Some Future Hook"),
        "event labels are a closed set"
    );
    let (status, text) = gw.get("/healthz").await;
    assert_eq!(
        (status, text.as_str()),
        (StatusCode::OK, r#"{"status":"ok"}"#)
    );
}
