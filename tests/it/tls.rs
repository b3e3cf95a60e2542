//! `rediss://`: a real redis-server speaking only TLS, with a certificate from a test CA made by
//! `openssl`. ferry connects when told the CA (`store_ca_file`), and refuses a server whose
//! certificate it cannot verify. The same for a master behind a TLS Sentinel
//! (`rediss+sentinel://`) and for a TLS Redis Cluster (`rediss+cluster://`).

use crate::harness::{free_port, serve_on_free_port, wait_for, DEADLINE, GUARD};
use ferry::store::redis::RedisStore;
use ferry::store::{Append, EventLog, StreamId};
use ferry_proto::{Event, WebhookReceived};
use std::path::Path;
use std::process::{Child, Command, Stdio};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (is it installed?)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.crt`), and a server certificate for 127.0.0.1 signed by it (`srv.crt`, `srv.key`),
/// written into `dir`.
pub(crate) fn certificates(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=ferry test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "srv.key",
        "-out",
        "srv.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    openssl(dir, &csr);
    std::fs::write(dir.join("ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.crt",
            "-days",
            "2",
            "-extfile",
            "ext",
        ],
    );
}

struct TlsRedis {
    child: Child,
    port: u16,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> TlsRedis {
    let port = free_port();
    let child = Command::new("sh")
        .arg("-c")
        .arg(GUARD)
        .args(["redis-guard", "redis-server"])
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args(["--tls-cert-file", "srv.crt", "--tls-key-file", "srv.key"])
        .args(["--tls-ca-cert-file", "ca.crt", "--tls-auth-clients", "no"])
        .args(["--save", "", "--appendonly", "no"])
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn redis-server");
    TlsRedis { child, port }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_store_works_with_its_ca_and_is_refused_without_it() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let server = start(dir.path());
    let url = format!("rediss://127.0.0.1:{}/0", server.port);
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let store = wait_for(DEADLINE, "the TLS redis-server to answer", || {
        let (url, ca) = (url.clone(), ca.clone());
        async move { RedisStore::connect_tls(&url, "tls", Some(ca)).await.ok() }
    })
    .await;
    let event = Event::WebhookReceived(WebhookReceived {
        event: "Tag Push Hook".into(),
        action: "ignored".into(),
        ..Default::default()
    });
    store
        .append(Append::new(StreamId::Webhooks, vec![event.clone()]))
        .await
        .unwrap();
    let read = store.read_stream(&StreamId::Webhooks, 0).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].decode().unwrap(), event);

    // Without the CA the certificate cannot be verified: no connection.
    let refused = RedisStore::connect(&url, "tls").await;
    assert!(refused.is_err(), "connected to a server it cannot verify");

    // The binary, with store_ca_file from the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("FERRY_STORE", &url)
        .env("FERRY_STORE_CA_FILE", dir.path().join("ca.crt"))
        .env("FERRY_NAMESPACE", "tls")
        .env("FERRY_LOG", "warn")
        .args(["replay", "--verify"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("webhooks: ignored 1"));
}

/// `redis-server` speaking only TLS on `port`, with the test certificates in `dir`.
fn tls_server(dir: &Path, port: u16) -> Command {
    // (absolute paths: the guard that runs it does not take a working directory along)
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", "0", "--tls-port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .arg("--tls-cert-file")
        .arg(dir.join("srv.crt"))
        .arg("--tls-key-file")
        .arg(dir.join("srv.key"))
        .arg("--tls-ca-cert-file")
        .arg(dir.join("ca.crt"))
        .args([
            "--tls-auth-clients",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir);
    cmd
}

/// Appends a webhook event through a store at `url` (trusting `ca`) once it answers, and
/// reads it back; then checks that without the CA the store cannot be opened.
async fn round_trip(url: &str, ca: Vec<u8>) {
    let event = Event::WebhookReceived(WebhookReceived {
        event: "Tag Push Hook".into(),
        action: "ignored".into(),
        ..Default::default()
    });
    let store = wait_for(DEADLINE * 4, "the TLS store to take an append", || {
        let (url, ca, event) = (url.to_string(), ca.clone(), event.clone());
        async move {
            let store = RedisStore::connect_tls(&url, "tls", Some(ca)).await.ok()?;
            store
                .append(Append::new(StreamId::Webhooks, vec![event]))
                .await
                .ok()?;
            Some(store)
        }
    })
    .await;
    let read = store.read_stream(&StreamId::Webhooks, 0).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].decode().unwrap(), event);
    let refused = RedisStore::connect(url, "tls").await;
    assert!(
        refused.is_err(),
        "{url}: connected to a server it cannot verify"
    );
}

struct Guarded(Vec<Child>);

impl Drop for Guarded {
    fn drop(&mut self) {
        for child in &mut self.0 {
            drop(child.stdin.take()); // the guard stops its server
            let _ = child.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_sentinel_store_reaches_its_master_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let (master, master_guard) =
        serve_on_free_port("tls-master", |port| tls_server(dir.path(), port));
    let mut guards = Guarded(vec![master_guard]);
    let (sentinel, sentinel_guard) = serve_on_free_port("tls-sentinel", |port| {
        let conf = dir.path().join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port 0\ntls-port {port}\nbind 127.0.0.1\ndir {d}\n\
                 tls-cert-file {d}/srv.crt\ntls-key-file {d}/srv.key\n\
                 tls-ca-cert-file {d}/ca.crt\ntls-auth-clients no\ntls-replication yes\n\
                 sentinel monitor tls-main 127.0.0.1 {master} 1\n",
                d = dir.path().display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new("redis-server");
        cmd.arg(&conf).arg("--sentinel");
        cmd
    });
    guards.0.push(sentinel_guard);
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    round_trip(
        &format!("rediss+sentinel://127.0.0.1:{sentinel}/tls-main"),
        ca,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_cluster_store_works_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let mut guards = Guarded(Vec::new());
    let mut ports = Vec::new();
    for i in 0..3 {
        let data = dir.path().join(format!("node{i}"));
        std::fs::create_dir_all(&data).unwrap();
        let (port, guard) = serve_on_free_port("tls-cluster-node", |port| {
            let mut cmd = tls_server(dir.path(), port);
            cmd.arg("--dir")
                .arg(&data)
                .args(["--cluster-enabled", "yes", "--tls-cluster", "yes"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")]);
            cmd
        });
        guards.0.push(guard);
        ports.push(port);
    }
    crate::failover::create_cluster(&ports, 0, Some(&dir.path().join("ca.crt")));
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    round_trip(&format!("rediss+cluster://127.0.0.1:{}", ports[0]), ca).await;
}
