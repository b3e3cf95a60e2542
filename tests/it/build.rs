//! The build step executor against real git repositories (made here with the `git` CLI), served
//! over `file://`, by a `git daemon`, over smart HTTP (`git http-backend`) and over ssh (a real
//! sshd), each started on a free port; artifacts published to a local directory or to a real
//! S3-compatible server.

use crate::harness::{git, serve_on_free_port, S3Server};
use ferry::build::{self, ArtifactStore, BuildEnv, BuildJob, Error, LogLine, Stream};
use ferry::deploy::transport::PinnedKey;
use ferry_proto::{BuildSpec, JobId};
use object_store::ObjectStoreExt;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(30);

/// A repository with two commits: `v1.0.0` is a lightweight tag on the first, `v2.0.0` an
/// annotated tag on the second.
struct Repo {
    /// Holds `repo/` (the repository), `data/` (the agent's data_dir) and `store/` (artifacts).
    dir: tempfile::TempDir,
    first: String,
    second: String,
}

impl Repo {
    fn new() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("app.txt"), "version one\n").unwrap();
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-q", "-m", "first"]);
        let first = git(&repo, &["rev-parse", "HEAD"]);
        git(&repo, &["tag", "v1.0.0"]);
        std::fs::write(repo.join("app.txt"), "version two\n").unwrap();
        git(&repo, &["commit", "-q", "-am", "second"]);
        let second = git(&repo, &["rev-parse", "HEAD"]);
        git(&repo, &["tag", "-a", "v2.0.0", "-m", "release two"]);
        Repo { dir, first, second }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("repo")
    }

    fn file_url(&self) -> String {
        format!("file://{}", self.path().display())
    }

    fn env(&self) -> BuildEnv {
        let store = url::Url::from_directory_path(self.dir.path().join("store")).unwrap();
        BuildEnv {
            data_dir: self.dir.path().join("data"),
            artifacts: ArtifactStore::from_url(&store).unwrap(),
            secrets: vec![],
            ssh_key: None,
            known_hosts: None,
            accept_new_host_keys: false,
            git_ca_certs: Vec::new(),
        }
    }

    /// The same, publishing to `s3://<bucket>/<prefix>` with `options` (see [`S3Server::options`]).
    fn s3_env(&self, prefix: &str, options: &[(&str, String)]) -> BuildEnv {
        let url = url::Url::parse(&format!("s3://{}/{prefix}", S3Server::BUCKET)).unwrap();
        let options: Vec<(&str, &str)> = options.iter().map(|(k, v)| (*k, v.as_str())).collect();
        BuildEnv {
            artifacts: ArtifactStore::from_url_with(&url, &options).unwrap(),
            ..self.env()
        }
    }

    fn stored(&self, key: &str) -> Vec<u8> {
        std::fs::read(self.dir.path().join("store").join(key)).expect("artifact in the store")
    }
}

/// A job of `repo`'s `v1.0.0` whose one step builds it from `url`, queued in pool `default`.
async fn queue_build(store: &dyn ferry::store::Store, repo: &Repo, url: &str) -> JobId {
    use ferry::store::{Append, StreamId};
    use ferry_proto::{StepId, StepQueued, StepSpec};
    let job = JobId::new();
    let mut created = ferry::store::conformance::noop_job(job, "v1.0.0", "default", &["build"]);
    created.sha = repo.first.clone();
    created.steps[0].spec = StepSpec::Build(spec(url));
    let queued = StepQueued {
        step: StepId::new("build"),
        attempt: 1,
        pool: "default".into(),
        priority: 0,
    };
    store
        .append(Append::new(StreamId::Job(job), vec![created.into(), queued.into()]).expect(0))
        .await
        .unwrap();
    job
}

/// An agent `name` of one slot that builds with `env` (data in `repo`'s `data/`), in pool
/// `default`.
fn builder(name: &str, repo: &Repo, env: BuildEnv) -> ferry::agent::Options {
    use ferry::agent;
    agent::Options {
        name: ferry_proto::AgentId::new(name),
        pools: vec!["default".into()],
        labels: vec![],
        concurrency: 1,
        lease_ttl: Duration::from_secs(10),
        shutdown_grace: Duration::from_secs(5),
        runner: Arc::new(agent::Runner {
            build: Some(env),
            ..agent::Runner::local(repo.dir.path().join("data"))
        }),
    }
}

/// The usual build: copy the app and write the tag next to it.
fn spec(url: &str) -> BuildSpec {
    BuildSpec {
        clone_url: url.to_string(),
        commands: vec![
            "mkdir -p dist".into(),
            r#"cp app.txt dist/ && printf '%s' "$FERRY_TAG" > dist/tag.txt"#.into(),
        ],
        artifacts: vec!["dist".into()],
        timeout_secs: 60,
        ..Default::default()
    }
}

struct Outcome {
    result: Result<build::Artifact, Error>,
    lines: Vec<LogLine>,
    /// Host keys the build reported pinning.
    pins: Vec<PinnedKey>,
}

async fn run(env: &BuildEnv, tag: &str, sha: &str, attempt: u32, spec: &BuildSpec) -> Outcome {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let git_ref = format!("refs/tags/{tag}");
    let job = BuildJob {
        project: "group/app",
        tag,
        git_ref: &git_ref,
        sha,
        job_id: JobId::new(),
        attempt,
        spec,
    };
    let log = move |l: LogLine| sink.lock().unwrap().push(l);
    let pins = Mutex::new(Vec::new());
    let pinned = |key: PinnedKey| pins.lock().unwrap().push(key);
    let result = build::run(job, env, &log, &pinned, std::future::pending()).await;
    let lines = lines.lock().unwrap().clone();
    let pins = pins.into_inner().unwrap();
    Outcome {
        result,
        lines,
        pins,
    }
}

/// The files of a tar.gz, by name.
fn untar(bytes: &[u8]) -> BTreeMap<String, String> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut files = BTreeMap::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        let mut body = String::new();
        e.read_to_string(&mut body).unwrap();
        files.insert(name, body);
    }
    files
}

/// Builds `tag` and checks the stored artifact: its name, key, checksum and content.
/// Builds `tag` from `url` and checks the artifact; returns the host keys the build pinned.
async fn check_build(
    repo: &Repo,
    env: &BuildEnv,
    url: &str,
    tag: &str,
    sha: &str,
    app: &str,
) -> Vec<PinnedKey> {
    let out = run(env, tag, sha, 1, &spec(url)).await;
    let artifact = out
        .result
        .unwrap_or_else(|e| panic!("build of {tag} from {url} failed: {e}; log {:?}", out.lines));
    assert_eq!(
        artifact.name,
        format!("group-app-{tag}-{}.tar.gz", &sha[..8])
    );
    let bytes = repo.stored(&artifact.key);
    let sha256 = format!("{:x}", Sha256::digest(&bytes));
    assert_eq!(artifact.sha256, sha256);
    assert_eq!(artifact.size, bytes.len() as u64);
    assert_eq!(
        artifact.key,
        format!("sha256/{}/{sha256}/{}", &sha256[..2], artifact.name)
    );
    let files = untar(&bytes);
    assert_eq!(files.get("dist/app.txt").map(String::as_str), Some(app));
    assert_eq!(files.get("dist/tag.txt").map(String::as_str), Some(tag));
    // The work directory is gone, the mirror stays.
    assert_eq!(
        std::fs::read_dir(env.data_dir.join("work"))
            .unwrap()
            .count(),
        0,
        "work directories left behind"
    );
    assert!(env.data_dir.join("mirrors/group_2fapp.git").is_dir());
    out.pins
}

#[tokio::test]
async fn builds_lightweight_and_annotated_tags_over_file_url() {
    let repo = Repo::new();
    let env = repo.env();
    let url = repo.file_url();
    check_build(&repo, &env, &url, "v1.0.0", &repo.first, "version one\n").await;
    check_build(&repo, &env, &url, "v2.0.0", &repo.second, "version two\n").await;
}

#[tokio::test]
async fn builds_lightweight_and_annotated_tags_from_git_daemon() {
    let repo = Repo::new();
    let daemon = GitDaemon::start(repo.dir.path());
    let env = repo.env();
    let url = format!("git://127.0.0.1:{}/repo", daemon.port);
    check_build(&repo, &env, &url, "v1.0.0", &repo.first, "version one\n").await;
    check_build(&repo, &env, &url, "v2.0.0", &repo.second, "version two\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_lightweight_and_annotated_tags_over_smart_http() {
    let repo = Repo::new();
    let server = GitHttp::start(repo.dir.path(), None).await;
    let env = repo.env();
    let url = format!("http://127.0.0.1:{}/repo", server.port);
    check_build(&repo, &env, &url, "v1.0.0", &repo.first, "version one\n").await;
    check_build(&repo, &env, &url, "v2.0.0", &repo.second, "version two\n").await;
}

/// An https clone URL whose server certificate comes from a CA the system does not know: the
/// clone fails naming the URL, and succeeds once the agent trusts the CA (`agent.git_ca_file`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_tags_over_https_when_the_agent_trusts_the_servers_ca() {
    let repo = Repo::new();
    let certs = tempfile::tempdir().unwrap();
    crate::tls::certificates(certs.path());
    let server = GitHttp::start(repo.dir.path(), Some(certs.path())).await;
    let url = format!("https://127.0.0.1:{}/repo", server.port);

    let out = run(&repo.env(), "v1.0.0", &repo.first, 1, &spec(&url)).await;
    let err = out
        .result
        .expect_err("a certificate from an unknown CA must fail the clone");
    assert!(
        matches!(&err, Error::Fetch { url: u, .. } if *u == url),
        "{err:?}"
    );
    assert!(err.to_string().contains("certificate"), "says why: {err}");

    let env = BuildEnv {
        git_ca_certs: ferry::build::read_ca_certs(&certs.path().join("ca.crt")).unwrap(),
        ..repo.env()
    };
    check_build(&repo, &env, &url, "v1.0.0", &repo.first, "version one\n").await;
    check_build(&repo, &env, &url, "v2.0.0", &repo.second, "version two\n").await;
}

#[test]
fn a_git_ca_file_without_a_certificate_is_refused_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.pem");
    let err = ferry::build::read_ca_certs(&missing).unwrap_err();
    assert!(err.contains("missing.pem"), "{err}");
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let err = ferry::build::read_ca_certs(&empty).unwrap_err();
    assert!(err.contains("empty.pem"), "{err}");
}

#[tokio::test]
async fn builds_tags_over_ssh_with_the_agents_key_checked_against_its_known_hosts() {
    let repo = Repo::new();
    let sshd = crate::sshd::Sshd::start();
    let known = repo.dir.path().join("known_hosts");
    crate::sshd::known_hosts(&known, &[&sshd]);
    let env = BuildEnv {
        ssh_key: Some(crate::sshd::client_key().private.clone()),
        known_hosts: Some(known),
        ..repo.env()
    };
    let url = format!(
        "ssh://root@127.0.0.1:{}{}",
        sshd.port(),
        repo.path().display()
    );
    check_build(&repo, &env, &url, "v1.0.0", &repo.first, "version one\n").await;
    check_build(&repo, &env, &url, "v2.0.0", &repo.second, "version two\n").await;
}

#[tokio::test]
async fn an_unknown_ssh_host_key_fails_the_clone_unless_new_keys_are_accepted() {
    let repo = Repo::new();
    let sshd = crate::sshd::Sshd::start();
    let known = repo.dir.path().join("known_hosts");
    std::fs::write(&known, "").unwrap();
    let strict = BuildEnv {
        ssh_key: Some(crate::sshd::client_key().private.clone()),
        known_hosts: Some(known.clone()),
        ..repo.env()
    };
    let url = format!(
        "ssh://root@127.0.0.1:{}{}",
        sshd.port(),
        repo.path().display()
    );
    let out = run(&strict, "v1.0.0", &repo.first, 1, &spec(&url)).await;
    let err = out
        .result
        .expect_err("an unknown host key must fail the clone");
    assert!(matches!(err, Error::Fetch { .. }), "{err:?}");
    assert_eq!(std::fs::read_to_string(&known).unwrap(), "");
    assert!(out.pins.is_empty(), "{:?}", out.pins);

    let accept_new = BuildEnv {
        accept_new_host_keys: true,
        ..strict
    };
    let pins = check_build(
        &repo,
        &accept_new,
        &url,
        "v1.0.0",
        &repo.first,
        "version one\n",
    )
    .await;
    assert_eq!(
        pins,
        [PinnedKey {
            host: format!("root@127.0.0.1:{}", sshd.port()),
            fingerprint: sshd.fingerprint(),
            key_type: "ssh-ed25519".into(),
        }]
    );
    let pinned = std::fs::read_to_string(&known).unwrap();
    assert!(
        pinned.contains(&sshd.host_key()),
        "the new key is pinned in the agent's known_hosts: {pinned:?}"
    );
    // The pin was reported once, for the agent to record as host_key_pinned; the next clone
    // finds the key known and reports nothing.
    let again = run(&accept_new, "v2.0.0", &repo.second, 1, &spec(&url)).await;
    again.result.expect("the second build");
    assert!(again.pins.is_empty(), "{:?}", again.pins);
}

#[tokio::test]
async fn a_second_build_fetches_into_the_mirror_and_reuses_the_artifact() {
    let repo = Repo::new();
    let env = repo.env();
    let spec = spec(&repo.file_url());
    let first = run(&env, "v2.0.0", &repo.second, 1, &spec).await;
    let first_artifact = first.result.unwrap();
    assert!(!first_artifact.reused);
    assert!(ferry_said(&first.lines, "mirror created"));

    // A new commit upstream: the next fetch brings only what is new into the same mirror.
    std::fs::write(repo.path().join("more.txt"), "more\n").unwrap();
    git(&repo.path(), &["add", "."]);
    git(&repo.path(), &["commit", "-q", "-m", "third"]);
    git(&repo.path(), &["tag", "v3.0.0"]);
    // A fetch killed while it updated refs left git's lock files: they do not stop the next.
    let mirror = env.data_dir.join("mirrors/group_2fapp.git");
    std::fs::write(mirror.join("packed-refs.lock"), "").unwrap();
    std::fs::write(mirror.join("refs/tags/v3.0.0.lock"), "").unwrap();

    let again = run(&env, "v2.0.0", &repo.second, 2, &spec).await;
    let again_artifact = again.result.unwrap();
    assert!(
        ferry_said(&again.lines, "mirror updated"),
        "{:?}",
        again.lines
    );
    assert!(
        again_artifact.reused,
        "the same bytes must reuse the stored artifact"
    );
    assert_eq!(again_artifact.key, first_artifact.key);
    assert_eq!(again_artifact.sha256, first_artifact.sha256);
    assert_eq!(
        git(&mirror, &["rev-parse", "refs/tags/v3.0.0"]),
        git(&repo.path(), &["rev-parse", "HEAD"])
    );
}

#[tokio::test]
async fn a_build_publishes_to_an_s3_store_and_a_rerun_reuses_the_object() {
    let repo = Repo::new();
    let s3 = S3Server::start();
    let env = repo.s3_env("ferry/builds", &s3.options());
    let spec = spec(&repo.file_url());
    let first = run(&env, "v2.0.0", &repo.second, 1, &spec).await;
    let artifact = first
        .result
        .unwrap_or_else(|e| panic!("build failed: {e}; log {:?}", first.lines));
    assert!(!artifact.reused);
    // The object is in the server's bucket, under the prefix, with the recorded checksum.
    let on_server = s3
        .root
        .path()
        .join(S3Server::BUCKET)
        .join("ferry/builds")
        .join(&artifact.key);
    let bytes = std::fs::read(&on_server)
        .unwrap_or_else(|e| panic!("{} on the S3 server: {e}", on_server.display()));
    assert_eq!(artifact.sha256, format!("{:x}", Sha256::digest(&bytes)));
    assert_eq!(artifact.size, bytes.len() as u64);
    let files = untar(&bytes);
    assert_eq!(
        files.get("dist/tag.txt").map(String::as_str),
        Some("v2.0.0")
    );
    // Readers (deploy steps) get the same bytes through the store.
    let read = env
        .artifacts
        .object_store()
        .get(&object_store::path::Path::from(artifact.key.as_str()))
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(read.as_ref(), bytes.as_slice());

    let again = run(&env, "v2.0.0", &repo.second, 2, &spec).await;
    let again = again.result.unwrap();
    assert!(again.reused, "the same bytes must reuse the stored object");
    assert_eq!(again.key, artifact.key);
}

#[tokio::test]
async fn an_s3_store_that_refuses_the_credentials_fails_the_publish_naming_the_store() {
    let repo = Repo::new();
    let s3 = S3Server::start();
    let mut options = s3.options();
    for (key, value) in &mut options {
        if *key == "aws_secret_access_key" {
            *value = "not-the-secret".into();
        }
    }
    let env = repo.s3_env("", &options);
    let out = run(&env, "v1.0.0", &repo.first, 1, &spec(&repo.file_url())).await;
    let err = out
        .result
        .expect_err("a refused upload must fail the build");
    assert!(matches!(err, Error::Store { .. }), "{err:?}");
    assert!(
        err.retryable(),
        "a store failure is an infrastructure failure"
    );
    assert!(err.to_string().contains("s3://artifacts"), "{err}");
}

#[test]
fn s3_urls_without_a_bucket_and_unknown_s3_settings_are_refused() {
    let no_bucket = url::Url::parse("s3:///builds").unwrap();
    let err = ArtifactStore::from_url(&no_bucket).unwrap_err();
    assert!(err.to_string().contains("names its bucket"), "{err}");
    let url = url::Url::parse("s3://artifacts/builds").unwrap();
    let err = ArtifactStore::from_url_with(&url, &[("aws_no_such_setting", "1")]).unwrap_err();
    assert!(err.to_string().contains("aws_no_such_setting"), "{err}");
}

#[tokio::test]
async fn a_tag_moved_after_the_webhook_fails_without_retry() {
    let repo = Repo::new();
    let env = repo.env();
    // The webhook said v1.0.0 is the first commit; someone force-moved it since.
    git(&repo.path(), &["tag", "-f", "v1.0.0", &repo.second]);
    let out = run(&env, "v1.0.0", &repo.first, 1, &spec(&repo.file_url())).await;
    let err = out.result.unwrap_err();
    assert!(matches!(err, Error::TagMoved { .. }), "{err}");
    assert!(!err.retryable());
    assert_eq!(
        err.to_string(),
        format!(
            "tag v1.0.0 moved: it now points to {}, the job was planned for {}",
            repo.second, repo.first
        )
    );
}

#[tokio::test]
async fn a_build_that_times_out_has_its_whole_process_group_killed() {
    let repo = Repo::new();
    let env = repo.env();
    let pidfile = repo.dir.path().join("sleep.pid");
    let escaped = repo.dir.path().join("escaped.pid");
    let mut spec = spec(&repo.file_url());
    // Besides a background child, one that leaves the process group (as GNU timeout,
    // ssh-agent or a daemon do): the group's SIGKILL does not reach it, its tag does.
    spec.commands = vec![r#"setsid sh -c 'echo $$ > "$ESCAPED"; exec sleep 1000' &
sleep 1000 & echo $! > "$PIDFILE"; wait"#
        .into()];
    spec.env
        .insert("PIDFILE".into(), pidfile.display().to_string());
    spec.env
        .insert("ESCAPED".into(), escaped.display().to_string());
    spec.timeout_secs = 2;
    let started = Instant::now();
    let out = run(&env, "v1.0.0", &repo.first, 1, &spec).await;
    let err = out.result.unwrap_err();
    assert!(matches!(err, Error::TimedOut { .. }), "{err}");
    assert!(!err.retryable());
    assert_eq!(err.to_string(), "build timed out after 2s");
    assert!(started.elapsed() < DEADLINE);
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("the command wrote the background child's pid")
        .trim()
        .parse()
        .unwrap();
    wait_until("the background sleep to be gone", || !alive(pid));
    let pid: u32 = std::fs::read_to_string(&escaped)
        .expect("the escaped child wrote its pid")
        .trim()
        .parse()
        .unwrap();
    wait_until("the sleep that left the group to be gone", || !alive(pid));
}

#[tokio::test]
async fn a_checkout_that_hangs_ends_at_the_build_timeout() {
    // A git daemon that accepts the connection and never answers: the fetch would wait for
    // it (up to the agent's stall limit, two minutes); the build's timeout bounds it sooner.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("git://{}/repo.git", listener.local_addr().unwrap());
    let repo = Repo::new();
    let mut spec = spec(&url);
    spec.timeout_secs = 2;
    let started = Instant::now();
    let out = run(&repo.env(), "v1.0.0", &repo.first, 1, &spec).await;
    let err = out.result.unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "fetching {url} failed: the checkout did not finish within the build's timeout (2s)"
        )
    );
    // Worth another attempt: the server, not the build, is at fault.
    assert!(err.retryable());
    assert!(started.elapsed() < DEADLINE);
    drop(listener);
}

#[tokio::test]
async fn cancelling_a_build_kills_its_process_group() {
    let repo = Repo::new();
    let env = repo.env();
    let pidfile = repo.dir.path().join("sleep.pid");
    let mut spec = spec(&repo.file_url());
    spec.commands = vec![r#"sleep 1000 & echo $! > "$PIDFILE"; wait"#.into()];
    spec.env
        .insert("PIDFILE".into(), pidfile.display().to_string());
    let git_ref = "refs/tags/v1.0.0";
    let job = BuildJob {
        project: "group/app",
        tag: "v1.0.0",
        git_ref,
        sha: &repo.first,
        job_id: JobId::new(),
        attempt: 1,
        spec: &spec,
    };
    // Cancel once the background child is running.
    let cancel = {
        let pidfile = pidfile.clone();
        async move {
            while !pidfile.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let result = tokio::time::timeout(DEADLINE, build::run(job, &env, &|_| {}, &|_| {}, cancel))
        .await
        .expect("the build stops when cancelled");
    let err = result.unwrap_err();
    assert_eq!(err.to_string(), "build cancelled");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    wait_until("the background sleep to be gone", || !alive(pid));
    assert_eq!(
        std::fs::read_dir(env.data_dir.join("work"))
            .unwrap()
            .count(),
        0
    );
}

#[tokio::test]
async fn secrets_printed_by_the_build_are_masked() {
    let repo = Repo::new();
    let mut env = repo.env();
    env.secrets = vec![
        ("DEPLOY_TOKEN".into(), "s3cr3t-deploy-value".into()),
        ("UNUSED_SECRET".into(), "another-secret".into()),
    ];
    let mut spec = spec(&repo.file_url());
    spec.secrets = vec!["DEPLOY_TOKEN".into()];
    spec.commands
        .push(r#"echo "token is $DEPLOY_TOKEN""#.into());
    spec.commands
        .push(r#"echo "$DEPLOY_TOKEN" >&2; echo another-secret"#.into());
    let out = run(&env, "v1.0.0", &repo.first, 1, &spec).await;
    out.result.unwrap();
    let has = |stream, line: &str| {
        out.lines
            .iter()
            .any(|l| l.stream == stream && l.line == line)
    };
    assert!(has(Stream::Stdout, "token is ***"), "{:?}", out.lines);
    assert!(has(Stream::Stderr, "***"), "{:?}", out.lines);
    assert!(has(Stream::Stdout, "***"), "{:?}", out.lines);
    assert!(out
        .lines
        .iter()
        .all(|l| !l.line.contains("s3cr3t") && !l.line.contains("another-secret")));
}

#[tokio::test]
async fn a_missing_secret_is_named() {
    let repo = Repo::new();
    let mut spec = spec(&repo.file_url());
    spec.secrets = vec!["NOT_HERE_TOKEN".into()];
    let err = run(&repo.env(), "v1.0.0", &repo.first, 1, &spec)
        .await
        .result
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "secret NOT_HERE_TOKEN is not configured on this agent"
    );
}

#[tokio::test]
async fn artifact_paths_that_escape_the_checkout_are_refused() {
    let repo = Repo::new();
    let env = repo.env();
    for (artifacts, commands) in [
        (vec!["../data"], vec![]),
        (vec!["dist/../../x"], vec![]),
        (vec!["/etc/passwd"], vec![]),
        (vec!["escape"], vec!["ln -s /etc escape"]),
        (vec!["up"], vec!["ln -s ../.. up"]),
        (vec!["dist"], vec!["mkdir dist && ln -s ../../.. dist/up"]),
    ] {
        let mut spec = spec(&repo.file_url());
        spec.artifacts = artifacts.iter().map(|s| s.to_string()).collect();
        spec.commands = commands.iter().map(|s| s.to_string()).collect();
        let err = run(&env, "v1.0.0", &repo.first, 1, &spec)
            .await
            .result
            .unwrap_err();
        assert!(
            matches!(err, Error::PathRefused { .. }),
            "{artifacts:?}: {err}"
        );
        assert!(!err.retryable());
        assert!(err.to_string().starts_with("artifact path "), "{err}");
    }
    let mut spec = spec(&repo.file_url());
    spec.artifacts = vec!["nothing-here".into()];
    let err = run(&env, "v1.0.0", &repo.first, 1, &spec)
        .await
        .result
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "artifact path nothing-here does not exist in the checkout"
    );
    assert!(!err.retryable());
}

#[tokio::test]
async fn a_tag_with_shell_metacharacters_reaches_the_command_only_as_data() {
    let repo = Repo::new();
    let env = repo.env();
    let tag = "v1;touch${IFS}pwned;$(touch${IFS}pwned2)`touch${IFS}pwned3`";
    git(&repo.path(), &["tag", tag, &repo.first]);
    let mut spec = spec(&repo.file_url());
    spec.commands.push("ls -a > dist/listing.txt".into());
    let out = run(&env, tag, &repo.first, 1, &spec).await;
    let artifact = out
        .result
        .unwrap_or_else(|e| panic!("{e}; {:?}", out.lines));
    assert_eq!(
        artifact.name,
        format!(
            "group-app-v1_touch__IFS_pwned___touch__IFS_pwned2__touch__IFS_pwned3_-{}.tar.gz",
            &repo.first[..8]
        )
    );
    let files = untar(&repo.stored(&artifact.key));
    assert_eq!(files["dist/tag.txt"], tag);
    assert!(
        !files["dist/listing.txt"].contains("pwned"),
        "{}",
        files["dist/listing.txt"]
    );
    for dir in [
        repo.dir.path().to_path_buf(),
        std::env::current_dir().unwrap(),
    ] {
        for name in ["pwned", "pwned2", "pwned3"] {
            assert!(
                !dir.join(name).exists(),
                "{name} created in {}",
                dir.display()
            );
        }
    }
}

#[tokio::test]
async fn a_failing_command_is_not_retryable_and_records_its_exit_code() {
    let repo = Repo::new();
    let mut spec = spec(&repo.file_url());
    spec.commands = vec![
        "true".into(),
        "echo failing; exit 3".into(),
        "touch never".into(),
    ];
    let out = run(&repo.env(), "v1.0.0", &repo.first, 1, &spec).await;
    let err = out.result.unwrap_err();
    assert!(!err.retryable());
    assert_eq!(err.exit_code(), Some(3));
    assert_eq!(
        err.to_string(),
        "command 2 (echo failing; exit 3) exited with code 3"
    );
    assert!(out
        .lines
        .iter()
        .any(|l| l.stream == Stream::Stdout && l.line == "failing"));
    assert!(!out.lines.iter().any(|l| l.line.contains("touch never")));
}

#[tokio::test]
async fn an_unreachable_clone_url_is_retryable() {
    let repo = Repo::new();
    let env = repo.env();
    let port = free_port(); // nothing listens there
    for url in [
        format!("git://127.0.0.1:{port}/repo"),
        format!("http://127.0.0.1:{port}/repo.git"),
        format!("https://127.0.0.1:{port}/repo.git"),
        format!("file://{}/no-such-repo", repo.dir.path().display()),
    ] {
        let err = run(&env, "v1.0.0", &repo.first, 1, &spec(&url))
            .await
            .result
            .unwrap_err();
        assert!(matches!(err, Error::Fetch { .. }), "{url}: {err}");
        assert!(err.retryable(), "{url}");
        assert!(
            err.to_string()
                .starts_with(&format!("fetching {url} failed: ")),
            "{err}"
        );
    }
}

#[tokio::test]
async fn a_tag_missing_upstream_is_not_retryable() {
    let repo = Repo::new();
    let out = run(
        &repo.env(),
        "v9.9.9",
        &repo.first,
        1,
        &spec(&repo.file_url()),
    )
    .await;
    let err = out.result.unwrap_err();
    assert!(!err.retryable());
    assert_eq!(
        err.to_string(),
        format!("tag v9.9.9 does not exist at {}", repo.file_url())
    );
}

fn ferry_said(lines: &[LogLine], what: &str) -> bool {
    lines
        .iter()
        .any(|l| l.stream == Stream::Ferry && l.line.contains(what))
}

/// Alive means: exists and is not a zombie (a zombie runs nothing; whether it is reaped depends
/// on who our pid 1 is).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        }
    }
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let end = Instant::now() + DEADLINE;
    while !ok() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port()
}

struct GitDaemon {
    port: u16,
    child: Child,
}

impl GitDaemon {
    fn start(base: &Path) -> GitDaemon {
        let (port, child) = serve_on_free_port("git-daemon", |port| {
            let mut cmd = Command::new("git");
            cmd.arg("daemon")
                .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1"])
                .arg(format!("--port={port}"))
                .arg(format!("--base-path={}", base.display()))
                .arg(base);
            cmd
        });
        GitDaemon { port, child }
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// A smart-HTTP git server: `git http-backend` run as a CGI program per request, behind an axum
/// router on a free loopback port, serving the repositories under `base`.
struct GitHttp {
    port: u16,
    _task: tokio::task::JoinHandle<()>,
}

impl GitHttp {
    /// Plain HTTP, or HTTPS with the certificates in `tls` (see [`TlsListener`]).
    async fn start(base: &Path, tls: Option<&Path>) -> GitHttp {
        use axum::body::{Body, Bytes};
        use axum::http::{Method, Request, Response, StatusCode};
        let base = base.to_path_buf();
        let handler = move |req: Request<Body>| {
            let base = base.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body: Bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap();
                let header = |name: &str| {
                    parts
                        .headers
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string()
                };
                let (content_type, protocol) = (header("content-type"), header("git-protocol"));
                let output = tokio::task::spawn_blocking(move || {
                    use std::io::Write;
                    let mut child = Command::new("git")
                        .arg("http-backend")
                        .env("GIT_PROJECT_ROOT", &base)
                        .env("GIT_HTTP_EXPORT_ALL", "1")
                        .env("REQUEST_METHOD", parts.method.as_str())
                        .env("PATH_INFO", parts.uri.path())
                        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
                        .env("CONTENT_TYPE", content_type)
                        .env("CONTENT_LENGTH", body.len().to_string())
                        .env("GIT_PROTOCOL", protocol)
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("spawn git http-backend");
                    if parts.method == Method::POST {
                        child.stdin.take().unwrap().write_all(&body).unwrap();
                    }
                    drop(child.stdin.take());
                    child.wait_with_output().unwrap().stdout
                })
                .await
                .unwrap();
                // CGI: headers, a blank line, the body.
                let split = output
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map(|i| (i, 4))
                    .or_else(|| output.windows(2).position(|w| w == b"\n\n").map(|i| (i, 2)))
                    .expect("CGI headers");
                let head = String::from_utf8_lossy(&output[..split.0]).to_string();
                let mut response = Response::builder().status(StatusCode::OK);
                for line in head.lines() {
                    let Some((name, value)) = line.split_once(':') else {
                        continue;
                    };
                    let value = value.trim();
                    if name.eq_ignore_ascii_case("status") {
                        let code: u16 = value[..3].parse().unwrap();
                        response = response.status(code);
                    } else {
                        response = response.header(name, value);
                    }
                }
                response
                    .body(Body::from(output[split.0 + split.1..].to_vec()))
                    .unwrap()
            }
        };
        let app = axum::Router::new().fallback(handler);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = match tls {
            None => tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            }),
            Some(dir) => {
                let tls = TlsListener::new(listener, dir);
                tokio::spawn(async move {
                    axum::serve(tls, app).await.unwrap();
                })
            }
        };
        GitHttp { port, _task: task }
    }
}

/// Serves HTTPS with `srv.crt` / `srv.key` of a directory made by `tls::certificates`.
/// Connections whose handshake fails (a client that does not trust the CA) are dropped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl TlsListener {
    fn new(tcp: tokio::net::TcpListener, dir: &Path) -> TlsListener {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        ferry::tls::install_provider();
        let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(dir.join("srv.crt"))
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = PrivateKeyDer::from_pem_file(dir.join("srv.key")).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        TlsListener {
            tcp,
            acceptor: tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)),
        }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

/// An agent building from an ssh URL under accept-new records the host key its clone pinned:
/// `host_key_pinned`, fenced by the step's lease, before the step's outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_records_the_host_key_its_ssh_clone_pinned() {
    use ferry::agent;
    use ferry::store::{Store, StreamId};
    use ferry_proto::Event;

    let repo = Repo::new();
    let sshd = crate::sshd::Sshd::start();
    let known = repo.dir.path().join("known_hosts");
    std::fs::write(&known, "").unwrap();
    let env = BuildEnv {
        ssh_key: Some(crate::sshd::client_key().private.clone()),
        known_hosts: Some(known.clone()),
        accept_new_host_keys: true,
        ..repo.env()
    };
    let url = format!(
        "ssh://root@127.0.0.1:{}{}",
        sshd.port(),
        repo.path().display()
    );
    let store: Arc<dyn Store> = Arc::new(crate::harness::redis_store().await);
    let job = queue_build(&*store, &repo, &url).await;

    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let options = builder("builder", &repo, env);
    let agent = tokio::spawn(agent::run(store.clone(), options, async move {
        let _ = stopped.await;
    }));
    let history = crate::harness::wait_for(DEADLINE * 2, "the build step's outcome", || {
        let store = store.clone();
        async move {
            let history = store.read_stream(&StreamId::Job(job), 0).await.ok()?;
            let ended = history.iter().any(|s| {
                matches!(
                    s.decode(),
                    Ok(Event::StepSucceeded(_) | Event::StepFailed(_))
                )
            });
            ended.then_some(history)
        }
    })
    .await;
    let _ = stop.send(());
    agent.await.unwrap().unwrap();

    let events: Vec<(Event, Option<u64>)> = history
        .iter()
        .map(|s| (s.decode().unwrap(), s.envelope.token))
        .collect();
    let claim_token = events
        .iter()
        .find_map(|(e, t)| matches!(e, Event::StepClaimed(_)).then_some(*t))
        .flatten()
        .expect("claimed under a token");
    let pinned: Vec<usize> = (0..events.len())
        .filter(|&i| matches!(&events[i].0, Event::HostKeyPinned(_)))
        .collect();
    assert_eq!(pinned.len(), 1, "{events:?}");
    let (Event::HostKeyPinned(p), token) = &events[pinned[0]] else {
        unreachable!()
    };
    assert_eq!(p.host, format!("root@127.0.0.1:{}", sshd.port()));
    assert_eq!(p.fingerprint, sshd.fingerprint());
    assert_eq!(p.key_type, "ssh-ed25519");
    assert_eq!((p.step.as_str(), p.attempt), ("build", 1));
    assert_eq!(*token, Some(claim_token), "appended under the step's lease");
    let succeeded = events
        .iter()
        .position(|(e, _)| matches!(e, Event::StepSucceeded(_)))
        .expect("the build succeeded");
    assert!(pinned[0] < succeeded, "recorded before the outcome");
}

#[tokio::test]
async fn a_mirror_with_too_many_packs_is_collected_after_the_checkout() {
    let repo = Repo::new();
    let env = repo.env();
    let spec = spec(&repo.file_url());
    run(&env, "v2.0.0", &repo.second, 1, &spec)
        .await
        .result
        .unwrap();
    // As years of fetches would leave it: one pack per fetch that brought something.
    let mirror = env.data_dir.join("mirrors/group_2fapp.git");
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(
            r#"for i in $(seq 1 55); do
                 echo "filler $i" | git hash-object -w --stdin | git pack-objects -q objects/pack/pack >/dev/null || exit 1
               done"#,
        )
        .current_dir(&mirror)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let packs = || {
        std::fs::read_dir(mirror.join("objects/pack"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "pack")
            })
            .count()
    };
    assert!(packs() > 55, "{} packs", packs());

    let again = run(&env, "v2.0.0", &repo.second, 2, &spec).await;
    again.result.unwrap();
    assert!(
        ferry_said(&again.lines, "mirror collected:"),
        "{:?}",
        again.lines
    );
    assert!(packs() <= 2, "{} packs after gc", packs());
    // The mirror still serves the tags, and the next build is an ordinary update.
    assert_eq!(
        git(&mirror, &["rev-parse", "refs/tags/v2.0.0^{commit}"]),
        repo.second
    );
    let third = run(&env, "v2.0.0", &repo.second, 3, &spec).await;
    third.result.unwrap();
    assert!(
        !ferry_said(&third.lines, "mirror collected"),
        "{:?}",
        third.lines
    );
}

/// The artifact retention may delete an artifact while a build that found it already stored is
/// about to record it. The build records it only under the artifact's lock, after checking it
/// is still there: here the retention holds the lock (the test does), deletes the object and
/// lets go; the attempt then fails as retryable, and the next one builds and publishes the
/// artifact again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_deleted_while_its_build_records_it_is_built_again() {
    use ferry::agent;
    use ferry::coordinator::{self, artifacts, decide::RetryPolicy};
    use ferry::store::{Store, StreamId};
    use ferry_proto::Event;

    let repo = Repo::new();
    let env = repo.env();
    let url = repo.file_url();
    // Built once already: the key the next build of v1.0.0 finds stored.
    let key = run(&env, "v1.0.0", &repo.first, 1, &spec(&url))
        .await
        .result
        .unwrap()
        .key;
    let store: Arc<dyn Store> = Arc::new(crate::harness::redis_store().await);
    let retention = artifacts::hold(&*store, &key, "retention", Duration::ZERO)
        .await
        .unwrap()
        .expect("the artifact's lock is free");

    let job = queue_build(&*store, &repo, &url).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let options = builder("rebuilder", &repo, env.clone());
    let agent = tokio::spawn(agent::run(store.clone(), options, until(stopped.clone())));
    let coordinator = tokio::spawn(coordinator::run(
        store.clone(),
        coordinator::Options {
            policy: RetryPolicy {
                max_attempts: 3,
                base: Duration::from_millis(100),
                max: Duration::from_millis(100),
            },
            sweep_interval: Duration::from_millis(100),
            ..Default::default()
        },
        until(stopped),
    ));

    // The build found the artifact stored, and now waits for its lock.
    crate::harness::wait_for(DEADLINE, "the build to find its artifact stored", || {
        let store = store.clone();
        async move {
            let lines = store
                .read_logs(job, None, 1000, Duration::ZERO)
                .await
                .ok()?;
            lines
                .iter()
                .any(|(_, l)| l.line.contains("already stored"))
                .then_some(())
        }
    })
    .await;
    env.artifacts.delete(&key).await.unwrap();
    retention.release(&*store).await;

    let history = crate::harness::wait_for(DEADLINE * 2, "the build to succeed", || {
        let store = store.clone();
        async move {
            let history = store.read_stream(&StreamId::Job(job), 0).await.ok()?;
            let events: Vec<Event> = history.iter().map(|s| s.decode().unwrap()).collect();
            events
                .iter()
                .any(|e| matches!(e, Event::StepSucceeded(_)))
                .then_some(events)
        }
    })
    .await;
    let _ = stop.send(true);
    agent.await.unwrap().unwrap();
    coordinator.await.unwrap().unwrap();

    let failed: Vec<_> = history
        .iter()
        .filter_map(|e| match e {
            Event::StepFailed(f) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 1, "{history:#?}");
    assert_eq!(failed[0].attempt, 1);
    assert!(failed[0].retryable);
    assert!(
        failed[0]
            .error
            .contains("left the store after it was published"),
        "{}",
        failed[0].error
    );
    let published: Vec<_> = history
        .iter()
        .filter_map(|e| match e {
            Event::ArtifactPublished(a) => Some(a),
            _ => None,
        })
        .collect();
    assert_eq!(
        published.len(),
        1,
        "only the second attempt records it: {history:#?}"
    );
    assert_eq!(
        (published[0].attempt, published[0].key.as_str()),
        (2, key.as_str())
    );
    assert!(env.artifacts.exists(&key).await.unwrap(), "stored again");
}
