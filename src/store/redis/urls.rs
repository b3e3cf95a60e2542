//! Store URLs that name several nodes: `redis+sentinel://` (the Sentinels of a master) and
//! `redis+cluster://` (some nodes of a Redis Cluster), and their TLS forms `rediss+…`. A URL's
//! authority holds one host, so these are parsed here rather than by a URL parser.
//!
//! - `redis+sentinel://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]/MASTER[/DB]`, with
//!   `?sentinel_password=...` (and `sentinel_username`) when the Sentinels require their own
//!   credentials; the user and password before `@` are the data nodes' (master and replicas).
//!   The port defaults to 26379, Sentinel's.
//! - `redis+cluster://[[USER]:PASSWORD@]HOST[:PORT][,HOST[:PORT]...]`; the port defaults to
//!   6379.

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
pub fn check_multi_node(url: &str) -> Option<Result<(), String>> {
    let scheme = multi_node_scheme(url)?;
    Some(if SENTINEL_SCHEMES.contains(&scheme) {
        SentinelUrl::parse(url).map(|_| ())
    } else {
        ClusterUrl::parse(url).map(|_| ())
    })
}

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
    pub fn parse(url: &str) -> Result<SentinelUrl, String> {
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
    pub fn parse(url: &str) -> Result<ClusterUrl, String> {
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
    ) -> Result<Parts<'a>, String> {
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

/// A store URL without its passwords (`user:password@` and `*password=` query parameters), for
/// messages; read as text, so that a URL too broken to parse is redacted too. The user part ends
/// at the last `@` (a password may hold `/`, `?` or `@` unencoded).
pub fn redact(url: &str) -> String {
    let Some(end) = multi_node_scheme(url)
        .map(str::len)
        .or_else(|| url.find("://").map(|i| i + 3))
    else {
        return url.to_string();
    };
    // SCHEME[user:password@]hosts[/path][?query], with `*_password=` parameters
    let mut out = url[..end].to_string();
    let mut rest = &url[end..];
    if let Some((info, after)) = rest.rsplit_once('@') {
        if let Some((user, _)) = info.split_once(':') {
            out.push_str(&format!("{user}:***@"));
            rest = after;
        }
    }
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    out.push_str(rest);
    if let Some(query) = query {
        let pairs: Vec<String> = query
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.ends_with("password") => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// `host[:port]` or `[v6]:port`.
fn parse_host(text: &str, node: &str, default_port: u16) -> Result<(String, u16), String> {
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

fn decode(what: &str, s: &str) -> Result<String, String> {
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
