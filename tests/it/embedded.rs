//! The embedded store with the real binary: `ferry demo` (and `--keep`), `ferry up` on the
//! default store surviving `kill -9` with webhooks in flight, and a corrupt database refused at
//! start.

use crate::cli::Proc;
use crate::harness::{git, wait_for, wait_until, DEADLINE};
use ferry::domain::{JobPhase, JobState};
use ferry::store::sqlite::SqliteStore;
use ferry::store::{EventLog, Order, StreamId};
use ferry_proto::Event;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

fn ferry(cwd: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(cwd);
    cmd
}

/// Collects a child's stdout lines as they come.
fn lines(child: &mut std::process::Child) -> Arc<Mutex<Vec<String>>> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let stdout = child.stdout.take().unwrap();
    let sink = out.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    out
}

fn after(lines: &[String], prefix: &str) -> Option<String> {
    lines
        .iter()
        .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_builds_and_deploys_a_sample_tag_end_to_end() {
    let cwd = tempfile::tempdir().unwrap();
    let dir = cwd.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || ferry(&dir).arg("demo").output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("job ") && l.contains(" succeeded in ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("build: compiling bundle"),
        "the log tail: {stdout}"
    );
    assert!(stdout.contains("deploy:demo      succeeded"), "{stdout}");
    let sha = after(&lines, "sha256:").expect("the artifact's checksum");
    assert_eq!(sha.len(), 64, "{sha}");
    // Everything is under ./.ferry, and the release is live.
    let target = after(&lines, "deploy target").expect("the deploy target");
    assert!(target.starts_with(&cwd.path().join(".ferry").display().to_string()));
    let current = std::fs::read_link(Path::new(&target).join("current")).unwrap();
    assert!(
        current.to_string_lossy().starts_with("releases/v1.0.0-"),
        "{current:?}"
    );
    let html = std::fs::read_to_string(Path::new(&target).join("current/dist/index.html")).unwrap();
    assert!(html.contains("demo app v1.0.0"), "{html}");
    let store = after(&lines, "embedded store").expect("the store's path");
    assert!(Path::new(&store).is_file());
    // The store holds the whole history: it replays and verifies.
    let dir = cwd.path().to_path_buf();
    let replay = tokio::task::spawn_blocking(move || {
        ferry(&dir)
            .args(["--store", &store, "replay", "--verify"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_keep_leaves_the_gateway_running_for_your_own_webhooks() {
    let cwd = tempfile::tempdir().unwrap();
    let mut child = ferry(cwd.path())
        .args(["demo", "--keep"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = lines(&mut child);
    let proc = Proc(child);
    wait_until(DEADLINE * 4, || async {
        out.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("ferry keeps running"))
    })
    .await;
    let text = out.lock().unwrap().join("\n");
    // The curl line names the gateway, the hook token and the payload file.
    let curl = text
        .lines()
        .skip_while(|l| !l.contains("curl -sS"))
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    let url = curl
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("the gateway url");
    let token = curl
        .split("X-Gitlab-Token: ")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .expect("the hook token");
    let payload = curl
        .split("--data @")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .expect("the payload file");
    let body = std::fs::read(payload).unwrap();
    let res = reqwest::Client::new()
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Gitlab-Event", "Tag Push Hook")
        .header("X-Gitlab-Token", token)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "the same push again is a duplicate");
    let answer: serde_json::Value = res.json().await.unwrap();
    assert_eq!(answer["duplicate"], true, "{answer}");
    // SIGTERM stops it cleanly.
    unsafe { libc::kill(proc.0.id() as i32, libc::SIGTERM) };
    let child = Arc::new(Mutex::new(proc));
    let status = wait_for(DEADLINE * 2, "the demo to exit", || {
        let child = child.clone();
        async move { child.lock().unwrap().0.try_wait().unwrap() }
    })
    .await;
    assert!(status.success(), "{status:?}");
}

/// `ferry up` with no store configured runs on `<data_dir>/ferry.db` (`./.ferry` by default).
/// Webhooks are sent while it is killed with SIGKILL and started again; GitLab resends what was
/// not acknowledged. Every accepted webhook becomes exactly one job, and the build that was
/// running when it died is reclaimed and finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_on_the_embedded_store_survives_kill_9_with_webhooks_in_flight() {
    let cwd = tempfile::tempdir().unwrap();
    let repo = cwd.path().join("repo");
    std::fs::create_dir_all(&repo).unwrap();
    // The build of the first tag waits at a gate until ferry has been killed once.
    std::fs::write(
        repo.join("build.sh"),
        "#!/bin/sh\nset -eu\nif [ \"$FERRY_TAG\" = t00 ]; then\n  touch \"$MARKS/started\"\n  while [ ! -f \"$MARKS/gate\" ]; do sleep 0.05; done\nfi\nmkdir -p dist && echo \"$FERRY_TAG\" > dist/tag\n",
    )
    .unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["add", "."]);
    git(&repo, &["commit", "-q", "-m", "app"]);
    const TAGS: usize = 12;
    for i in 0..TAGS {
        git(&repo, &["tag", &format!("t{i:02}")]);
    }
    let sha = git(&repo, &["rev-parse", "HEAD"]);
    let marks = cwd.path().join("marks");
    std::fs::create_dir_all(&marks).unwrap();
    let port = crate::sshd::free_port();
    std::fs::write(
        cwd.path().join("ferry.toml"),
        format!(
            r#"
[gateway]
listen = "127.0.0.1:{port}"
[coordinator]
lease_ttl = "2s"
sweep_interval = "200ms"
[agent]
concurrency = 4
[[projects]]
id = 5
path = "group/app"
webhook_token = "hook"
clone_url = "file://{repo}"
[projects.build]
commands = ["sh build.sh"]
artifacts = ["dist/"]
timeout = "2m"
env = {{ MARKS = "{marks}" }}
"#,
            repo = repo.display(),
            marks = marks.display(),
        ),
    )
    .unwrap();
    let up = || {
        let mut child = ferry(cwd.path())
            .args(["--config", "ferry.toml", "up"])
            .env("FERRY_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = lines(&mut child);
        (Proc(child), out)
    };
    let body = |tag: &str| {
        serde_json::json!({
            "object_kind": "tag_push",
            "before": "0".repeat(40),
            "after": sha,
            "checkout_sha": sha,
            "ref": format!("refs/tags/{tag}"),
            "project_id": 5,
            "project": {"id": 5, "path_with_namespace": "group/app"},
        })
    };
    let http = reqwest::Client::new();
    let send = |tag: String| {
        let (http, body) = (http.clone(), body(&tag));
        async move {
            http.post(format!("http://127.0.0.1:{port}/hooks/gitlab"))
                .header("X-Gitlab-Event", "Tag Push Hook")
                .header("X-Gitlab-Token", "hook")
                .header("Idempotency-Key", format!("delivery-{tag}"))
                .json(&body)
                .timeout(std::time::Duration::from_secs(5))
                .send()
                .await
                .ok()
                .map(|r| r.status().as_u16())
        }
    };

    let (mut first, out) = up();
    wait_until(DEADLINE, || async {
        out.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("API token") && l.contains("generated"))
    })
    .await;
    assert!(out
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains(&format!("listening on http://127.0.0.1:{port}"))));
    // t00 first, and wait until its build runs; then the rest, with the kill in the middle.
    assert_eq!(send("t00".into()).await, Some(202));
    wait_until(DEADLINE * 3, || async { marks.join("started").exists() }).await;
    let mut answers: BTreeMap<String, Option<u16>> = BTreeMap::new();
    let in_flight: Vec<_> = (1..TAGS)
        .map(|i| tokio::spawn(send(format!("t{i:02}"))))
        .collect();
    first.kill9();
    for (i, task) in in_flight.into_iter().enumerate() {
        answers.insert(format!("t{:02}", i + 1), task.await.unwrap());
    }
    std::fs::write(marks.join("gate"), "").unwrap();

    // Started again on the same file; GitLab resends every delivery it has no 2xx for.
    let (_second, _) = up();
    for i in 0..TAGS {
        let tag = format!("t{i:02}");
        if answers
            .get(&tag)
            .copied()
            .flatten()
            .is_some_and(|s| s < 300)
        {
            continue;
        }
        let status = wait_for(DEADLINE, "the restarted gateway to answer", || {
            send(tag.clone())
        })
        .await;
        assert!(status == 202 || status == 200, "{tag}: {status}");
    }
    // Read the store (the running process shares the file).
    let store = SqliteStore::open(&cwd.path().join(".ferry/ferry.db")).unwrap();
    let jobs = wait_for(DEADLINE * 6, "every job to end", || async {
        let ids = store.jobs(None, 100, Order::Oldest).await.unwrap();
        let mut states = Vec::new();
        for id in ids {
            let mut state = JobState::new(id);
            for s in store.read_stream(&StreamId::Job(id), 0).await.unwrap() {
                state.evolve(&s.decode().unwrap(), s.envelope.at_ms);
            }
            if !state.phase.is_terminal() {
                return None;
            }
            states.push(state);
        }
        (states.len() >= TAGS).then_some(states)
    })
    .await;
    let mut per_tag: BTreeMap<String, usize> = BTreeMap::new();
    for j in &jobs {
        assert_eq!(j.phase, JobPhase::Succeeded, "{:?}", j);
        *per_tag
            .entry(j.plan.as_ref().unwrap().tag.clone())
            .or_default() += 1;
    }
    let expected: BTreeMap<String, usize> = (0..TAGS).map(|i| (format!("t{i:02}"), 1)).collect();
    assert_eq!(per_tag, expected, "exactly one job per accepted webhook");
    // t00's build was running when ferry died: its lease expired and it ran again.
    let t00 = jobs
        .iter()
        .find(|j| j.plan.as_ref().unwrap().tag == "t00")
        .unwrap();
    let events: Vec<Event> = store
        .read_stream(&StreamId::Job(t00.id), 0)
        .await
        .unwrap()
        .iter()
        .map(|s| s.decode().unwrap())
        .collect();
    assert!(
        events.iter().any(|e| matches!(e, Event::LeaseExpired(_))),
        "{events:#?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::StepSucceeded(_)))
            .count(),
        1
    );
    // One port shows every role's metrics under `ferry up`.
    let metrics = http
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for family in [
        "ferry_webhooks_received_total",
        "ferry_coordinator_decisions_total",
        "ferry_agent_steps_total",
        "ferry_logs_expired_total",
    ] {
        assert!(metrics.contains(family), "{family} missing:\n{metrics}");
    }
    assert!(
        metrics
            .lines()
            .filter_map(
                |l| l.strip_prefix(r#"ferry_agent_steps_total{kind="build",outcome="succeeded"} "#)
            )
            .any(|v| v.parse::<f64>().is_ok_and(|v| v >= 1.0)),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_database_stops_ferry_at_start_and_is_left_alone() {
    let cwd = tempfile::tempdir().unwrap();
    let data = cwd.path().join(".ferry");
    std::fs::create_dir_all(&data).unwrap();
    let garbage = b"not a database at all, just some bytes\n".repeat(200);
    std::fs::write(data.join("ferry.db"), &garbage).unwrap();
    let dir = cwd.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        ferry(&dir)
            .args(["up", "--listen", "127.0.0.1:0"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ferry.db"), "names the file: {err}");
    assert!(err.contains("not a SQLite database"), "{err}");
    assert_eq!(std::fs::read(data.join("ferry.db")).unwrap(), garbage);
}
