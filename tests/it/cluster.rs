//! A store on a Redis Cluster (three masters, each with a replica): the real `ferry`
//! coordinator and agent, given `redis+cluster://`, run jobs, and carry on without a restart
//! when the master holding the namespace's slot is killed with SIGKILL and its replica takes
//! over. The store's size is read from that master.

use crate::failover::{create_cluster, kill9, phase, query, roles, submit, succeeded_once};
use crate::harness::{self, serve_on_free_port, wait_until, DEADLINE};
use ferry::store::redis::RedisStore;
use ferry::store::{Capacity, Store};
use std::process::{Child, Command};
use std::sync::Arc;

/// Six cluster-enabled servers on free loopback ports, joined as three masters with one
/// replica each; stopped when dropped.
struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<(u16, Child)>,
}

impl Cluster {
    fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..6 {
            let data = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&data).unwrap();
            nodes.push(serve_on_free_port("redis-cluster-node", |port| {
                let mut cmd = Command::new("redis-server");
                cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .arg("--dir")
                    .arg(&data)
                    .args(["--save", "", "--appendonly", "no"])
                    .args(["--cluster-enabled", "yes"])
                    .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                    .args(["--cluster-node-timeout", "1000"]);
                cmd
            }));
        }
        let ports: Vec<u16> = nodes.iter().map(|(p, _)| *p).collect();
        create_cluster(&ports, 1, None);
        Cluster { _dir: dir, nodes }
    }

    fn url(&self) -> String {
        format!("redis+cluster://127.0.0.1:{}", self.nodes[0].0)
    }

    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes.iter().map(|(p, _)| *p)
    }

    /// Waits until every node sees a healthy cluster with all six nodes.
    async fn wait_ok(&self, skip: Option<u16>) {
        wait_until(DEADLINE * 4, || async {
            self.ports().filter(|p| Some(*p) != skip).all(|p| {
                query::<String>(p, redis::cmd("CLUSTER").arg("INFO"))
                    .is_ok_and(|info| info.contains("cluster_state:ok"))
            })
        })
        .await;
    }

    /// The nodes serving `key`'s slot now, as ports: its master first, then its replicas
    /// (those that have joined).
    fn nodes_of(&self, key: &str) -> Option<Vec<u16>> {
        let any = self
            .ports()
            .find(|p| query::<String>(*p, &redis::cmd("PING")).is_ok())?;
        let slot: i64 = query(any, redis::cmd("CLUSTER").arg("KEYSLOT").arg(key)).ok()?;
        // CLUSTER SLOTS: [[start, end, [ip, port, id, ...], [ip, port, id, ...]...], ...]
        let slots: Vec<Vec<redis::Value>> = query(any, redis::cmd("CLUSTER").arg("SLOTS")).ok()?;
        let range = slots.into_iter().find(|r| {
            let n = |i: usize| {
                r.get(i)
                    .and_then(|v| redis::from_redis_value::<i64>(v.clone()).ok())
            };
            n(0).is_some_and(|start| start <= slot) && n(1).is_some_and(|end| slot <= end)
        })?;
        range[2..]
            .iter()
            .map(|node| {
                let node: Vec<redis::Value> = redis::from_redis_value(node.clone()).ok()?;
                let port: i64 = redis::from_redis_value(node.get(1)?.clone()).ok()?;
                Some(port as u16)
            })
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            drop(child.stdin.take()); // the guard stops its server
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_and_agent_run_on_a_cluster_and_survive_its_failover() {
    let cluster = Cluster::start();
    cluster.wait_ok(None).await;
    let (url, ns) = (cluster.url(), harness::namespace());
    let redis = RedisStore::connect(&url, &ns).await.unwrap();
    // The store's size comes from the master of the namespace's slot: the only node with a
    // maxmemory here.
    let owner = cluster.nodes_of(&format!("{{{ns}}}:log")).unwrap()[0];
    let _: () = query(
        owner,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("maxmemory")
            .arg("512mb"),
    )
    .unwrap();
    let usage = redis.usage().await.unwrap();
    assert_eq!(usage.limit_bytes, Some(512 << 20), "{usage:?}");
    let store: Arc<dyn Store> = Arc::new(redis);
    let _roles = roles(&url, &ns);

    let before = submit(&*store).await;
    succeeded_once(&harness::job_succeeded(&*store, before, DEADLINE).await);

    // The namespace is one slot: kill the master serving it, once its replica has everything.
    let slot = format!("{{{ns}}}");
    wait_until(DEADLINE * 4, || async {
        cluster.nodes_of(&slot).is_some_and(|n| n.len() == 2)
    })
    .await;
    let nodes = cluster.nodes_of(&slot).unwrap();
    let (master, replica) = (nodes[0], nodes[1]);
    let synced: i64 = query(master, redis::cmd("WAIT").arg(1).arg(5000)).unwrap();
    assert_eq!(synced, 1, "the replica acknowledged every write");
    kill9(master);
    wait_until(DEADLINE * 4, || async {
        cluster.nodes_of(&slot).and_then(|n| n.first().copied()) == Some(replica)
    })
    .await;
    cluster.wait_ok(Some(master)).await;

    // Neither process was restarted.
    let after = submit(&*store).await;
    wait_until(DEADLINE * 4, || async {
        phase(&*store, after).await.is_some_and(|p| p.is_terminal())
    })
    .await;
    succeeded_once(&harness::job_succeeded(&*store, after, DEADLINE).await);
    succeeded_once(&harness::job_succeeded(&*store, before, DEADLINE).await);
}
