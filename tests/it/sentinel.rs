//! A store behind Redis Sentinel: the real `ferry` coordinator and agent, given the Sentinels'
//! `redis+sentinel://` URL, carry on without a restart when the master is killed with SIGKILL
//! and Sentinel promotes its replica.

use crate::failover::{kill9, phase, query, roles, submit, succeeded_once};
use crate::harness::{self, serve_on_free_port, wait_until, DEADLINE};
use ferry::domain::JobPhase;
use ferry::store::redis::RedisStore;
use ferry::store::Store;
use std::process::{Child, Command};
use std::sync::Arc;

const MASTER: &str = "ferry-main";

/// A master, its replica and one Sentinel watching them (quorum 1, down after 1 s), each on a
/// free loopback port, stopped when dropped.
struct SentinelSet {
    _dir: tempfile::TempDir,
    master: (u16, Child),
    replica: (u16, Child),
    sentinel: (u16, Child),
}

fn redis_server(dir: &std::path::Path, port: u16) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .arg("--dir")
        .arg(dir)
        .args(["--save", "", "--appendonly", "no"]);
    cmd
}

impl SentinelSet {
    fn start() -> SentinelSet {
        let dir = tempfile::tempdir().unwrap();
        let data = |name: &str| {
            let d = dir.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        let (master_dir, replica_dir) = (data("master"), data("replica"));
        let master = serve_on_free_port("redis-master", |port| redis_server(&master_dir, port));
        let master_port = master.0;
        let replica = serve_on_free_port("redis-replica", |port| {
            let mut cmd = redis_server(&replica_dir, port);
            cmd.args(["--replicaof", "127.0.0.1", &master_port.to_string()]);
            cmd
        });
        let sentinel_dir = data("sentinel");
        let sentinel = serve_on_free_port("redis-sentinel", |port| {
            // Sentinel rewrites its configuration file, so each gets its own.
            let conf = sentinel_dir.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     sentinel monitor {MASTER} 127.0.0.1 {master_port} 1\n\
                     sentinel down-after-milliseconds {MASTER} 1000\n\
                     sentinel failover-timeout {MASTER} 5000\n",
                    sentinel_dir.display()
                ),
            )
            .unwrap();
            let mut cmd = Command::new("redis-server");
            cmd.arg(&conf).arg("--sentinel");
            cmd
        });
        SentinelSet {
            _dir: dir,
            master,
            replica,
            sentinel,
        }
    }

    fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/{MASTER}", self.sentinel.0)
    }

    /// Waits until the replica has caught up with the master and the Sentinel knows it.
    async fn wait_ready(&self) {
        wait_until(DEADLINE * 2, || async {
            let replicas: Vec<Vec<String>> = query(
                self.sentinel.0,
                redis::cmd("SENTINEL").arg("REPLICAS").arg(MASTER),
            )
            .unwrap_or_default();
            let known = replicas.iter().any(|fields| {
                fields
                    .windows(2)
                    .any(|w| w[0] == "flags" && w[1] == "slave")
                    && fields
                        .windows(2)
                        .any(|w| w[0] == "master-link-status" && w[1] == "ok")
            });
            known && self.synced()
        })
        .await;
    }

    /// Whether every write the master took is on the replica (`WAIT 1`).
    fn synced(&self) -> bool {
        query::<i64>(self.master.0, redis::cmd("WAIT").arg(1).arg(5000)).ok() == Some(1)
    }

    /// Whether the former replica now answers as the master.
    fn replica_promoted(&self) -> bool {
        role(self.replica.0).as_deref() == Some("master")
    }

    /// Whether the former master now answers as a replica.
    fn master_demoted(&self) -> bool {
        role(self.master.0).as_deref() == Some("slave")
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for (_, child) in [&mut self.sentinel, &mut self.replica, &mut self.master] {
            drop(child.stdin.take()); // the guard stops its server
            let _ = child.wait();
        }
    }
}

/// What the server on `port` says it is (`ROLE`): "master", "slave" or "sentinel".
fn role(port: u16) -> Option<String> {
    let role: Vec<redis::Value> = query(port, &redis::cmd("ROLE")).ok()?;
    redis::from_redis_value(role.first()?.clone()).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_agent_follow_the_master_across_a_sentinel_failover() {
    let set = SentinelSet::start();
    set.wait_ready().await;
    let (url, ns) = (set.url(), harness::namespace());
    let store: Arc<dyn Store> = Arc::new(RedisStore::connect(&url, &ns).await.unwrap());
    let _roles = roles(&url, &ns);

    let before = submit(&*store).await;
    harness::job_succeeded(&*store, before, DEADLINE).await;
    set.wait_ready().await; // everything written so far is on the replica too

    kill9(set.master.0);
    wait_until(DEADLINE * 4, || async { set.replica_promoted() }).await;

    // Neither process was restarted: both found the new master through the Sentinel.
    let after = submit(&*store).await;
    assert!(
        ferry::metrics::STORE.master_switches.get() >= 1,
        "this process's store counted its switch"
    );
    wait_until(DEADLINE * 4, || async {
        phase(&*store, after).await.is_some_and(|p| p.is_terminal())
    })
    .await;
    succeeded_once(&harness::job_succeeded(&*store, after, DEADLINE).await);
    // The history written before the failover is intact on the new master.
    succeeded_once(&harness::job_succeeded(&*store, before, DEADLINE).await);
}

/// A switchover (`SENTINEL FAILOVER`) leaves the old master running as a replica at the same
/// address: the store's reconnected connection there meets `READONLY`, and the store follows
/// the new master. (Until Sentinel has demoted the old master, that one still takes writes,
/// which the demotion then throws away: Redis's own window, which `min-replicas-to-write`
/// narrows; the test appends after the demotion.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_follows_a_switchover_to_the_replica() {
    let set = SentinelSet::start();
    set.wait_ready().await;
    let ns = harness::namespace();
    let store = RedisStore::connect(&set.url(), &ns).await.unwrap();
    let before = submit(&store).await;
    set.wait_ready().await;

    let _: () = query(
        set.sentinel.0,
        redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER),
    )
    .unwrap();
    wait_until(DEADLINE * 4, || async {
        set.replica_promoted() && set.master_demoted()
    })
    .await;

    let after = submit(&store).await;
    let key = format!("{{{ns}}}:s:job:{after}");
    let on_new_master: bool = query(set.replica.0, redis::cmd("EXISTS").arg(&key)).unwrap();
    assert!(on_new_master, "{key} was written to the new master");
    for job in [before, after] {
        assert_eq!(phase(&store, job).await, Some(JobPhase::Queued), "{job}");
    }
}
