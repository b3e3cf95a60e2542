//! The SSH transport against real OpenSSH `sshd` instances (see `sshd.rs`): commands, the
//! environment, SFTP uploads, host-key verification, and a whole deploy.
//!
//! The sshd "hosts" share this machine's filesystem, so the deploy test gives all of them one
//! environment path, runs them one at a time (`max_parallel = 1`), and tells them apart by the
//! server port each session reports in `$SSH_CONNECTION`: the first host uploads and unpacks, the
//! next ones find the release already there (as a re-run would), and every one of them switches
//! and runs `after_switch` in its own SSH session. Deploys to hosts with separate target roots
//! (a [`Fleet`](crate::sshd::Fleet)) are in `ssh_fleet.rs`.

use crate::sshd::{self, client_key, Sshd};
use async_trait::async_trait;
use ferry::config::HostKeyPolicy;
use ferry::deploy::ssh::SshConnector;
use ferry::deploy::transport::{self, Connector, Hosts, Output, PinnedKey, Transport};
use ferry::deploy::{self, HostReport, Phase, Progress, Release};
use ferry_proto::{DeploySpec, FencingToken, JobId};
use sha2::Digest;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn connector(known_hosts: &Path, policy: HostKeyPolicy) -> SshConnector {
    SshConnector::new(&client_key().private, known_hosts, policy).expect("load the client key")
}

/// A server, a `known_hosts` file that lists it, and a strict connector.
struct Fixture {
    sshd: Sshd,
    dir: tempfile::TempDir,
    ssh: SshConnector,
}

impl Fixture {
    fn new() -> Fixture {
        let sshd = Sshd::start();
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        sshd::known_hosts(&kh, &[&sshd]);
        let ssh = connector(&kh, HostKeyPolicy::Strict);
        Fixture { sshd, dir, ssh }
    }

    async fn connect(&self) -> Box<dyn Transport> {
        match self.ssh.connect(&self.sshd.target()).await {
            Ok(t) => t,
            Err(e) => panic!("{e}\nsshd log:\n{}", self.sshd.log()),
        }
    }
}

type Seen = Mutex<Vec<(String, String)>>;

async fn run(t: &dyn Transport, script: &str, env: &[(&str, &str)], seen: &Seen) -> Output {
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let log = |s: &str, l: &str| seen.lock().unwrap().push((s.into(), l.into()));
    t.exec(script, &env, &log).await.expect("exec")
}

#[tokio::test]
async fn exec_streams_stdout_stderr_and_the_exit_status() {
    let f = Fixture::new();
    let t = f.connect().await;
    assert_eq!(t.host(), f.sshd.target());
    let seen = Seen::default();
    let out = run(
        &*t,
        "echo one; echo oops >&2; printf 'two\\nno newline'; exit 7",
        &[],
        &seen,
    )
    .await;
    assert_eq!(out.status, Some(7));
    assert_eq!(out.stdout, "one\ntwo\nno newline\n");
    assert_eq!(out.stderr, "oops\n");
    let seen = seen.lock().unwrap().clone();
    let lines = |stream: &str| -> Vec<String> {
        seen.iter()
            .filter(|(s, _)| s == stream)
            .map(|(_, l)| l.clone())
            .collect()
    };
    assert_eq!(lines("stdout"), ["one", "two", "no newline"]);
    assert_eq!(lines("stderr"), ["oops"]);

    // The same session serves many commands; stdin is closed; output written after the exit
    // status (by a process the script left behind, holding stdout) is still collected.
    let out = run(&*t, "cat; echo done", &[], &Seen::default()).await;
    assert_eq!((out.status, out.stdout.as_str()), (Some(0), "done\n"));
    let out = run(
        &*t,
        "echo early; (sleep 0.3; echo late; echo late-err >&2) & exit 3",
        &[],
        &Seen::default(),
    )
    .await;
    assert_eq!(out.status, Some(3));
    assert_eq!(out.stdout, "early\nlate\n");
    assert_eq!(out.stderr, "late-err\n");
    let big = run(&*t, "seq 1 20000", &[], &Seen::default()).await;
    assert_eq!(big.stdout.lines().count(), 20000);
    assert_eq!(big.stdout.lines().last(), Some("20000"));
    let killed = run(&*t, "kill -TERM $$", &[], &Seen::default()).await;
    assert_eq!(killed.status, None);
    assert!(killed.stderr.contains("TERM"), "{killed:?}");
    // Statuses above 128 that no killing signal gives are passed on as they are (147 would
    // be SIGSTOP's, 255 is ssh's own failure).
    for code in [147, 200, 255] {
        let out = run(&*t, &format!("exit {code}"), &[], &Seen::default()).await;
        assert_eq!((out.status, out.stderr.as_str()), (Some(code), ""));
    }
}

/// A command whose call is dropped (its agent lost the lease, or gave up waiting) is killed on
/// the host, with what it started, whether the connection lives on or is closed with it. (The
/// connection closing alone, as when the agent process dies, ends the script's input the same
/// way on the host; it is not isolated here: in process, the dropped call closes its channel
/// first.)
#[tokio::test]
async fn a_dropped_command_is_killed_on_the_host() {
    use crate::harness::DEADLINE;
    use crate::harness::{processes_with, sleep_marker, wait_until, wait_until_none_with};
    let f = Fixture::new();
    for drop_connection in [false, true] {
        let t = f.connect().await;
        // (found by their command lines: pids written inside the sshd's PID namespace would
        // name other processes out here)
        let (background, foreground) = (sleep_marker(), sleep_marker());
        let script = format!("sleep {background} & sleep {foreground}; wait");
        let seen = Seen::default();
        let log = |s: &str, l: &str| seen.lock().unwrap().push((s.into(), l.into()));
        let exec = t.exec(&script, &[], &log);
        tokio::select! {
            out = exec => panic!("the command ended: {out:?}"),
            _ = wait_until(DEADLINE, || async {
                // (the sleeps themselves: their command lines are `sleep\0<marker>`)
                processes_with(&format!("sleep\0{background}")).len() == 1
                    && processes_with(&format!("sleep\0{foreground}")).len() == 1
            }) => {}
        }
        if drop_connection {
            drop(t);
        } else {
            let out = run(&*t, "echo still here", &[], &Seen::default()).await;
            assert_eq!(out.stdout, "still here\n");
        }
        // the sleeps, and the shells whose scripts name them
        wait_until_none_with(&background).await;
        wait_until_none_with(&foreground).await;
    }
}

#[tokio::test]
async fn env_values_arrive_verbatim_and_nothing_in_them_runs() {
    let f = Fixture::new();
    let t = f.connect().await;
    let pwned = f.dir.path().join("pwned");
    let p = pwned.display();
    let values = [
        "it's a 'quoted' \"value\"".to_string(),
        format!("$(touch {p}) ${{HOME}} $HOME"),
        format!("`touch {p}`; touch {p} && echo hi"),
        format!("line one\nline two\n'; touch {p}; echo '\n"),
        "\\ \\' \\\\ * ? [a] ~ # ! % & | < > { }".to_string(),
        String::new(),
        "tab\there\r\n".to_string(),
        "ünïcödé ✓".to_string(),
    ];
    let out_file = f.dir.path().join("value");
    for v in &values {
        let out = run(
            &*t,
            r#"printf '%s' "$FERRY_VALUE" > "$FERRY_OUT""#,
            &[
                ("FERRY_VALUE", v),
                ("FERRY_OUT", &out_file.display().to_string()),
            ],
            &Seen::default(),
        )
        .await;
        assert!(out.success(), "{out:?}");
        assert_eq!(&std::fs::read_to_string(&out_file).unwrap(), v);
    }
    assert!(!pwned.exists(), "a value was executed");

    // Names are ferry's own constants: anything else is refused before reaching the host.
    let env = vec![("FERRY_X; touch /tmp/x".to_string(), "v".to_string())];
    let err = t.exec("true", &env, &|_, _| {}).await.unwrap_err();
    assert!(err
        .to_string()
        .contains("invalid environment variable name"));
    assert!(err.to_string().contains(&f.sshd.target()), "{err}");
}

#[tokio::test]
async fn upload_streams_a_file_and_replaces_the_target() {
    let f = Fixture::new();
    let t = f.connect().await;
    let local = f.dir.path().join("artifact.bin");
    // 6 MiB + a bit of pseudo-random bytes.
    let mut data = Vec::with_capacity(6 * 1024 * 1024 + 123);
    let mut x: u64 = 0x9e3779b97f4a7c15;
    while data.len() < 6 * 1024 * 1024 + 123 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    data.truncate(6 * 1024 * 1024 + 123);
    std::fs::write(&local, &data).unwrap();
    let remote_dir = f.dir.path().join("remote");
    std::fs::create_dir(&remote_dir).unwrap();
    let remote = remote_dir.join("artifact.tar.gz");
    std::fs::write(&remote, b"an older, different file").unwrap();
    let remote_str = remote.display().to_string();

    t.upload(&local, &remote_str).await.expect("upload");
    let got = std::fs::read(&remote).unwrap();
    assert_eq!(got.len(), data.len());
    assert_eq!(sha2::Sha256::digest(&got), sha2::Sha256::digest(&data));
    assert!(!remote_dir.join("artifact.tar.gz.part").exists());

    // The host computes the same checksum.
    let out = run(
        &*t,
        r#"sha256sum "$FERRY_FILE" | cut -d' ' -f1"#,
        &[("FERRY_FILE", &remote_str)],
        &Seen::default(),
    )
    .await;
    assert_eq!(out.stdout.trim(), hex(&sha2::Sha256::digest(&data)));

    // Failures name the host.
    let err = t
        .upload(
            &local,
            &format!("{}/missing/dir/file", remote_dir.display()),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, transport::Error::Io { .. }), "{err}");
    assert!(err.to_string().contains(&f.sshd.target()), "{err}");
}

#[tokio::test]
async fn an_unknown_host_key_is_refused_in_strict_mode() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    let other = Sshd::start();
    sshd::known_hosts(&kh, &[&other]); // knows another host, not this one
    let before = std::fs::read_to_string(&kh).unwrap();
    let err = connector(&kh, HostKeyPolicy::Strict)
        .connect(&sshd.target())
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, transport::Error::HostKey { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&sshd.target()), "{msg}");
    assert!(msg.contains(&sshd.fingerprint()), "{msg}");
    assert!(msg.starts_with("host key of"), "{msg}");
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), before);

    // No known_hosts file at all: refused too, and none is created.
    let missing = dir.path().join("none");
    let err = connector(&missing, HostKeyPolicy::Strict)
        .connect(&sshd.target())
        .await
        .err()
        .expect("refused");
    assert!(matches!(err, transport::Error::HostKey { .. }), "{err}");
    assert!(!missing.exists());
}

#[tokio::test]
async fn a_changed_host_key_is_refused_under_every_policy() {
    let sshd = Sshd::start();
    let impostor = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    // known_hosts records another key for this server's [host]:port.
    std::fs::write(
        &kh,
        format!(
            "# a comment\n{}\n[127.0.0.1]:{} {}\n",
            impostor.known_hosts_line(),
            sshd.port(),
            impostor.host_key()
        ),
    )
    .unwrap();
    let before = std::fs::read_to_string(&kh).unwrap();
    let pins = Arc::new(Mutex::new(Vec::<String>::new()));
    for policy in [HostKeyPolicy::Strict, HostKeyPolicy::AcceptNew] {
        let p = pins.clone();
        let ssh = connector(&kh, policy).on_pin(move |h, _| p.lock().unwrap().push(h.into()));
        let err = ssh.connect(&sshd.target()).await.err().expect("refused");
        assert!(matches!(err, transport::Error::HostKey { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(&sshd.target()), "{msg}");
        assert!(msg.contains(&sshd.fingerprint()), "{msg}");
        assert!(msg.contains("CHANGED"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
    }
    assert!(pins.lock().unwrap().is_empty());
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), before);
}

#[tokio::test]
async fn accept_new_pins_an_unknown_key_and_later_connections_use_it() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    let pins = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let p = pins.clone();
    let ssh = connector(&kh, HostKeyPolicy::AcceptNew)
        .on_pin(move |h, fp| p.lock().unwrap().push((h.into(), fp.into())));
    let t = ssh.connect(&sshd.target()).await.expect("pinned");
    let out = t.exec("echo ok", &[], &|_, _| {}).await.unwrap();
    assert_eq!(out.stdout, "ok\n");
    assert_eq!(*pins.lock().unwrap(), [(sshd.target(), sshd.fingerprint())]);
    let text = std::fs::read_to_string(&kh).unwrap();
    assert_eq!(text.lines().collect::<Vec<_>>(), [sshd.known_hosts_line()]);

    // Later connections — even strict ones — accept the pinned key, and nothing is pinned again.
    ssh.connect(&sshd.target())
        .await
        .expect("pinned key accepted");
    connector(&kh, HostKeyPolicy::Strict)
        .connect(&sshd.target())
        .await
        .expect("strict accepts the pinned key");
    assert_eq!(pins.lock().unwrap().len(), 1);
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), text);

    // OpenSSH itself accepts the pinned entry.
    let status = std::process::Command::new("ssh-keygen")
        .args(["-F", &format!("[127.0.0.1]:{}", sshd.port()), "-f"])
        .arg(&kh)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// An entry ferry cannot check a key against (here a wildcard pattern that covers the host)
/// means the operator said something about the host: accept-new does not pin past it.
#[tokio::test]
async fn accept_new_does_not_pin_past_an_entry_it_cannot_evaluate() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    let line = "[127.0.0.*]:* ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl";
    std::fs::write(&kh, format!("{line}\n")).unwrap();
    let err = connector(&kh, HostKeyPolicy::AcceptNew)
        .connect(&sshd.target())
        .await
        .err()
        .expect("refused");
    let message = err.to_string();
    assert!(
        message.contains("line 1: the wildcard pattern [127.0.0.*]:*")
            && message.contains("not pinned under accept-new"),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), format!("{line}\n"));
}

#[tokio::test]
async fn hashed_known_hosts_entries_are_understood() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    sshd::known_hosts(&kh, &[&sshd]);
    let status = std::process::Command::new("ssh-keygen")
        .args(["-q", "-H", "-f"])
        .arg(&kh)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let text = std::fs::read_to_string(&kh).unwrap();
    assert!(text.starts_with("|1|"), "{text}");
    connector(&kh, HostKeyPolicy::Strict)
        .connect(&sshd.target())
        .await
        .expect("hashed entry matches");
}

#[tokio::test]
async fn a_refused_or_silent_host_fails_to_connect_in_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let ssh = connector(&dir.path().join("known_hosts"), HostKeyPolicy::Strict)
        .connect_timeout(Duration::from_secs(2));

    let closed = format!("root@127.0.0.1:{}", sshd::free_port());
    let start = Instant::now();
    let err = ssh.connect(&closed).await.err().expect("refused");
    assert!(matches!(err, transport::Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains(&closed), "{err}");
    assert!(start.elapsed() < Duration::from_secs(2));

    // A port that accepts TCP but never speaks SSH: the connect timeout ends it.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = format!("root@127.0.0.1:{}", silent.local_addr().unwrap().port());
    let start = Instant::now();
    let err = ssh.connect(&target).await.err().expect("timed out");
    assert!(matches!(err, transport::Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(5));

    // Not an ssh target at all.
    let err = ssh.connect("no-user-here").await.err().expect("invalid");
    assert!(matches!(err, transport::Error::Connect { .. }), "{err}");
}

#[tokio::test]
async fn a_server_that_refuses_the_key_fails_to_connect() {
    let sshd = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    sshd::known_hosts(&kh, &[&sshd]);
    let stranger = sshd::keygen(dir.path(), "stranger");
    let ssh = SshConnector::new(&stranger, &kh, HostKeyPolicy::Strict).unwrap();
    let err = ssh.connect(&sshd.target()).await.err().expect("refused");
    assert!(matches!(err, transport::Error::Connect { .. }), "{err}");
    assert!(err.to_string().contains("refused the key"), "{err}");

    let missing = SshConnector::new(dir.path().join("nope"), &kh, HostKeyPolicy::Strict);
    assert!(missing.unwrap_err().contains("cannot load ssh key"));
}

// ---------------------------------------------------------------------------------------------
// A whole deploy

#[derive(Default)]
struct Recorder {
    events: Mutex<Vec<String>>,
}

#[async_trait]
impl Progress for Recorder {
    async fn host_started(&self, host: &str) -> Result<(), String> {
        self.events.lock().unwrap().push(format!("{host} started"));
        Ok(())
    }
    async fn checkpoint(&self, host: &str, phase: Phase) -> Result<(), String> {
        let e = format!("{host} {}", phase.as_str());
        self.events.lock().unwrap().push(e);
        Ok(())
    }
    async fn host_finished(&self, r: &HostReport) -> Result<(), String> {
        let e = format!("{} finished ok={}", r.host, r.ok);
        self.events.lock().unwrap().push(e);
        Ok(())
    }
    async fn host_key_pinned(&self, key: &PinnedKey) -> Result<(), String> {
        let e = format!("{} pinned {}", key.host, key.fingerprint);
        self.events.lock().unwrap().push(e);
        Ok(())
    }
    fn log(&self, _host: &str, _stream: &str, _line: &str) {}
}

impl Recorder {
    fn count(&self, suffix: &str) -> usize {
        let events = self.events.lock().unwrap();
        events.iter().filter(|e| e.ends_with(suffix)).count()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A small release archive with `app.sh`.
fn artifact(dir: &Path) -> (PathBuf, String) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("app.sh"), "echo v1\n").unwrap();
    let path = dir.join("app.tar.gz");
    let file = std::fs::File::create(&path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all(".", &src).unwrap();
    tar.into_inner().unwrap().finish().unwrap();
    let sum = hex(&sha2::Sha256::digest(std::fs::read(&path).unwrap()));
    (path, sum)
}

#[tokio::test]
async fn a_release_deploys_to_real_sshd_hosts_and_a_rerun_uploads_nothing() {
    let servers = [Sshd::start(), Sshd::start(), Sshd::start()];
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    sshd::known_hosts(&kh, &servers.iter().collect::<Vec<_>>());
    let hosts = Hosts::new(Some(connector(&kh, HostKeyPolicy::Strict)));
    let path = dir.path().join("srv/app");
    let spec = DeploySpec {
        environment: "production".into(),
        hosts: servers.iter().map(Sshd::target).collect(),
        path: path.display().to_string(),
        // Which server ran this session: the last field of $SSH_CONNECTION is its port.
        after_switch: vec![r#"echo "${SSH_CONNECTION##* } $(sh app.sh)" >> ../../sessions"#.into()],
        health_check: Some("test -f app.sh".into()),
        max_parallel: 1,
        keep_releases: 5,
        health_check_retries: 1,
        health_check_interval_ms: 10,
        ..Default::default()
    };
    let (art, sum) = artifact(dir.path());
    let release = |token| Release {
        project: "group/app",
        tag: "v1",
        sha: "0123456789abcdef0123456789abcdef01234567",
        job: JobId::new(),
        attempt: 1,
        token: FencingToken(token),
        artifact: &art,
        sha256: &sum,
    };

    let progress = Recorder::default();
    let out = deploy::deploy(&spec, &release(10), &hosts, &BTreeSet::new(), &progress)
        .await
        .unwrap();
    assert!(out.failed().is_empty(), "{out:?}");
    assert_eq!(out.hosts.len(), 3);
    assert_eq!(
        std::fs::read_link(path.join("current")).unwrap(),
        Path::new("releases/v1-0123456")
    );
    // The shared filesystem: the first host uploaded, the others found the release there.
    assert_eq!(progress.count(" uploaded"), 1);
    assert_eq!(progress.count(" healthy"), 3);
    assert_eq!(
        out.hosts.iter().map(|h| h.reused).collect::<Vec<_>>(),
        [false, true, true]
    );
    let sessions = std::fs::read_to_string(path.join("sessions")).unwrap();
    let expected: Vec<String> = servers.iter().map(|s| format!("{} v1", s.port())).collect();
    assert_eq!(sessions.lines().collect::<Vec<_>>(), expected);

    // The same release again: nothing is uploaded, every host switches and restarts again.
    let progress = Recorder::default();
    let out = deploy::deploy(&spec, &release(11), &hosts, &BTreeSet::new(), &progress)
        .await
        .unwrap();
    assert!(out.hosts.iter().all(|h| h.ok && h.reused), "{out:?}");
    assert_eq!(progress.count(" uploaded"), 0);
    assert_eq!(progress.count(" restarted"), 3);
    let sessions = std::fs::read_to_string(path.join("sessions")).unwrap();
    assert_eq!(sessions.lines().count(), 6);

    // `local` still goes through the local transport.
    let t = hosts.connect("local").await.unwrap();
    assert_eq!(t.host(), "local");
}

/// Over SSH, the host's own `timeout` stops a command that runs past `command_timeout` (the
/// agent gives up a little later, and its agent may be frozen with the connection open), with everything it started (here a background
/// `sleep` the command waits for), and the host fails with `timeout`'s status.
#[tokio::test]
async fn a_command_past_command_timeout_is_stopped_on_the_ssh_host() {
    let server = Sshd::start();
    let dir = tempfile::tempdir().unwrap();
    let kh = dir.path().join("known_hosts");
    sshd::known_hosts(&kh, &[&server]);
    let hosts = Hosts::new(Some(connector(&kh, HostKeyPolicy::Strict)));
    // (found by its command line: a pid written inside the sshd's PID namespace would name
    // another process out here)
    let marker = crate::harness::sleep_marker();
    let spec = DeploySpec {
        environment: "production".into(),
        hosts: vec![server.target()],
        path: dir.path().join("srv/app").display().to_string(),
        after_switch: vec![format!("sleep {marker} & wait")],
        keep_releases: 5,
        rollback_on_failure: false,
        command_timeout_secs: 1,
        ..Default::default()
    };
    let (art, sum) = artifact(dir.path());
    let release = Release {
        project: "group/app",
        tag: "v1",
        sha: "0123456789abcdef0123456789abcdef01234567",
        job: JobId::new(),
        attempt: 1,
        token: FencingToken(1),
        artifact: &art,
        sha256: &sum,
    };
    let out = deploy::deploy(
        &spec,
        &release,
        &hosts,
        &BTreeSet::new(),
        &Recorder::default(),
    )
    .await
    .unwrap();
    let error = out.failed()[0].error.clone().unwrap();
    assert!(error.contains("exited with status 124"), "{error}");
    crate::harness::wait_until_none_with(&marker).await;
}
