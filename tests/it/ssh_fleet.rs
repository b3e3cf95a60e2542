//! Deploys to fleets of real OpenSSH servers (see `sshd.rs`): every host has its own host key,
//! `authorized_keys` and a private target root mounted at the one absolute path the environment
//! names, so each host's files can be checked on their own.

use crate::cli::Proc;
use crate::harness::{self, git, job_events, wait_for, wait_until, DEADLINE};
use crate::sshd::{client_key, Fleet, RefusedPort};
use async_trait::async_trait;
use ferry::agent::{self, ArtifactFetch, Runner};
use ferry::config::HostKeyPolicy;
use ferry::coordinator;
use ferry::deploy::release_name;
use ferry::deploy::ssh::SshConnector;
use ferry::deploy::transport::Hosts;
use ferry::domain::{JobPhase, JobState};
use ferry::store::{Append, LogPos, Order, Store, StreamId};
use ferry_proto::*;
use sha2::Digest;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Runs `script` on `target` with the system's OpenSSH client (strict host keys, the fleet's
/// `known_hosts`): the harness checks itself without going through ferry.
fn ssh(fleet: &Fleet, target: &str, script: &str) -> std::process::Output {
    let (user_host, port) = target.rsplit_once(':').unwrap();
    let kh = fleet.scratch().join("known_hosts");
    fleet.known_hosts(&kh);
    std::process::Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .arg("-i")
        .arg(&crate::sshd::client_key().private)
        .args(["-p", port, user_host, script])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn fleet_hosts_share_one_path_but_write_to_their_own_roots_and_die_with_the_fleet() {
    let fleet = Fleet::start(3);
    let path = fleet.path();
    for (i, host) in fleet.hosts().iter().enumerate() {
        let out = ssh(
            &fleet,
            &host.target(),
            &format!("mkdir -p '{path}' && echo host-{i} > '{path}/who'"),
        );
        assert!(out.status.success(), "{out:?}\n{}", host.log());
    }
    for i in 0..fleet.len() {
        assert_eq!(fleet.lines(i, "who"), [format!("host-{i}")]);
    }
    // Outside every host's namespace the shared directory is untouched.
    assert_eq!(std::fs::read_dir(fleet.target_dir()).unwrap().count(), 0);

    // The helpers read what a host wrote; the health check fails only where it is marked.
    let targets = fleet.targets();
    let out = ssh(
        &fleet,
        &targets[1],
        &format!("cd '{path}' && mkdir -p releases/r1 releases/.tmp && ln -s releases/r1 current"),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fleet.current(1).as_deref(), Some("releases/r1"));
    assert_eq!(fleet.releases(1), ["r1"]);
    assert_eq!((fleet.current(2), fleet.releases(2)), (None, vec![]));
    fleet.set_unhealthy(2, true);
    assert!(ssh(&fleet, &targets[1], &fleet.health_check())
        .status
        .success());
    assert!(!ssh(&fleet, &targets[2], &fleet.health_check())
        .status
        .success());
    fleet.set_unhealthy(2, false);
    assert!(ssh(&fleet, &targets[2], &fleet.health_check())
        .status
        .success());
    assert_eq!(fleet.host(2).sftp_sessions(), 0);
    let local = fleet.scratch().join("payload");
    std::fs::write(&local, "payload").unwrap();
    let put = std::process::Command::new("sftp")
        .args(["-b", "-", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            fleet.scratch().join("known_hosts").display()
        ))
        .arg("-i")
        .arg(&crate::sshd::client_key().private)
        .args(["-P", &fleet.host(2).port().to_string(), "root@127.0.0.1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(format!("put {} {path}/copied\n", local.display()).as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(put.success());
    assert!(fleet.file(2, "copied").exists());
    assert_eq!(fleet.host(2).sftp_sessions(), 1);

    // A session that leaves a process behind: stopping the host kills it too.
    let marker = format!(
        "{}.{:06}",
        900 + fleet.host(0).port() % 100,
        std::process::id() % 1_000_000
    );
    let out = ssh(
        &fleet,
        &fleet.host(0).target(),
        &format!("nohup setsid sleep {marker} >/dev/null 2>&1 & echo started"),
    );
    assert!(out.status.success(), "{out:?}");
    let end = Instant::now() + Duration::from_secs(30);
    while crate::harness::processes_with(&marker).is_empty() {
        assert!(Instant::now() < end, "the session's process never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    fleet.host(0).stop();
    assert!(
        crate::harness::processes_with(&marker).is_empty(),
        "a session's process outlived its sshd"
    );

    // A stopped host refuses connections; restarted it answers again; a new key is new.
    let out = ssh(&fleet, &fleet.host(0).target(), "true");
    assert!(!out.status.success());
    fleet.host(0).restart();
    assert!(ssh(&fleet, &fleet.host(0).target(), "true")
        .status
        .success());
    let old = fleet.host(1).fingerprint();
    fleet.host(1).restart_with_new_key();
    assert_ne!(fleet.host(1).fingerprint(), old);
    assert_eq!(
        fleet.lines(1, "who"),
        ["host-1"],
        "the root survives a restart"
    );

    // A refused port refuses.
    let refused = RefusedPort::new();
    let addr = refused.target().replace("root@", "");
    let err = std::net::TcpStream::connect(addr).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}

// ---------------------------------------------------------------------------------------------
// Deploy jobs run by an in-process coordinator and agent on Redis, over SSH to a fleet.

/// Artifacts from a local directory, by key.
struct Dir(PathBuf);

#[async_trait]
impl ArtifactFetch for Dir {
    async fn fetch(&self, key: &str, dest: &Path) -> Result<(), String> {
        tokio::fs::copy(self.0.join(key), dest)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

const STEP: &str = "deploy:production";

/// How long a whole deploy job may take on a loaded machine.
const JOB_DEADLINE: Duration = Duration::from_secs(180);

/// A fleet, a store, and a coordinator and an agent deploying to the fleet over SSH.
struct Env {
    fleet: Fleet,
    store: Arc<dyn Store>,
    known_hosts: PathBuf,
    artifacts: PathBuf,
    _stop: watch::Sender<bool>,
}

impl Env {
    /// `n` hosts, a `known_hosts` listing them (unless `policy` is accept-new, which starts
    /// from an empty one), a coordinator and one agent.
    async fn start(n: usize, policy: HostKeyPolicy) -> Env {
        let fleet = tokio::task::spawn_blocking(move || Fleet::start(n))
            .await
            .unwrap();
        let store: Arc<dyn Store> = Arc::new(harness::redis_store().await);
        let known_hosts = fleet.scratch().join("known_hosts");
        if policy == HostKeyPolicy::Strict {
            fleet.known_hosts(&known_hosts);
        }
        let artifacts = fleet.scratch().join("artifacts");
        std::fs::create_dir_all(&artifacts).unwrap();
        let ssh = SshConnector::new(&client_key().private, &known_hosts, policy).unwrap();
        let (stop, rx) = watch::channel(false);
        let until = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let coordinator = coordinator::Options {
            consumer: "c".into(),
            sweep_interval: Duration::from_millis(100),
            ..Default::default()
        };
        let (s, r) = (store.clone(), rx.clone());
        tokio::spawn(async move { coordinator::run(s, coordinator, until(r)).await.unwrap() });
        let agent = agent::Options {
            name: AgentId::new("agent-1"),
            pools: vec!["default".into()],
            labels: vec![],
            concurrency: 2,
            lease_ttl: Duration::from_secs(15),
            shutdown_grace: Duration::from_secs(5),
            runner: Arc::new(Runner {
                connector: Arc::new(Hosts::new(Some(ssh))),
                artifacts: Some(Arc::new(Dir(artifacts.clone()))),
                build: None,
                data_dir: fleet.scratch().join("agent-data"),
            }),
        };
        let s = store.clone();
        tokio::spawn(async move { agent::run(s, agent, until(rx)).await.unwrap() });
        Env {
            fleet,
            store,
            known_hosts,
            artifacts,
            _stop: stop,
        }
    }

    /// A deploy to every host of the fleet; `after_switch` appends the running release's
    /// version to `<path>/restarts` on the host.
    fn spec(&self) -> DeploySpec {
        DeploySpec {
            environment: "production".into(),
            hosts: self.fleet.targets(),
            path: self.fleet.path(),
            after_switch: vec![r#"echo "$(sh app.sh)" >> "$FERRY_PATH/restarts""#.into()],
            health_check: Some(self.fleet.health_check()),
            health_check_retries: 1,
            health_check_interval_ms: 50,
            max_parallel: 2,
            keep_releases: 5,
            ..Default::default()
        }
    }

    /// Publishes a release archive whose `app.sh` prints `version`.
    fn artifact(&self, version: &str) -> ArtifactPublished {
        let src = self.artifacts.join(format!("src-{version}"));
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("app.sh"), format!("echo {version}\n")).unwrap();
        let name = format!("app-{version}.tar.gz");
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(self.artifacts.join(&name)).unwrap(),
            flate2::Compression::fast(),
        );
        let mut tar = tar::Builder::new(gz);
        tar.append_dir_all(".", &src).unwrap();
        tar.into_inner().unwrap().finish().unwrap();
        self.published(&name)
    }

    /// `ArtifactPublished` for a file already in the artifacts directory.
    fn published(&self, name: &str) -> ArtifactPublished {
        let bytes = std::fs::read(self.artifacts.join(name)).unwrap();
        ArtifactPublished {
            step: StepId::new(STEP),
            attempt: 1,
            name: name.into(),
            key: name.into(),
            size: bytes.len() as u64,
            sha256: hex(&sha2::Sha256::digest(&bytes)),
        }
    }

    /// Creates a job deploying `artifact` as `tag` at `sha` per `spec`, and waits until it ends.
    async fn deploy(
        &self,
        tag: &str,
        sha: &str,
        spec: &DeploySpec,
        artifact: ArtifactPublished,
    ) -> (JobState, Vec<Event>) {
        let job = JobId::new();
        let created = JobCreated {
            artifact: None,
            job,
            project_id: 1,
            project: "group/app".into(),
            tag: tag.into(),
            git_ref: format!("refs/tags/{tag}"),
            sha: sha.into(),
            priority: 0,
            trigger: "test".into(),
            steps: vec![StepPlan {
                step: StepId::new(STEP),
                pool: "default".into(),
                priority: 0,
                spec: StepSpec::Deploy(spec.clone()),
            }],
        };
        self.store
            .append(
                Append::new(StreamId::Job(job), vec![created.into(), artifact.into()]).expect(0),
            )
            .await
            .unwrap();
        wait_until(JOB_DEADLINE, || async {
            job_events(&*self.store, job).await.0.phase.is_terminal()
        })
        .await;
        job_events(&*self.store, job).await
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A sha whose first seven characters name `tag`'s release apart from others.
fn sha_of(tag: &str) -> String {
    hex(&sha2::Sha256::digest(tag.as_bytes()))[..40].to_string()
}

fn release_link(tag: &str) -> String {
    format!("releases/{}", release_name(tag, &sha_of(tag)))
}

/// Per host: `started`, `<phase>`, `finished` in the order they were recorded, with the attempt.
fn host_log(events: &[Event], host: &str) -> Vec<(u32, String)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::DeployHostStarted(s) if s.host == host => Some((s.attempt, "started".into())),
            Event::DeployHostCheckpoint(c) if c.host == host => Some((c.attempt, c.phase.clone())),
            Event::DeployHostFinished(f) if f.host == host => Some((f.attempt, "finished".into())),
            _ => None,
        })
        .collect()
}

fn count_started(events: &[Event], host: &str) -> usize {
    host_log(events, host)
        .iter()
        .filter(|(_, p)| p == "started")
        .count()
}

fn finished<'a>(events: &'a [Event], host: &str) -> Vec<&'a DeployHostFinished> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::DeployHostFinished(f) if f.host == host => Some(f),
            _ => None,
        })
        .collect()
}

fn step_failed(events: &[Event]) -> Vec<&StepFailed> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::StepFailed(f) => Some(f),
            _ => None,
        })
        .collect()
}

fn all_phases() -> Vec<String> {
    [
        "started",
        "uploaded",
        "unpacked",
        "switched",
        "restarted",
        "healthy",
        "finished",
    ]
    .map(String::from)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_to_five_hosts_goes_two_at_a_time() {
    let env = Env::start(5, HostKeyPolicy::Strict).await;
    let spec = env.spec();
    assert_eq!(spec.max_parallel, 2);
    let (state, events) = env
        .deploy("v1", &sha_of("v1"), &spec, env.artifact("v1"))
        .await;
    assert_eq!(state.phase, JobPhase::Succeeded, "{events:?}");

    // Never more than two hosts between started and finished; two at once did happen.
    let (mut in_flight, mut most) = (0i32, 0i32);
    for e in &events {
        match e {
            Event::DeployHostStarted(_) => in_flight += 1,
            Event::DeployHostFinished(_) => in_flight -= 1,
            _ => {}
        }
        most = most.max(in_flight);
        assert!(in_flight <= 2, "more than two hosts at once: {events:?}");
    }
    assert_eq!((most, in_flight), (2, 0));
    // Batches in host order: a batch starts only after the previous one finished entirely.
    let targets = env.fleet.targets();
    let position = |f: &dyn Fn(&Event) -> bool| events.iter().position(f).unwrap();
    for (b, batch) in targets.chunks(2).enumerate().skip(1) {
        let first_start = batch
            .iter()
            .map(|h| position(&|e| matches!(e, Event::DeployHostStarted(s) if &s.host == h)))
            .min()
            .unwrap();
        for h in &targets[..b * 2] {
            let done = position(&|e| matches!(e, Event::DeployHostFinished(f) if &f.host == h));
            assert!(
                done < first_start,
                "{h} finished after batch {b} started: {events:?}"
            );
        }
    }
    for (i, host) in targets.iter().enumerate() {
        let phases: Vec<String> = host_log(&events, host)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        assert_eq!(phases, all_phases(), "{host}");
        assert!(finished(&events, host)[0].ok);
        // On the host itself: its own release, its own restart, its own upload.
        assert_eq!(
            env.fleet.current(i).as_deref(),
            Some(release_link("v1").as_str())
        );
        assert_eq!(env.fleet.releases(i), [release_name("v1", &sha_of("v1"))]);
        assert_eq!(env.fleet.lines(i, "restarts"), ["v1"]);
        assert_eq!(env.fleet.host(i).sftp_sessions(), 1, "{host}");
        let incoming = std::fs::read_dir(env.fleet.file(i, ".incoming"))
            .unwrap()
            .count();
        assert_eq!(incoming, 0, "{host} keeps no upload behind");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_host_and_a_changed_host_key_fail_the_job_with_an_outcome_for_every_host() {
    let env = Env::start(4, HostKeyPolicy::Strict).await;
    let known_before = std::fs::read_to_string(&env.known_hosts).unwrap();
    let refused = RefusedPort::new();
    // Host 2 comes back with another key than the one known_hosts recorded.
    let changed = env.fleet.host(2);
    tokio::task::block_in_place(|| changed.restart_with_new_key());
    let t = env.fleet.targets();
    let mut spec = env.spec();
    spec.hosts = vec![
        t[0].clone(),
        refused.target(),
        t[1].clone(),
        t[2].clone(),
        t[3].clone(),
    ];
    spec.max_parallel = 1;
    spec.max_failures = 1;
    spec.rollback_on_failure = false;
    let (state, events) = env
        .deploy("v1", &sha_of("v1"), &spec, env.artifact("v1"))
        .await;
    assert_eq!(state.phase, JobPhase::Failed, "{events:?}");

    // One outcome per host.
    for host in &spec.hosts {
        assert_eq!(finished(&events, host).len(), 1, "{host}: {events:?}");
    }
    let outcome = |h: &str| finished(&events, h)[0].clone();
    assert!(outcome(&t[0]).ok && outcome(&t[1]).ok);
    let refusal = outcome(&refused.target());
    let why = refusal.error.as_deref().unwrap();
    assert!(!refusal.ok);
    assert!(
        why.starts_with(&format!("cannot connect to {}", refused.target())),
        "{why}"
    );
    let key = outcome(&t[2]);
    let why = key.error.as_deref().unwrap();
    assert!(!key.ok);
    assert!(
        why.contains(&format!("host key of {} refused", t[2])),
        "{why}"
    );
    assert!(why.contains(&changed.fingerprint()), "{why}");
    assert!(why.contains("CHANGED"), "{why}");
    // max_failures = 1: the second failure stops the rollout; host 3 is never started.
    let skipped = outcome(&t[3]);
    assert!(!skipped.ok);
    assert!(skipped
        .error
        .as_deref()
        .unwrap()
        .contains("max_failures = 1"));
    assert_eq!(count_started(&events, &t[3]), 0, "{events:?}");

    // A host-key failure is not retried: one attempt, failed, naming both failures.
    let failed = step_failed(&events);
    assert_eq!(failed.len(), 1, "{events:?}");
    assert!(!failed[0].retryable);
    assert!(
        failed[0].error.contains("failed on 2 of 5 hosts"),
        "{}",
        failed[0].error
    );
    assert!(
        failed[0].error.contains(&format!("not started: {}", t[3])),
        "{}",
        failed[0].error
    );

    // The hosts: 0 and 1 deployed, 2 (changed key) and 3 (skipped) untouched.
    for i in [0, 1] {
        assert_eq!(
            env.fleet.current(i).as_deref(),
            Some(release_link("v1").as_str())
        );
        assert_eq!(env.fleet.lines(i, "restarts"), ["v1"]);
    }
    for i in [2, 3] {
        assert!(!env.fleet.file(i, "").exists(), "host {i} was touched");
        assert_eq!(env.fleet.host(i).sftp_sessions(), 0);
    }
    // Strict: nothing was pinned.
    assert_eq!(
        std::fs::read_to_string(&env.known_hosts).unwrap(),
        known_before
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_health_check_rolls_the_switched_hosts_back_and_restarts_them_there() {
    let env = Env::start(4, HostKeyPolicy::Strict).await;
    let spec = env.spec();
    let (state, events) = env
        .deploy("v1", &sha_of("v1"), &spec, env.artifact("v1"))
        .await;
    assert_eq!(state.phase, JobPhase::Succeeded, "{events:?}");

    // v2 goes one host at a time; host 2's health check fails.
    env.fleet.set_unhealthy(2, true);
    let mut spec = env.spec();
    spec.max_parallel = 1;
    let (state, events) = env
        .deploy("v2", &sha_of("v2"), &spec, env.artifact("v2"))
        .await;
    assert_eq!(state.phase, JobPhase::Failed, "{events:?}");
    let t = env.fleet.targets();

    // Hosts 0 and 1 went through v2 entirely, then were switched back when host 2 failed.
    for h in &t[..2] {
        let fin = finished(&events, h);
        assert_eq!(fin.len(), 2, "{h}: {events:?}");
        assert!(fin[0].ok && !fin[0].rolled_back);
        assert!(fin[1].ok && fin[1].rolled_back, "{h}: {:?}", fin[1]);
    }
    let fin = finished(&events, &t[2]);
    assert_eq!(fin.len(), 2, "{events:?}");
    assert!(!fin[0].ok && fin[0].error.as_deref().unwrap().contains("health check"));
    assert!(fin[1].rolled_back, "{:?}", fin[1]);
    let phases: Vec<String> = host_log(&events, &t[2])
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        phases,
        [
            "started",
            "uploaded",
            "unpacked",
            "switched",
            "restarted",
            "finished",
            "finished"
        ]
    );
    // Host 3 was never started and keeps v1 without a restart.
    assert_eq!(count_started(&events, &t[3]), 0);
    assert!(finished(&events, &t[3])[0]
        .error
        .as_deref()
        .unwrap()
        .contains("not deployed"));
    let failed = step_failed(&events);
    assert_eq!(failed.len(), 1);
    assert!(!failed[0].retryable);

    // On the hosts: every one is on v1; the switched ones ran after_switch on v2, then on v1.
    for i in 0..4 {
        assert_eq!(
            env.fleet.current(i).as_deref(),
            Some(release_link("v1").as_str()),
            "host {i}"
        );
    }
    for i in 0..3 {
        assert_eq!(
            env.fleet.lines(i, "restarts"),
            ["v1", "v2", "v1"],
            "host {i}"
        );
        assert!(env
            .fleet
            .releases(i)
            .contains(&release_name("v2", &sha_of("v2"))));
    }
    assert_eq!(env.fleet.lines(3, "restarts"), ["v1"]);
    assert_eq!(env.fleet.releases(3), [release_name("v1", &sha_of("v1"))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeploying_the_same_release_uploads_nothing() {
    let env = Env::start(3, HostKeyPolicy::Strict).await;
    let spec = env.spec();
    let artifact = env.artifact("v1");
    let (state, events) = env
        .deploy("v1", &sha_of("v1"), &spec, artifact.clone())
        .await;
    assert_eq!(state.phase, JobPhase::Succeeded, "{events:?}");
    let marker = |i: usize| {
        let path = env
            .fleet
            .file(i, &format!("{}/.ferry-release", release_link("v1")));
        let meta = std::fs::metadata(path).unwrap();
        use std::os::unix::fs::MetadataExt;
        (meta.ino(), meta.mtime(), meta.mtime_nsec())
    };
    let before: Vec<_> = (0..3).map(marker).collect();
    for i in 0..3 {
        assert_eq!(env.fleet.host(i).sftp_sessions(), 1);
    }

    let (state, events) = env.deploy("v1", &sha_of("v1"), &spec, artifact).await;
    assert_eq!(state.phase, JobPhase::Succeeded, "{events:?}");
    for (i, host) in env.fleet.targets().iter().enumerate() {
        let phases: Vec<String> = host_log(&events, host)
            .into_iter()
            .map(|(_, p)| p)
            .collect();
        // No `uploaded`: the release was found unpacked with the same checksum.
        assert_eq!(
            phases,
            [
                "started",
                "unpacked",
                "switched",
                "restarted",
                "healthy",
                "finished"
            ],
            "{host}"
        );
        // Nothing reached the host by SFTP, the release directory is the very same one, and
        // the switch and restart still ran.
        assert_eq!(env.fleet.host(i).sftp_sessions(), 1, "{host}");
        assert_eq!(
            marker(i),
            before[i],
            "{host}: the release was unpacked again"
        );
        assert_eq!(env.fleet.lines(i, "restarts"), ["v1", "v1"]);
        assert_eq!(
            env.fleet.current(i).as_deref(),
            Some(release_link("v1").as_str())
        );
    }
}

/// `(name, kind, link target, content)` of one archive entry.
type RawEntry<'a> = (&'a str, tar::EntryType, Option<&'a str>, &'a [u8]);

/// A tar.gz written with raw headers, so that malicious entries can be written at all.
fn raw_archive(path: &Path, entries: &[RawEntry]) {
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut b = tar::Builder::new(gz);
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_old();
        let bytes = h.as_old_mut();
        bytes.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            bytes.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
        h.set_entry_type(*kind);
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap().finish().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tar_slip_archive_is_refused_and_nothing_reaches_the_hosts() {
    let env = Env::start(2, HostKeyPolicy::Strict).await;
    let spec = env.spec();
    use tar::EntryType::{Regular, Symlink};
    let archives: [(&str, Vec<RawEntry>); 2] = [
        (
            "dotdot.tar.gz",
            vec![
                ("app.sh", Regular, None, b"echo v1\n"),
                ("../../../evil", Regular, None, b"pwned\n"),
            ],
        ),
        (
            "link.tar.gz",
            vec![
                ("app.sh", Regular, None, b"echo v1\n"),
                ("out", Symlink, Some("../../.."), b""),
                ("out/evil", Regular, None, b"pwned\n"),
            ],
        ),
    ];
    for (i, (name, entries)) in archives.iter().enumerate() {
        raw_archive(&env.artifacts.join(name), entries);
        let tag = format!("v{}", i + 1);
        let (state, events) = env
            .deploy(&tag, &sha_of(&tag), &spec, env.published(name))
            .await;
        assert_eq!(state.phase, JobPhase::Failed, "{events:?}");
        let failed = step_failed(&events);
        assert_eq!(failed.len(), 1, "{events:?}");
        assert!(
            failed[0].error.contains("escapes the release"),
            "{}",
            failed[0].error
        );
        assert!(!failed[0].retryable);
        assert!(
            !events.iter().any(|e| matches!(
                e,
                Event::DeployHostStarted(_) | Event::DeployHostFinished(_)
            )),
            "{events:?}"
        );
    }
    // No host was touched: no session ever ran, nothing exists in any root or around it.
    for i in 0..2 {
        let root: Vec<_> = std::fs::read_dir(env.fleet.root(i)).unwrap().collect();
        assert!(root.is_empty(), "host {i}: {root:?}");
        assert_eq!(env.fleet.host(i).sftp_sessions(), 0);
        assert!(!env.fleet.host(i).log().contains("Accepted publickey"));
    }
    let evil: Vec<PathBuf> = walk(env.fleet.target_dir().parent().unwrap())
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "evil"))
        .collect();
    assert!(evil.is_empty(), "{evil:?}");
}

/// Every path under `dir` (not following links).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                todo.push(p.clone());
            }
            out.push(p);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Real `ferry` processes (gateway, coordinator, agents) on Redis, building a real repository and
// deploying it over SSH to a fleet.

const HOOK_TOKEN: &str = "fleet-hook-token";

/// A repository whose build writes `dist/app.sh` printing the tag, a configuration deploying it
/// to a fleet, and the store the processes share.
struct World {
    fleet: Fleet,
    dir: tempfile::TempDir,
    repo: PathBuf,
    config: PathBuf,
    listen: String,
    url: String,
    ns: String,
    store: Arc<dyn Store>,
}

impl World {
    /// `hosts` fleet hosts in one environment deployed `max_parallel` at a time; `after_switch`
    /// commands run after the standard one that appends the release's version to
    /// `<path>/restarts`.
    async fn new(
        hosts: usize,
        max_parallel: u32,
        after_switch: &[String],
        lease_ttl: &str,
    ) -> World {
        let fleet = tokio::task::spawn_blocking(move || Fleet::start(hosts))
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::write(
            repo.join("build.sh"),
            "#!/bin/sh\nset -eu\nmkdir -p dist\nprintf 'echo %s\\n' \"$FERRY_TAG\" > dist/app.sh\n",
        )
        .unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        git(&repo, &["add", "."]);
        git(&repo, &["commit", "-q", "-m", "app"]);
        let known_hosts = dir.path().join("known_hosts");
        fleet.known_hosts(&known_hosts);
        let listen = format!("127.0.0.1:{}", crate::sshd::free_port());
        let config = dir.path().join("ferry.toml");
        let quote = |s: &str| format!("{s:?}");
        let mut commands = vec![quote(
            r#"echo "$(sh dist/app.sh)" >> "$FERRY_PATH/restarts""#,
        )];
        commands.extend(after_switch.iter().map(|c| quote(c)));
        let hosts: Vec<String> = fleet.targets().iter().map(|t| quote(t)).collect();
        std::fs::write(
            &config,
            format!(
                r#"
[gateway]
listen = "{listen}"
[coordinator]
lease_ttl = "{lease_ttl}"
sweep_interval = "200ms"
retry_base = "200ms"
retry_max = "1s"
[agent]
ssh_key = "{key}"
known_hosts = "{known_hosts}"
host_key_policy = "strict"
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
hosts = [{hosts}]
path = "{path}"
after_switch = [{commands}]
health_check = {health}
health_check_retries = 1
health_check_interval = "100ms"
max_parallel = {max_parallel}
"#,
                key = client_key().private.display(),
                known_hosts = known_hosts.display(),
                artifacts = dir.path().join("artifacts").display(),
                repo = repo.display(),
                hosts = hosts.join(", "),
                path = fleet.path(),
                commands = commands.join(", "),
                health = quote(&fleet.health_check()),
            ),
        )
        .unwrap();
        let url = harness::shared().url();
        let ns = harness::namespace();
        let store: Arc<dyn Store> = Arc::new(
            ferry::store::redis::RedisStore::connect(&url, &ns)
                .await
                .unwrap(),
        );
        World {
            fleet,
            dir,
            repo,
            config,
            listen,
            url,
            ns,
            store,
        }
    }

    /// Tags the repository's HEAD (after a commit of its own) and returns the commit.
    fn tag(&self, tag: &str) -> String {
        std::fs::write(self.repo.join("VERSION"), tag).unwrap();
        git(&self.repo, &["add", "."]);
        git(&self.repo, &["commit", "-q", "-m", tag]);
        git(&self.repo, &["tag", tag]);
        git(&self.repo, &["rev-parse", "HEAD"])
    }

    fn spawn(&self, role: &str, name: &str) -> Proc {
        Proc(
            std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("FERRY_STORE", &self.url)
                .env("FERRY_NAMESPACE", &self.ns)
                .env("FERRY_AGENT_NAME", name)
                .env(
                    "FERRY_DATA_DIR",
                    self.dir.path().join(format!("data-{name}")),
                )
                .env("FERRY_LOG", "warn")
                .arg("--config")
                .arg(&self.config)
                .arg(role)
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    }

    /// Delivers a GitLab tag-push webhook for `tag` at `sha` (202 expected).
    async fn push_tag(&self, tag: &str, sha: &str) {
        let body = harness::tag_push(78, "group/app", tag, sha);
        let http = reqwest::Client::new();
        let url = format!("http://{}/hooks/gitlab", self.listen);
        let key = format!(
            "0b9f7c1e-2222-4000-8000-{:012x}",
            rand::random::<u64>() & 0xffff_ffff_ffff
        );
        let status = wait_for(
            DEADLINE * 3,
            "the gateway to accept the webhook",
            || async {
                let res = http
                    .post(&url)
                    .header("X-Gitlab-Event", "Tag Push Hook")
                    .header("X-Gitlab-Token", HOOK_TOKEN)
                    .header("Idempotency-Key", &key)
                    .json(&body)
                    .send()
                    .await
                    .ok()?;
                Some(res.status().as_u16())
            },
        )
        .await;
        assert_eq!(status, 202);
    }

    /// The job created for `tag`.
    async fn job(&self, tag: &str) -> JobId {
        wait_for(DEADLINE * 3, "the job to be created", || async {
            for job in self.store.jobs(None, 100, Order::Oldest).await.ok()? {
                let (state, _) = job_events(&*self.store, job).await;
                if state.plan.as_ref().is_some_and(|p| p.tag == tag) {
                    return Some(job);
                }
            }
            None
        })
        .await
    }

    async fn events(&self, job: JobId) -> (JobState, Vec<Event>) {
        job_events(&*self.store, job).await
    }

    async fn wait_ended(&self, job: JobId) -> (JobState, Vec<Event>) {
        wait_until(JOB_DEADLINE, || async {
            self.events(job).await.0.phase.is_terminal()
        })
        .await;
        self.events(job).await
    }

    /// The global log position of each of `job`'s events, in order.
    async fn positions(&self, job: JobId) -> Vec<(LogPos, Event)> {
        self.store
            .read_stream(&StreamId::Job(job), 0)
            .await
            .unwrap()
            .into_iter()
            .map(|s| (s.pos.clone(), s.decode().unwrap()))
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_deploy_is_replaced_and_finished_hosts_are_not_redone() {
    // Host 2 holds in after_switch while `<target>/hold` exists there, saying so with `held`
    // (the target directory is the parent of FERRY_PATH).
    let hold = r#"t="$(dirname "$FERRY_PATH")"; if [ -e "$t/hold" ]; then touch "$t/held"; while [ -e "$t/hold" ]; do sleep 0.05; done; fi"#;
    let w = World::new(4, 1, &[hold.to_string()], "3s").await;
    std::fs::write(w.fleet.root(2).join("hold"), "").unwrap();
    let sha = w.tag("v1.0.0");
    let _gateway = w.spawn("gateway", "gw");
    let _coordinator = w.spawn("coordinator", "c1");
    let mut a1 = w.spawn("agent", "agent-1");
    w.push_tag("v1.0.0", &sha).await;
    let job = w.job("v1.0.0").await;
    let held = w.fleet.root(2).join("held");
    wait_until(JOB_DEADLINE, || async { held.exists() }).await;

    // SIGKILL while host 2 is between its switch and the end of after_switch.
    a1.kill9();
    let (_, before) = w.events(job).await;
    let t = w.fleet.targets();
    let done_before: Vec<&String> = t
        .iter()
        .filter(|h| finished(&before, h).iter().any(|f| f.ok))
        .collect();
    assert_eq!(done_before, [&t[0], &t[1]], "{before:?}");
    let phases: Vec<String> = host_log(&before, &t[2])
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        phases,
        ["started", "uploaded", "unpacked", "switched"],
        "{before:?}"
    );

    std::fs::remove_file(w.fleet.root(2).join("hold")).unwrap();
    let _a2 = w.spawn("agent", "agent-2");
    let (state, events) = w.wait_ended(job).await;
    assert_eq!(state.phase, JobPhase::Succeeded, "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::LeaseExpired(l) if l.step.as_str().starts_with("deploy"))),
        "{events:?}"
    );
    // Hosts finished before the kill were not started again.
    for h in &done_before {
        assert_eq!(count_started(&events, h), 1, "{h} was redone: {events:?}");
    }
    // Host 2 resumed from its checkpoint: the release was already unpacked, nothing uploaded.
    let resumed: Vec<String> = host_log(&events, &t[2])
        .into_iter()
        .filter(|(a, _)| *a > 1)
        .map(|(_, p)| p)
        .collect();
    assert_eq!(
        resumed,
        [
            "started",
            "unpacked",
            "switched",
            "restarted",
            "healthy",
            "finished"
        ],
        "{events:?}"
    );
    assert!(finished(&events, &t[3]).iter().any(|f| f.ok));

    // On the hosts: every one runs v1.0.0; hosts 0 and 1 restarted once; each got one upload.
    let link = format!("releases/{}", release_name("v1.0.0", &sha));
    for i in 0..4 {
        assert_eq!(
            w.fleet.current(i).as_deref(),
            Some(link.as_str()),
            "host {i}"
        );
        assert_eq!(w.fleet.host(i).sftp_sessions(), 1, "host {i}");
    }
    assert_eq!(w.fleet.lines(0, "restarts"), ["v1.0.0"]);
    assert_eq!(w.fleet.lines(1, "restarts"), ["v1.0.0"]);
    assert_eq!(w.fleet.lines(2, "restarts"), ["v1.0.0", "v1.0.0"]);
    assert_eq!(w.fleet.lines(3, "restarts"), ["v1.0.0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tags_pushed_in_quick_succession_leave_the_newer_one_current_everywhere() {
    let w = World::new(3, 2, &[], "10s").await;
    let v1 = w.tag("v1.0.0");
    let v2 = w.tag("v2.0.0");
    let _gateway = w.spawn("gateway", "gw");
    let _coordinator = w.spawn("coordinator", "c1");
    let _a1 = w.spawn("agent", "agent-1");
    let _a2 = w.spawn("agent", "agent-2");
    w.push_tag("v1.0.0", &v1).await;
    w.push_tag("v2.0.0", &v2).await;
    let (j1, j2) = (w.job("v1.0.0").await, w.job("v2.0.0").await);
    let (s2, e2) = w.wait_ended(j2).await;
    assert_eq!(s2.phase, JobPhase::Succeeded, "{e2:?}");
    let (s1, e1) = w.wait_ended(j1).await;
    assert!(
        matches!(s1.phase, JobPhase::Superseded | JobPhase::Succeeded),
        "{:?}: {e1:?}",
        s1.phase
    );

    // If v1 deployed at all, all of it happened before v2's deploy began: never interleaved.
    let p1 = w.positions(j1).await;
    let p2 = w.positions(j2).await;
    let first_v2 = p2
        .iter()
        .find(|(_, e)| matches!(e, Event::DeployHostStarted(_)))
        .map(|(p, _)| p.clone())
        .expect("v2 deployed");
    for (pos, e) in &p1 {
        if matches!(
            e,
            Event::DeployHostStarted(_)
                | Event::DeployHostCheckpoint(_)
                | Event::DeployHostFinished(_)
        ) {
            assert!(pos < &first_v2, "v1's {e:?} after v2's deploy began");
        }
    }
    let v1_deployed = p1
        .iter()
        .any(|(_, e)| matches!(e, Event::DeployHostStarted(_)));
    for (i, host) in w.fleet.targets().iter().enumerate() {
        assert!(finished(&e2, host).iter().all(|f| f.ok), "{host}: {e2:?}");
        let link = format!("releases/{}", release_name("v2.0.0", &v2));
        assert_eq!(
            w.fleet.current(i).as_deref(),
            Some(link.as_str()),
            "host {i}"
        );
        let restarts = w.fleet.lines(i, "restarts");
        assert_eq!(
            restarts.last().map(String::as_str),
            Some("v2.0.0"),
            "host {i}"
        );
        let expected = if v1_deployed { 2 } else { 1 };
        assert_eq!(restarts.len(), expected, "host {i}: {restarts:?}");
    }
}

fn pins(events: &[Event]) -> Vec<&HostKeyPinned> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::HostKeyPinned(p) => Some(p),
            _ => None,
        })
        .collect()
}

/// A job's events as the API lists them (`GET /api/v1/jobs/{id}/events`), and the job as it
/// shows it.
async fn api_view(store: &Arc<dyn Store>, job: JobId) -> (serde_json::Value, serde_json::Value) {
    use ferry::api::{self, ApiState};
    let token = ferry::gateway::Secret::new("fleet-api-token");
    let router = api::router(ApiState::new(store.clone(), &[token]));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let http = reqwest::Client::new();
    let get = |path: String| {
        let req = http
            .get(format!("{base}{path}"))
            .bearer_auth("fleet-api-token");
        async move {
            let res = req.send().await.unwrap();
            assert!(res.status().is_success(), "{res:?}");
            res.json::<serde_json::Value>().await.unwrap()
        }
    };
    let events = get(format!("/api/v1/jobs/{job}/events")).await;
    let shown = get(format!("/api/v1/jobs/{job}")).await;
    server.abort();
    (events, shown)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_new_pins_each_new_host_key_once_as_an_event_and_still_refuses_a_changed_one() {
    let env = Env::start(2, HostKeyPolicy::AcceptNew).await;
    assert!(!env.known_hosts.exists());
    let t = env.fleet.targets();
    let spec = env.spec();
    let v1 = env.artifact("v1");
    let (state, events) = env.deploy("v1", &sha_of("v1"), &spec, v1.clone()).await;
    assert_eq!(state.phase, JobPhase::Succeeded, "{events:?}");

    // One event per host, naming the host, its key's fingerprint and type, under the step.
    let mut got: Vec<(String, String, String, u32)> = pins(&events)
        .iter()
        .map(|p| {
            assert_eq!(p.step.as_str(), STEP);
            (
                p.host.clone(),
                p.fingerprint.clone(),
                p.key_type.clone(),
                p.attempt,
            )
        })
        .collect();
    got.sort();
    let mut expected: Vec<(String, String, String, u32)> = env
        .fleet
        .hosts()
        .iter()
        .map(|h| (h.target(), h.fingerprint(), "ssh-ed25519".into(), 1))
        .collect();
    expected.sort();
    assert_eq!(got, expected, "{events:?}");
    // Each pin is recorded in its host's deploy: after it started, before its first checkpoint.
    for host in &t {
        let at = |f: &dyn Fn(&Event) -> bool| events.iter().position(f).unwrap();
        let started = at(&|e| matches!(e, Event::DeployHostStarted(s) if &s.host == host));
        let pinned = at(&|e| matches!(e, Event::HostKeyPinned(p) if &p.host == host));
        let first = at(&|e| matches!(e, Event::DeployHostCheckpoint(c) if &c.host == host));
        assert!(started < pinned && pinned < first, "{host}: {events:?}");
    }
    // known_hosts now lists exactly the fleet's keys, in a form OpenSSH reads.
    let known = std::fs::read_to_string(&env.known_hosts).unwrap();
    let mut lines: Vec<&str> = known.lines().collect();
    lines.sort();
    let mut want: Vec<String> = env
        .fleet
        .hosts()
        .iter()
        .map(|h| h.known_hosts_line())
        .collect();
    want.sort();
    assert_eq!(lines, want);
    for host in env.fleet.hosts() {
        assert_eq!(
            env.fleet.current(0).as_deref(),
            Some(release_link("v1").as_str())
        );
        let found = std::process::Command::new("ssh-keygen")
            .args(["-F", &format!("[127.0.0.1]:{}", host.port()), "-f"])
            .arg(&env.known_hosts)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(found.success());
    }
    // The API lists the event and shows the job.
    let (listed, shown) = api_view(&env.store, state.id).await;
    let items: Vec<&serde_json::Value> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["name"] == "host_key_pinned")
        .collect();
    assert_eq!(items.len(), 2, "{listed}");
    for item in items {
        assert_eq!(
            (item["kind"].as_u64(), item["version"].as_u64()),
            (Some(23), Some(1))
        );
        assert!(
            item["token"].as_u64().is_some(),
            "appended under the lease: {item}"
        );
        assert!(item["payload"]["fingerprint"]
            .as_str()
            .unwrap()
            .starts_with("SHA256:"));
        assert_eq!(item["payload"]["key_type"], "ssh-ed25519");
        assert!(t.iter().any(|h| item["payload"]["host"] == h.as_str()));
    }
    assert_eq!(shown["state"], "succeeded", "{shown}");

    // Known keys are not pinned again.
    let (state, events) = env.deploy("v1", &sha_of("v1"), &spec, v1).await;
    assert_eq!(state.phase, JobPhase::Succeeded, "{events:?}");
    assert!(pins(&events).is_empty(), "{events:?}");
    assert_eq!(std::fs::read_to_string(&env.known_hosts).unwrap(), known);

    // A changed key is still refused, naming host and fingerprint, and nothing is pinned.
    let changed = env.fleet.host(1);
    tokio::task::block_in_place(|| changed.restart_with_new_key());
    let (state, events) = env
        .deploy("v2", &sha_of("v2"), &spec, env.artifact("v2"))
        .await;
    assert_eq!(state.phase, JobPhase::Failed, "{events:?}");
    assert!(pins(&events).is_empty(), "{events:?}");
    let refused = finished(&events, &t[1]);
    let why = refused[0].error.as_deref().unwrap();
    assert!(
        why.contains(&format!("host key of {} refused", t[1])),
        "{why}"
    );
    assert!(
        why.contains(&changed.fingerprint()) && why.contains("CHANGED"),
        "{why}"
    );
    assert_eq!(std::fs::read_to_string(&env.known_hosts).unwrap(), known);
    assert_eq!(
        env.fleet.host(1).sftp_sessions(),
        1,
        "nothing more reached the changed host"
    );
    for i in 0..2 {
        assert_eq!(
            env.fleet.current(i).as_deref(),
            Some(release_link("v1").as_str()),
            "host {i} is on v1 (host 0 rolled back)"
        );
    }
}
