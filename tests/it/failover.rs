//! What the failover tests share (`sentinel.rs`, `cluster.rs`, `tls.rs`): raw commands to one
//! server by port, SIGKILL of a server, a cluster's creation, and submitting and watching jobs
//! while the store may be failing over.

use ferry::domain::{JobPhase, JobState};
use ferry::store::{Append, Error, Store, StreamId};
use ferry_proto::{Event, JobId};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::harness::{wait_until, DEADLINE};

/// The real `ferry coordinator` (sweeping every 200 ms) and `ferry agent` (`a1`) on the store
/// at `url`, in namespace `ns`; killed when dropped.
pub fn roles(url: &str, ns: &str) -> [crate::cli::Proc; 2] {
    let coordinator = crate::cli::ferry(url, ns)
        .env("FERRY_COORDINATOR_SWEEP_INTERVAL", "200ms")
        .arg("coordinator")
        .spawn()
        .unwrap();
    let agent = crate::cli::ferry(url, ns)
        .env("FERRY_AGENT_NAME", "a1")
        .arg("agent")
        .spawn()
        .unwrap();
    [crate::cli::Proc(coordinator), crate::cli::Proc(agent)]
}

/// One command to the plain-TCP server on loopback `port`.
pub fn query<T: redis::FromRedisValue>(port: u16, cmd: &redis::Cmd) -> redis::RedisResult<T> {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}/"))?;
    let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
    cmd.query(&mut conn)
}

/// SIGKILLs the server on `port` (the server itself, by the pid `INFO server` names, not its
/// guard).
pub fn kill9(port: u16) {
    let info: String = query(port, redis::cmd("INFO").arg("server")).unwrap();
    let pid = info
        .lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .expect("INFO server names the process id")
        .trim()
        .to_string();
    let status = Command::new("kill").args(["-9", &pid]).status().unwrap();
    assert!(status.success(), "kill -9 {pid}");
}

/// Joins cluster-enabled servers on `ports` into a cluster with `replicas` replicas per master
/// (`redis-cli --cluster create`), over TLS trusting `ca` when given.
pub fn create_cluster(ports: &[u16], replicas: u32, ca: Option<&Path>) {
    let mut cmd = Command::new("redis-cli");
    if let Some(ca) = ca {
        cmd.args(["--tls", "--cacert"]).arg(ca);
    }
    let out = cmd
        .args(["--cluster", "create"])
        .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
        .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
        .output()
        .expect("run redis-cli --cluster create");
    assert!(
        out.status.success(),
        "redis-cli --cluster create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The job's phase, or `None` while the store cannot be read (a failover in progress).
pub async fn phase(store: &dyn Store, job: JobId) -> Option<JobPhase> {
    let mut state = JobState::new(job);
    for s in store.read_stream(&StreamId::Job(job), 0).await.ok()? {
        state.evolve(&s.decode().unwrap(), s.envelope.at_ms);
    }
    Some(state.phase)
}

/// Appends a one-step no-op job, retrying while the store is unavailable; a conflict means an
/// earlier attempt landed.
pub async fn submit(store: &dyn Store) -> JobId {
    let job = JobId::new();
    let created: Event =
        ferry::store::conformance::noop_job(job, "v1", "default", &["build"]).into();
    wait_until(DEADLINE * 4, || async {
        match store
            .append(Append::new(StreamId::Job(job), vec![created.clone()]).expect(0))
            .await
        {
            Ok(_) | Err(Error::Conflict { .. }) => true,
            Err(_) => false,
        }
    })
    .await;
    job
}

/// Asserts the history holds exactly one `StepSucceeded`.
pub fn succeeded_once(events: &[Event]) {
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::StepSucceeded(_)))
            .count(),
        1,
        "{events:#?}"
    );
}
