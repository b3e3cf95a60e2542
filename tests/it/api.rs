//! The REST API over real HTTP (gateway and API routers merged, as `ferry gateway` serves them)
//! against a real Redis store, with in-process coordinators and agents where work must move;
//! and the real `ferry jobs` / `ferry agents` commands against it.

use crate::harness::{self, wait_for, wait_until, DEADLINE};
use ferry::agent;
use ferry::api::{self, ApiState};
use ferry::coordinator::{self, decide::RetryPolicy};
use ferry::gateway::{self, GatewayOptions, GatewayState, Secret};
use ferry::store::{Append, Order, Store, StreamId};
use ferry_proto::*;
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

const TOKEN: &str = "api-token-7c1e";

/// The gateway and the API on `127.0.0.1:0`, until dropped.
struct Api {
    base: String,
    store: Arc<dyn Store>,
    http: reqwest::Client,
    _stop: oneshot::Sender<()>,
}

impl Api {
    async fn start(tokens: &[&str]) -> Api {
        let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
        Api::over(store, tokens).await
    }

    async fn over(store: Arc<dyn Store>, tokens: &[&str]) -> Api {
        Api::serving(store, tokens, Vec::new()).await
    }

    /// The same, knowing `projects` (for manual deploys and rollbacks).
    async fn serving(
        store: Arc<dyn Store>,
        tokens: &[&str],
        projects: Vec<ferry::coordinator::plan::ProjectPlan>,
    ) -> Api {
        let gw = GatewayState::new(store.clone(), vec![], GatewayOptions::default()).unwrap();
        let tokens: Vec<Secret> = tokens.iter().map(|t| Secret::new(*t)).collect();
        let state = ApiState::new(store.clone(), &tokens).with_projects(projects);
        let router = gateway::router(gw).merge(api::router(state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Api {
            base,
            store,
            http: reqwest::Client::new(),
            _stop: stop,
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder, token: Option<&str>) -> (StatusCode, Value) {
        let req = match token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let res = req.send().await.expect("request");
        let status = res.status();
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("answer is not json ({e}): {status} {text:?}"));
        (status, body)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.send(self.http.get(format!("{}{path}", self.base)), Some(TOKEN))
            .await
    }

    async fn post(&self, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base));
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req, Some(TOKEN)).await
    }

    /// A job of `project` whose single build step (with a secret, by name) is queued in `pool`.
    async fn queued_job(&self, project: &str, pool: &str) -> JobId {
        let build = StepSpec::Build(BuildSpec {
            clone_url: "file:///nowhere".into(),
            commands: vec!["true".into()],
            secrets: vec!["DEPLOY_KEY".into()],
            ..Default::default()
        });
        self.queued_job_with(project, pool, build).await
    }

    async fn queued_job_with(&self, project: &str, pool: &str, spec: StepSpec) -> JobId {
        let job = JobId::new();
        let created = JobCreated {
            artifact: None,
            job,
            project_id: 42,
            project: project.into(),
            tag: "v1.2.3".into(),
            git_ref: "refs/tags/v1.2.3".into(),
            sha: "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7".into(),
            priority: 0,
            trigger: "test".into(),
            steps: vec![StepPlan {
                step: StepId::new("build"),
                pool: pool.into(),
                priority: 0,
                spec,
            }],
        };
        let queued = StepQueued {
            step: StepId::new("build"),
            attempt: 1,
            pool: pool.into(),
            priority: 0,
        };
        self.store
            .append(Append::new(StreamId::Job(job), vec![created.into(), queued.into()]).expect(0))
            .await
            .unwrap();
        job
    }

    async fn end(&self, job: JobId, event: Event) {
        self.store
            .append(Append::new(StreamId::Job(job), vec![event]))
            .await
            .unwrap();
    }
}

fn failed() -> Event {
    JobFailed {
        reason: "build failed".into(),
        step: Some(StepId::new("build")),
    }
    .into()
}

fn error_of(body: &Value) -> &str {
    body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {body}"))
}

/// A coordinator and agents running in this process until stopped.
struct Roles {
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Roles {
    fn start(store: &Arc<dyn Store>, coordinators: usize, agents: &[(&str, &str)]) -> Roles {
        Roles::start_with(store, coordinators, agents, coordinator::Options::default())
    }

    /// As `start`, the coordinators with `base`'s options but for their names, retry policy
    /// and a 100 ms sweep.
    fn start_with(
        store: &Arc<dyn Store>,
        coordinators: usize,
        agents: &[(&str, &str)],
        base: coordinator::Options,
    ) -> Roles {
        let (stop, rx) = watch::channel(false);
        let mut roles = Roles {
            stop,
            tasks: Vec::new(),
        };
        for i in 0..coordinators {
            let opts = coordinator::Options {
                consumer: format!("c{i}"),
                policy: RetryPolicy::default(),
                sweep_interval: Duration::from_millis(100),
                ..base.clone()
            };
            let (store, mut rx) = (store.clone(), rx.clone());
            roles.tasks.push(tokio::spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                coordinator::run(store, opts, stop).await.unwrap();
            }));
        }
        for (name, pool) in agents {
            roles.tasks.push(spawn_agent(store, name, pool, rx.clone()));
        }
        roles
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// `AgentJoined` of a one-slot agent serving `pool`.
fn joined(name: &str, pool: &str) -> Event {
    AgentJoined {
        agent: AgentId::new(name),
        pools: vec![pool.into()],
        labels: vec![],
        version: "test".into(),
        capacity: 1,
    }
    .into()
}

fn spawn_agent(
    store: &Arc<dyn Store>,
    name: &str,
    pool: &str,
    mut stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let opts = agent::Options {
        name: AgentId::new(name),
        pools: vec![pool.into()],
        labels: vec!["test".into()],
        concurrency: 2,
        lease_ttl: Duration::from_millis(900),
        shutdown_grace: Duration::from_secs(5),
        runner: Arc::new(agent::Runner::local(
            std::env::temp_dir().join("ferry-agent"),
        )),
    };
    let store = store.clone();
    tokio::spawn(async move {
        let until = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        agent::run(store, opts, until).await.unwrap();
    })
}

// ---------------------------------------------------------------------------------------------

/// `POST /api/v1/agents/{name}/stop`: the agent hears of it with a heartbeat, stops as on
/// SIGTERM and records that it left, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_asked_to_stop_through_the_api_stops_and_says_why() {
    let api = Api::start(&[TOKEN]).await;
    let (_keep, never) = watch::channel(false);
    let agent = spawn_agent(&api.store, "worker-s", "linux", never);
    wait_until(DEADLINE, || async {
        let (_, body) = api.get("/api/v1/agents").await;
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["name"] == "worker-s" && a["live"] == true)
    })
    .await;
    let (status, body) = api.post("/api/v1/agents/nobody/stop", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let (status, body) = api
        .post(
            "/api/v1/agents/worker-s/stop",
            Some(json!({ "reason": "kernel upgrade" })),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["stop_requested"], "kernel upgrade");
    // Nothing else tells it to stop: the request does.
    tokio::time::timeout(DEADLINE, agent)
        .await
        .expect("the agent stops by itself")
        .unwrap();
    let (_, body) = api.get("/api/v1/agents").await;
    let gone = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "worker-s")
        .cloned()
        .unwrap();
    assert_eq!(gone["live"], false, "{gone}");
    assert_eq!(
        gone["left"], "stopped on request (kernel upgrade): running steps finished",
        "{gone}"
    );
    let (status, body) = api.post("/api/v1/agents/worker-s/stop", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

/// The heartbeat deadline of `agent` once it has heartbeated twice after `after` (so it has
/// heard whatever the store said before `after`, and acted on it).
async fn heard_twice(store: &Arc<dyn Store>, agent: &str, after: u64) -> u64 {
    let mut seen = after;
    for _ in 0..2 {
        seen = wait_for(DEADLINE, "a heartbeat", || async {
            let live = store.live_agents().await.unwrap();
            let deadline = live.iter().find(|(a, _)| a.as_str() == agent)?.1;
            (deadline > seen).then_some(deadline)
        })
        .await;
    }
    seen
}

/// `POST /api/v1/agents/{name}/pause` and `/resume`: a paused agent claims nothing (also
/// when it starts paused, and from the heartbeat that brings a pause to a running agent), the
/// waiting steps say why, and once resumed it claims them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_claims_nothing_until_it_is_resumed() {
    let api = Api::start(&[TOKEN]).await;
    let pool = "paused-pool";
    api.store
        .append(Append::new(
            StreamId::Agents,
            vec![joined("worker-p", pool)],
        ))
        .await
        .unwrap();
    let (status, body) = api.post("/api/v1/agents/nobody/pause", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    let (status, body) = api.post("/api/v1/agents/worker-p/resume", None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = api
        .post(
            "/api/v1/agents/worker-p/pause",
            Some(json!({ "reason": "disk replacement" })),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["paused"], "disk replacement");

    // It starts paused: its first heartbeat, before any claim, says so.
    let first = api.queued_job_with("g/app", pool, StepSpec::Noop).await;
    let (_keep, never) = watch::channel(false);
    let _agent = spawn_agent(&api.store, "worker-p", pool, never);
    let beat = heard_twice(&api.store, "worker-p", 0).await;
    let api = &api;
    let status_of = |job: JobId| async move {
        let (_, shown) = api.get(&format!("/api/v1/jobs/{job}")).await;
        shown
    };
    let shown = status_of(first).await;
    assert_eq!(shown["steps"][0]["status"], "queued", "{shown}");
    assert_eq!(
        shown["waiting"][0]["reason"],
        format!("every live agent serving pool {pool} is paused (worker-p: disk replacement)"),
        "{shown}"
    );
    let (_, agents) = api.get("/api/v1/agents").await;
    let listed = agents["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "worker-p")
        .cloned()
        .unwrap();
    assert_eq!(listed["paused"], "disk replacement", "{listed}");
    assert_eq!(listed["live"], true, "{listed}");

    let (status, body) = api.post("/api/v1/agents/worker-p/resume", None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    wait_until(DEADLINE, || async {
        status_of(first).await["steps"][0]["status"] == "succeeded"
    })
    .await;

    // Paused while running: from the heartbeat that brings the pause, nothing new is claimed.
    let (status, _) = api.post("/api/v1/agents/worker-p/pause", None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    let beat = heard_twice(&api.store, "worker-p", beat).await;
    let second = api.queued_job_with("g/app", pool, StepSpec::Noop).await;
    heard_twice(&api.store, "worker-p", beat).await;
    let shown = status_of(second).await;
    assert_eq!(shown["steps"][0]["status"], "queued", "{shown}");
    assert!(
        shown["waiting"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("(worker-p: paused through the api)"),
        "{shown}"
    );
    let (status, _) = api.post("/api/v1/agents/worker-p/resume", None).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    wait_until(DEADLINE, || async {
        status_of(second).await["steps"][0]["status"] == "succeeded"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_needs_a_configured_bearer_token() {
    let api = Api::start(&["other-token", TOKEN]).await;
    let url = format!("{}/api/v1/jobs", api.base);
    let (status, body) = api.send(api.http.get(&url), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&body), "missing bearer token");
    let (status, body) = api.send(api.http.get(&url), Some("api-token-7c1")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_of(&body), "invalid bearer token");
    let (status, body) = api
        .send(api.http.get(&url).basic_auth("u", Some(TOKEN)), None)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        error_of(&body).starts_with("malformed authorization header"),
        "{body}"
    );
    // POST routes too, and nothing is written by a refused request
    let job = api.queued_job("g/app", "p").await;
    let (status, _) = api
        .send(
            api.http
                .post(format!("{}/api/v1/jobs/{job}/cancel", api.base)),
            Some("nope"),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        api.store
            .read_stream(&StreamId::Job(job), 0)
            .await
            .unwrap()
            .len(),
        2
    );
    for token in ["other-token", TOKEN] {
        let (status, body) = api.send(api.http.get(&url), Some(token)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // the gateway's own routes stay open; unknown paths are JSON 404s
    let (status, _) = api
        .send(api.http.get(format!("{}/healthz", api.base)), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = api.get("/api/v1/nothing-here").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(body["error"].is_string());

    // no token configured: everything is refused, saying why
    let closed = Api::over(api.store.clone(), &[]).await;
    let (status, body) = closed
        .send(
            closed.http.get(format!("{}/api/v1/jobs", closed.base)),
            Some(""),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        error_of(&body).contains("no API token is configured"),
        "{body}"
    );
    let (status, _) = closed.get("/api/v1/agents").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_list_filters_and_a_cursor_walks_every_job_once() {
    let api = Api::start(&[TOKEN]).await;
    let mut alpha = Vec::new();
    let mut beta = Vec::new();
    for i in 0..7 {
        alpha.push(api.queued_job("group/alpha", "p").await);
        if i < 5 {
            beta.push(api.queued_job("group/beta", "p").await);
        }
    }
    let cancelled: Event = JobCancelled {
        reason: "r".into(),
        by: "test".into(),
    }
    .into();
    api.end(alpha[1], cancelled.clone()).await;
    api.end(alpha[4], failed()).await;
    api.end(beta[2], cancelled).await;
    let creation_order = api.store.jobs(None, 100, Order::Oldest).await.unwrap();
    assert_eq!(creation_order.len(), 12);

    // walk everything, 5 at a time
    let walk = |query: String| {
        let api = &api;
        async move {
            let mut seen: Vec<Value> = Vec::new();
            let mut cursor: Option<String> = None;
            for _ in 0..20 {
                let c = cursor
                    .as_ref()
                    .map(|c| format!("&cursor={c}"))
                    .unwrap_or_default();
                let (status, body) = api.get(&format!("/api/v1/jobs?{query}{c}")).await;
                assert_eq!(status, StatusCode::OK, "{body}");
                seen.extend(body["items"].as_array().unwrap().iter().cloned());
                match body["next"].as_str() {
                    Some(n) => cursor = Some(n.to_string()),
                    None => {
                        assert!(body["next"].is_null(), "{body}");
                        return seen;
                    }
                }
            }
            panic!("the cursor never ended");
        }
    };
    let id_list = |items: &[Value]| -> Vec<JobId> {
        items
            .iter()
            .map(|j| j["id"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let all = walk("limit=5".into()).await;
    let newest_first: Vec<JobId> = creation_order.iter().rev().copied().collect();
    assert_eq!(
        id_list(&all),
        newest_first,
        "every job once, the newest first"
    );
    let oldest = walk("order=oldest&limit=5".into()).await;
    assert_eq!(
        id_list(&oldest),
        creation_order,
        "order=oldest: creation order"
    );
    let newest = walk("order=newest&limit=7".into()).await;
    assert_eq!(id_list(&newest), newest_first);
    let first = &all[0];
    for field in [
        "id",
        "project",
        "tag",
        "sha",
        "state",
        "created_at",
        "updated_at",
    ] {
        assert!(!first[field].is_null(), "{field} missing in {first}");
    }
    assert_eq!(first["tag"], "v1.2.3");
    assert!(
        humantime::parse_rfc3339(first["created_at"].as_str().unwrap()).is_ok(),
        "{first}"
    );
    // a page of exactly the rest ends the walk
    let (_, body) = api.get("/api/v1/jobs?limit=12").await;
    assert_eq!(body["items"].as_array().unwrap().len(), 12);
    assert!(body["next"].is_null());

    let ids_of = |items: &[Value]| -> BTreeSet<JobId> {
        items
            .iter()
            .map(|j| j["id"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let beta_walk = walk("project=group/beta&limit=2".into()).await;
    assert_eq!(ids_of(&beta_walk), beta.iter().copied().collect());
    assert_eq!(beta_walk.len(), 5);
    let cancelled_walk = walk("state=cancelled&limit=1".into()).await;
    assert_eq!(
        ids_of(&cancelled_walk),
        [alpha[1], beta[2]].into_iter().collect()
    );
    let (_, body) = api
        .get("/api/v1/jobs?state=failed&project=group/alpha")
        .await;
    assert_eq!(ids_of(body["items"].as_array().unwrap()), [alpha[4]].into());
    assert_eq!(body["items"][0]["state"], "failed");
    let (_, body) = api
        .get("/api/v1/jobs?state=queued&project=group/alpha")
        .await;
    assert_eq!(body["items"].as_array().unwrap().len(), 5);

    // bad parameters are named
    for (query, name) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("state=sleeping", "state"),
        ("order=sideways", "order"),
        ("cursor=not-a-job", "cursor"),
        (&format!("cursor={}", JobId::new()) as &str, "cursor"),
    ] {
        let (status, body) = api.get(&format!("/api/v1/jobs?{query}")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {body}");
        assert!(error_of(&body).contains(name), "{query}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_says_why_a_step_waits_until_an_agent_serves_its_pool() {
    let api = Api::start(&[TOKEN]).await;
    let job = api.queued_job("g/app", "lonely").await;
    let (status, body) = api.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "queued");
    assert_eq!(body["plan"]["steps"][0]["kind"], "build");
    let step = &body["steps"][0];
    assert_eq!(
        (
            &step["step"],
            &step["status"],
            &step["attempt"],
            &step["pool"]
        ),
        (
            &json!("build"),
            &json!("queued"),
            &json!(1),
            &json!("lonely")
        )
    );
    assert_eq!(
        body["waiting"],
        json!([{ "step": "build", "pool": "lonely", "reason": "no live agent serves pool lonely" }])
    );

    // an agent of another pool changes nothing; one of this pool that is not live neither
    api.store
        .append(Append::new(
            StreamId::Agents,
            vec![joined("busy", "elsewhere"), joined("sleepy", "lonely")],
        ))
        .await
        .unwrap();
    api.store
        .heartbeat(&AgentId::new("busy"), Duration::from_secs(60))
        .await
        .unwrap();
    let (_, body) = api.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(
        body["waiting"][0]["reason"],
        "no live agent serves pool lonely"
    );
    // once an agent of the pool heartbeats, the step just waits its turn
    api.store
        .heartbeat(&AgentId::new("sleepy"), Duration::from_secs(60))
        .await
        .unwrap();
    let (_, body) = api.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(body["waiting"][0]["reason"], "queued in pool lonely");

    // a retry that waits for its due time says when
    let retry: Event = StepRetryScheduled {
        step: StepId::new("build"),
        attempt: 2,
        pool: "lonely".into(),
        priority: 0,
        due_ms: 4_102_444_800_000, // 2100-01-01
        reason: "clone failed".into(),
    }
    .into();
    api.end(job, retry).await;
    let (_, body) = api.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(body["steps"][0]["status"], "delayed");
    assert_eq!(
        body["waiting"][0]["reason"],
        "retry due at 2100-01-01T00:00:00.000Z"
    );

    let (status, body) = api.get(&format!("/api/v1/jobs/{}", JobId::new())).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_of(&body).contains("not found"), "{body}");
    let (status, body) = api.get("/api/v1/jobs/12345").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_of(&body).contains("job id"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_the_decoded_history() {
    let api = Api::start(&[TOKEN]).await;
    let job = api.queued_job("g/app", "p").await;
    let (status, body) = api.get(&format!("/api/v1/jobs/{job}/events")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let items = body["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    assert!(body["next"].is_null());
    let created = &items[0];
    assert_eq!(
        (&created["kind"], &created["name"], &created["version"]),
        (&json!(2), &json!("job_created"), &json!(1))
    );
    assert!(created["pos"].as_str().is_some_and(|p| !p.is_empty()));
    assert!(created["at"].is_string());
    assert!(created["token"].is_null());
    assert_eq!(created["payload"]["job"], json!(job.to_string()));
    assert_eq!(created["payload"]["project"], "g/app");
    assert_eq!(
        created["payload"]["steps"][0]["spec"]["Build"]["secrets"],
        json!(["DEPLOY_KEY"]),
        "secrets appear by name only"
    );
    assert_eq!(items[1]["name"], "step_queued");
    assert_eq!(items[1]["payload"]["pool"], "p");
    assert_eq!(items[1]["payload"]["attempt"], 1);

    let (_, page) = api.get(&format!("/api/v1/jobs/{job}/events?limit=1")).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], "1");
    let (_, rest) = api
        .get(&format!("/api/v1/jobs/{job}/events?limit=1&cursor=1"))
        .await;
    assert_eq!(rest["items"][0], items[1]);
    assert!(rest["next"].is_null());

    let (status, _) = api
        .get(&format!("/api/v1/jobs/{}/events", JobId::new()))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_removes_queued_work_and_only_once() {
    let api = Api::start(&[TOKEN]).await;
    let job = api.queued_job("g/app", "p").await;
    let other = api.queued_job("g/app", "p").await;
    let queued_jobs = || async {
        let q = api.store.queued().await.unwrap();
        q.into_iter().map(|q| q.job).collect::<BTreeSet<_>>()
    };
    assert_eq!(queued_jobs().await, [job, other].into());

    let (status, body) = api
        .post(
            &format!("/api/v1/jobs/{job}/cancel"),
            Some(json!({ "reason": "wrong tag" })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["state"], "cancelled");
    assert_eq!(queued_jobs().await, [other].into(), "queued work is gone");
    let (_, shown) = api.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(shown["state"], "cancelled");
    assert_eq!(shown["reason"], "wrong tag");
    assert_eq!(shown["waiting"], json!([]));
    let history = api.store.read_stream(&StreamId::Job(job), 0).await.unwrap();
    match history.last().unwrap().decode().unwrap() {
        Event::JobCancelled(c) => {
            assert_eq!((c.by.as_str(), c.reason.as_str()), ("api", "wrong tag"))
        }
        other => panic!("expected JobCancelled, got {other:?}"),
    }

    let (status, body) = api.post(&format!("/api/v1/jobs/{job}/cancel"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(error_of(&body).contains("already ended"), "{body}");
    assert_eq!(
        api.store
            .read_stream(&StreamId::Job(job), 0)
            .await
            .unwrap()
            .len(),
        history.len(),
        "a refused cancel writes nothing"
    );
    let (status, _) = api
        .post(&format!("/api/v1/jobs/{}/cancel", JobId::new()), None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, body) = api
        .post(
            &format!("/api/v1/jobs/{other}/cancel"),
            Some(json!({ "why": 1 })),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // a running step's lease is revoked: its holder's next renewal is refused
    let running = api.queued_job("g/app", "hold").await;
    let claim = api
        .store
        .claim(
            &["hold".to_string()],
            &AgentId::new("holder"),
            Duration::from_secs(60),
        )
        .await
        .unwrap()
        .expect("the step is claimable");
    assert_eq!(claim.job, running);
    let (_, shown) = api.get(&format!("/api/v1/jobs/{running}")).await;
    assert_eq!(shown["state"], "running");
    assert_eq!(shown["steps"][0]["agent"], "holder");
    let (status, body) = api
        .post(&format!("/api/v1/jobs/{running}/cancel"), None)
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["reason"], "cancelled through the api");
    assert!(matches!(
        api.store
            .renew(running, &claim.step, claim.token, Duration::from_secs(60))
            .await,
        Err(ferry::store::Error::Stale { .. })
    ));
    assert!(api.store.leases().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_a_failed_job_runs_a_new_job_with_the_same_plan() {
    let api = Api::start(&[TOKEN]).await;
    let pool = "retry-pool";
    let old = api.queued_job_with("g/app", pool, StepSpec::Noop).await;

    let (status, body) = api.post(&format!("/api/v1/jobs/{old}/retry"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_of(&body).contains("has not ended"), "{body}");

    api.end(old, failed()).await;
    let (status, body) = api.post(&format!("/api/v1/jobs/{old}/retry"), None).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let new: JobId = body["id"].as_str().unwrap().parse().unwrap();
    assert_ne!(new, old);
    assert_eq!(body["retry_of"], json!(old.to_string()));

    let (_, shown) = api.get(&format!("/api/v1/jobs/{new}")).await;
    assert_eq!(shown["state"], "queued");
    assert_eq!(shown["trigger"], format!("retry:{old}"));
    assert_eq!(
        shown["steps"][0]["status"], "pending",
        "the coordinators queue it, as for a webhook's job"
    );
    let (_, old_shown) = api.get(&format!("/api/v1/jobs/{old}")).await;
    assert_eq!(old_shown["state"], "failed", "the old job stays as it was");
    // A repeated POST does not start a second job.
    let (status, body) = api.post(&format!("/api/v1/jobs/{old}/retry"), None).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(error_of(&body).contains("already retried"), "{body}");
    let plan = |job: JobId| {
        let store = api.store.clone();
        async move {
            match store.read_stream(&StreamId::Job(job), 0).await.unwrap()[0]
                .decode()
                .unwrap()
            {
                Event::JobCreated(c) => c,
                other => panic!("{other:?}"),
            }
        }
    };
    let (a, b) = (plan(old).await, plan(new).await);
    assert_eq!((a.steps, a.sha, a.tag), (b.steps, b.sha, b.tag));

    // the new job runs to the end through a coordinator and an agent
    let roles = Roles::start(&api.store, 1, &[("runner", pool)]);
    wait_until(DEADLINE, || async {
        let (_, shown) = api.get(&format!("/api/v1/jobs/{new}")).await;
        shown["state"] == "succeeded"
    })
    .await;
    roles.stop().await;
    let (_, shown) = api.get(&format!("/api/v1/jobs/{new}")).await;
    assert_eq!(shown["steps"][0]["status"], "succeeded");
    assert_eq!(shown["steps"][0]["attempt"], 1);
    let (_, old_shown) = api.get(&format!("/api/v1/jobs/{old}")).await;
    assert_eq!(old_shown["state"], "failed");
}

/// A job whose deploy would land over a newer tag's (queued, running or deployed) is not
/// retried (design invariant 5; GitLab's "outdated deployment jobs"): the answer names the
/// newer job and the manual deploy that ships the older release on purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_never_deploys_an_older_tag_over_a_newer_one() {
    let api = Api::start(&[TOKEN]).await;
    let deploy = |env: &str| {
        StepSpec::Deploy(DeploySpec {
            environment: env.into(),
            hosts: vec!["local".into()],
            path: "/srv/app".into(),
            ..Default::default()
        })
    };
    let old = api
        .queued_job_with("g/app", "deploys", deploy("production"))
        .await;
    api.end(old, failed()).await;
    let older = {
        let job = JobId::new();
        let step = |name: &str, spec: StepSpec| StepPlan {
            step: StepId::new(name),
            pool: "deploys".into(),
            priority: 0,
            spec,
        };
        let created = JobCreated {
            artifact: None,
            job,
            project_id: 42,
            project: "g/app".into(),
            tag: "v1.2.0".into(),
            git_ref: "refs/tags/v1.2.0".into(),
            sha: "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7".into(),
            priority: 0,
            trigger: "test".into(),
            steps: vec![
                step("build", StepSpec::Noop),
                step("deploy:production", deploy("production")),
            ],
        };
        api.store
            .append(Append::new(StreamId::Job(job), vec![created.into()]).expect(0))
            .await
            .unwrap();
        api.end(job, failed()).await;
        job
    };
    let newer = api
        .queued_job_with("g/app", "deploys", deploy("production"))
        .await;
    let retry = |job: JobId| {
        let api = &api;
        async move { api.post(&format!("/api/v1/jobs/{job}/retry"), None).await }
    };
    // while the newer job is queued, and once it deployed
    for end in [None, Some(JobSucceeded {}.into())] {
        if let Some(event) = end {
            api.end(newer, event).await;
        }
        let (status, body) = retry(old).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let error = error_of(&body);
        assert!(error.contains(&format!("the newer job {newer}")), "{error}");
        assert!(
            error.contains("ferry deploy g/app v1.2.3 --env production"),
            "{error}"
        );
    }
    // Another environment's deploys do not stand in the way; a newer job that failed does not.
    let staging = api
        .queued_job_with("g/app", "deploys", deploy("staging"))
        .await;
    api.end(staging, failed()).await;
    let (status, body) = retry(staging).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    // The newest deploy may be retried (it deploys its own release again).
    let (status, body) = retry(newer).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert!(body.get("left_out").is_none(), "{body}");
    let newest = body["id"].clone();

    // A job that builds and deploys is retried without its outdated deploy: the build runs
    // again (an expired artifact is built again so), the answer says what was left out.
    let (status, body) = retry(older).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["left_out"][0]["environment"], "production", "{body}");
    assert_eq!(body["left_out"][0]["newer_job"], newest);
    let fresh: JobId = body["id"].as_str().unwrap().parse().unwrap();
    let first = api
        .store
        .read_stream(&StreamId::Job(fresh), 0)
        .await
        .unwrap();
    match first[0].decode().unwrap() {
        Event::JobCreated(c) => {
            let steps: Vec<String> = c.steps.iter().map(|s| s.step.to_string()).collect();
            assert_eq!(steps, ["build"]);
        }
        other => panic!("{other:?}"),
    }
}

/// A manual deploy ships the tag's build at the commit the tag points to now: a tag moved to a
/// commit whose build failed (or has not finished) is a conflict naming that commit, not the
/// old commit's artifact shipped under the tag's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_deploy_never_ships_the_commit_a_tag_moved_away_from() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let deploy = DeploySpec {
        environment: "production".into(),
        hosts: vec!["local".into()],
        path: "/srv/app".into(),
        ..Default::default()
    };
    let project = ferry::coordinator::plan::ProjectPlan {
        id: Some(42),
        path: "g/app".into(),
        priority: 0,
        deploy_priority: 10,
        auto_build: true,
        auto_deploy: true,
        clone_url: None,
        build_pool: "default".into(),
        build: BuildSpec::default(),
        environments: vec![("default".into(), deploy)],
    };
    let api = Api::serving(store.clone(), &[TOKEN], vec![project]).await;
    let job = |sha: &str, artifact: bool| {
        let job = JobId::new();
        let created = JobCreated {
            artifact: artifact.then(|| ArtifactRef {
                job,
                name: "app.tar.gz".into(),
                key: format!("sha256/{}", "e".repeat(64)),
                size: 1,
                sha256: "e".repeat(64),
            }),
            job,
            project_id: 42,
            project: "g/app".into(),
            tag: "v1.2.3".into(),
            git_ref: "refs/tags/v1.2.3".into(),
            sha: sha.into(),
            priority: 0,
            trigger: "test".into(),
            steps: vec![],
        };
        (job, created)
    };
    let (first, created) = job(&"a".repeat(40), true);
    store
        .append(Append::new(StreamId::Job(first), vec![created.into()]).expect(0))
        .await
        .unwrap();
    let (moved, created) = job(&"b".repeat(40), false);
    store
        .append(Append::new(StreamId::Job(moved), vec![created.into()]).expect(0))
        .await
        .unwrap();
    api.end(moved, failed()).await;
    let (status, body) = api
        .post(
            "/api/v1/deploys",
            Some(json!({"project": "g/app", "tag": "v1.2.3", "environment": "production"})),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let error = error_of(&body);
    assert!(
        error.contains(&format!(
            "points to {} since job {moved} (failed)",
            "b".repeat(40)
        )),
        "{error}"
    );
}

/// Log retention: once a job has been over for `keep_logs`, the coordinator holding the sweep
/// lock records `logs_expired` and its lines are gone; the API answers 410 Gone naming when,
/// the job and its events stay, and a running job's lines are untouched. The CLI says so too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_jobs_logs_expire_after_keep_logs_and_the_api_says_so() {
    use ferry::store::Fence;
    let api = Api::start(&[TOKEN]).await;
    let pool = "retention-pool";
    let (done, running) = (
        api.queued_job_with("g/app", pool, StepSpec::Noop).await,
        api.queued_job_with("g/app", pool, StepSpec::Noop).await,
    );
    for job in [done, running] {
        let claim = api
            .store
            .claim(&[pool.to_string()], &AgentId::new("by-hand"), DEADLINE * 6)
            .await
            .unwrap()
            .expect("a queued step");
        assert_eq!(claim.job, job);
        let fence = Fence {
            step: claim.step.clone(),
            token: claim.token,
        };
        let line = StepLog {
            step: claim.step.clone(),
            attempt: claim.attempt,
            stream: "stdout".into(),
            line: format!("output of {job}"),
        };
        api.store.append_logs(job, &fence, &[line]).await.unwrap();
    }
    api.end(done, JobSucceeded {}.into()).await;
    let logs = |job: JobId| format!("/api/v1/jobs/{job}/logs");
    let (status, body) = api.get(&logs(done)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["items"][0]["line"], format!("output of {done}"));

    let roles = Roles::start_with(
        &api.store,
        1,
        &[],
        coordinator::Options {
            keep_logs: Some(Duration::from_millis(300)),
            ..Default::default()
        },
    );
    let body = wait_for(DEADLINE, "the ended job's logs to expire", || async {
        let (status, body) = api.get(&logs(done)).await;
        (status == StatusCode::GONE).then_some(body)
    })
    .await;
    let message = error_of(&body);
    assert!(
        message.contains(&format!("the logs of job {done} were removed at")),
        "{message}"
    );
    let (_, shown) = api.get(&format!("/api/v1/jobs/{done}")).await;
    assert_eq!(shown["state"], "succeeded");
    assert!(shown["logs_expired_at"].is_string(), "{shown}");
    let (_, follow) = api.get(&format!("{}?follow=true", logs(done))).await;
    assert!(error_of(&follow).contains("were removed"), "{follow}");
    let (_, events) = api.get(&format!("/api/v1/jobs/{done}/events")).await;
    let names: Vec<&str> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(names.last(), Some(&"logs_expired"), "{names:?}");
    assert_eq!(
        names.iter().filter(|n| **n == "logs_expired").count(),
        1,
        "{names:?}"
    );

    // The job still running keeps its lines, however old.
    let (status, body) = api.get(&logs(running)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["items"][0]["line"], format!("output of {running}"));

    let base = api.base.clone();
    let id = done.to_string();
    let flags = ["--api", base.as_str(), "--token", TOKEN];
    let out = ferry(&[&["jobs", "logs", id.as_str()][..], &flags].concat()).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("were removed at") && stderr(&out).contains("http 410"),
        "{}",
        stderr(&out)
    );
    let out = ferry(&[&["jobs", "show", id.as_str()][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("logs: removed "), "{}", stdout(&out));
    roles.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_show_live_an_agent_that_stops_has_left_and_one_that_stops_heartbeating_is_lost() {
    let api = Api::start(&[TOKEN]).await;
    let roles = Roles::start(&api.store, 1, &[]);
    let (stop_agent, agent_rx) = watch::channel(false);
    let agent = spawn_agent(&api.store, "worker-1", "linux", agent_rx);

    let live = wait_for(DEADLINE, "the agent to be live", || async {
        let (_, body) = api.get("/api/v1/agents").await;
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "worker-1" && a["live"] == true)
            .cloned()
    })
    .await;
    assert_eq!(live["pools"], json!(["linux"]));
    assert_eq!(live["labels"], json!(["test"]));
    assert_eq!(live["capacity"], 2);
    assert_eq!(live["version"], env!("CARGO_PKG_VERSION"));
    assert!(live["heartbeat_deadline"].is_string());
    assert!(live["lost"].is_null());

    // a live agent of another pool does not serve this one
    let job = api.queued_job("g/app", "nobody").await;
    let (_, body) = api.get(&format!("/api/v1/jobs/{job}")).await;
    assert_eq!(
        body["waiting"][0]["reason"],
        "no live agent serves pool nobody"
    );

    // A stopped agent says it left: not live at once, not lost.
    let _ = stop_agent.send(true);
    agent.await.unwrap();
    let (_, body) = api.get("/api/v1/agents").await;
    let gone = body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "worker-1")
        .cloned()
        .unwrap();
    assert_eq!(gone["live"], false, "{gone}");
    assert_eq!(gone["left"], "shut down: running steps finished", "{gone}");
    assert!(gone["lost"].is_null(), "{gone}");

    // One that just stops heartbeating (a crash, a cut network) is reported lost.
    api.store
        .append(Append::new(
            StreamId::Agents,
            vec![joined("worker-2", "linux")],
        ))
        .await
        .unwrap();
    api.store
        .heartbeat(&"worker-2".into(), Duration::from_millis(200))
        .await
        .unwrap();
    let lost = wait_for(DEADLINE, "the agent to be reported lost", || async {
        let (_, body) = api.get("/api/v1/agents").await;
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "worker-2" && a["live"] == false && a["lost"].is_string())
            .cloned()
    })
    .await;
    assert_eq!(lost["lost"], "heartbeat expired");
    assert!(lost["heartbeat_deadline"].is_null());
    assert!(lost["left"].is_null());
    let recorded: Vec<AgentLost> = api
        .store
        .read_stream(&StreamId::Agents, 0)
        .await
        .unwrap()
        .iter()
        .filter_map(|s| match s.decode().unwrap() {
            Event::AgentLost(l) => Some(l),
            _ => None,
        })
        .collect();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].agent.as_str(), "worker-2");
    roles.stop().await;
}

// ---------------------------------------------------------------------------------------------
// the real binary

async fn ferry(args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FERRY_LOG", "warn")
        .args(args);
    tokio::task::spawn_blocking(move || cmd.output().expect("run ferry"))
        .await
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_lists_and_shows_jobs_through_the_api() {
    let api = Api::start(&[TOKEN]).await;
    let waiting = api.queued_job("group/cli", "lonely").await;
    let failed_job = api.queued_job("group/cli", "lonely").await;
    api.end(failed_job, failed()).await;
    let base = api.base.clone();
    let flags = ["--api", base.as_str(), "--token", TOKEN];

    let out = ferry(&[&["jobs", "list"][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("ID"), "{text}");
    // A server's configuration is none of the client's business: one that does not load (here
    // missing altogether) does not stop it.
    let out = ferry(
        &[
            &["--config", "/nonexistent/ferry.toml", "jobs", "list"][..],
            &flags,
        ]
        .concat(),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), text);
    for want in [
        waiting.to_string(),
        failed_job.to_string(),
        "group/cli".into(),
        "v1.2.3".into(),
        "queued".into(),
        "failed".into(),
    ] {
        assert!(text.contains(&want), "{want} missing from:\n{text}");
    }
    // newest first, one per page: the hint printed under a page continues the same listing
    let out = ferry(&[&["jobs", "list", "--limit", "1"][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&failed_job.to_string()), "{text}");
    assert!(!text.contains(&waiting.to_string()), "{text}");
    let more = text
        .lines()
        .find_map(|l| l.strip_prefix("more: ferry "))
        .unwrap_or_else(|| panic!("no hint for the next page in:\n{text}"));
    let hinted = shlex::split(more).expect("the hint is a shell command");
    assert!(hinted.contains(&"--limit".to_string()), "{more}");
    let hinted: Vec<&str> = hinted.iter().map(String::as_str).collect();
    let out = ferry(&[&hinted[..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&waiting.to_string()), "{text}");
    assert!(!text.contains(&failed_job.to_string()), "{text}");
    let out = ferry(&[&["jobs", "list", "--oldest", "--limit", "1"][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&waiting.to_string()), "{text}");
    assert!(text.contains("--oldest --cursor"), "{text}");

    let out = ferry(&[&["jobs", "list", "--state", "failed", "--json"][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["items"].as_array().unwrap().len(), 1);
    assert_eq!(json["items"][0]["id"], json!(failed_job.to_string()));

    let id = waiting.to_string();
    let out = ferry(&[&["jobs", "show", id.as_str()][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&id), "{text}");
    assert!(text.contains("build"), "{text}");
    assert!(
        text.contains("waiting: build: no live agent serves pool lonely"),
        "{text}"
    );

    let left = AgentLeft {
        agent: "gone-agent".into(),
        reason: "shut down: running steps finished".into(),
    };
    api.store
        .append(Append::new(
            StreamId::Agents,
            vec![joined("gone-agent", "lonely"), left.into()],
        ))
        .await
        .unwrap();
    let out = ferry(&[&["agents", "list"][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("NAME"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("gone-agent")
            && l.ends_with("left: shut down: running steps finished")),
        "{text}"
    );

    // `ferry agents stop`: the live agent's next heartbeat hears it.
    api.store
        .append(Append::new(
            StreamId::Agents,
            vec![joined("cli-agent", "lonely")],
        ))
        .await
        .unwrap();
    let cli_agent = AgentId::new("cli-agent");
    let beat = Duration::from_secs(60);
    assert_eq!(
        api.store.heartbeat(&cli_agent, beat).await.unwrap().stop,
        None
    );

    // `ferry agents pause` / `resume`: the heartbeat says so, and the list shows it.
    let out = ferry(
        &[
            &["agents", "pause", "cli-agent", "--reason", "new disks"][..],
            &flags,
        ]
        .concat(),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("agent cli-agent paused (new disks)"),
        "{}",
        stdout(&out)
    );
    let heard = api.store.heartbeat(&cli_agent, beat).await.unwrap();
    assert_eq!(heard.pause.as_deref(), Some("new disks"));
    let out = ferry(&[&["agents", "list"][..], &flags].concat()).await;
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.starts_with("cli-agent") && l.ends_with("live, paused: new disks")),
        "{text}"
    );
    let out = ferry(&[&["agents", "resume", "cli-agent"][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("agent cli-agent resumed"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        api.store.heartbeat(&cli_agent, beat).await.unwrap().pause,
        None
    );
    let out = ferry(&[&["agents", "resume", "cli-agent"][..], &flags].concat()).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not paused"), "{}", stderr(&out));

    let out = ferry(
        &[
            &["agents", "stop", "cli-agent", "--reason", "maintenance"][..],
            &flags,
        ]
        .concat(),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("agent cli-agent asked to stop (maintenance)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(
        api.store
            .heartbeat(&cli_agent, beat)
            .await
            .unwrap()
            .stop
            .as_deref(),
        Some("maintenance")
    );
    let out = ferry(&[&["agents", "list"][..], &flags].concat()).await;
    let text = stdout(&out);
    assert!(
        text.lines()
            .any(|l| l.starts_with("cli-agent") && l.ends_with("live, stopping: maintenance")),
        "{text}"
    );
    let out = ferry(&[&["agents", "stop", "gone-agent"][..], &flags].concat()).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is not live"), "{}", stderr(&out));

    // API errors come out as the API's message, with a non-zero exit
    let unknown = JobId::new().to_string();
    let out = ferry(&[&["jobs", "show", unknown.as_str()][..], &flags].concat()).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("job {unknown} not found")),
        "{}",
        stderr(&out)
    );
    let out = ferry(&["jobs", "list", "--api", base.as_str(), "--token", "wrong"]).await;
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid bearer token"),
        "{}",
        stderr(&out)
    );
    let out = ferry(
        &[
            &["jobs", "cancel", failed_job.to_string().as_str()][..],
            &flags,
        ]
        .concat(),
    )
    .await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already ended"), "{}", stderr(&out));
    let out = ferry(
        &[
            &["jobs", "retry", failed_job.to_string().as_str()][..],
            &flags,
        ]
        .concat(),
    )
    .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("retried as job"), "{}", stdout(&out));
    let out = ferry(&[&["jobs", "cancel", id.as_str()][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("cancelled"), "{}", stdout(&out));
    assert!(api
        .store
        .queued()
        .await
        .unwrap()
        .iter()
        .all(|q| q.job != waiting));
}

/// The API folds the agents stream (which grows with every join and stop, for good) a tail at a
/// time; a stream that is not the one it folded (a store restored from an older backup, a
/// failover that lost writes) is folded again from its start, not continued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_list_folds_new_entries_and_notices_a_replaced_stream() {
    let redis = harness::redis_store().await;
    let stream_key = format!("{{{}}}:s:agents", redis.namespace());
    let api = Api::over(Arc::new(redis), &[TOKEN]).await;
    let join = |name: &'static str| {
        let store = api.store.clone();
        async move {
            store
                .append(Append::new(StreamId::Agents, vec![joined(name, "p")]))
                .await
                .unwrap();
        }
    };
    let names = || async {
        let (status, body) = api.get("/api/v1/agents").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    join("a1").await;
    assert_eq!(names().await, ["a1"]);
    join("a2").await;
    join("a3").await;
    assert_eq!(names().await, ["a1", "a2", "a3"]);
    assert_eq!(names().await, ["a1", "a2", "a3"], "nothing new: the same");

    // Another history of the same length (and one longer) in place of the one folded.
    let mut conn = redis::Client::open(harness::shared().url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(&stream_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    for name in ["b1", "b2", "b3"] {
        join(name).await;
    }
    assert_eq!(names().await, ["b1", "b2", "b3"]);
    let _: () = redis::cmd("DEL")
        .arg(&stream_key)
        .query_async(&mut conn)
        .await
        .unwrap();
    for name in ["c1", "c2", "c3", "c4", "c5"] {
        join(name).await;
    }
    assert_eq!(names().await, ["c1", "c2", "c3", "c4", "c5"]);
}

/// A fleet that scales agents up and down would list every agent it ever ran: agents that left
/// or were lost more than a day ago are counted in `hidden` instead, and listed with
/// `all=true` (`ferry agents list --all`); one that joins again is listed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_gone_for_over_a_day_are_listed_only_when_asked_for() {
    let api = Api::start(&[TOKEN]).await;
    let now = ferry::store::now_ms();
    let hours_ago = |h: u64| now - h * 3600 * 1000;
    let record = |event: Event, at_ms: u64| {
        let store = api.store.clone();
        async move {
            let mut append = Append::new(StreamId::Agents, vec![event]);
            append.at_ms = at_ms;
            store.append(append).await.unwrap();
        }
    };
    let gone = |name: &str, lost: bool| -> Event {
        let (agent, reason) = (AgentId::new(name), "test".to_string());
        if lost {
            AgentLost { agent, reason }.into()
        } else {
            AgentLeft { agent, reason }.into()
        }
    };
    record(joined("old-lost", "p"), hours_ago(30)).await;
    record(gone("old-lost", true), hours_ago(26)).await;
    record(joined("old-left", "p"), hours_ago(30)).await;
    record(gone("old-left", false), hours_ago(25)).await;
    record(joined("recent", "p"), hours_ago(3)).await;
    record(gone("recent", true), hours_ago(2)).await;
    record(joined("back", "p"), hours_ago(40)).await;
    record(gone("back", false), hours_ago(39)).await;
    record(joined("back", "p"), hours_ago(1)).await;

    let names = |body: &Value| -> Vec<String> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect()
    };
    let (status, body) = api.get("/api/v1/agents").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(names(&body), ["back", "recent"], "{body}");
    assert_eq!(body["hidden"], 2, "{body}");
    assert!(
        body["items"][0]["gone_at"].is_null(),
        "joined again: {body}"
    );
    assert!(body["items"][1]["gone_at"].is_string(), "{body}");
    let (_, body) = api.get("/api/v1/agents?all=true").await;
    assert_eq!(
        names(&body),
        ["back", "old-left", "old-lost", "recent"],
        "{body}"
    );
    assert_eq!(body["hidden"], 0, "{body}");
    assert_eq!(body["items"][2]["lost"], "test", "{body}");
    let (status, body) = api.get("/api/v1/agents?all=yes").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_of(&body).contains("all"), "{body}");

    let flags = ["--api", api.base.as_str(), "--token", TOKEN];
    let out = ferry(&[&["agents", "list"][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(!text.contains("old-lost"), "{text}");
    assert!(
        text.contains("2 more left or were lost over a day ago: ferry agents list --all"),
        "{text}"
    );
    let out = ferry(&[&["agents", "list", "--all"][..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains("old-lost") && text.contains("old-left"),
        "{text}"
    );
    assert!(!text.contains("more left"), "{text}");
}

/// A tag's jobs: with the project (by path) looked up in the tag's index, without it filtered
/// from the job list; both orders, a cursor, the other filters and the CLI's `--tag`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_tag_are_listed_from_its_index() {
    let api = Api::start(&[TOKEN]).await;
    let mut created = Vec::new();
    for (project, tag) in [
        ("group/alpha", "v1"),
        ("group/alpha", "v2"),
        ("group/beta", "v1"),
        ("group/alpha", "v1"),
        ("group/alpha", "v1"),
    ] {
        let job = JobId::new();
        let plan = JobCreated {
            project: project.into(),
            ..ferry::store::conformance::noop_job(job, tag, "nobody", &["build"])
        };
        api.store
            .append(Append::new(StreamId::Job(job), vec![plan.into()]).expect(0))
            .await
            .unwrap();
        created.push(job);
    }
    api.end(created[3], failed()).await;
    let ids = |body: &Value| -> Vec<JobId> {
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["id"].as_str().unwrap().parse().unwrap())
            .collect()
    };
    let alpha_v1 = [created[4], created[3], created[0]];
    let (status, body) = api.get("/api/v1/jobs?project=group/alpha&tag=v1").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(ids(&body), alpha_v1, "newest first");
    assert!(body["next"].is_null(), "{body}");
    let (_, body) = api
        .get("/api/v1/jobs?project=group/alpha&tag=v1&order=oldest")
        .await;
    assert_eq!(ids(&body), [created[0], created[3], created[4]]);
    let (_, body) = api
        .get("/api/v1/jobs?project=group/alpha&tag=v1&state=failed")
        .await;
    assert_eq!(ids(&body), [created[3]]);
    // a page at a time
    let (_, first) = api
        .get("/api/v1/jobs?project=group/alpha&tag=v1&limit=2")
        .await;
    assert_eq!(ids(&first), alpha_v1[..2]);
    let cursor = first["next"].as_str().expect("more").to_string();
    let (_, rest) = api
        .get(&format!(
            "/api/v1/jobs?project=group/alpha&tag=v1&limit=2&cursor={cursor}"
        ))
        .await;
    assert_eq!(ids(&rest), alpha_v1[2..]);
    assert!(rest["next"].is_null(), "{rest}");
    let (status, body) = api
        .get(&format!(
            "/api/v1/jobs?project=group/alpha&tag=v1&cursor={}",
            created[2]
        ))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_of(&body).contains("cursor"), "{body}");
    // without the project: every project's jobs of that tag
    let (_, body) = api.get("/api/v1/jobs?tag=v1").await;
    assert_eq!(ids(&body), [created[4], created[3], created[2], created[0]]);
    let (_, body) = api.get("/api/v1/jobs?project=group/alpha&tag=v9").await;
    assert!(ids(&body).is_empty(), "{body}");

    // Behind a long history: the index answers at once; a filter reads at most a budget of
    // jobs per request and says where to continue.
    let later: Vec<_> = (0..api::SCAN_BUDGET)
        .map(|_| {
            let store = api.store.clone();
            async move {
                let job = JobId::new();
                let plan = ferry::store::conformance::noop_job(job, "other", "nobody", &["b"]);
                store
                    .append(Append::new(StreamId::Job(job), vec![plan.into()]).expect(0))
                    .await
                    .unwrap();
            }
        })
        .collect();
    futures_util::future::join_all(later).await;
    let (_, body) = api.get("/api/v1/jobs?project=group/alpha&tag=v1").await;
    assert_eq!(ids(&body), alpha_v1);
    assert!(body["next"].is_null(), "{body}");
    let (_, body) = api.get("/api/v1/jobs?tag=v1").await;
    assert!(
        ids(&body).is_empty(),
        "the budget went on newer jobs: {body}"
    );
    assert!(body["next"].is_string(), "{body}");

    let flags = ["--api", api.base.as_str(), "--token", TOKEN];
    let args = [
        "jobs",
        "list",
        "--project",
        "group/alpha",
        "--tag",
        "v1",
        "--limit",
        "1",
    ];
    let out = ferry(&[&args[..], &flags].concat()).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&created[4].to_string()), "{text}");
    assert!(
        text.contains("--project group/alpha --tag v1 --limit 1 --cursor"),
        "the next page keeps the tag: {text}"
    );
}

/// A log follow lasts as long as its job; a graceful shutdown waits for every open response.
/// The server's stop ends the follow, so shutting down does not wait for the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_ends_log_follows_instead_of_waiting_for_their_jobs() {
    let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
    let running = Api::over(store.clone(), &[TOKEN]).await;
    let job = running.queued_job("group/app", "default").await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let state = ApiState::new(store, &[Secret::new(TOKEN)]).with_stop(stopped.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let mut stopped = stopped;
        axum::serve(listener, api::router(state))
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
    });
    let mut follow = reqwest::Client::new()
        .get(format!("{base}/api/v1/jobs/{job}/logs?follow=true"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), StatusCode::OK);
    stop.send(true).unwrap();
    tokio::time::timeout(DEADLINE, server)
        .await
        .expect("the server stops while the job still runs")
        .unwrap();
    // The follow's body ends (rather than hanging on the job).
    tokio::time::timeout(DEADLINE, async {
        while let Some(_chunk) = follow.chunk().await.unwrap() {}
    })
    .await
    .expect("the follow ends");
}

/// A store that cannot answer is a 503 saying so, never "not found", and never the store's own
/// error text (which names servers and files); a log follow ends with the same words.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_answer_is_503_not_404() {
    let server = harness::RedisServer::start();
    let store = ferry::store::redis::RedisStore::connect(&server.url(), &harness::namespace())
        .await
        .unwrap();
    let api = Api::over(Arc::new(store), &[TOKEN]).await;
    let job = api.queued_job("group/app", "default").await;
    // A follow that starts while the store answers, and meets its failure on a later read.
    let follow = api
        .http
        .get(format!("{}/api/v1/jobs/{job}/logs?follow=true", api.base))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(follow.status(), StatusCode::OK);
    server.stop();
    for path in [
        format!("/api/v1/jobs/{job}"),
        format!("/api/v1/jobs/{job}/events?cursor=5"),
    ] {
        let (status, body) = api.get(&path).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert_eq!(
            body,
            json!({ "error": "event store unavailable" }),
            "{path}"
        );
    }
    let text = tokio::time::timeout(DEADLINE * 3, follow.text())
        .await
        .expect("the follow ends")
        .unwrap();
    assert!(
        text.contains("event: error\ndata: event store unavailable"),
        "{text}"
    );
    assert!(!text.contains("127.0.0.1"), "{text}");
}
