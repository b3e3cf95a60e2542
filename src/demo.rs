//! `ferry demo`: the whole flow on this machine, in seconds, with nothing to install but `git`.
//!
//! It creates a sample git repository with a tag and a small build script, writes a project
//! configuration, starts every role in this process on a fresh embedded store, delivers a real
//! Tag Push webhook over HTTP to its own gateway (shaped like GitLab's, with the hook's token),
//! and follows the job live: a spinner per step and the tail of the log. The build is packed and
//! published like any other, and deployed with the local transport into a directory. It ends
//! with a summary and the paths of everything it made, and fails (non-zero exit) if any part
//! did. With `--keep` ferry keeps running, so you can send webhooks of your own.

use crate::app::{self, StoreLocation};
use crate::cli::DemoArgs;
use crate::config::{self, Config, Overrides};
use crate::domain::{JobPhase, JobState, StepStatus};
use crate::store::{LogPos, Order, Store, StreamId};
use anyhow::{bail, Context};
use ferry_proto::JobId;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const PROJECT: &str = "demo/app";
const TAG: &str = "v1.0.0";
/// The demo gives up on a job that has not ended in this long.
const DEADLINE: Duration = Duration::from_secs(300);

/// Everything the demo made.
struct Paths {
    root: PathBuf,
    repo: PathBuf,
    config: PathBuf,
    store: PathBuf,
    artifacts: PathBuf,
    target: PathBuf,
}

impl Paths {
    fn new(base: &Path) -> anyhow::Result<Paths> {
        let millis = crate::store::now_ms();
        let root = std::path::absolute(base.join(format!("demo-{millis}")))
            .context("cannot resolve the demo directory")?;
        std::fs::create_dir_all(&root)
            .with_context(|| format!("cannot create {}", root.display()))?;
        Ok(Paths {
            repo: root.join("repo"),
            config: root.join("ferry.toml"),
            store: root.join("ferry.db"),
            artifacts: root.join("artifacts"),
            target: root.join("srv"),
            root,
        })
    }
}

/// Runs the demo; `Ok(false)` when the job did not succeed.
pub async fn run(base: &Config, args: &DemoArgs) -> anyhow::Result<bool> {
    let paths = Paths::new(&base.data_dir)?;
    println!("ferry demo: working in {}", paths.root.display());
    let sha = sample_repo(&paths.repo)?;
    let hook_token = app::generate_token();
    let api_token = app::generate_token();
    let listen = match args.listen {
        Some(addr) => addr.to_string(),
        None => "127.0.0.1:0".to_string(),
    };
    std::fs::write(
        &paths.config,
        demo_config(&paths, &listen, &hook_token, &api_token),
    )
    .with_context(|| format!("cannot write {}", paths.config.display()))?;
    let config = config::load(Some(&paths.config), &|_| None, &Overrides::default())
        .context("the demo's configuration")?;

    let location = StoreLocation::of(&config)?;
    let store = location.open(&config.namespace, None).await?;
    let listener = app::bind(&config).await?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop) = watch::channel(false);
    let roles = start_roles(&config, store.clone(), listener, stop.clone())?;
    println!("ferry demo: gateway on http://{addr}, store {location}");

    let started = Instant::now();
    let payload = webhook(&sha);
    std::fs::write(
        paths.root.join("webhook.json"),
        serde_json::to_vec_pretty(&payload)?,
    )?;
    deliver(&addr.to_string(), &hook_token, &payload).await?;
    let job = created_job(&*store).await?;
    println!("ferry demo: webhook accepted; job {job}");
    let state = follow(&*store, job).await?;
    let ok = state.phase == JobPhase::Succeeded;
    summary(&state, started.elapsed(), &paths);

    if args.keep && ok {
        println!();
        println!("ferry keeps running (Ctrl-C stops it). Send your own webhook:");
        println!(
            "  curl -sS -X POST http://{addr}/hooks/gitlab -H 'Content-Type: application/json' \\\n    -H 'X-Gitlab-Event: Tag Push Hook' -H 'X-Gitlab-Token: {hook_token}' \\\n    --data @{}",
            paths.root.join("webhook.json").display()
        );
        println!(
            "  (edit ref/after/checkout_sha in it to build another tag of {})",
            paths.repo.display()
        );
        println!("and look at the jobs: ferry jobs --api http://{addr} --token {api_token} list");
        app::until(app::shutdown_signal()).await;
    }
    let _ = stop_tx.send(true);
    for role in roles {
        let _ = tokio::time::timeout(Duration::from_secs(10), role).await;
    }
    Ok(ok)
}

/// A repository with a build script, committed and tagged; returns the tagged commit.
fn sample_repo(repo: &Path) -> anyhow::Result<String> {
    std::fs::create_dir_all(repo)?;
    std::fs::write(
        repo.join("build.sh"),
        r#"#!/bin/sh
# The demo's build: what a real project's `make` would do, in a few lines.
set -eu
echo "building $FERRY_PROJECT $FERRY_TAG at ${FERRY_SHA%"${FERRY_SHA#???????}"}"
mkdir -p dist
for part in assets pages bundle; do
  echo "compiling $part"
  sleep 0.3
done
cat > dist/index.html <<EOF
<h1>demo app $FERRY_TAG</h1>
EOF
printf '#!/bin/sh\necho "demo app %s is live"\n' "$FERRY_TAG" > dist/start.sh
echo "done: dist/ holds $(ls dist | wc -l) files"
"#,
    )?;
    std::fs::write(repo.join("README"), "A sample project for `ferry demo`.\n")?;
    git(repo, &["init", "-q", "-b", "main"])?;
    git(repo, &["add", "."])?;
    git(repo, &["commit", "-q", "-m", "demo app"])?;
    git(repo, &["tag", TAG])?;
    git(repo, &["rev-parse", "HEAD"])
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=ferry demo",
            "-c",
            "user.email=demo@ferry.invalid",
            "-c",
            "commit.gpgsign=false",
            "-c",
            "tag.gpgsign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .context("cannot run git: the demo needs it (apt-get install git)")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn demo_config(paths: &Paths, listen: &str, hook_token: &str, api_token: &str) -> String {
    format!(
        r#"# Written by `ferry demo`. Run it again with: ferry --config {config} up
store = "sqlite://{store}"
data_dir = "{data}"

[gateway]
listen = "{listen}"

[api]
tokens = ["{api_token}"]

[coordinator]
lease_ttl = "10s"
sweep_interval = "500ms"

[agent]
name = "demo-agent"
pools = ["default"]
concurrency = 2

[artifacts]
url = "file://{artifacts}/"

[[projects]]
id = 1
path = "{PROJECT}"
webhook_token = "{hook_token}"
clone_url = "file://{repo}"

[projects.build]
commands = ["sh build.sh"]
artifacts = ["dist/"]
timeout = "5m"

[[projects.environments]]
name = "demo"
hosts = ["local"]
path = "{target}"
after_switch = ["sh dist/start.sh"]
health_check = "test -s dist/index.html"
"#,
        config = paths.config.display(),
        store = paths.store.display(),
        data = paths.root.join("data").display(),
        artifacts = paths.artifacts.display(),
        repo = paths.repo.display(),
        target = paths.target.display(),
    )
}

type Role = tokio::task::JoinHandle<()>;

/// The coordinator, the agent and the gateway, in this process.
fn start_roles(
    config: &Config,
    store: Arc<dyn Store>,
    listener: tokio::net::TcpListener,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Vec<Role>> {
    let agent_opts = app::agent_options(config)?;
    let coordinator_opts = app::coordinator_options(config)?;
    let config = config.clone();
    let report = |role: &'static str| {
        move |r: anyhow::Result<()>| {
            if let Err(e) = r {
                eprintln!("ferry demo: the {role} stopped: {e:#}");
            }
        }
    };
    Ok(vec![
        tokio::spawn({
            let (store, stop) = (store.clone(), stop.clone());
            async move {
                report("coordinator")(
                    crate::coordinator::run(store, coordinator_opts, app::until(stop))
                        .await
                        .map_err(Into::into),
                )
            }
        }),
        tokio::spawn({
            let (store, stop) = (store.clone(), stop.clone());
            async move {
                report("agent")(
                    crate::agent::run(store, agent_opts, app::until(stop))
                        .await
                        .map_err(Into::into),
                )
            }
        }),
        tokio::spawn(
            async move { report("gateway")(app::serve(&config, store, listener, stop).await) },
        ),
    ])
}

/// A Tag Push webhook for the demo's tag, shaped like GitLab's.
fn webhook(sha: &str) -> serde_json::Value {
    serde_json::json!({
        "object_kind": "tag_push",
        "event_name": "tag_push",
        "before": "0000000000000000000000000000000000000000",
        "after": sha,
        "ref": format!("refs/tags/{TAG}"),
        "ref_protected": true,
        "checkout_sha": sha,
        "message": null,
        "user_id": 1,
        "user_name": "Demo User",
        "user_username": "demo",
        "user_email": "",
        "user_avatar": null,
        "project_id": 1,
        "project": {
            "id": 1,
            "name": "app",
            "description": "",
            "web_url": "http://gitlab.invalid/demo/app",
            "avatar_url": null,
            "git_ssh_url": "git@gitlab.invalid:demo/app.git",
            "git_http_url": "http://gitlab.invalid/demo/app.git",
            "namespace": "demo",
            "visibility_level": 0,
            "path_with_namespace": PROJECT,
            "default_branch": "main",
            "ci_config_path": null,
            "homepage": "http://gitlab.invalid/demo/app",
            "url": "git@gitlab.invalid:demo/app.git",
            "ssh_url": "git@gitlab.invalid:demo/app.git",
            "http_url": "http://gitlab.invalid/demo/app.git"
        },
        "commits": [],
        "total_commits_count": 0,
        "push_options": {},
        "repository": {
            "name": "app",
            "url": "git@gitlab.invalid:demo/app.git",
            "description": "",
            "homepage": "http://gitlab.invalid/demo/app",
            "git_http_url": "http://gitlab.invalid/demo/app.git",
            "git_ssh_url": "git@gitlab.invalid:demo/app.git",
            "visibility_level": 0
        }
    })
}

/// POSTs the webhook the way GitLab does, with the hook's token.
async fn deliver(addr: &str, token: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    let delivery = uuid::Uuid::new_v4().to_string();
    let response = reqwest::Client::new()
        .post(format!("http://{addr}/hooks/gitlab"))
        .header("Content-Type", "application/json")
        .header("User-Agent", "GitLab/18.0.0")
        .header("X-Gitlab-Event", "Tag Push Hook")
        .header("X-Gitlab-Token", token)
        .header("X-Gitlab-Instance", "http://gitlab.invalid")
        .header("X-Gitlab-Webhook-UUID", uuid::Uuid::new_v4().to_string())
        .header("X-Gitlab-Event-UUID", &delivery)
        .header("Idempotency-Key", &delivery)
        .json(body)
        .send()
        .await
        .context("cannot deliver the webhook to the demo's gateway")?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap_or_default();
    if status.as_u16() != 202 {
        bail!("the gateway answered the webhook with {status}: {answer}");
    }
    Ok(())
}

/// The demo's job (its store is fresh: the first one), once a coordinator created it.
async fn created_job(store: &dyn Store) -> anyhow::Result<JobId> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(job) = store.jobs(None, 1, Order::Oldest).await?.first() {
            return Ok(*job);
        }
        if Instant::now() > deadline {
            bail!("the webhook was accepted but no job was created within 30s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Follows `job` until it ends: a spinner per step, and the log tail.
async fn follow(store: &dyn Store, job: JobId) -> anyhow::Result<JobState> {
    let terminal = std::io::stderr().is_terminal();
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{spinner:.cyan} {prefix:<16} {msg}")
        .expect("a valid template")
        .tick_strings(&["⠋", "⠙", "⠹", "⠸", "⠼", "⠴", "⠦", "⠧", "⠇", "⠏", "✔"]);
    let failed = ProgressStyle::with_template("{spinner:.red} {prefix:<16} {msg}")
        .expect("a valid template")
        .tick_strings(&["✘", "✘"]);
    let mut bars: BTreeMap<String, (ProgressBar, String)> = BTreeMap::new();
    let mut after: Option<LogPos> = None;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let state = fold(store, job).await?;
        for step in &state.steps {
            let name = step.step.to_string();
            let text = describe(&step.status);
            let (bar, last) = bars.entry(name.clone()).or_insert_with(|| {
                let bar = multi.add(ProgressBar::new_spinner());
                bar.set_style(style.clone());
                bar.set_prefix(name.clone());
                bar.enable_steady_tick(Duration::from_millis(100));
                (bar, String::new())
            });
            if *last != text {
                if !terminal {
                    println!("  {name:<16} {text}");
                }
                // A step that ended stops spinning and shows its mark: ✔ or ✘.
                match step.status {
                    StepStatus::Succeeded { .. } => bar.finish_with_message(text.clone()),
                    StepStatus::Failed { .. } => {
                        bar.set_style(failed.clone());
                        bar.finish_with_message(text.clone());
                    }
                    _ => bar.set_message(text.clone()),
                }
                *last = text;
            }
        }
        let lines = store
            .read_logs(job, after.as_ref(), 200, Duration::from_millis(200))
            .await?;
        for (pos, line) in lines {
            let text = format!("  │ {}: {}", line.step, line.line);
            if terminal {
                multi.println(&text).ok();
            } else {
                println!("{text}");
            }
            after = Some(pos);
        }
        if state.phase.is_terminal() {
            for (bar, last) in bars.values() {
                bar.finish_with_message(last.clone());
            }
            return Ok(state);
        }
        if Instant::now() > deadline {
            bail!("job {job} has not ended after {DEADLINE:?}");
        }
    }
}

fn describe(status: &StepStatus) -> String {
    match status {
        StepStatus::Pending => "waiting".into(),
        StepStatus::Queued { .. } => "queued".into(),
        StepStatus::Delayed { attempt, .. } => format!("retrying (attempt {attempt})"),
        StepStatus::Claimed { started: false, .. } => "claimed".into(),
        StepStatus::Claimed { attempt, agent, .. } => {
            format!("running on {agent} (attempt {attempt})")
        }
        StepStatus::Interrupted { reason, .. } => format!("interrupted: {reason}"),
        StepStatus::Succeeded { attempt } => format!("succeeded (attempt {attempt})"),
        StepStatus::Failed { error, .. } => format!("failed: {error}"),
    }
}

async fn fold(store: &dyn Store, job: JobId) -> anyhow::Result<JobState> {
    let mut state = JobState::new(job);
    for stored in store.read_stream(&StreamId::Job(job), 0).await? {
        state.evolve(&stored.decode()?, stored.envelope.at_ms);
    }
    Ok(state)
}

fn summary(state: &JobState, took: Duration, paths: &Paths) {
    let plan = state.plan.as_ref();
    println!();
    println!(
        "job {} {} in {:.1}s",
        state.id,
        state.phase.as_str(),
        took.as_secs_f64()
    );
    if let Some(reason) = &state.reason {
        println!("  reason:    {reason}");
    }
    if let Some(a) = state.artifact() {
        println!("  artifact:  {} ({} bytes)", a.name, a.size);
        println!("  sha256:    {}", a.sha256);
    }
    let current = paths.target.join("current");
    if let (Some(plan), Ok(link)) = (plan, std::fs::read_link(&current)) {
        println!(
            "  release:   {} ({}) on local",
            crate::deploy::release_name(&plan.tag, &plan.sha),
            paths.target.join(&link).display()
        );
        println!("  current:   {} -> {}", current.display(), link.display());
    }
    println!();
    println!("what the demo made:");
    println!("  {:<22} {}", "directory", paths.root.display());
    println!("  {:<22} {}", "sample repository", paths.repo.display());
    println!("  {:<22} {}", "configuration", paths.config.display());
    println!("  {:<22} {}", "embedded store", paths.store.display());
    println!("  {:<22} {}", "artifacts", paths.artifacts.display());
    println!("  {:<22} {}", "deploy target", paths.target.display());
}
