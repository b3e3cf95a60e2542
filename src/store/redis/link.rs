//! The connection every normal command goes through, and where it points.
//!
//! A store is one server (`redis://`, `rediss://`), the master that a set of Redis Sentinels
//! names (`redis+sentinel://`), or a Redis Cluster (`redis+cluster://HOST:PORT[,HOST:PORT...]`,
//! some of its nodes; the cluster client learns the rest, follows the slot map and retries
//! through a failover by itself; every key of a namespace is in one slot, so all of a store's
//! traffic goes to the one shard that holds it). For one server, a [`ConnectionManager`] reconnects to
//! the same address after a restart. Behind Sentinels the master can move: after a failover the
//! old address refuses connections, or answers as a replica that refuses every write
//! (`READONLY`). Such an error makes the link ask the Sentinels for the master again, in the
//! background, and switch every later command to it. The failing command itself returns its
//! error at once: callers already treat [`Error::Unavailable`](crate::store::Error) as
//! "retry with backoff", and a command is never sent twice by the link (an append that might
//! have landed is the caller's to re-check, as with any lost connection).
//!
//! URL: `redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]`, with
//! `?sentinel_password=...` (and `sentinel_username`) when the Sentinels require their own
//! credentials. The user and password before `@` are the data nodes' (master and replicas).
//! The port defaults to 26379, Sentinel's.

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
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tracing::{info, warn};

/// The schemes of a store given by its Sentinels: plain, and TLS to the Sentinels and the
/// data nodes.
pub const SENTINEL_SCHEMES: [&str; 2] = ["redis+sentinel://", "rediss+sentinel://"];
/// The schemes of a store on a Redis Cluster: plain, and TLS.
pub const CLUSTER_SCHEMES: [&str; 2] = ["redis+cluster://", "rediss+cluster://"];

/// The multi-node scheme `url` starts with, if any.
pub fn multi_node_scheme(url: &str) -> Option<&'static str> {
    SENTINEL_SCHEMES
        .into_iter()
        .chain(CLUSTER_SCHEMES)
        .find(|s| url.starts_with(s))
}

/// Whether `url` names a store by several nodes (Sentinels or cluster nodes), whose authority a
/// URL parser cannot hold; `Some(Err(why))` when such a url is invalid.
pub fn check_multi_node(url: &str) -> Option<std::result::Result<(), String>> {
    let scheme = multi_node_scheme(url)?;
    Some(if SENTINEL_SCHEMES.contains(&scheme) {
        SentinelUrl::parse(url).map(|_| ())
    } else {
        ClusterUrl::parse(url).map(|_| ())
    })
}

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

/// A parsed `redis+sentinel://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelUrl {
    /// TLS to the Sentinels and to the data nodes (`rediss+sentinel://`).
    pub tls: bool,
    pub sentinels: Vec<(String, u16)>,
    pub master: String,
    pub db: i64,
    pub username: Option<String>,
    pub password: Option<String>,
    pub sentinel_username: Option<String>,
    pub sentinel_password: Option<String>,
}

impl SentinelUrl {
    /// Parses `url`; errors name what is wrong with it.
    pub fn parse(url: &str) -> std::result::Result<SentinelUrl, String> {
        let parts = Parts::split(url, SENTINEL_SCHEMES, "sentinel", 26379)?;
        let mut path = parts.path.split('/');
        let master = path.next().unwrap_or("");
        if master.is_empty() {
            return Err(format!(
                "name the master the Sentinels monitor: {}HOST:PORT[,HOST:PORT...]/MASTER[/DB]",
                SENTINEL_SCHEMES[0]
            ));
        }
        let master = decode("master name", master)?;
        let db = match path.next() {
            None | Some("") => 0,
            Some(db) => db
                .parse::<i64>()
                .ok()
                .filter(|d| *d >= 0)
                .ok_or_else(|| format!("database {db:?} is not a number"))?,
        };
        if let Some(extra) = path.find(|p| !p.is_empty()) {
            return Err(format!(
                "unexpected {extra:?} after the master name and database"
            ));
        }
        let (mut sentinel_username, mut sentinel_password) = (None, None);
        for pair in parts.query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sentinel_username" => sentinel_username = Some(decode(key, value)?),
                "sentinel_password" => sentinel_password = Some(decode(key, value)?),
                _ => {
                    return Err(format!(
                        "unknown parameter {key:?} (known: sentinel_username, sentinel_password)"
                    ))
                }
            }
        }
        Ok(SentinelUrl {
            tls: parts.tls,
            sentinels: parts.nodes,
            master,
            db,
            username: parts.username,
            password: parts.password,
            sentinel_username,
            sentinel_password,
        })
    }

    fn client(&self, ca: Option<&[u8]>) -> std::result::Result<SentinelClient, RedisError> {
        let addrs = self.sentinels.iter().map(|(host, port)| match self.tls {
            true => ConnectionAddr::TcpTls {
                host: host.clone(),
                port: *port,
                insecure: false,
                tls_params: None,
            },
            false => ConnectionAddr::Tcp(host.clone(), *port),
        });
        let mut b = SentinelClientBuilder::new(addrs, &self.master, SentinelServerType::Master)?
            .set_client_to_redis_db(self.db);
        if self.tls {
            b = b
                .set_client_to_sentinel_tls_mode(TlsMode::Secure)
                .set_client_to_redis_tls_mode(TlsMode::Secure);
            if let Some(ca) = ca {
                b = b
                    .set_client_to_sentinel_certificates(certificates(ca))
                    .set_client_to_redis_certificates(certificates(ca));
            }
        }
        if let Some(u) = &self.username {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = &self.password {
            b = b.set_client_to_redis_password(p);
        }
        if let Some(u) = &self.sentinel_username {
            b = b.set_client_to_sentinel_username(u);
        }
        if let Some(p) = &self.sentinel_password {
            b = b.set_client_to_sentinel_password(p);
        }
        b.build()
    }
}

/// A parsed `redis+cluster://` URL: some of the cluster's nodes (the client learns the rest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterUrl {
    /// TLS to every node (`rediss+cluster://`).
    pub tls: bool,
    pub nodes: Vec<(String, u16)>,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl ClusterUrl {
    /// Parses `url`; errors name what is wrong with it.
    pub fn parse(url: &str) -> std::result::Result<ClusterUrl, String> {
        let parts = Parts::split(url, CLUSTER_SCHEMES, "cluster node", 6379)?;
        if !parts.path.is_empty() {
            return Err(format!(
                "a cluster has no databases or names: {}HOST:PORT[,HOST:PORT...], got path {:?}",
                CLUSTER_SCHEMES[0], parts.path
            ));
        }
        if !parts.query.is_empty() {
            return Err(format!("unknown parameters {:?}", parts.query));
        }
        Ok(ClusterUrl {
            tls: parts.tls,
            nodes: parts.nodes,
            username: parts.username,
            password: parts.password,
        })
    }

    fn clients(
        &self,
        ca: Option<&[u8]>,
    ) -> std::result::Result<(ClusterClient, ClusterClient), RedisError> {
        let scheme = if self.tls { "rediss" } else { "redis" };
        let builder = || {
            let nodes = self
                .nodes
                .iter()
                .map(|(host, port)| format!("{scheme}://{host}:{port}/"));
            let mut b = ClusterClient::builder(nodes).connection_timeout(CONNECT_TIMEOUT);
            if self.tls {
                b = b.tls(TlsMode::Secure);
                if let Some(ca) = ca {
                    b = b.certs(certificates(ca));
                }
            }
            if let Some(u) = &self.username {
                b = b.username(u);
            }
            if let Some(p) = &self.password {
                b = b.password(p);
            }
            b
        };
        // Normal commands are bounded like a single server's (a failover inside the cluster
        // is retried within the overall bound); blocking ones by their caller.
        let normal = builder()
            .response_timeout(RESPONSE_TIMEOUT)
            .overall_response_timeout(Some(RESPONSE_TIMEOUT * 2))
            .build()?;
        Ok((normal, builder().build()?))
    }
}

/// What the multi-node URLs share: `SCHEME[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]`, then
/// an optional path after `/` and query after `?`.
struct Parts<'a> {
    tls: bool,
    nodes: Vec<(String, u16)>,
    username: Option<String>,
    password: Option<String>,
    path: &'a str,
    query: &'a str,
}

impl<'a> Parts<'a> {
    /// `schemes`: the plain one, then the TLS one.
    fn split(
        url: &'a str,
        schemes: [&str; 2],
        node: &str,
        default_port: u16,
    ) -> std::result::Result<Parts<'a>, String> {
        let (tls, rest) = match (url.strip_prefix(schemes[0]), url.strip_prefix(schemes[1])) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => {
                return Err(format!(
                    "the url does not start with {}",
                    schemes.join(" or ")
                ))
            }
        };
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (mut username, mut password) = (None, None);
        if let Some(info) = userinfo {
            let (user, pass) = match info.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (info, None),
            };
            if !user.is_empty() {
                username = Some(decode("user name", user)?);
            }
            if let Some(p) = pass {
                password = Some(decode("password", p)?);
            }
        }
        let mut nodes = Vec::new();
        for host in hosts.split(',') {
            nodes.push(parse_host(host, node, default_port)?);
        }
        Ok(Parts {
            tls,
            nodes,
            username,
            password,
            path,
            query,
        })
    }
}

/// `host[:port]` or `[v6]:port`.
fn parse_host(
    text: &str,
    node: &str,
    default_port: u16,
) -> std::result::Result<(String, u16), String> {
    let bad = || format!("{node} address {text:?} is not HOST[:PORT]");
    if text.is_empty() {
        return Err(format!("a {node} address is empty (check the commas)"));
    }
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        (host, after.strip_prefix(':'))
    } else {
        match text.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err(bad());
    }
    let port = match port {
        None => default_port,
        Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(bad)?,
    };
    Ok((host.to_string(), port))
}

fn decode(what: &str, s: &str) -> std::result::Result<String, String> {
    percent_decode(s).ok_or_else(|| format!("the {what} is not valid percent-encoding"))
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
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
            let sentinels = parsed.client(ca).map_err(|e| invalid(e.to_string()))?;
            return Ok(Target::Sentinel {
                url: parsed,
                sentinels: Box::new(tokio::sync::Mutex::new(sentinels)),
            });
        }
        let parsed = ClusterUrl::parse(url).map_err(invalid)?;
        let (normal, blocking) = parsed.clients(ca).map_err(|e| invalid(e.to_string()))?;
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
        if let Err(e) = &r {
            self.failed(e);
        }
        r.map(Blocking::Single)
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
        for _ in 0..RESOLVE_ATTEMPTS {
            let found = {
                let mut sentinels = sentinels.lock().await;
                tokio::time::timeout(RESOLVE_TIMEOUT, master(url, &mut sentinels)).await
            };
            let client = match found {
                Ok(Ok(client)) => client,
                Ok(Err(e)) => {
                    warn!(master = %url.master, error = %e, "no master from the Sentinels yet");
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

impl ConnectionLike for Link {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let r = match self.current().0 {
                Conn::Single(mut c) => c.req_packed_command(cmd).await,
                Conn::Cluster(mut c) => c.req_packed_command(cmd).await,
            };
            if let Err(e) = &r {
                self.failed(e);
            }
            r
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
                Conn::Cluster(mut c) => c.req_packed_commands(pipeline, offset, count).await,
            };
            if let Err(e) = &r {
                self.failed(e);
            }
            r
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sentinel_url_names_its_sentinels_master_database_and_credentials() {
        let u = SentinelUrl::parse(
            "redis+sentinel://ferry:p%40ss@10.0.0.1:26380,sentinel-b,[::1]:5000/ferry-main/2?sentinel_password=s3",
        )
        .unwrap();
        assert_eq!(
            u.sentinels,
            [
                ("10.0.0.1".to_string(), 26380),
                ("sentinel-b".to_string(), 26379),
                ("::1".to_string(), 5000)
            ]
        );
        assert_eq!(u.master, "ferry-main");
        assert_eq!(u.db, 2);
        assert_eq!(u.username.as_deref(), Some("ferry"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.sentinel_password.as_deref(), Some("s3"));
        assert_eq!(u.sentinel_username, None);
        let plain = SentinelUrl::parse("redis+sentinel://h/m").unwrap();
        assert!(!plain.tls);
        assert!(SentinelUrl::parse("rediss+sentinel://h/m").unwrap().tls);
        assert_eq!((plain.db, plain.password), (0, None));
    }

    #[test]
    fn a_cluster_url_names_some_nodes_and_the_credentials() {
        let u = ClusterUrl::parse("redis+cluster://app:pw@n1:7000,n2,[::1]:7002/").unwrap();
        assert_eq!(
            u.nodes,
            [
                ("n1".to_string(), 7000),
                ("n2".to_string(), 6379),
                ("::1".to_string(), 7002)
            ]
        );
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref()),
            (Some("app"), Some("pw"))
        );
        for (url, says) in [
            ("redis+cluster://n1:7000/0", "no databases"),
            ("redis+cluster://n1:7000?x=1", "unknown parameters"),
            ("redis+cluster://n1:7000,", "empty"),
            ("redis+cluster://n1:99999", "is not HOST[:PORT]"),
        ] {
            let e = ClusterUrl::parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
        assert!(!u.tls && ClusterUrl::parse("rediss+cluster://n1").unwrap().tls);
        assert!(check_multi_node("redis://h:6379/0").is_none());
        assert_eq!(check_multi_node("redis+cluster://n1"), Some(Ok(())));
    }

    #[test]
    fn a_bad_sentinel_url_says_what_is_wrong() {
        for (url, says) in [
            ("redis+sentinel://h:26379", "name the master"),
            ("redis+sentinel://h:26379/", "name the master"),
            ("redis+sentinel://h:x/m", "is not HOST[:PORT]"),
            ("redis+sentinel://h:0/m", "is not HOST[:PORT]"),
            ("redis+sentinel://a,,b/m", "empty"),
            ("redis+sentinel:///m", "empty"),
            ("redis+sentinel://h/m/x", "not a number"),
            ("redis+sentinel://h/m/1/z", "unexpected"),
            ("redis+sentinel://h/m?password=x", "unknown parameter"),
            ("redis+sentinel://:%zz@h/m", "percent-encoding"),
        ] {
            let e = SentinelUrl::parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}
