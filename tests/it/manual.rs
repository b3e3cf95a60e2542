//! Manual operations with the real binary: `ferry up` builds and deploys two tags pushed by
//! webhook, then `ferry rollback` and `ferry deploy` (the CLI, through the API) move `current`
//! back and forth. A rollback to a release still on the host switches it without uploading.

use crate::cli::Proc;
use crate::harness::{self, git, wait_for, wait_until, DEADLINE};
use ferry::store::redis::RedisStore;
use ferry::store::{Order, Store};
use ferry_proto::{Event, JobId};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

const HOOK_TOKEN: &str = "manual-hook-token";
const API_TOKEN: &str = "manual-api-token";

struct World {
    dir: tempfile::TempDir,
    url: String,
    ns: String,
    config: PathBuf,
    listen: String,
    store: Arc<dyn Store>,
    /// tag → commit
    tags: Vec<(String, String)>,
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(
            repo.join("build.sh"),
            "#!/bin/sh\nset -eu\nmkdir -p dist\nprintf 'echo %s\\n' \"$(cat VERSION)\" > dist/app.sh\n",
        )
        .unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        let mut tags = Vec::new();
        for tag in ["v1.0.0", "v2.0.0"] {
            std::fs::write(repo.join("VERSION"), tag).unwrap();
            git(&repo, &["add", "."]);
            git(&repo, &["commit", "-q", "-m", tag]);
            git(&repo, &["tag", tag]);
            tags.push((tag.to_string(), git(&repo, &["rev-parse", "HEAD"])));
        }
        let listen = format!("127.0.0.1:{}", crate::sshd::free_port());
        let config = dir.path().join("ferry.toml");
        std::fs::write(
            &config,
            format!(
                r#"
data_dir = "{data}"
[gateway]
listen = "{listen}"
[api]
tokens = ["{API_TOKEN}"]
[coordinator]
lease_ttl = "5s"
sweep_interval = "200ms"
[artifacts]
url = "file://{artifacts}/"
[[projects]]
id = 78
path = "group/app"
webhook_token = "{HOOK_TOKEN}"
clone_url = "file://{repo}"
[projects.build]
commands = ["sh build.sh"]
artifacts = ["dist/"]
timeout = "2m"
[[projects.environments]]
name = "production"
hosts = ["local"]
path = "{target}"
after_switch = ["sh dist/app.sh > ../../deployed"]
"#,
                data = dir.path().join("data").display(),
                artifacts = dir.path().join("artifacts").display(),
                repo = repo.display(),
                target = dir.path().join("srv").display(),
            ),
        )
        .unwrap();
        let url = harness::shared().url();
        let ns = harness::namespace();
        let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&url, &ns).await.unwrap());
        World {
            dir,
            url,
            ns,
            config,
            listen,
            store,
            tags,
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("FERRY_STORE", &self.url)
            .env("FERRY_NAMESPACE", &self.ns)
            .env("FERRY_LOG", "warn")
            .arg("--config")
            .arg(&self.config)
            .args(args);
        cmd
    }

    fn up(&self) -> Proc {
        Proc(self.command(&["up"]).stdout(Stdio::null()).spawn().unwrap())
    }

    /// Runs a CLI command against the API and returns its output.
    async fn cli(&self, args: &[&str]) -> Output {
        let api = format!("http://{}", self.listen);
        let mut cmd = self.command(args);
        cmd.args(["--api", &api, "--token", API_TOKEN]);
        tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap()
    }

    fn sha(&self, tag: &str) -> &str {
        &self.tags.iter().find(|(t, _)| t == tag).unwrap().1
    }

    fn release(&self, tag: &str) -> String {
        format!("{tag}-{}", &self.sha(tag)[..7])
    }

    /// Delivers a tag-push webhook for `tag` and returns the job it created.
    async fn push_tag(&self, tag: &str) -> JobId {
        let before: BTreeSet<JobId> = self.jobs().await.into_iter().collect();
        let body = harness::tag_push(78, "group/app", tag, self.sha(tag));
        let http = reqwest::Client::new();
        let url = format!("http://{}/hooks/gitlab", self.listen);
        let status = wait_for(DEADLINE, "the gateway to accept the webhook", || async {
            let res = http
                .post(&url)
                .header("X-Gitlab-Event", "Tag Push Hook")
                .header("X-Gitlab-Token", HOOK_TOKEN)
                .json(&body)
                .send()
                .await
                .ok()?;
            Some(res.status().as_u16())
        })
        .await;
        assert_eq!(status, 202);
        wait_for(DEADLINE, "the job to be created", || async {
            self.jobs().await.into_iter().find(|j| !before.contains(j))
        })
        .await
    }

    async fn jobs(&self) -> Vec<JobId> {
        self.store.jobs(None, 100, Order::Oldest).await.unwrap()
    }

    /// Waits for `job` to end and asserts it succeeded.
    async fn succeeded(&self, job: JobId) -> Vec<Event> {
        harness::job_succeeded(&*self.store, job, DEADLINE * 6).await
    }

    fn current(&self) -> String {
        let link = std::fs::read_link(self.dir.path().join("srv/current")).unwrap();
        link.to_string_lossy()
            .trim_start_matches("releases/")
            .into()
    }

    fn deployed(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("srv/deployed")).unwrap()
    }
}

fn json_of(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Asserts that a CLI command failed, saying `want`.
fn fails(out: Output, want: &str) {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "{want}: succeeded");
    assert!(err.contains(want), "want {want:?} in: {err}");
}

fn uploads(events: &[Event]) -> usize {
    events
        .iter()
        .filter(|e| matches!(e, Event::DeployHostCheckpoint(c) if c.phase == "uploaded"))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_and_redeploy_go_through_the_cli_and_reuse_releases_on_the_host() {
    let w = World::new().await;
    let _up = w.up();
    for tag in ["v1.0.0", "v2.0.0"] {
        let job = w.push_tag(tag).await;
        let events = w.succeeded(job).await;
        assert_eq!(uploads(&events), 1, "a first deploy uploads");
        assert_eq!(w.current(), w.release(tag));
    }
    assert_eq!(w.deployed(), "v2.0.0\n");

    // Roll back to the release before the current one: v1, still on the host.
    let out = w
        .cli(&["rollback", "group/app", "--env", "production", "--json"])
        .await;
    let body = json_of(&out);
    assert_eq!(body["release"], w.release("v1.0.0"));
    assert_eq!(body["rolled_back_from"], w.release("v2.0.0"));
    assert_eq!(body["trigger"], "rollback:production");
    let rollback: JobId = body["id"].as_str().unwrap().parse().unwrap();
    let events = w.succeeded(rollback).await;
    assert_eq!(w.current(), w.release("v1.0.0"));
    assert_eq!(w.deployed(), "v1.0.0\n");
    assert_eq!(
        uploads(&events),
        0,
        "the release was on the host: {events:#?}"
    );
    match &events[0] {
        Event::JobCreated(plan) => {
            assert_eq!(plan.tag, "v1.0.0");
            assert_eq!(plan.sha, w.sha("v1.0.0"));
            assert_eq!(plan.steps.len(), 1, "no build: {plan:?}");
            assert!(plan.artifact.is_some());
        }
        other => panic!("{other:?}"),
    }

    // Deploy v2 again by hand: the text output names the job.
    let out = w
        .cli(&["deploy", "group/app", "v2.0.0", "--env", "production"])
        .await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&w.release("v2.0.0")), "{text}");
    let redeploy: JobId = w.jobs().await.into_iter().max().expect("the deploy job");
    assert!(text.contains(&redeploy.to_string()), "{text}");
    let events = w.succeeded(redeploy).await;
    assert_eq!(uploads(&events), 0);
    assert_eq!(w.current(), w.release("v2.0.0"));

    // Rollback to an explicit tag, and the environment's history through the API.
    let body = json_of(
        &w.cli(&[
            "rollback",
            "group/app",
            "--env",
            "production",
            "--to",
            "v1.0.0",
            "--json",
        ])
        .await,
    );
    let to_v1: JobId = body["id"].as_str().unwrap().parse().unwrap();
    w.succeeded(to_v1).await;
    assert_eq!(w.current(), w.release("v1.0.0"));
    let http = reqwest::Client::new();
    let releases: Value = http
        .get(format!(
            "http://{}/api/v1/releases?project=group/app&environment=production&limit=2",
            w.listen
        ))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let items = releases["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{releases}");
    assert_eq!(items[0]["job"], json!(to_v1));
    assert_eq!(items[0]["current"], true);
    assert_eq!(items[1]["job"], json!(redeploy));
    assert_eq!(items[1]["current"], false);
    assert_eq!(releases["next"], json!(redeploy), "4 releases, pages of 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_operations_refuse_what_cannot_be_done_with_clear_errors() {
    let w = World::new().await;
    let _up = w.up();
    // Wait for the API to answer.
    wait_until(DEADLINE, || async {
        reqwest::get(format!("http://{}/healthz", w.listen))
            .await
            .is_ok()
    })
    .await;
    fails(
        w.cli(&["rollback", "group/app", "--env", "production"])
            .await,
        "has never been deployed: nothing to roll back (http 409)",
    );
    fails(
        w.cli(&["deploy", "group/app", "v1.0.0", "--env", "production"])
            .await,
        "tag v1.0.0 of group/app has no built artifact",
    );
    fails(
        w.cli(&["deploy", "group/app", "v1.0.0", "--env", "staging"])
            .await,
        "project group/app has no environment \"staging\" (http 404)",
    );
    fails(
        w.cli(&["deploy", "group/other", "v1.0.0", "--env", "production"])
            .await,
        "unknown project \"group/other\" (http 404)",
    );

    let job = w.push_tag("v1.0.0").await;
    w.succeeded(job).await;
    fails(
        w.cli(&["rollback", "group/app", "--env", "production"])
            .await,
        "has had no release before v1.0.0",
    );
    fails(
        w.cli(&[
            "rollback",
            "group/app",
            "--env",
            "production",
            "--to",
            "v1.0.0",
        ])
        .await,
        "already runs v1.0.0",
    );
    let http = reqwest::Client::new();
    let res = http
        .post(format!("http://{}/api/v1/deploys", w.listen))
        .bearer_auth(API_TOKEN)
        .json(&json!({"project": "group/app", "tag": "v1.0.0", "env": "production"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let body: Value = res.json().await.unwrap();
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown field `env`"),
        "{body}"
    );
}

/// Artifact retention with the real binaries: while v1 and v2 are the two newest releases of
/// production they stay, whatever their age; once v2 has been deployed again, v1's artifact is
/// no release's any more, and a retention pass (run here with a clock two minutes ahead, and a
/// one-second `keep`) records `artifact_expired` on v1's job and deletes it. Deploying or
/// rolling back to v1 then says why it cannot; v2's artifact stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_no_environment_keeps_expires_and_is_no_longer_offered() {
    use ferry::build::ArtifactStore;
    use ferry::coordinator::artifacts::expire_artifacts;
    use std::time::Duration;
    let w = World::new().await;
    let _up = w.up();
    let mut built = Vec::new();
    for tag in ["v1.0.0", "v2.0.0"] {
        let job = w.push_tag(tag).await;
        w.succeeded(job).await;
        built.push(job);
    }
    let artifacts = ArtifactStore::from_url(
        &url::Url::from_directory_path(w.dir.path().join("artifacts")).unwrap(),
    )
    .unwrap();
    let key_of = |events: &[Event]| {
        events
            .iter()
            .find_map(|e| match e {
                Event::ArtifactPublished(a) => Some(a.key.clone()),
                _ => None,
            })
            .unwrap()
    };
    let v1 = key_of(&w.succeeded(built[0]).await);
    let v2 = key_of(&w.succeeded(built[1]).await);
    let later = ferry::store::now_ms() + 120_000;
    let keep = Duration::from_secs(1);
    let pass = || expire_artifacts(&*w.store, &artifacts, keep, "test", later, None, 100);

    // Both are releases production keeps (current and the one before): nothing goes.
    let first = pass().await.unwrap();
    assert!(first.deleted.is_empty(), "{first:?}");
    assert!(artifacts.exists(&v1).await.unwrap());

    // v1 deployed by hand (a job that ships v1's artifact), then v2 twice: the two newest
    // releases are both v2, so v1's artifact may go.
    let mut deploys = Vec::new();
    for tag in ["v1.0.0", "v2.0.0", "v2.0.0"] {
        let out = w
            .cli(&["deploy", "group/app", tag, "--env", "production", "--json"])
            .await;
        let job: JobId = json_of(&out)["id"].as_str().unwrap().parse().unwrap();
        w.succeeded(job).await;
        deploys.push(job);
    }
    let second = pass().await.unwrap();
    assert_eq!(second.deleted, std::slice::from_ref(&v1), "{second:?}");
    assert!(!artifacts.exists(&v1).await.unwrap());
    assert!(artifacts.exists(&v2).await.unwrap());
    // Recorded on every job that used it: its build and the deploy that shipped it.
    for job in [built[0], deploys[0]] {
        let events = w.succeeded(job).await;
        assert!(
            matches!(events.last(), Some(Event::ArtifactExpired(e)) if e.key == v1 && e.kept_for_ms == 1000),
            "{events:#?}"
        );
    }
    // A second pass finds nothing more to do.
    let third = pass().await.unwrap();
    assert!(third.deleted.is_empty(), "{third:?}");

    let gone = format!("the artifact of {} (job ", w.release("v1.0.0"));
    let remedy = format!(
        "build the tag again (retry job {}, which built it)",
        built[0]
    );
    fails(
        w.cli(&["deploy", "group/app", "v1.0.0", "--env", "production"])
            .await,
        &gone,
    );
    fails(
        w.cli(&[
            "rollback",
            "group/app",
            "--env",
            "production",
            "--to",
            "v1.0.0",
        ])
        .await,
        &remedy,
    );
    // Retrying the deploy would ship the deleted artifact: refused the same way.
    fails(
        w.cli(&["jobs", "retry", &deploys[0].to_string()]).await,
        &remedy,
    );
    assert_eq!(w.current(), w.release("v2.0.0"));

    // Built again (the job retried), the same bytes are stored again under the same key. The
    // retry leaves out its deploy to production, where v2 is newer (it would land v1 over it);
    // v1 then deploys by hand.
    let out = w
        .cli(&["jobs", "retry", &built[0].to_string(), "--json"])
        .await;
    let answer = json_of(&out);
    assert_eq!(
        answer["left_out"][0]["environment"], "production",
        "{answer}"
    );
    let rebuilt: JobId = answer["id"].as_str().unwrap().parse().unwrap();
    let events = w.succeeded(rebuilt).await;
    assert_eq!(key_of(&events), v1);
    assert!(artifacts.exists(&v1).await.unwrap());
    assert_eq!(w.current(), w.release("v2.0.0"));
    let out = w
        .cli(&[
            "deploy",
            "group/app",
            "v1.0.0",
            "--env",
            "production",
            "--json",
        ])
        .await;
    let job: JobId = json_of(&out)["id"].as_str().unwrap().parse().unwrap();
    w.succeeded(job).await;
    assert_eq!(w.current(), w.release("v1.0.0"));
}
