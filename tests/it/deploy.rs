//! The deploy step against real directories and real shell scripts, through the local transport.
//! Each test "host" is a local transport whose target directory is its own, so several hosts
//! can live on one machine (the SSH transport's tests use real sshd instances).

use async_trait::async_trait;
use ferry::deploy::transport::{self, Connector, Local, LogFn, Output, PinnedKey, Transport};
use ferry::deploy::{self, HostReport, Phase, Progress, Release};
use ferry_proto::{DeploySpec, FencingToken, JobId};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A local "host" whose environment path is redirected into its own directory.
struct Rooted {
    name: String,
    root: PathBuf,
    uploads: Arc<AtomicUsize>,
}

#[async_trait]
impl Transport for Rooted {
    fn host(&self) -> &str {
        &self.name
    }
    async fn exec(
        &self,
        script: &str,
        env: &[(String, String)],
        log: LogFn<'_>,
    ) -> Result<Output, transport::Error> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| match k.as_str() {
                "FERRY_PATH" | "FERRY_WORKDIR" => {
                    (k.clone(), format!("{}{v}", self.root.display()))
                }
                // a host without a usable `timeout`
                "FERRY_TIMEOUT" if self.name.starts_with("bare") => (k.clone(), String::new()),
                _ => (k.clone(), v.clone()),
            })
            .collect();
        Local.exec(script, &env, log).await
    }
    async fn upload(&self, local: &Path, remote: &str) -> Result<(), transport::Error> {
        self.uploads.fetch_add(1, Ordering::SeqCst);
        Local
            .upload(local, &format!("{}{remote}", self.root.display()))
            .await
    }
}

struct Hosts {
    dir: tempfile::TempDir,
    uploads: Arc<AtomicUsize>,
}

impl Hosts {
    fn new() -> Hosts {
        Hosts {
            dir: tempfile::tempdir().unwrap(),
            uploads: Arc::new(AtomicUsize::new(0)),
        }
    }
    fn root(&self, host: &str) -> PathBuf {
        self.dir.path().join(host)
    }
    fn current(&self, host: &str) -> String {
        let link = std::fs::read_link(self.root(host).join("srv/app/current")).unwrap();
        link.display().to_string()
    }
}

#[async_trait]
impl Connector for Hosts {
    async fn connect(&self, host: &str) -> Result<Box<dyn Transport>, transport::Error> {
        if host.starts_with("down") {
            return Err(transport::Error::Connect {
                host: host.into(),
                reason: "connection refused".into(),
            });
        }
        Ok(Box::new(Rooted {
            name: host.into(),
            root: self.root(host),
            uploads: self.uploads.clone(),
        }))
    }
}

/// Records progress and the most hosts in flight at once.
#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    fail_after: Mutex<Option<usize>>,
}

#[async_trait]
impl Progress for Recorder {
    async fn host_started(&self, host: &str) -> Result<(), String> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        self.events.lock().unwrap().push(format!("{host} started"));
        Ok(())
    }
    async fn checkpoint(&self, host: &str, phase: Phase) -> Result<(), String> {
        let mut events = self.events.lock().unwrap();
        if let Some(n) = *self.fail_after.lock().unwrap() {
            if events.len() >= n {
                return Err("lease lost".into());
            }
        }
        events.push(format!("{host} {}", phase.as_str()));
        Ok(())
    }
    async fn host_finished(&self, r: &HostReport) -> Result<(), String> {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.events
            .lock()
            .unwrap()
            .push(format!("{} finished ok={}", r.host, r.ok));
        Ok(())
    }
    async fn host_key_pinned(&self, key: &PinnedKey) -> Result<(), String> {
        let e = format!("{} pinned {}", key.host, key.fingerprint);
        self.events.lock().unwrap().push(e);
        Ok(())
    }
    fn log(&self, _host: &str, _stream: &str, _line: &str) {}
}

/// A release archive with `app.sh` printing `version`, plus any extra raw entries.
fn artifact(dir: &Path, version: &str) -> (PathBuf, String) {
    let src = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("app.sh"), format!("echo {version}\n")).unwrap();
    let path = dir.join(format!("app-{version}.tar.gz"));
    let file = std::fs::File::create(&path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(".", &src).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    use sha2::Digest;
    (path, hex(&sha2::Sha256::digest(&bytes)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn spec(hosts: &[&str]) -> DeploySpec {
    DeploySpec {
        environment: "production".into(),
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        path: "/srv/app".into(),
        after_switch: vec!["sh app.sh > ../../restarted-with".into()],
        health_check: Some("test -f app.sh".into()),
        max_parallel: 2,
        keep_releases: 5,
        health_check_retries: 1,
        health_check_interval_ms: 10,
        ..Default::default()
    }
}

fn release<'a>(tag: &'a str, artifact: &'a Path, sha256: &'a str, token: u64) -> Release<'a> {
    Release {
        project: "group/app",
        tag,
        sha: "0123456789abcdef0123456789abcdef01234567",
        job: JobId::new(),
        attempt: 1,
        token: FencingToken(token),
        artifact,
        sha256,
    }
}

/// Deploys `release` to every host of `spec`, none done before, recording nothing.
async fn deploy_all(spec: &DeploySpec, release: &Release<'_>, hosts: &Hosts) -> deploy::Outcome {
    deploy::deploy(spec, release, hosts, &BTreeSet::new(), &Recorder::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn rolls_out_in_batches_and_a_rerun_uploads_nothing() {
    let hosts = Hosts::new();
    let names = ["h1", "h2", "h3", "h4", "h5"];
    let spec = spec(&names);
    let (art, sum) = artifact(hosts.dir.path(), "v1");
    let progress = Recorder::default();
    let out = deploy::deploy(
        &spec,
        &release("v1", &art, &sum, 10),
        &hosts,
        &BTreeSet::new(),
        &progress,
    )
    .await
    .unwrap();
    assert!(out.failed().is_empty(), "{out:?}");
    assert_eq!(progress.max_in_flight.load(Ordering::SeqCst), 2);
    for h in names {
        assert_eq!(hosts.current(h), "releases/v1-0123456");
        let restarted = std::fs::read_to_string(hosts.root(h).join("srv/app/restarted-with"));
        assert_eq!(restarted.unwrap(), "v1\n");
    }
    assert_eq!(hosts.uploads.load(Ordering::SeqCst), 5);
    let events = progress.events.lock().unwrap().clone();
    let h1: Vec<&String> = events.iter().filter(|e| e.starts_with("h1 ")).collect();
    assert_eq!(
        h1,
        [
            "h1 started",
            "h1 uploaded",
            "h1 unpacked",
            "h1 switched",
            "h1 restarted",
            "h1 healthy",
            "h1 finished ok=true"
        ]
    );

    // The same release again: every host already has it, nothing is uploaded.
    let out = deploy_all(&spec, &release("v1", &art, &sum, 11), &hosts).await;
    assert!(out.hosts.iter().all(|h| h.ok && h.reused), "{out:?}");
    assert_eq!(hosts.uploads.load(Ordering::SeqCst), 5);

    // Resuming after a crash: hosts already done are not touched.
    let done: BTreeSet<String> = ["h1", "h2", "h3"].iter().map(|s| s.to_string()).collect();
    let (art2, sum2) = artifact(hosts.dir.path(), "v2");
    let out = deploy::deploy(
        &spec,
        &release("v2", &art2, &sum2, 12),
        &hosts,
        &done,
        &Recorder::default(),
    )
    .await
    .unwrap();
    assert_eq!(out.hosts.len(), 2);
    assert_eq!(hosts.current("h4"), "releases/v2-0123456");
    assert_eq!(hosts.current("h1"), "releases/v1-0123456");
}

#[tokio::test]
async fn a_failed_health_check_rolls_every_switched_host_back() {
    let hosts = Hosts::new();
    let names = ["h1", "h2", "h3"];
    let mut spec = spec(&names);
    let (v1, s1) = artifact(hosts.dir.path(), "v1");
    deploy_all(&spec, &release("v1", &v1, &s1, 1), &hosts).await;
    // v2's health check fails on h2 only.
    spec.health_check = Some("test ! -f ../../unhealthy".into());
    std::fs::write(hosts.root("h2").join("srv/app/unhealthy"), "").unwrap();
    let (v2, s2) = artifact(hosts.dir.path(), "v2");
    let out = deploy_all(&spec, &release("v2", &v2, &s2, 2), &hosts).await;
    let failed = out.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].host, "h2");
    assert!(
        failed[0].error.as_deref().unwrap().contains("health check"),
        "{failed:?}"
    );
    for h in names {
        assert_eq!(hosts.current(h), "releases/v1-0123456", "{h} rolled back");
        let restarted = std::fs::read_to_string(hosts.root(h).join("srv/app/restarted-with"));
        assert_eq!(restarted.unwrap(), "v1\n", "{h} restarted on v1 again");
    }
    // h1 and h2 (one batch) were switched and are rolled back; h3's batch never started.
    let rolled: Vec<&str> = out
        .hosts
        .iter()
        .filter(|h| h.rolled_back)
        .map(|h| h.host.as_str())
        .collect();
    assert_eq!(rolled, ["h1", "h2"], "{out:?}");
    let skipped: Vec<&str> = out.skipped().iter().map(|h| h.host.as_str()).collect();
    assert_eq!(skipped, ["h3"], "{out:?}");
}

#[tokio::test]
async fn an_unreachable_host_fails_alone_within_max_failures() {
    let hosts = Hosts::new();
    let mut spec = spec(&["h1", "down-h2", "h3"]);
    spec.max_parallel = 1;
    spec.max_failures = 1;
    let (v1, s1) = artifact(hosts.dir.path(), "v1");
    let out = deploy_all(&spec, &release("v1", &v1, &s1, 1), &hosts).await;
    let failed = out.failed();
    assert_eq!(failed.len(), 1);
    assert!(failed[0]
        .error
        .as_deref()
        .unwrap()
        .contains("connection refused"));
    assert_eq!(hosts.current("h3"), "releases/v1-0123456");

    // With no failures allowed, no batch starts after the failing one; the host it would have
    // deployed still gets an outcome, without ever being started.
    spec.max_failures = 0;
    spec.hosts = vec!["down-h0".into(), "h9".into()];
    let progress = Recorder::default();
    let out = deploy::deploy(
        &spec,
        &release("v1", &v1, &s1, 2),
        &hosts,
        &BTreeSet::new(),
        &progress,
    )
    .await
    .unwrap();
    assert_eq!(out.failed().len(), 1);
    let skipped = out.skipped();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].host, "h9");
    assert!(skipped[0]
        .error
        .as_deref()
        .unwrap()
        .contains("max_failures"));
    assert!(!hosts.root("h9").exists());
    let events = progress.events.lock().unwrap().clone();
    assert!(!events.contains(&"h9 started".to_string()), "{events:?}");
    assert!(
        events.contains(&"h9 finished ok=false".to_string()),
        "{events:?}"
    );
}

#[tokio::test]
async fn a_tar_slip_archive_is_refused_before_any_host_is_touched() {
    let hosts = Hosts::new();
    let spec = spec(&["h1"]);
    let path = hosts.dir.path().join("evil.tar.gz");
    {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(&path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        let mut h = tar::Header::new_old();
        let name = b"../../etc/evil";
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_size(0);
        h.set_mode(0o644);
        h.set_cksum();
        b.append(&h, std::io::empty()).unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    let err = deploy::deploy(
        &spec,
        &release("v1", &path, "00", 1),
        &hosts,
        &BTreeSet::new(),
        &Recorder::default(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("escapes the release"), "{err}");
    assert!(!hosts.root("h1").exists());
}

#[tokio::test]
async fn a_deploy_with_an_older_token_cannot_switch_a_host() {
    let hosts = Hosts::new();
    let spec = spec(&["h1"]);
    let (v2, s2) = artifact(hosts.dir.path(), "v2");
    deploy_all(&spec, &release("v2", &v2, &s2, 50), &hosts).await;
    let (v1, s1) = artifact(hosts.dir.path(), "v1");
    let out = deploy_all(&spec, &release("v1", &v1, &s1, 40), &hosts).await;
    assert!(
        out.hosts[0]
            .error
            .as_deref()
            .unwrap()
            .contains("fenced out"),
        "{out:?}"
    );
    assert_eq!(hosts.current("h1"), "releases/v2-0123456");
}

#[tokio::test]
async fn a_lost_lease_stops_the_deploy_at_once() {
    let hosts = Hosts::new();
    let spec = spec(&["h1", "h2", "h3", "h4"]);
    let (v1, s1) = artifact(hosts.dir.path(), "v1");
    let progress = Recorder::default();
    *progress.fail_after.lock().unwrap() = Some(3);
    let err = deploy::deploy(
        &spec,
        &release("v1", &v1, &s1, 1),
        &hosts,
        &BTreeSet::new(),
        &progress,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("lease lost"), "{err}");
    assert!(
        !hosts.root("h3").exists(),
        "no new batch after the lease was lost"
    );
}

#[tokio::test]
async fn old_releases_are_pruned_but_never_current_or_previous() {
    let hosts = Hosts::new();
    let mut spec = spec(&["h1"]);
    spec.keep_releases = 2;
    for (i, v) in ["v1", "v2", "v3", "v4"].iter().enumerate() {
        let (art, sum) = artifact(hosts.dir.path(), v);
        let out = deploy_all(&spec, &release(v, &art, &sum, i as u64 + 1), &hosts).await;
        assert!(out.failed().is_empty(), "{out:?}");
    }
    let mut left: Vec<String> = std::fs::read_dir(hosts.root("h1").join("srv/app/releases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["v3-0123456", "v4-0123456"]);
}

#[test]
fn release_names_are_path_safe() {
    assert_eq!(
        deploy::release_name("v1.2.3", "abcdef0123"),
        "v1.2.3-abcdef0"
    );
    assert_eq!(
        deploy::release_name("release/1.0", "abcdef0123"),
        "release_1.0-abcdef0"
    );
    assert_eq!(
        deploy::release_name("../x;rm -rf /", "abcdef0123"),
        "_x_rm_-rf__-abcdef0"
    );
}

/// A command that never ends (a service started in the foreground, a health check against an
/// address that drops packets) fails its host at `command_timeout` instead of holding the
/// step, and every newer deploy to the environment, for good. The host's own `timeout` stops
/// it first (status 124); on a host without one the agent stops waiting a margin later, and
/// what the command started is killed with it.
#[tokio::test]
async fn a_command_that_runs_past_command_timeout_fails_its_host() {
    let hosts = Hosts::new();
    let mut spec = spec(&["h1"]);
    spec.command_timeout_secs = 1;
    spec.rollback_on_failure = false;
    spec.after_switch = vec!["sleep 300".into()];
    let (v1, s1) = artifact(hosts.dir.path(), "v1");
    let started = std::time::Instant::now();
    let out = deploy_all(&spec, &release("v1", &v1, &s1, 1), &hosts).await;
    let error = out.failed()[0].error.clone().unwrap();
    assert!(
        error.contains("after_switch command \"sleep 300\" exited with status 124"),
        "{error}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(60));

    // No `timeout` on the host: the agent stops waiting at command_timeout + its margin.
    let pid_file = hosts.dir.path().join("sleeper.pid");
    spec.hosts = vec!["bare".into()];
    spec.after_switch = vec![format!("echo $$ > {}; exec sleep 300", pid_file.display())];
    let (v2, s2) = artifact(hosts.dir.path(), "v2");
    let out = deploy_all(&spec, &release("v2", &v2, &s2, 2), &hosts).await;
    let error = out.failed()[0].error.clone().unwrap();
    assert!(
        error.contains("bare: still running after 1 s (command_timeout)"),
        "{error}"
    );
    crate::harness::wait_until_gone(&pid_file).await;
}

/// A host whose rollback failed half-way (switched back, then its `after_switch` failed) is on
/// no known release: it is reported failed, so a retry deploys it again instead of counting it
/// among the hosts already done.
#[tokio::test]
async fn a_host_whose_rollback_failed_is_not_counted_as_done() {
    let hosts = Hosts::new();
    let names = ["h1", "h2"];
    let mut spec = spec(&names);
    // Restarting v1 fails on h1 once `broken` is there: only its rollback meets it.
    spec.after_switch = vec![
        "sh app.sh > ../../restarted-with && ! { test -f ../../broken && grep -q v1 app.sh; }"
            .into(),
    ];
    let (v1, s1) = artifact(hosts.dir.path(), "v1");
    let first = deploy_all(&spec, &release("v1", &v1, &s1, 1), &hosts).await;
    assert!(first.failed().is_empty(), "{first:?}");
    std::fs::write(hosts.root("h1").join("srv/app/broken"), "").unwrap();
    spec.health_check = Some("test ! -f ../../unhealthy".into());
    std::fs::write(hosts.root("h2").join("srv/app/unhealthy"), "").unwrap();
    let (v2, s2) = artifact(hosts.dir.path(), "v2");
    let out = deploy_all(&spec, &release("v2", &v2, &s2, 2), &hosts).await;
    let h1 = out.hosts.iter().find(|h| h.host == "h1").unwrap();
    assert!(!h1.ok && !h1.rolled_back, "{h1:?}");
    assert!(
        h1.error.as_deref().unwrap().contains("rollback failed"),
        "{h1:?}"
    );
}

/// The same release name with other contents (the tag rebuilt into other bytes) is not
/// unpacked over the release `current` points to: that would change what runs before the
/// switch, the restart and the health check. The host fails, saying so, and keeps running
/// what it ran.
#[tokio::test]
async fn a_live_release_is_not_replaced_by_other_contents_of_the_same_name() {
    let hosts = Hosts::new();
    let spec = spec(&["h1"]);
    let (v1, s1) = artifact(hosts.dir.path(), "v1");
    let out = deploy_all(&spec, &release("v1", &v1, &s1, 1), &hosts).await;
    assert!(out.failed().is_empty(), "{out:?}");
    // Another build of v1: other bytes under the same release name.
    let (rebuilt, s2) = artifact(hosts.dir.path(), "v1-rebuilt");
    assert_ne!(s1, s2);
    let out = deploy_all(&spec, &release("v1", &rebuilt, &s2, 2), &hosts).await;
    let error = out.failed()[0].error.clone().unwrap();
    assert!(error.contains("is live with other contents"), "{error}");
    assert_eq!(hosts.current("h1"), "releases/v1-0123456");
    let app = hosts.root("h1").join("srv/app/current/app.sh");
    assert_eq!(std::fs::read_to_string(app).unwrap(), "echo v1\n");
}

/// What failed uploads and unpacks left on a host (an archive in `.incoming`, a half-unpacked
/// `releases/.<name>.tmp`) is removed by a later deploy's pruning once over a day old; newer
/// ones (another deploy's, in flight) stay.
#[tokio::test]
async fn leftovers_of_failed_uploads_are_pruned_after_a_day() {
    let hosts = Hosts::new();
    let spec = spec(&["h1"]);
    let app = hosts.root("h1").join("srv/app");
    let leftovers = [
        app.join(".incoming/old.tar.gz"),
        app.join("releases/.v0-0123456.tmp"),
    ];
    let fresh = app.join(".incoming/fresh.tar.gz");
    for p in &leftovers {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    }
    std::fs::write(&leftovers[0], "").unwrap();
    std::fs::create_dir_all(&leftovers[1]).unwrap();
    std::fs::write(&fresh, "").unwrap();
    let status = std::process::Command::new("touch")
        .args(["-d", "2 days ago"])
        .args(&leftovers)
        .status()
        .unwrap();
    assert!(status.success());
    let (v1, s1) = artifact(hosts.dir.path(), "v1");
    let out = deploy_all(&spec, &release("v1", &v1, &s1, 1), &hosts).await;
    assert!(out.failed().is_empty(), "{out:?}");
    for p in &leftovers {
        assert!(!p.exists(), "{} left", p.display());
    }
    assert!(fresh.exists());
}

/// Deploying the live release again (a redeploy) and failing rolls back to that release, what
/// ran before, not to the release that preceded it once.
#[tokio::test]
async fn a_failed_redeploy_of_the_live_release_rolls_back_to_it() {
    let hosts = Hosts::new();
    let mut spec = spec(&["h1"]);
    let (v1, s1) = artifact(hosts.dir.path(), "v1");
    let (v2, s2) = artifact(hosts.dir.path(), "v2");
    for (tag, art, sum, token) in [("v1", &v1, &s1, 1), ("v2", &v2, &s2, 2)] {
        let out = deploy_all(&spec, &release(tag, art, sum, token), &hosts).await;
        assert!(out.failed().is_empty(), "{out:?}");
    }
    spec.health_check = Some("test ! -f ../../unhealthy".into());
    std::fs::write(hosts.root("h1").join("srv/app/unhealthy"), "").unwrap();
    let out = deploy_all(&spec, &release("v2", &v2, &s2, 3), &hosts).await;
    assert!(out.hosts[0].rolled_back, "{out:?}");
    assert_eq!(hosts.current("h1"), "releases/v2-0123456");
}
