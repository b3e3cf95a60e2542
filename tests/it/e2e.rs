//! The whole flow with real processes: a real git repository, a webhook over HTTP to
//! `ferry gateway`, `ferry coordinator` and `ferry agent` processes on one Redis, a build with
//! gix and `sh`, and a deploy with the local transport. Agents are killed with SIGKILL (their
//! build dies with them) and frozen with SIGSTOP in the middle of a build.

use crate::cli::Proc;
use crate::harness::{self, git, wait_for, wait_until, S3Server, DEADLINE};
use ferry::store::redis::RedisStore;
use ferry::store::{Order, Store};
use ferry_proto::{Event, JobId};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

const HOOK_TOKEN: &str = "e2e-hook-token";

/// A scratch world: a git repository with a tagged build script, a config, a store.
struct World {
    dir: tempfile::TempDir,
    url: String,
    ns: String,
    config: PathBuf,
    listen: String,
    store: Arc<dyn Store>,
    sha: String,
    /// Set for every process the test starts (the S3 settings, when artifacts go to S3).
    env: Vec<(String, String)>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl World {
    async fn new() -> World {
        World::with_artifacts(None).await
    }

    /// A world whose artifacts go to a bucket of `s3` (else to a local directory).
    async fn with_artifacts(s3: Option<&S3Server>) -> World {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        // The build waits at a gate the test opens, and leaves its pid per attempt behind, and
        // that of a process it started outside its process group (as a daemon would). The
        // deploy's hook (dist/app.sh, which the build writes) does the same at a second gate.
        std::fs::write(
            repo.join("build.sh"),
            "#!/bin/sh\nset -eu\n\
             setsid sh -c 'echo $$ > \"$MARKS/escaped-$FERRY_ATTEMPT\"; exec sleep 1000' \
             >/dev/null 2>&1 &\n\
             echo $$ > \"$MARKS/pid-$FERRY_ATTEMPT\"\n\
             echo \"building $FERRY_TAG attempt $FERRY_ATTEMPT\"\n\
             while [ ! -f \"$MARKS/gate\" ]; do sleep 0.05; done\n\
             mkdir -p dist && printf 'echo $$ > %s/deploy-pid\\n\
             while [ ! -f %s/deploy-gate ]; do sleep 0.05; done\\necho deployed %s\\n' \
             \"$MARKS\" \"$MARKS\" \"$FERRY_TAG\" > dist/app.sh\n",
        )
        .unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-q", "-m", "app"]);
        git(&repo, &["tag", "v1.0.0"]);
        let sha = git(&repo, &["rev-parse", "HEAD"]);
        let marks = dir.path().join("marks");
        std::fs::create_dir_all(&marks).unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let config = dir.path().join("ferry.toml");
        std::fs::write(
            &config,
            format!(
                r#"
data_dir = "{data}"
[gateway]
listen = "{listen}"
[coordinator]
lease_ttl = "2s"
sweep_interval = "200ms"
[artifacts]
url = "{artifacts}"
[[projects]]
id = 77
path = "group/app"
webhook_token = "{HOOK_TOKEN}"
clone_url = "file://{repo}"
[projects.build]
commands = ["sh build.sh"]
artifacts = ["dist/"]
timeout = "2m"
env = {{ MARKS = "{marks}" }}
[[projects.environments]]
name = "production"
hosts = ["local"]
path = "{target}"
after_switch = ["sh dist/app.sh > ../../deployed"]
"#,
                data = dir.path().join("data").display(),
                artifacts = match s3 {
                    Some(_) => format!("s3://{}/e2e", S3Server::BUCKET),
                    None => format!("file://{}/", dir.path().join("artifacts").display()),
                },
                repo = repo.display(),
                marks = marks.display(),
                target = dir.path().join("srv").display(),
            ),
        )
        .unwrap();
        let url = harness::shared().url();
        let ns = harness::namespace();
        let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&url, &ns).await.unwrap());
        let env = s3
            .map(|s3| {
                s3.options()
                    .into_iter()
                    .map(|(k, v)| (k.to_ascii_uppercase(), v))
                    .collect()
            })
            .unwrap_or_default();
        World {
            dir,
            url,
            ns,
            config,
            listen,
            store,
            sha,
            env,
        }
    }

    fn marks(&self) -> PathBuf {
        self.dir.path().join("marks")
    }

    fn spawn(&self, role: &[&str], agent: &str) -> Proc {
        self.spawn_on(&self.url, role, agent)
    }
    /// A process that reaches the store at `store` (a proxy, say).
    fn spawn_on(&self, store: &str, role: &[&str], agent: &str) -> Proc {
        self.spawn_with(store, role, agent, &[])
    }
    /// A process with `extra` environment variables besides the world's.
    fn spawn_with(
        &self,
        store: &str,
        role: &[&str],
        agent: &str,
        extra: &[(std::ffi::OsString, std::ffi::OsString)],
    ) -> Proc {
        Proc(
            Command::new(env!("CARGO_BIN_EXE_ferry"))
                .env_clear()
                .envs(extra.iter().map(|(k, v)| (k, v)))
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("FERRY_STORE", store)
                .env("FERRY_NAMESPACE", &self.ns)
                .env("FERRY_AGENT_NAME", agent)
                .env("FERRY_LOG", "warn")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .arg("--config")
                .arg(&self.config)
                .args(role)
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// Delivers a GitLab tag-push webhook for v1.0.0 and returns the job it created.
    async fn push_tag(&self) -> JobId {
        let body = harness::tag_push(77, "group/app", "v1.0.0", &self.sha);
        let http = reqwest::Client::new();
        let url = format!("http://{}/hooks/gitlab", self.listen);
        let status = wait_for(DEADLINE, "the gateway to accept the webhook", || async {
            let res = http
                .post(&url)
                .header("X-Gitlab-Event", "Tag Push Hook")
                .header("X-Gitlab-Token", HOOK_TOKEN)
                .header("Idempotency-Key", "0b9f7c1e-1111-4000-8000-000000000077")
                .json(&body)
                .send()
                .await
                .ok()?;
            Some(res.status().as_u16())
        })
        .await;
        assert_eq!(status, 202);
        wait_for(DEADLINE, "the job to be created", || async {
            self.store
                .jobs(None, 10, Order::Oldest)
                .await
                .unwrap()
                .first()
                .copied()
        })
        .await
    }

    /// Waits for `job` to end, checks that it succeeded, and returns its history.
    async fn succeeded(&self, job: JobId) -> Vec<Event> {
        harness::job_succeeded(&*self.store, job, DEADLINE * 6).await
    }
    async fn pid(&self, attempt: u32) -> i32 {
        let path = self.marks().join(format!("pid-{attempt}"));
        wait_for(DEADLINE * 3, "the build to start", || async {
            std::fs::read_to_string(&path).ok()?.trim().parse().ok()
        })
        .await
    }

    /// The pid of the process the build started outside its group, in attempt `attempt`.
    async fn escaped(&self, attempt: u32) -> i32 {
        let path = self.marks().join(format!("escaped-{attempt}"));
        wait_for(
            DEADLINE * 3,
            "the build's escaped process to start",
            || async { std::fs::read_to_string(&path).ok()?.trim().parse().ok() },
        )
        .await
    }

    /// Opens the build's gate and the deploy's.
    fn open_gate(&self) {
        self.open("gate");
        self.open("deploy-gate");
    }
    fn open(&self, gate: &str) {
        std::fs::write(self.marks().join(gate), "").unwrap();
    }
    /// The pid of the deploy hook that runs now (waiting at its gate).
    async fn deploy_pid(&self) -> i32 {
        let path = self.marks().join("deploy-pid");
        wait_for(DEADLINE * 3, "the deploy hook to start", || async {
            std::fs::read_to_string(&path).ok()?.trim().parse().ok()
        })
        .await
    }

    /// What is left under the agents' `data_dir/work` (they share the data directory): every
    /// step's work directory goes when the step ends, and those of a killed agent when the
    /// next agent starts.
    fn work_left(&self) -> Vec<String> {
        match std::fs::read_dir(self.dir.path().join("data/work")) {
            Ok(entries) => entries
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => Vec::new(),
        }
    }

    fn assert_deployed(&self) {
        let current = std::fs::read_link(self.dir.path().join("srv/current")).unwrap();
        assert_eq!(
            current,
            Path::new(&format!("releases/v1.0.0-{}", &self.sha[..7]))
        );
        let out = std::fs::read_to_string(self.dir.path().join("srv/deployed")).unwrap();
        assert_eq!(out, "deployed v1.0.0\n");
    }
}

/// Whether `pid` still runs: it exists and is not a zombie (an orphan waits as a zombie until
/// whoever adopted it reaps it).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// How many StepSucceeded of `step` the history holds.
fn succeeded_steps(events: &[Event], step: &str) -> usize {
    count(
        events,
        |e| matches!(e, Event::StepSucceeded(s) if s.step.as_str() == step),
    )
}

fn count(events: &[Event], f: impl Fn(&Event) -> bool) -> usize {
    events.iter().filter(|e| f(e)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_build_is_replaced_and_the_tag_is_built_and_deployed_once() {
    let w = World::new().await;
    let _gateway = w.spawn(&["gateway"], "gw");
    let _coordinator = w.spawn(&["coordinator"], "c1");
    let mut a1 = w.spawn(&["agent"], "agent-1");
    let job = w.push_tag().await;
    let first = w.pid(1).await;
    let escaped = w.escaped(1).await;
    a1.kill9();
    // The build does not run on without its agent: the group's watchdog kills it, and what it
    // started outside the group.
    wait_until(DEADLINE, || async { !alive(first) }).await;
    wait_until(DEADLINE, || async { !alive(escaped) }).await;
    let _a2 = w.spawn(&["agent"], "agent-2");
    let second = w.pid(2).await;
    assert_ne!(first, second);
    w.open_gate();
    let events = w.succeeded(job).await;
    let build_succeeded = succeeded_steps(&events, "build");
    assert_eq!(build_succeeded, 1, "{events:?}");
    assert_eq!(count(&events, |e| matches!(e, Event::LeaseExpired(_))), 1);
    assert_eq!(
        count(&events, |e| matches!(e, Event::ArtifactPublished(_))),
        1
    );
    w.assert_deployed();
    // agent-1's checkout of attempt 1 went when agent-2 started.
    assert_eq!(w.work_left(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_deploy_takes_its_local_deploy_script_with_it() {
    let w = World::new().await;
    let _gateway = w.spawn(&["gateway"], "gw");
    let _coordinator = w.spawn(&["coordinator"], "c1");
    let mut a1 = w.spawn(&["agent"], "agent-1");
    let job = w.push_tag().await;
    w.open("gate");
    let first = w.deploy_pid().await;
    a1.kill9();
    // The local transport's script does not run on without its agent: the group's watchdog
    // kills it (else it would deploy beside the next attempt).
    wait_until(DEADLINE, || async { !alive(first) }).await;
    std::fs::remove_file(w.marks().join("deploy-pid")).unwrap();
    let _a2 = w.spawn(&["agent"], "agent-2");
    let second = w.deploy_pid().await;
    assert_ne!(first, second);
    w.open("deploy-gate");
    let events = w.succeeded(job).await;
    let deployed = succeeded_steps(&events, "deploy:production");
    assert_eq!(deployed, 1, "{events:?}");
    w.assert_deployed();
    assert_eq!(w.work_left(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_is_built_and_deployed_through_an_s3_artifact_store() {
    let s3 = S3Server::start();
    let w = World::with_artifacts(Some(&s3)).await;
    let _gateway = w.spawn(&["gateway"], "gw");
    let _coordinator = w.spawn(&["coordinator"], "c1");
    // (an agent started with a variable that is not UTF-8 builds as any other)
    let odd = std::os::unix::ffi::OsStringExt::from_vec(b"caf\xe9".to_vec());
    let _agent = w.spawn_with(
        &w.url,
        &["agent"],
        "agent-1",
        &[("FERRY_TEST_LATIN1".into(), odd)],
    );
    let job = w.push_tag().await;
    w.open_gate();
    let events = w.succeeded(job).await;
    let key = events
        .iter()
        .find_map(|e| match e {
            Event::ArtifactPublished(a) => Some(a.key.clone()),
            _ => None,
        })
        .expect("ArtifactPublished");
    // The agent uploaded to the S3 server, and the deploy read it back from there.
    let object = s3.root.path().join(S3Server::BUCKET).join("e2e").join(&key);
    assert!(object.is_file(), "{} on the S3 server", object.display());
    w.assert_deployed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_from_the_store_kills_its_build_before_the_step_is_granted_again() {
    let w = World::new().await;
    let redis_port = url::Url::parse(&w.url).unwrap().port().unwrap();
    let proxy = harness::Proxy::start(redis_port);
    let _gateway = w.spawn(&["gateway"], "gw");
    let _coordinator = w.spawn(&["coordinator"], "c1");
    let via_proxy = format!("redis://127.0.0.1:{}/", proxy.port);
    let _a1 = w.spawn_on(&via_proxy, &["agent"], "agent-1");
    let job = w.push_tag().await;
    let first = w.pid(1).await;
    // agent-1's connection to the store is cut without a reset: its renewals get no answer (the
    // store client would wait 5 s; the lease lasts 2 s).
    proxy.freeze();
    let _a2 = w.spawn(&["agent"], "agent-2");
    w.pid(2).await; // the lease ran out and the step was granted again: attempt 2 runs
    assert!(
        !alive(first),
        "attempt 1's build still ran when the step was granted again"
    );
    w.open_gate();
    let events = w.succeeded(job).await;
    let build_succeeded = succeeded_steps(&events, "build");
    assert_eq!(build_succeeded, 1, "{events:?}");
    w.assert_deployed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_is_fenced_out_and_kills_its_build_when_it_wakes() {
    let w = World::new().await;
    let _gateway = w.spawn(&["gateway"], "gw");
    let _coordinator = w.spawn(&["coordinator"], "c1");
    let a1 = w.spawn(&["agent"], "agent-1");
    let job = w.push_tag().await;
    let first = w.pid(1).await;
    let a1_pid = a1.0.id() as i32;
    // SAFETY: plain signals to a child process this test started.
    unsafe { libc::kill(a1_pid, libc::SIGSTOP) };
    let _a2 = w.spawn(&["agent"], "agent-2");
    w.pid(2).await; // the step was re-granted to agent-2 (attempt 2)
    unsafe { libc::kill(a1_pid, libc::SIGCONT) };
    // agent-1 wakes, finds its lease gone and kills its build before doing anything else.
    wait_until(DEADLINE, || async { !alive(first) }).await;
    w.open_gate();
    let events = w.succeeded(job).await;
    // Nothing agent-1 wrote for attempt 1 came after its lease expired.
    let expired = events
        .iter()
        .position(|e| matches!(e, Event::LeaseExpired(_)))
        .expect("agent-1's lease expired");
    let late: Vec<&Event> = events[expired + 1..]
        .iter()
        .filter(|e| match e {
            Event::StepStarted(s) => s.step.as_str() == "build" && s.attempt == 1,
            Event::StepSucceeded(s) => s.step.as_str() == "build" && s.attempt == 1,
            Event::StepFailed(s) => s.step.as_str() == "build" && s.attempt == 1,
            Event::ArtifactPublished(a) => a.attempt == 1,
            _ => false,
        })
        .collect();
    assert!(
        late.is_empty(),
        "late events of the fenced-out attempt: {late:?}"
    );
    let build_succeeded = succeeded_steps(&events, "build");
    assert_eq!(build_succeeded, 1, "{events:?}");
    w.assert_deployed();
}
