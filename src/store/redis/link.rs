//! The connection every normal command goes through, and where it points.
//!
//! A store is one server (`redis://`, `rediss://`), the master a set of Redis Sentinels names
//! (`redis+sentinel://`), or a Redis Cluster (`redis+cluster://`); see [`super::urls`] for
//! the URLs. For one server, a [`ConnectionManager`] reconnects to the same address after a
//! restart. Behind Sentinels the master can move: after a failover the old address refuses
//! connections, or answers as a replica that refuses every write (`READONLY`). Such an error
//! makes the link ask the Sentinels for the master again, in the background, and switch every
//! later command to it. The failing command itself returns its error at once: callers already
//! treat [`Error::Unavailable`] as "retry with backoff", and a command is never sent twice by
//! the link (an append that might have landed is the caller's to re-check, as with any lost
//! connection). A cluster client learns the other nodes and follows the slot map; the link
//! sends a command again only on a reply that proves it did not run (MOVED, TRYAGAIN,
//! CLUSTERDOWN, ...), never after a dropped connection or a timeout. Every key of a namespace
//! is in one slot, so all of a store's traffic goes to the shard that holds it.

use super::urls::{multi_node_scheme, ClusterUrl, SentinelUrl, SENTINEL_SCHEMES};
use super::{CONNECT_TIMEOUT, RESPONSE_TIMEOUT};
use crate::store::{Error, Result};
use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, Pipeline, RedisError, RedisFuture,
    TlsCertificates, TlsMode, Value,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;
use tracing::{debug, info, warn};

/// Trust for a TLS store: the PEM certificates `ca` when given, else the system's roots.
fn certificates(ca: &[u8]) -> TlsCertificates {
    TlsCertificates {
        client_tls: None,
        root_cert: Some(ca.to_vec()),
    }
}

/// How long one attempt to learn the master from the Sentinels may take.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between attempts while no Sentinel names a reachable master (a failover in progress).
const RESOLVE_PAUSE: Duration = Duration::from_millis(200);
/// Attempts of one background resolution before it gives up (the next failing command starts
/// another).
const RESOLVE_ATTEMPTS: u32 = 150;

/// A client that asks `url`'s Sentinels for the master (over TLS with `rediss+sentinel://`,
/// trusting `ca` when given).
fn sentinel_client(
    url: &SentinelUrl,
    ca: Option<&[u8]>,
) -> std::result::Result<SentinelClient, RedisError> {
    let addrs = url.sentinels.iter().map(|(host, port)| match url.tls {
        true => ConnectionAddr::TcpTls {
            host: host.clone(),
            port: *port,
            insecure: false,
            tls_params: None,
        },
        false => ConnectionAddr::Tcp(host.clone(), *port),
    });
    let mut b = SentinelClientBuilder::new(addrs, &url.master, SentinelServerType::Master)?
        .set_client_to_redis_db(url.db);
    if url.tls {
        b = b
            .set_client_to_sentinel_tls_mode(TlsMode::Secure)
            .set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(ca) = ca {
            b = b
                .set_client_to_sentinel_certificates(certificates(ca))
                .set_client_to_redis_certificates(certificates(ca));
        }
    }
    if let Some(u) = &url.username {
        b = b.set_client_to_redis_username(u);
    }
    if let Some(p) = &url.password {
        b = b.set_client_to_redis_password(p);
    }
    if let Some(u) = &url.sentinel_username {
        b = b.set_client_to_sentinel_username(u);
    }
    if let Some(p) = &url.sentinel_password {
        b = b.set_client_to_sentinel_password(p);
    }
    b.build()
}

/// Clients for `url`'s cluster: one for normal commands, one without a response timeout for
/// blocking ones (over TLS with `rediss+cluster://`, trusting `ca` when given).
fn cluster_clients(
    url: &ClusterUrl,
    ca: Option<&[u8]>,
) -> std::result::Result<(ClusterClient, ClusterClient), RedisError> {
    let scheme = if url.tls { "rediss" } else { "redis" };
    let builder = || {
        let nodes = url
            .nodes
            .iter()
            .map(|(host, port)| format!("{scheme}://{host}:{port}/"));
        let mut b = ClusterClient::builder(nodes).connection_timeout(CONNECT_TIMEOUT);
        if url.tls {
            b = b.tls(TlsMode::Secure);
            if let Some(ca) = ca {
                b = b.certs(certificates(ca));
            }
        }
        if let Some(u) = &url.username {
            b = b.username(u);
        }
        if let Some(p) = &url.password {
            b = b.password(p);
        }
        b
    };
    // Normal commands are bounded like a single server's; blocking ones by their caller. The
    // client retries nothing by itself: it would send again a script that may have run (after
    // a dropped connection or a response timeout), and a second append, claim or release is
    // not the first one's answer. The link retries only the replies that prove the command did
    // not run (see `not_run`).
    let normal = builder()
        .response_timeout(RESPONSE_TIMEOUT)
        .overall_response_timeout(Some(RESPONSE_TIMEOUT * 2))
        .retries(0)
        .build()?;
    Ok((normal, builder().build()?))
}

/// Where the store's server is.
pub(super) enum Target {
    Server(Client),
    Sentinel {
        url: SentinelUrl,
        sentinels: Box<tokio::sync::Mutex<SentinelClient>>,
    },
    /// A Redis Cluster: the client follows slots and failovers itself. One client for normal
    /// commands, one without a response timeout for blocking ones.
    Cluster {
        normal: Box<ClusterClient>,
        blocking: Box<ClusterClient>,
    },
}

impl Target {
    /// The target of a store `url`: Sentinels for `redis+sentinel://`, a cluster for
    /// `redis+cluster://` (`rediss+…` for TLS, trusting `ca` when given), else the one server
    /// `server` names.
    pub(super) fn of(
        url: &str,
        ca: Option<&[u8]>,
        server: impl FnOnce() -> Result<Client>,
    ) -> Result<Target> {
        let invalid = |e: String| Error::Invalid(format!("redis store url is invalid: {e}"));
        let Some(scheme) = multi_node_scheme(url) else {
            return Ok(Target::Server(server()?));
        };
        if SENTINEL_SCHEMES.contains(&scheme) {
            let parsed = SentinelUrl::parse(url).map_err(invalid)?;
            let sentinels = sentinel_client(&parsed, ca).map_err(|e| invalid(e.to_string()))?;
            return Ok(Target::Sentinel {
                url: parsed,
                sentinels: Box::new(tokio::sync::Mutex::new(sentinels)),
            });
        }
        let parsed = ClusterUrl::parse(url).map_err(invalid)?;
        let (normal, blocking) =
            cluster_clients(&parsed, ca).map_err(|e| invalid(e.to_string()))?;
        Ok(Target::Cluster {
            normal: Box::new(normal),
            blocking: Box::new(blocking),
        })
    }
}

/// A connection for normal commands.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A dedicated connection for blocking commands (see `RedisStore::blocking`).
pub(super) enum Blocking {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

struct Current {
    /// The server's client (`None` for a cluster).
    client: Option<Client>,
    conn: Conn,
    generation: u64,
}

/// The link to the store's server (see the module doc). Cheap to clone.
#[derive(Clone)]
pub(super) struct Link {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    config: ConnectionManagerConfig,
    current: RwLock<Current>,
    resolving: AtomicBool,
}

impl Link {
    /// Connects to the target's server (asking the Sentinels which one is the master).
    pub(super) async fn open(target: Target, config: ConnectionManagerConfig) -> Result<Link> {
        let connect = |e| super::command_error("connect", e);
        let (client, conn) = match &target {
            Target::Cluster { normal, .. } => (
                None,
                Conn::Cluster(normal.get_async_connection().await.map_err(connect)?),
            ),
            Target::Server(client) => (
                Some(client.clone()),
                Conn::Single(manager(client, &config).await?),
            ),
            Target::Sentinel { url, sentinels } => {
                // (the switch counter shows at zero from the start, for rate() and alerts)
                LazyLock::force(&crate::metrics::STORE);
                let client = master(url, &mut *sentinels.lock().await).await?;
                let conn = Conn::Single(manager(&client, &config).await?);
                (Some(client), conn)
            }
        };
        Ok(Link {
            inner: Arc::new(Inner {
                target,
                config,
                current: RwLock::new(Current {
                    client,
                    conn,
                    generation: 0,
                }),
                resolving: AtomicBool::new(false),
            }),
        })
    }

    /// A new connection for blocking commands, to the current server.
    pub(super) async fn blocking(&self) -> std::result::Result<Blocking, RedisError> {
        let client = match &self.inner.target {
            Target::Cluster { blocking, .. } => {
                return blocking.get_async_connection().await.map(Blocking::Cluster);
            }
            _ => self.inner.current.read().expect("link lock").client.clone(),
        };
        let client = client.expect("a server or Sentinel link has a client");
        let config = AsyncConnectionConfig::new()
            .set_response_timeout(None)
            .set_connection_timeout(Some(CONNECT_TIMEOUT));
        let r = client
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        self.seen(r).map(Blocking::Single)
    }

    /// Passes `r` through, telling the link when it is an error ([`Link::failed`]).
    fn seen<T>(&self, r: std::result::Result<T, RedisError>) -> std::result::Result<T, RedisError> {
        if let Err(e) = &r {
            self.failed(e);
        }
        r
    }

    fn current(&self) -> (Conn, u64) {
        let c = self.inner.current.read().expect("link lock");
        (c.conn.clone(), c.generation)
    }

    /// Tells the link a command failed with `e`: behind Sentinels, an error that says the
    /// server is gone or no longer the master starts a background search for the master.
    pub(super) fn failed(&self, e: &RedisError) {
        if !matches!(self.inner.target, Target::Sentinel { .. }) || !moved_master(e) {
            return;
        }
        if self.inner.resolving.swap(true, Ordering::AcqRel) {
            return; // a search is already running
        }
        let link = self.clone();
        let generation = self.current().1;
        tokio::spawn(async move {
            link.follow_master(generation).await;
            link.inner.resolving.store(false, Ordering::Release);
        });
    }

    /// Asks the Sentinels for the master until one names a master that answers as one, then
    /// switches to it if it is not the server already in use.
    async fn follow_master(&self, generation: u64) {
        let Target::Sentinel { url, sentinels } = &self.inner.target else {
            return;
        };
        for attempt in 0..RESOLVE_ATTEMPTS {
            // (while a failover runs, the Sentinels name no reachable master for seconds: said
            // once, not every attempt)
            let level_warn = attempt == 0;
            let found = {
                let mut sentinels = sentinels.lock().await;
                tokio::time::timeout(RESOLVE_TIMEOUT, master(url, &mut sentinels)).await
            };
            let client = match found {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => {
                    if level_warn {
                        warn!(master = %url.master, error = %e, "no master from the Sentinels yet; asking again");
                    } else {
                        debug!(master = %url.master, error = %e, "no master from the Sentinels yet");
                    }
                    tokio::time::sleep(RESOLVE_PAUSE).await;
                    continue;
                }
                Err(_) => {
                    warn!(master = %url.master, "the Sentinels did not answer in time");
                    continue;
                }
            };
            let addr = client.get_connection_info().addr().to_string();
            let same = {
                let c = self.inner.current.read().expect("link lock");
                c.generation != generation
                    || c.client
                        .as_ref()
                        .is_some_and(|c| c.get_connection_info().addr().to_string() == addr)
            };
            if same {
                // The master did not move (or another search switched already): the
                // connection manager reconnects to it by itself.
                return;
            }
            match manager(&client, &self.inner.config).await {
                Ok(conn) => {
                    let mut c = self.inner.current.write().expect("link lock");
                    c.generation += 1;
                    c.client = Some(client);
                    c.conn = Conn::Single(conn);
                    crate::metrics::STORE.master_switches.inc();
                    info!(master = %url.master, %addr, "following the master the Sentinels name");
                    return;
                }
                Err(e) => {
                    warn!(master = %url.master, %addr, error = %e, "cannot connect to the new master yet");
                    tokio::time::sleep(RESOLVE_PAUSE).await;
                }
            }
        }
        warn!(master = %url.master, "gave up looking for the master; the next failing command looks again");
    }
}

async fn manager(client: &Client, config: &ConnectionManagerConfig) -> Result<ConnectionManager> {
    ConnectionManager::new_with_config(client.clone(), config.clone())
        .await
        .map_err(|e| super::command_error("connect", e))
}

/// The master the Sentinels name, checked to answer as the master.
async fn master(url: &SentinelUrl, sentinels: &mut SentinelClient) -> Result<Client> {
    sentinels.async_get_client().await.map_err(|e| {
        Error::Unavailable(format!(
            "no Sentinel of {:?} names a reachable master {:?}: {e}",
            url.sentinels
                .iter()
                .map(|(h, p)| format!("{h}:{p}"))
                .collect::<Vec<_>>(),
            url.master
        ))
    })
}

/// Whether `e` says the server is unreachable or is not the master any more.
fn moved_master(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.kind(),
            ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
        )
}

/// A cluster's reply that proves the command was not run (a slot that moved or is moving,
/// a cluster or master that is down, a replica, a server loading its data): the link sends it
/// again, after the client learned the new slot map, within [`CLUSTER_RETRY`].
fn not_run(e: &RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind as S};
    matches!(
        e.kind(),
        ErrorKind::Server(
            S::Moved
                | S::Ask
                | S::TryAgain
                | S::ClusterDown
                | S::MasterDown
                | S::ReadOnly
                | S::BusyLoading
        )
    )
}

/// How long the link keeps sending a cluster command whose replies say it was not run.
const CLUSTER_RETRY: Duration = Duration::from_secs(10);

/// Sends a cluster command until it runs, or fails in a way that may mean it ran.
async fn cluster_retrying<T, F, Fut>(mut send: F) -> std::result::Result<T, RedisError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, RedisError>>,
{
    let give_up = tokio::time::Instant::now() + CLUSTER_RETRY;
    let mut pause = Duration::from_millis(20);
    loop {
        match send().await {
            Err(e) if not_run(&e) && tokio::time::Instant::now() + pause < give_up => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = match self.current().0 {
                Conn::Single(mut c) => c.req_packed_command(cmd).await,
                Conn::Cluster(c) => {
                    cluster_retrying(|| {
                        let mut c = c.clone();
                        async move { c.req_packed_command(cmd).await }
                    })
                    .await
                }
            };
            self.seen(r)
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let r = match self.current().0 {
                Conn::Single(mut c) => c.req_packed_commands(pipeline, offset, count).await,
                Conn::Cluster(c) => {
                    cluster_retrying(|| {
                        let mut c = c.clone();
                        async move { c.req_packed_commands(pipeline, offset, count).await }
                    })
                    .await
                }
            };
            self.seen(r)
        })
    }

    fn get_db(&self) -> i64 {
        match self.current().0 {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl ConnectionLike for Blocking {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Blocking::Single(c) => c.req_packed_command(cmd),
            Blocking::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Blocking::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Blocking::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Blocking::Single(c) => c.get_db(),
            Blocking::Cluster(c) => c.get_db(),
        }
    }
}
