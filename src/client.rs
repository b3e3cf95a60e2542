//! `ferry jobs …`, `ferry agents …`, `ferry deploy` and `ferry rollback`: a thin client of the REST API (`/api/v1`). Prints tables
//! for people, or the API's JSON with `--json`. A non-2xx answer becomes an error carrying the
//! API's `{"error"}` message, so the command exits non-zero with it.

use crate::cli::{
    AgentsArgs, AgentsCommand, DeployArgs, JobsArgs, JobsCommand, JobsListArgs, RollbackArgs,
};
use anyhow::{anyhow, bail, Context};
use reqwest::Method;
use serde_json::Value;
use std::fmt::Write as _;
use std::time::Duration;

/// An API client: base URL and bearer token.
pub struct Client {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

impl Client {
    pub fn new(api: &str, token: Option<String>) -> anyhow::Result<Client> {
        let base = api.trim_end_matches('/').to_string();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            bail!("api url {api:?} must start with http:// or https://");
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .context("cannot build the http client")?;
        Ok(Client { http, base, token })
    }

    /// Calls `method path` and returns the JSON answer, or an error with the API's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = format!("{}/api/v1{path}", self.base);
        let mut request = self.http.request(method, &url).query(query);
        if let Some(b) = &body {
            request = request.json(b);
        }
        if let Some(t) = &self.token {
            request = request.bearer_auth(t);
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("cannot reach the ferry api at {}", self.base))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .with_context(|| format!("cannot read the answer of {url}"))?;
        let json: Option<Value> = serde_json::from_str(&body).ok();
        if !status.is_success() {
            let message = json
                .as_ref()
                .and_then(|v| v["error"].as_str())
                .map(str::to_string)
                .unwrap_or_else(|| body.chars().take(200).collect());
            bail!("{message} (http {})", status.as_u16());
        }
        json.ok_or_else(|| anyhow!("the api answered {url} with something that is not json"))
    }
}

/// Runs `ferry jobs …`, printing to stdout.
pub async fn jobs(args: &JobsArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.conn.api, args.conn.token.clone())?;
    let (answer, text) = match &args.command {
        JobsCommand::List(list) => {
            let mut query = Vec::new();
            let params = [
                ("project", list.project.clone()),
                ("tag", list.tag.clone()),
                ("state", list.state.clone()),
                ("limit", list.limit.map(|n| n.to_string())),
                ("cursor", list.cursor.clone()),
                ("order", list.oldest.then(|| "oldest".to_string())),
            ];
            for (k, v) in params {
                if let Some(v) = v {
                    query.push((k, v));
                }
            }
            let v = client.call(Method::GET, "/jobs", &query, None).await?;
            let text = render_job_list(&v, list);
            (v, text)
        }
        JobsCommand::Show { id } => {
            let v = client
                .call(Method::GET, &format!("/jobs/{}", segment(id)), &[], None)
                .await?;
            let text = render_job(&v);
            (v, text)
        }
        JobsCommand::Cancel { id, reason } => {
            let path = format!("/jobs/{}/cancel", segment(id));
            let body = reason.as_ref().map(|r| serde_json::json!({ "reason": r }));
            let v = client.call(Method::POST, &path, &[], body).await?;
            let text = format!("job {} {}\n", s(&v["id"]), s(&v["state"]));
            (v, text)
        }
        JobsCommand::Logs { id, follow } => return logs(&client, id, *follow).await,
        JobsCommand::Retry { id } => {
            let path = format!("/jobs/{}/retry", segment(id));
            let v = client.call(Method::POST, &path, &[], None).await?;
            let text = format!("job {} retried as job {}\n", id, s(&v["id"]));
            (v, text)
        }
    };
    print(args.conn.json, &answer, &text);
    Ok(())
}

/// `ferry jobs logs [-f]`: prints the job's lines; following, long-polls for new ones and prints
/// a progress line whenever a step changes, until the job has ended and every line is out.
async fn logs(client: &Client, id: &str, follow: bool) -> anyhow::Result<()> {
    let logs_path = format!("/jobs/{}/logs", segment(id));
    let job_path = format!("/jobs/{}", segment(id));
    let mut cursor: Option<String> = None;
    let mut seen: std::collections::BTreeMap<String, String> = Default::default();
    loop {
        // Whether the job had ended before this read: then an empty read means we are done.
        let ended = if follow {
            let job = client.call(Method::GET, &job_path, &[], None).await?;
            for st in job["steps"].as_array().into_iter().flatten() {
                let step = s(&st["step"]);
                let status = format!(
                    "{} (attempt {}{})",
                    s(&st["status"]),
                    s(&st["attempt"]),
                    match &st["agent"] {
                        Value::String(a) => format!(", agent {a}"),
                        _ => String::new(),
                    }
                );
                if seen.get(&step) != Some(&status) {
                    println!("==> {step}: {status}");
                    seen.insert(step, status);
                }
            }
            let state = s(&job["state"]);
            matches!(
                state.as_str(),
                "succeeded" | "failed" | "cancelled" | "superseded"
            )
            .then_some((state, job["reason"].clone()))
        } else {
            None
        };
        let mut query = vec![("limit", "500".to_string())];
        if follow {
            query.push(("wait", "2000".into()));
        }
        if let Some(c) = &cursor {
            query.push(("cursor", c.clone()));
        }
        let v = client.call(Method::GET, &logs_path, &query, None).await?;
        let items = v["items"].as_array().cloned().unwrap_or_default();
        for item in &items {
            println!("[{}] {}", s(&item["step"]), s(&item["line"]));
        }
        if let Value::String(next) = &v["next"] {
            cursor = Some(next.clone());
        }
        if !items.is_empty() {
            continue;
        }
        if !follow {
            return Ok(());
        }
        if let Some((state, reason)) = ended {
            println!("==> job {id} {state}");
            if state == "succeeded" {
                return Ok(());
            }
            bail!("job {id} {state}: {}", s(&reason));
        }
    }
}

/// Runs `ferry agents …`, printing to stdout.
pub async fn agents(args: &AgentsArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.conn.api, args.conn.token.clone())?;
    match args.command {
        AgentsCommand::List { all } => {
            let query = if all {
                vec![("all", "true".to_string())]
            } else {
                Vec::new()
            };
            let v = client.call(Method::GET, "/agents", &query, None).await?;
            print(args.conn.json, &v, &render_agents(&v));
        }
        AgentsCommand::Stop {
            ref name,
            ref reason,
        } => agent_action(args, &client, name, "stop", reason.as_deref()).await?,
        AgentsCommand::Pause {
            ref name,
            ref reason,
        } => agent_action(args, &client, name, "pause", reason.as_deref()).await?,
        AgentsCommand::Resume { ref name } => {
            agent_action(args, &client, name, "resume", None).await?
        }
    }
    Ok(())
}

/// `POST /api/v1/agents/{name}/{action}` (`stop`, `pause`, `resume`) with the reason, if given,
/// and what it did.
async fn agent_action(
    args: &AgentsArgs,
    client: &Client,
    name: &str,
    action: &str,
    reason: Option<&str>,
) -> anyhow::Result<()> {
    let path = format!("/agents/{}/{action}", segment(name));
    let body = reason.map(|r| serde_json::json!({ "reason": r }));
    let v = client.call(Method::POST, &path, &[], body).await?;
    let name = s(&v["name"]);
    let text = match action {
        "stop" => format!(
            "agent {name} asked to stop ({}); it stops taking work at its next heartbeat\n",
            s(&v["stop_requested"])
        ),
        "pause" => format!(
            "agent {name} paused ({}); it claims no new work from its next heartbeat until resumed\n",
            s(&v["paused"])
        ),
        _ => format!("agent {name} resumed; it claims work again from its next heartbeat\n"),
    };
    print(args.conn.json, &v, &text);
    Ok(())
}

/// Runs `ferry deploy PROJECT TAG --env ENV`: starts the deploy job and prints its id.
pub async fn deploy(args: &DeployArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.conn.api, args.conn.token.clone())?;
    let body = serde_json::json!({
        "project": args.project,
        "tag": args.tag,
        "environment": args.environment,
    });
    let v = client
        .call(Method::POST, "/deploys", &[], Some(body))
        .await?;
    let text = format!(
        "deploying {} ({}) to {}: job {}\nfollow it with: ferry jobs logs -f {}\n",
        s(&v["release"]),
        s(&v["project"]),
        args.environment,
        s(&v["id"]),
        s(&v["id"]),
    );
    print(args.conn.json, &v, &text);
    Ok(())
}

/// Runs `ferry rollback PROJECT --env ENV [--to TAG]`: starts the rollback job and prints it.
pub async fn rollback(args: &RollbackArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.conn.api, args.conn.token.clone())?;
    let mut body = serde_json::json!({
        "project": args.project,
        "environment": args.environment,
    });
    if let Some(to) = &args.to {
        body["to"] = Value::String(to.clone());
    }
    let v = client
        .call(Method::POST, "/rollbacks", &[], Some(body))
        .await?;
    let text = format!(
        "rolling {} of {} back from {} to {}: job {}\nfollow it with: ferry jobs logs -f {}\n",
        args.environment,
        s(&v["project"]),
        s(&v["rolled_back_from"]),
        s(&v["release"]),
        s(&v["id"]),
        s(&v["id"]),
    );
    print(args.conn.json, &v, &text);
    Ok(())
}

fn print(json: bool, answer: &Value, text: &str) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(answer).unwrap_or_default()
        );
    } else {
        print!("{text}");
    }
}

/// A job id as one path segment: anything but an id's characters is refused by the API anyway,
/// so escape the rest rather than let it change the path.
fn segment(id: &str) -> String {
    url::form_urlencoded::byte_serialize(id.as_bytes()).collect()
}

/// A JSON value as table text: strings bare, null as `-`.
fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

fn short_sha(v: &Value) -> String {
    s(v).chars().take(8).collect()
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<String>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
    out
}

fn render_job_list(v: &Value, list: &JobsListArgs) -> String {
    let rows: Vec<Vec<String>> = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|j| {
            vec![
                s(&j["id"]),
                s(&j["project"]),
                s(&j["tag"]),
                short_sha(&j["sha"]),
                s(&j["state"]),
                s(&j["updated_at"]),
            ]
        })
        .collect();
    let mut out = table(&["ID", "PROJECT", "TAG", "SHA", "STATE", "UPDATED"], &rows);
    if let Some(next) = v["next"].as_str() {
        // The next page is the same listing continued: the same filters and order.
        let mut more = String::from("more: ferry jobs list");
        for (flag, value) in [
            ("--project", &list.project),
            ("--tag", &list.tag),
            ("--state", &list.state),
            ("--limit", &list.limit.map(|n| n.to_string())),
        ] {
            if let Some(value) = value {
                // (argv cannot hold a NUL, the one thing that cannot be quoted)
                let word = shlex::try_quote(value).unwrap_or_else(|_| value.into());
                let _ = write!(more, " {flag} {word}");
            }
        }
        if list.oldest {
            more.push_str(" --oldest");
        }
        let _ = writeln!(out, "{more} --cursor {next}");
    }
    out
}

fn render_job(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job {}  {} {} ({})  {}",
        s(&v["id"]),
        s(&v["project"]),
        s(&v["tag"]),
        short_sha(&v["sha"]),
        s(&v["state"])
    );
    if !v["reason"].is_null() {
        let _ = writeln!(out, "reason: {}", s(&v["reason"]));
    }
    let _ = writeln!(
        out,
        "created {}  updated {}  trigger {}",
        s(&v["created_at"]),
        s(&v["updated_at"]),
        s(&v["trigger"])
    );
    if !v["logs_expired_at"].is_null() {
        let _ = writeln!(
            out,
            "logs: removed {} (coordinator.keep_logs)",
            s(&v["logs_expired_at"])
        );
    }
    if !v["artifact_expired_at"].is_null() {
        let _ = writeln!(
            out,
            "artifact: deleted {} (artifacts.keep)",
            s(&v["artifact_expired_at"])
        );
    }
    let rows: Vec<Vec<String>> = v["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|st| {
            let detail = [&st["error"], &st["reason"], &st["due_at"]]
                .into_iter()
                .find(|x| !x.is_null())
                .map(s)
                .unwrap_or_default();
            vec![
                s(&st["step"]),
                s(&st["status"]),
                s(&st["attempt"]),
                s(&st["pool"]),
                s(&st["agent"]),
                detail,
            ]
        })
        .collect();
    out.push('\n');
    out.push_str(&table(
        &["STEP", "STATUS", "ATTEMPT", "POOL", "AGENT", "DETAIL"],
        &rows,
    ));
    for w in v["waiting"].as_array().into_iter().flatten() {
        let _ = writeln!(out, "waiting: {}: {}", s(&w["step"]), s(&w["reason"]));
    }
    out
}

fn render_agents(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let pools: Vec<String> = a["pools"].as_array().into_iter().flatten().map(s).collect();
            let state = if a["live"].as_bool() == Some(true) {
                match (a["stop_requested"].as_str(), a["paused"].as_str()) {
                    (Some(why), _) => format!("live, stopping: {why}"),
                    (None, Some(why)) => format!("live, paused: {why}"),
                    (None, None) => "live".to_string(),
                }
            } else {
                match (a["left"].as_str(), a["lost"].as_str()) {
                    (Some(why), _) => format!("left: {why}"),
                    (None, Some(why)) => format!("lost: {why}"),
                    (None, None) => "not heartbeating".to_string(),
                }
            };
            vec![
                s(&a["name"]),
                pools.join(","),
                s(&a["capacity"]),
                s(&a["version"]),
                s(&a["heartbeat_deadline"]),
                state,
            ]
        })
        .collect();
    let mut out = table(
        &[
            "NAME",
            "POOLS",
            "CAPACITY",
            "VERSION",
            "HEARTBEAT UNTIL",
            "STATE",
        ],
        &rows,
    );
    if let Some(hidden) = v["hidden"].as_u64().filter(|n| *n > 0) {
        let _ = writeln!(
            out,
            "{hidden} more left or were lost over a day ago: ferry agents list --all"
        );
    }
    out
}
