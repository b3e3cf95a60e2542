//! Settings: defaults, then the TOML file, then `FERRY_*` environment variables, then flags,
//! validated once into a typed [`Config`].
//!
//! The module owns two layers. The raw layer (`raw.rs`) is what the file says, every field
//! optional. [`load`] applies the environment and the flags on top of it, remembering where each
//! value came from, then validates everything in one pass, so that every error names the key and
//! the place the bad value came from (`/etc/ferry.toml: coordinator.lease_ttl: ...`,
//! `environment FERRY_AGENT_CONCURRENCY: ...`, `flag --listen: ...`).
//!
//! Secrets named by `*_env` keys are read from the environment here, once, into [`Secret`], whose
//! `Debug` and `Display` print `***`. The `secrets` of a project are only names: the agent resolves
//! them where it runs the step, so they never pass through the config or the log.

mod raw;
#[cfg(test)]
mod tests;

use crate::store::redis::urls::redact;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

pub use url::Url;

use raw::{RawAgent, RawConfig, RawCoordinator, RawEnvironment, RawGateway, RawProject};

/// Names of the environment variables ferry reads, in one place.
///
/// Every scalar setting outside `[[projects]]` has one. Lists (`FERRY_AGENT_POOLS`,
/// `FERRY_AGENT_LABELS`) are comma-separated. An empty variable counts as unset.
pub mod env {
    /// Path of the TOML file (the `--config` flag).
    pub const CONFIG: &str = "FERRY_CONFIG";
    /// `store`
    pub const STORE: &str = "FERRY_STORE";
    /// `store_ca_file`
    pub const STORE_CA_FILE: &str = "FERRY_STORE_CA_FILE";
    /// `namespace`
    pub const NAMESPACE: &str = "FERRY_NAMESPACE";
    /// `data_dir`
    pub const DATA_DIR: &str = "FERRY_DATA_DIR";
    /// `gateway.listen`
    pub const GATEWAY_LISTEN: &str = "FERRY_GATEWAY_LISTEN";
    /// `gateway.public_url`
    pub const GATEWAY_PUBLIC_URL: &str = "FERRY_GATEWAY_PUBLIC_URL";
    /// `gateway.max_body_bytes`
    pub const GATEWAY_MAX_BODY_BYTES: &str = "FERRY_GATEWAY_MAX_BODY_BYTES";
    /// `gateway.dedupe_window`
    pub const GATEWAY_DEDUPE_WINDOW: &str = "FERRY_GATEWAY_DEDUPE_WINDOW";
    /// Default for `api.tokens_env`: the comma-separated bearer tokens the API accepts.
    pub const API_TOKENS: &str = "FERRY_API_TOKENS";
    /// `coordinator.lease_ttl`
    pub const COORDINATOR_LEASE_TTL: &str = "FERRY_COORDINATOR_LEASE_TTL";
    /// `coordinator.max_attempts`
    pub const COORDINATOR_MAX_ATTEMPTS: &str = "FERRY_COORDINATOR_MAX_ATTEMPTS";
    /// `coordinator.sweep_interval`
    pub const COORDINATOR_SWEEP_INTERVAL: &str = "FERRY_COORDINATOR_SWEEP_INTERVAL";
    /// `coordinator.keep_logs`
    pub const COORDINATOR_KEEP_LOGS: &str = "FERRY_COORDINATOR_KEEP_LOGS";
    /// `coordinator.keep_feed`
    pub const COORDINATOR_KEEP_FEED: &str = "FERRY_COORDINATOR_KEEP_FEED";
    /// `coordinator.retry_base`
    pub const COORDINATOR_RETRY_BASE: &str = "FERRY_COORDINATOR_RETRY_BASE";
    /// `coordinator.retry_max`
    pub const COORDINATOR_RETRY_MAX: &str = "FERRY_COORDINATOR_RETRY_MAX";
    /// `agent.name`
    pub const AGENT_NAME: &str = "FERRY_AGENT_NAME";
    /// `agent.pools`, comma-separated
    pub const AGENT_POOLS: &str = "FERRY_AGENT_POOLS";
    /// `agent.labels`, comma-separated
    pub const AGENT_LABELS: &str = "FERRY_AGENT_LABELS";
    /// `agent.concurrency`
    pub const AGENT_CONCURRENCY: &str = "FERRY_AGENT_CONCURRENCY";
    /// `agent.shutdown_grace`
    pub const AGENT_SHUTDOWN_GRACE: &str = "FERRY_AGENT_SHUTDOWN_GRACE";
    /// `agent.ssh_key`
    pub const AGENT_SSH_KEY: &str = "FERRY_AGENT_SSH_KEY";
    /// `agent.known_hosts`
    pub const AGENT_KNOWN_HOSTS: &str = "FERRY_AGENT_KNOWN_HOSTS";
    /// `agent.host_key_policy`
    pub const AGENT_HOST_KEY_POLICY: &str = "FERRY_AGENT_HOST_KEY_POLICY";
    /// `agent.git_ca_file`
    pub const AGENT_GIT_CA_FILE: &str = "FERRY_AGENT_GIT_CA_FILE";
    /// `agent.metrics_listen`
    pub const AGENT_METRICS_LISTEN: &str = "FERRY_AGENT_METRICS_LISTEN";
    /// `coordinator.metrics_listen`
    pub const COORDINATOR_METRICS_LISTEN: &str = "FERRY_COORDINATOR_METRICS_LISTEN";
    /// `artifacts.url`
    pub const ARTIFACTS_URL: &str = "FERRY_ARTIFACTS_URL";
    /// `artifacts.keep`
    pub const ARTIFACTS_KEEP: &str = "FERRY_ARTIFACTS_KEEP";
    /// `gitlab.url`
    pub const GITLAB_URL: &str = "FERRY_GITLAB_URL";
    /// `gitlab.reconcile_interval`
    pub const GITLAB_RECONCILE_INTERVAL: &str = "FERRY_GITLAB_RECONCILE_INTERVAL";
    /// `gitlab.reconcile_window`
    pub const GITLAB_RECONCILE_WINDOW: &str = "FERRY_GITLAB_RECONCILE_WINDOW";
    /// Default for `gitlab.token_env`: the GitLab API token.
    pub const GITLAB_TOKEN: &str = "FERRY_GITLAB_TOKEN";
    /// The API base URL the `ferry jobs` client talks to.
    pub const API_URL: &str = "FERRY_API_URL";
    /// The bearer token the `ferry jobs` client sends.
    pub const API_TOKEN: &str = "FERRY_API_TOKEN";
}

/// The longest duration a setting takes.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Defaults, for the docs and for the tests.
pub mod defaults {
    /// `namespace`
    pub const NAMESPACE: &str = "ferry";
    /// `data_dir`
    pub const DATA_DIR: &str = "/var/lib/ferry";
    /// `gateway.listen`
    pub const LISTEN: &str = "0.0.0.0:8080";
    /// `gateway.max_body_bytes` (5 MiB)
    pub const MAX_BODY_BYTES: u64 = 5 * 1024 * 1024;
    /// `gateway.dedupe_window`
    pub const DEDUPE_WINDOW: &str = "7d";
    /// `coordinator.lease_ttl`
    pub const LEASE_TTL: &str = "15s";
    /// `coordinator.max_attempts`
    pub const MAX_ATTEMPTS: u64 = 3;
    /// `coordinator.sweep_interval`
    pub const SWEEP_INTERVAL: &str = "1s";
    /// `coordinator.keep_logs`
    pub const KEEP_LOGS: &str = "30d";
    /// `coordinator.keep_feed`
    pub const KEEP_FEED: &str = "7d";
    /// `artifacts.keep`: artifacts are deleted only when asked to.
    pub const KEEP_ARTIFACTS: &str = "forever";
    /// `coordinator.retry_base`
    pub const RETRY_BASE: &str = "1s";
    /// `coordinator.retry_max`
    pub const RETRY_MAX: &str = "5m";
    /// `agent.pools` and `projects.build.pool`
    pub const POOL: &str = "default";
    /// `agent.concurrency`
    pub const CONCURRENCY: u64 = 2;
    /// `agent.shutdown_grace`
    pub const SHUTDOWN_GRACE: &str = "30s";
    /// `projects.build.timeout`
    pub const BUILD_TIMEOUT: &str = "30m";
    /// How far `deploy_priority` sits above `priority` when not set, so deploys sort above builds.
    pub const DEPLOY_PRIORITY_BOOST: i64 = 10;
    /// `projects.environments.keep_releases`
    pub const KEEP_RELEASES: u64 = 5;
    /// `projects.environments.health_check_retries`
    pub const HEALTH_CHECK_RETRIES: u64 = 5;
    /// `projects.environments.health_check_interval`
    pub const HEALTH_CHECK_INTERVAL: &str = "2s";
    /// `projects.environments.command_timeout`
    pub const COMMAND_TIMEOUT: &str = "10m";
}

/// A setting whose value must never be printed: `Debug` and `Display` show `***`.
///
/// There is deliberately no `PartialEq`: comparing a presented token with a secret must be done in
/// constant time by the code that checks it, on [`Secret::expose`].
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// The validated settings of one ferry process.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file the settings were read from, if any.
    pub file: Option<PathBuf>,
    /// The event store URL; `None` selects the embedded store.
    pub store: Option<String>,
    /// PEM file of the certificate authorities a TLS store's certificates (`rediss://`,
    /// `rediss+sentinel://`, `rediss+cluster://`) must chain to;
    /// `None`: the system's trust store.
    pub store_ca_file: Option<PathBuf>,
    /// Prefix (and Redis Cluster hash tag) of every key: several ferry installations can share
    /// one Redis under different namespaces.
    pub namespace: String,
    /// Agent work dirs, caches and the embedded store live here.
    pub data_dir: PathBuf,
    pub gateway: Gateway,
    pub api: Api,
    pub coordinator: Coordinator,
    pub agent: Agent,
    pub artifacts: Artifacts,
    /// `None` when `[gitlab]` is not configured: no commit statuses, no deployments.
    pub gitlab: Option<Gitlab>,
    pub projects: Vec<Project>,
}

/// `[gateway]`: the webhook receiver and the API server.
#[derive(Debug, Clone)]
pub struct Gateway {
    pub listen: SocketAddr,
    /// Base of the links sent back to GitLab (commit status `target_url`).
    pub public_url: Url,
    /// Larger bodies are answered 413.
    pub max_body_bytes: u64,
    /// How long a content key `(project, ref, before, after)` dedupes a delivery.
    pub dedupe_window: Duration,
}

/// `[api]`: who may use `/api/v1`.
#[derive(Debug, Clone)]
pub struct Api {
    /// Accepted bearer tokens. Empty: every API request is refused.
    pub tokens: Vec<Secret>,
}

/// `[coordinator]`: leases, retries and the sweep.
#[derive(Debug, Clone)]
pub struct Coordinator {
    pub lease_ttl: Duration,
    /// Attempts per step, the first one included.
    pub max_attempts: u32,
    /// How often expired leases and due retries are looked for.
    pub sweep_interval: Duration,
    /// First retry delay; doubles per attempt, with jitter.
    pub retry_base: Duration,
    /// Cap on the retry delay.
    pub retry_max: Duration,
    /// How long a job's output lines are kept after it ended; `None` ("forever"): always.
    pub keep_logs: Option<Duration>,
    /// How long the global log keeps an event every consumer group handled (the event stays
    /// in its own stream for good); `None` ("forever"): always. Redis only.
    pub keep_feed: Option<Duration>,
    /// Where `ferry coordinator` serves `/metrics` and `/healthz`; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// `[agent]`: the worker that runs builds and deploys.
#[derive(Debug, Clone)]
pub struct Agent {
    /// Unique among live agents; default `hostname-pid`.
    pub name: String,
    /// The pools this agent takes steps from.
    pub pools: Vec<String>,
    pub labels: Vec<String>,
    /// Steps run at once.
    pub concurrency: u32,
    /// On shutdown, how long running steps may finish before they are handed back.
    pub shutdown_grace: Duration,
    /// Private key for SSH deploys; `None` when the agent only deploys to `local`.
    pub ssh_key: Option<PathBuf>,
    /// OpenSSH `known_hosts` file; default `<data_dir>/known_hosts`.
    pub known_hosts: PathBuf,
    pub host_key_policy: HostKeyPolicy,
    /// PEM CA certificates trusted for `https://` clone URLs besides the system's roots.
    pub git_ca_file: Option<PathBuf>,
    /// Where `ferry agent` serves `/metrics` and `/healthz`; `None`: nowhere.
    pub metrics_listen: Option<SocketAddr>,
}

/// What to do with a host key that is not in `known_hosts`. There is no policy that ignores keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeyPolicy {
    /// Unknown or changed keys fail.
    Strict,
    /// Unknown keys are pinned on first use (and recorded); changed keys still fail.
    AcceptNew,
}

/// `[artifacts]`: where build outputs are stored.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// Default `file://<data_dir>/artifacts/`.
    pub url: Url,
    /// How long an artifact is kept after the last job that used it ended (`None`: forever,
    /// the default). Artifacts that an environment runs now or ran just before (a rollback's
    /// target) are kept whatever their age.
    pub keep: Option<Duration>,
}

/// `[gitlab]`: the API used for commit statuses, deployments and tag reconciliation.
#[derive(Debug, Clone)]
pub struct Gitlab {
    pub url: Url,
    pub token: Secret,
    /// How often tags are reconciled against GitLab's tag list; zero turns it off.
    pub reconcile_interval: Duration,
    /// How far back a tag may have been created (or its commit made) to be built when a
    /// reconciliation finds no webhook for it.
    pub reconcile_window: Duration,
}

/// One `[[projects]]` entry.
#[derive(Debug, Clone)]
pub struct Project {
    /// GitLab `project_id`; a webhook matches on it first.
    pub id: Option<u64>,
    /// `path_with_namespace`, e.g. `group/app`; a webhook matches on it when the id does not.
    pub path: String,
    /// Compared with `X-Gitlab-Token`.
    pub webhook_token: Option<Secret>,
    /// Standard Webhooks signing token (`whsec_...`), checked against `webhook-signature`.
    pub signing_token: Option<Secret>,
    /// Accept deliveries with neither token configured. Only ever set on purpose.
    pub allow_unauthenticated: bool,
    /// Default: the payload's `git_http_url`.
    pub clone_url: Option<Url>,
    pub auto_build: bool,
    pub auto_deploy: bool,
    /// Queue priority of builds; higher runs first.
    pub priority: i32,
    /// Queue priority of deploys; default `priority + 10`.
    pub deploy_priority: i32,
    pub on_tag_move: OnTagMove,
    /// Branches whose pushes are built; empty: only tags are.
    pub branches: Vec<String>,
    /// Names of environment variables the agent resolves and passes to commands.
    pub secrets: Vec<String>,
    pub build: Build,
    /// Deployed in this order.
    pub environments: Vec<Environment>,
}

/// What a tag that moves to another commit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTagMove {
    /// Record it, build nothing.
    Ignore,
    /// Build (and deploy) the new commit.
    Rebuild,
}

/// `[projects.build]`
#[derive(Debug, Clone)]
pub struct Build {
    pub pool: String,
    /// Run in order, each through the shell, in the checkout.
    pub commands: Vec<String>,
    /// Relative paths packed into the artifact.
    pub artifacts: Vec<String>,
    pub timeout: Duration,
    /// Plain (non-secret) variables for the commands.
    pub env: BTreeMap<String, String>,
}

/// One `[[projects.environments]]` entry.
#[derive(Debug, Clone)]
pub struct Environment {
    pub name: String,
    pub hosts: Vec<Host>,
    /// Absolute target directory on each host; releases live under `<path>/releases`.
    pub path: String,
    /// Pool of the agents that run this deploy; default the build pool.
    pub pool: String,
    pub before_switch: Vec<String>,
    pub after_switch: Vec<String>,
    pub health_check: Option<String>,
    /// Retries after a failed health check (so `retries + 1` attempts at most).
    pub health_check_retries: u32,
    pub health_check_interval: Duration,
    /// How long any one command on a host may run, at least 1 s.
    pub command_timeout: Duration,
    /// Hosts per batch, at least 1.
    pub max_parallel: u32,
    /// Failed hosts tolerated before no new batch starts.
    pub max_failures: u32,
    pub keep_releases: u32,
    pub rollback_on_failure: bool,
}

/// A deploy target: `user@host[:port]` (port 22 by default; IPv6 in brackets) or `local`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    /// The agent's own machine, without SSH.
    Local,
    Ssh {
        user: String,
        host: String,
        port: u16,
    },
}

/// The values given on the command line; they win over everything else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--store`
    pub store: Option<String>,
    /// `--listen` (gateway, up)
    pub listen: Option<SocketAddr>,
    /// `--name` (agent)
    pub agent_name: Option<String>,
    /// `--pools` (agent)
    pub agent_pools: Option<Vec<String>>,
    /// `--concurrency` (agent)
    pub agent_concurrency: Option<u32>,
    /// The command's own default for `data_dir` (`./.ferry` for `up` and `demo`), used when
    /// neither the file nor the environment sets it.
    pub default_data_dir: Option<PathBuf>,
}

/// Whether a store setting without a scheme names an embedded store file: it must end in `.db`,
/// `.sqlite` or `.sqlite3`, so that a mistyped server address (`localhost:6379`) is an error
/// rather than a new file.
pub fn is_store_file(text: &str) -> bool {
    !text.contains("://")
        && [".db", ".sqlite", ".sqlite3"]
            .iter()
            .any(|ext| text.len() > ext.len() && text.ends_with(ext))
}

/// A configuration that cannot be used, with the key and where its value came from.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax or type errors; `message` is toml's, with the line and column.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: unknown key {key} (expected one of: {})", path.display(), expected.join(", "))]
    UnknownKey {
        path: PathBuf,
        key: String,
        expected: &'static [&'static str],
    },
    #[error("{at}: {problem}")]
    Invalid { at: Location, problem: String },
}

/// A key and where its value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub origin: Origin,
    /// Dotted path, e.g. `projects[1].environments[0].hosts[2]`.
    pub key: String,
}

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(&'static str),
    Flag(&'static str),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::Default => write!(f, "default {}", self.key),
            Origin::File(path) => write!(f, "{}: {}", path.display(), self.key),
            Origin::Env(var) => write!(f, "environment {var}"),
            Origin::Flag(flag) => write!(f, "flag --{flag}"),
        }
    }
}

/// Reads a variable from the process environment; the `env` argument of [`load`] in `main`.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Loads the settings: defaults, then `path` (if any), then `env`, then `overrides`.
///
/// `env` looks up an environment variable; pass [`process_env`] in `main` and a map in tests.
pub fn load(
    path: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    overrides: &Overrides,
) -> Result<Config, Error> {
    match path {
        None => build(RawConfig::default(), None, env, overrides),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
                path: path.to_owned(),
                source,
            })?;
            load_str(&text, path, env, overrides)
        }
    }
}

/// [`load`] for a file already read; `path` names it in errors.
pub fn load_str(
    text: &str,
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    overrides: &Overrides,
) -> Result<Config, Error> {
    let parse_error = |e: toml::de::Error| Error::Parse {
        path: path.to_owned(),
        message: e.to_string().trim_end().to_owned(),
    };
    let doc: toml::Table = toml::from_str(text).map_err(parse_error)?;
    if let Some(unknown) = raw::find_unknown_key(&doc) {
        return Err(Error::UnknownKey {
            path: path.to_owned(),
            key: unknown.key,
            expected: unknown.expected,
        });
    }
    // Deserialise from the text, not from `doc`, so type errors keep their line and column.
    let raw: RawConfig = toml::from_str(text).map_err(parse_error)?;
    build(raw, Some(path), env, overrides)
}

impl Config {
    /// The project a webhook belongs to: by GitLab id first, then by `path_with_namespace`
    /// (ignoring ASCII case, as GitLab does).
    pub fn find_project(&self, id: Option<u64>, path: Option<&str>) -> Option<&Project> {
        id.and_then(|id| self.projects.iter().find(|p| p.id == Some(id)))
            .or_else(|| {
                let path = path?;
                self.projects
                    .iter()
                    .find(|p| p.path.eq_ignore_ascii_case(path))
            })
    }

    /// The project named on a command line: a numeric id or a path.
    pub fn project(&self, id_or_path: &str) -> Option<&Project> {
        self.find_project(id_or_path.parse().ok(), Some(id_or_path))
    }
}

impl Project {
    /// The environment called `name`.
    pub fn environment(&self, name: &str) -> Option<&Environment> {
        self.environments.iter().find(|e| e.name == name)
    }
}

impl FromStr for Host {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "local" {
            return Ok(Host::Local);
        }
        let (user, rest) = s
            .split_once('@')
            .ok_or("expected user@host[:port] or \"local\"")?;
        if !is_name(user) || user.starts_with('-') {
            return Err(format!("invalid user {user:?}"));
        }
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or("unclosed '['")?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("invalid IPv6 address {host:?}"));
            }
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(after.strip_prefix(':').ok_or("expected ':' after ']'")?),
                ),
            }
        } else {
            match rest.split_once(':') {
                Some((_, port)) if port.contains(':') => {
                    return Err("put an IPv6 address in brackets: user@[::1]:22".into())
                }
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        if !host.contains(':') && (!is_hostname(host) || host.starts_with('-')) {
            return Err(format!("invalid host name {host:?}"));
        }
        let port = match port {
            None => 22,
            Some(port) => match port.parse::<u16>() {
                Ok(port) if port > 0 => port,
                _ => return Err(format!("invalid port {port:?}")),
            },
        };
        Ok(Host::Ssh {
            user: user.to_owned(),
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Local => f.write_str("local"),
            Host::Ssh { user, host, port } if host.contains(':') => {
                write!(f, "{user}@[{host}]:{port}")
            }
            Host::Ssh { user, host, port } => write!(f, "{user}@{host}:{port}"),
        }
    }
}

impl FromStr for HostKeyPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "strict" => Ok(Self::Strict),
            "accept-new" => Ok(Self::AcceptNew),
            _ => Err(format!(
                "invalid host key policy {s:?}: only \"strict\" and \"accept-new\" exist; host keys are never ignored"
            )),
        }
    }
}

impl FromStr for OnTagMove {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ignore" => Ok(Self::Ignore),
            "rebuild" => Ok(Self::Rebuild),
            _ => Err(format!(
                "invalid value {s:?}: expected \"ignore\" or \"rebuild\""
            )),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Layering

/// Where an environment variable's value goes in the raw layer.
enum Slot<'a> {
    Text(&'a mut Option<String>),
    Count(&'a mut Option<u64>),
    List(&'a mut Option<Vec<String>>),
}

/// One scalar setting that an environment variable can set.
struct EnvSetting {
    key: &'static str,
    var: &'static str,
    slot: for<'a> fn(&'a mut RawConfig) -> Slot<'a>,
}

fn gateway(raw: &mut RawConfig) -> &mut RawGateway {
    raw.gateway.get_or_insert_with(Default::default)
}

fn coordinator(raw: &mut RawConfig) -> &mut RawCoordinator {
    raw.coordinator.get_or_insert_with(Default::default)
}

fn agent(raw: &mut RawConfig) -> &mut RawAgent {
    raw.agent.get_or_insert_with(Default::default)
}

#[rustfmt::skip]
const ENV_SETTINGS: &[EnvSetting] = &[
    EnvSetting { key: "store", var: env::STORE, slot: |r| Slot::Text(&mut r.store) },
    EnvSetting { key: "store_ca_file", var: env::STORE_CA_FILE, slot: |r| Slot::Text(&mut r.store_ca_file) },
    EnvSetting { key: "namespace", var: env::NAMESPACE, slot: |r| Slot::Text(&mut r.namespace) },
    EnvSetting { key: "data_dir", var: env::DATA_DIR, slot: |r| Slot::Text(&mut r.data_dir) },
    EnvSetting { key: "gateway.listen", var: env::GATEWAY_LISTEN, slot: |r| Slot::Text(&mut gateway(r).listen) },
    EnvSetting { key: "gateway.public_url", var: env::GATEWAY_PUBLIC_URL, slot: |r| Slot::Text(&mut gateway(r).public_url) },
    EnvSetting { key: "gateway.max_body_bytes", var: env::GATEWAY_MAX_BODY_BYTES, slot: |r| Slot::Count(&mut gateway(r).max_body_bytes) },
    EnvSetting { key: "gateway.dedupe_window", var: env::GATEWAY_DEDUPE_WINDOW, slot: |r| Slot::Text(&mut gateway(r).dedupe_window) },
    EnvSetting { key: "coordinator.lease_ttl", var: env::COORDINATOR_LEASE_TTL, slot: |r| Slot::Text(&mut coordinator(r).lease_ttl) },
    EnvSetting { key: "coordinator.max_attempts", var: env::COORDINATOR_MAX_ATTEMPTS, slot: |r| Slot::Count(&mut coordinator(r).max_attempts) },
    EnvSetting { key: "coordinator.sweep_interval", var: env::COORDINATOR_SWEEP_INTERVAL, slot: |r| Slot::Text(&mut coordinator(r).sweep_interval) },
    EnvSetting { key: "coordinator.keep_logs", var: env::COORDINATOR_KEEP_LOGS, slot: |r| Slot::Text(&mut coordinator(r).keep_logs) },
    EnvSetting { key: "coordinator.keep_feed", var: env::COORDINATOR_KEEP_FEED, slot: |r| Slot::Text(&mut coordinator(r).keep_feed) },
    EnvSetting { key: "coordinator.retry_base", var: env::COORDINATOR_RETRY_BASE, slot: |r| Slot::Text(&mut coordinator(r).retry_base) },
    EnvSetting { key: "coordinator.retry_max", var: env::COORDINATOR_RETRY_MAX, slot: |r| Slot::Text(&mut coordinator(r).retry_max) },
    EnvSetting { key: "agent.name", var: env::AGENT_NAME, slot: |r| Slot::Text(&mut agent(r).name) },
    EnvSetting { key: "agent.pools", var: env::AGENT_POOLS, slot: |r| Slot::List(&mut agent(r).pools) },
    EnvSetting { key: "agent.labels", var: env::AGENT_LABELS, slot: |r| Slot::List(&mut agent(r).labels) },
    EnvSetting { key: "agent.concurrency", var: env::AGENT_CONCURRENCY, slot: |r| Slot::Count(&mut agent(r).concurrency) },
    EnvSetting { key: "agent.shutdown_grace", var: env::AGENT_SHUTDOWN_GRACE, slot: |r| Slot::Text(&mut agent(r).shutdown_grace) },
    EnvSetting { key: "agent.ssh_key", var: env::AGENT_SSH_KEY, slot: |r| Slot::Text(&mut agent(r).ssh_key) },
    EnvSetting { key: "agent.known_hosts", var: env::AGENT_KNOWN_HOSTS, slot: |r| Slot::Text(&mut agent(r).known_hosts) },
    EnvSetting { key: "agent.host_key_policy", var: env::AGENT_HOST_KEY_POLICY, slot: |r| Slot::Text(&mut agent(r).host_key_policy) },
    EnvSetting { key: "agent.git_ca_file", var: env::AGENT_GIT_CA_FILE, slot: |r| Slot::Text(&mut agent(r).git_ca_file) },
    EnvSetting { key: "agent.metrics_listen", var: env::AGENT_METRICS_LISTEN, slot: |r| Slot::Text(&mut agent(r).metrics_listen) },
    EnvSetting { key: "coordinator.metrics_listen", var: env::COORDINATOR_METRICS_LISTEN, slot: |r| Slot::Text(&mut coordinator(r).metrics_listen) },
    EnvSetting { key: "artifacts.url", var: env::ARTIFACTS_URL, slot: |r| Slot::Text(&mut r.artifacts.get_or_insert_with(Default::default).url) },
    EnvSetting { key: "artifacts.keep", var: env::ARTIFACTS_KEEP, slot: |r| Slot::Text(&mut r.artifacts.get_or_insert_with(Default::default).keep) },
    EnvSetting { key: "gitlab.url", var: env::GITLAB_URL, slot: |r| Slot::Text(&mut r.gitlab.get_or_insert_with(Default::default).url) },
    EnvSetting { key: "gitlab.reconcile_interval", var: env::GITLAB_RECONCILE_INTERVAL, slot: |r| Slot::Text(&mut r.gitlab.get_or_insert_with(Default::default).reconcile_interval) },
    EnvSetting { key: "gitlab.reconcile_window", var: env::GITLAB_RECONCILE_WINDOW, slot: |r| Slot::Text(&mut r.gitlab.get_or_insert_with(Default::default).reconcile_window) },
];

/// The environment variables that set scalar settings, as `(key, variable)` pairs.
pub fn env_settings() -> impl Iterator<Item = (&'static str, &'static str)> {
    ENV_SETTINGS.iter().map(|s| (s.key, s.var))
}

/// Applies the environment and then the flags to `raw`, returning where each overridden key's
/// value came from.
fn layer(
    raw: &mut RawConfig,
    env: &dyn Fn(&str) -> Option<String>,
    overrides: &Overrides,
) -> Result<HashMap<&'static str, Origin>, Error> {
    let mut origins = HashMap::new();
    for setting in ENV_SETTINGS {
        let Some(value) = env(setting.var).filter(|v| !v.is_empty()) else {
            continue;
        };
        let origin = Origin::Env(setting.var);
        match (setting.slot)(raw) {
            Slot::Text(slot) => *slot = Some(value),
            Slot::List(slot) => *slot = Some(split_list(&value)),
            Slot::Count(slot) => match value.trim().parse::<u64>() {
                Ok(n) => *slot = Some(n),
                Err(_) => {
                    return Err(Error::Invalid {
                        at: Location {
                            origin,
                            key: setting.key.into(),
                        },
                        problem: format!("expected a positive integer, got {value:?}"),
                    })
                }
            },
        }
        origins.insert(setting.key, origin);
    }
    if let Some(store) = &overrides.store {
        raw.store = Some(store.clone());
        origins.insert("store", Origin::Flag("store"));
    }
    if let Some(listen) = overrides.listen {
        gateway(raw).listen = Some(listen.to_string());
        origins.insert("gateway.listen", Origin::Flag("listen"));
    }
    if let Some(name) = &overrides.agent_name {
        agent(raw).name = Some(name.clone());
        origins.insert("agent.name", Origin::Flag("name"));
    }
    if let Some(pools) = &overrides.agent_pools {
        agent(raw).pools = Some(pools.clone());
        origins.insert("agent.pools", Origin::Flag("pools"));
    }
    if let Some(n) = overrides.agent_concurrency {
        agent(raw).concurrency = Some(n.into());
        origins.insert("agent.concurrency", Origin::Flag("concurrency"));
    }
    Ok(origins)
}

fn split_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Validation

/// Knows where each value came from, to name it in errors.
struct Ctx<'a> {
    file: Option<&'a Path>,
    origins: HashMap<&'static str, Origin>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

type Result<T, E = Error> = std::result::Result<T, E>;

impl Ctx<'_> {
    fn at(&self, key: &str) -> Location {
        let origin = match (self.origins.get(key), self.file) {
            (Some(origin), _) => origin.clone(),
            (None, Some(file)) => Origin::File(file.to_owned()),
            (None, None) => Origin::Default,
        };
        Location {
            origin,
            key: key.to_owned(),
        }
    }

    fn err(&self, key: &str, problem: impl Into<String>) -> Error {
        Error::Invalid {
            at: self.at(key),
            problem: problem.into(),
        }
    }

    /// A duration of at most [`MAX_DURATION`] (longer ones overflow the clocks they are added
    /// to) and, unless zero, of at least a millisecond (the stores count in milliseconds).
    fn duration(&self, key: &str, value: Option<String>, default: &str) -> Result<Duration> {
        let value = value.unwrap_or_else(|| default.to_owned());
        let d = humantime::parse_duration(value.trim())
            .map_err(|e| self.err(key, format!("invalid duration {value:?}: {e}")))?;
        if d > MAX_DURATION {
            return Err(self.err(key, format!("{value:?} is too long: at most 100 years")));
        }
        if !d.is_zero() && d < Duration::from_millis(1) {
            return Err(self.err(key, format!("{value:?} is too short: at least 1ms")));
        }
        Ok(d)
    }

    /// An optional `ip:port` setting.
    fn optional_addr(&self, key: &str, value: Option<String>) -> Result<Option<SocketAddr>> {
        value
            .map(|v| {
                v.trim().parse().map_err(|e| {
                    self.err(
                        key,
                        format!("invalid address {v:?}: {e} (expected ip:port, e.g. 0.0.0.0:9101)"),
                    )
                })
            })
            .transpose()
    }

    fn positive_duration(
        &self,
        key: &str,
        value: Option<String>,
        default: &str,
    ) -> Result<Duration> {
        let d = self.duration(key, value, default)?;
        if d.is_zero() {
            return Err(self.err(key, "must be longer than zero"));
        }
        Ok(d)
    }

    /// A retention: a duration longer than zero, or `forever` (`None`).
    fn retention(&self, key: &str, value: Option<&str>, default: &str) -> Result<Option<Duration>> {
        let value = value.unwrap_or(default).trim();
        match humantime::parse_duration(value) {
            _ if value == "forever" => Ok(None),
            Ok(d) if d >= Duration::from_millis(1) && d <= MAX_DURATION => Ok(Some(d)),
            _ => Err(self.err(
                key,
                format!(
                    "invalid value {value:?}: expected a duration longer than zero (like \"30d\") \
                     or \"forever\""
                ),
            )),
        }
    }

    fn count(&self, key: &str, value: Option<u64>, default: u64, min: u64) -> Result<u32> {
        let n = value.unwrap_or(default);
        if n < min {
            return Err(self.err(key, format!("must be at least {min}, got {n}")));
        }
        u32::try_from(n).map_err(|_| self.err(key, format!("{n} is too large")))
    }

    fn url(&self, key: &str, value: &str, web: bool) -> Result<Url> {
        let url = Url::parse(value)
            .map_err(|e| self.err(key, format!("invalid url {:?}: {e}", redact(value))))?;
        if web && !matches!(url.scheme(), "http" | "https") {
            return Err(self.err(
                key,
                format!("invalid url {:?}: expected http or https", redact(value)),
            ));
        }
        Ok(url)
    }

    fn name(&self, key: &str, value: &str, what: &str) -> Result<String> {
        if is_name(value) {
            Ok(value.to_owned())
        } else {
            Err(self.err(
                key,
                format!("invalid {what} {value:?}: use only letters, digits, '.', '_' and '-'"),
            ))
        }
    }

    fn required<T>(&self, key: &str, value: Option<T>) -> Result<T> {
        value.ok_or_else(|| self.err(key, "missing required key"))
    }

    /// A secret given either literally (`literal_key`) or by the name of an environment variable
    /// (`<literal_key>_env`), never both.
    fn secret(
        &self,
        prefix: &str,
        literal_key: &str,
        literal: Option<String>,
        var: Option<String>,
    ) -> Result<Option<Secret>> {
        let literal_at = format!("{prefix}{literal_key}");
        let var_at = format!("{prefix}{literal_key}_env");
        match (literal, var) {
            (Some(_), Some(_)) => Err(self.err(
                &var_at,
                format!("set only one of {literal_key} and {literal_key}_env"),
            )),
            (Some(value), None) if value.is_empty() => Err(self.err(&literal_at, "is empty")),
            (Some(value), None) => Ok(Some(Secret(value))),
            (None, Some(var)) => self.resolve(&var_at, &var).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Reads the secret in environment variable `var`, named by `key`.
    fn resolve(&self, key: &str, var: &str) -> Result<Secret> {
        if !is_env_name(var) {
            return Err(self.err(key, format!("invalid environment variable name {var:?}")));
        }
        match (self.env)(var) {
            Some(value) if !value.is_empty() => Ok(Secret(value)),
            Some(_) => Err(self.err(key, format!("environment variable {var} is empty"))),
            None => Err(self.err(key, format!("environment variable {var} is not set"))),
        }
    }
}

fn build(
    mut raw: RawConfig,
    file: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    overrides: &Overrides,
) -> Result<Config> {
    let origins = layer(&mut raw, env, overrides)?;
    let cx = Ctx { file, origins, env };

    let store = match raw.store {
        // A bare path names an embedded store's file (`*.db`, `*.sqlite`, `*.sqlite3`).
        Some(store) if is_store_file(store.trim()) => Some(store),
        // Sentinel and cluster URLs list several hosts, which a URL's authority cannot hold.
        Some(store) if crate::store::redis::urls::check_multi_node(store.trim()).is_some() => {
            if let Some(Err(e)) = crate::store::redis::urls::check_multi_node(store.trim()) {
                return Err(cx.err("store", format!("invalid store url: {e}")));
            }
            Some(store)
        }
        Some(store) => {
            let url = cx.url("store", &store, false)?;
            if !matches!(url.scheme(), "redis" | "rediss" | "sqlite") {
                return Err(cx.err(
                    "store",
                    format!("unsupported store {:?}: expected redis://HOST:PORT/DB, rediss://…, redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER[/DB], redis+cluster://HOST:PORT[,HOST:PORT…], sqlite://PATH or a *.db file path (omit it for the embedded store in <data_dir>/ferry.db)", redact(&store)),
                ));
            }
            Some(store)
        }
        None => None,
    };
    let namespace = raw.namespace.unwrap_or_else(|| defaults::NAMESPACE.into());
    if namespace.is_empty()
        || !namespace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return Err(cx.err(
            "namespace",
            format!(
                "{namespace:?} must be non-empty and use only letters, digits, '.', '_' and '-'"
            ),
        ));
    }
    let data_dir = match raw.data_dir {
        Some(dir) => PathBuf::from(dir),
        None => overrides
            .default_data_dir
            .clone()
            .unwrap_or_else(|| defaults::DATA_DIR.into()),
    };
    if data_dir.as_os_str().is_empty() {
        return Err(cx.err("data_dir", "is empty"));
    }

    let gw = raw.gateway.unwrap_or_default();
    let listen_text = gw.listen.unwrap_or_else(|| defaults::LISTEN.into());
    let listen: SocketAddr = listen_text.trim().parse().map_err(|e| {
        cx.err(
            "gateway.listen",
            format!("invalid address {listen_text:?}: {e} (expected ip:port, e.g. 0.0.0.0:8080)"),
        )
    })?;
    let public_url = match gw.public_url {
        Some(url) => cx.url("gateway.public_url", &url, true)?,
        None => {
            let ip = match listen.ip() {
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                ip => ip.to_string(),
            };
            cx.url(
                "gateway.public_url",
                &format!("http://{ip}:{}/", listen.port()),
                true,
            )?
        }
    };
    let max_body_bytes = gw.max_body_bytes.unwrap_or(defaults::MAX_BODY_BYTES);
    if max_body_bytes == 0 {
        return Err(cx.err("gateway.max_body_bytes", "must be at least 1, got 0"));
    }
    let gateway = Gateway {
        listen,
        public_url,
        max_body_bytes,
        dedupe_window: cx.positive_duration(
            "gateway.dedupe_window",
            gw.dedupe_window,
            defaults::DEDUPE_WINDOW,
        )?,
    };

    let api = raw.api.unwrap_or_default();
    let tokens = match (api.tokens, api.tokens_env) {
        (Some(_), Some(_)) => {
            return Err(cx.err("api.tokens_env", "set only one of tokens and tokens_env"))
        }
        (Some(tokens), None) => {
            if let Some(i) = tokens.iter().position(|t| t.trim().is_empty()) {
                return Err(cx.err(&format!("api.tokens[{i}]"), "is empty"));
            }
            tokens.into_iter().map(Secret).collect()
        }
        (None, Some(var)) => split_list(cx.resolve("api.tokens_env", &var)?.expose())
            .into_iter()
            .map(Secret)
            .collect(),
        // Nothing configured: the default variable is optional.
        (None, None) => env(env::API_TOKENS)
            .map(|v| split_list(&v).into_iter().map(Secret).collect())
            .unwrap_or_default(),
    };

    let co = raw.coordinator.unwrap_or_default();
    let coordinator = Coordinator {
        lease_ttl: cx.positive_duration(
            "coordinator.lease_ttl",
            co.lease_ttl,
            defaults::LEASE_TTL,
        )?,
        max_attempts: cx.count(
            "coordinator.max_attempts",
            co.max_attempts,
            defaults::MAX_ATTEMPTS,
            1,
        )?,
        sweep_interval: cx.positive_duration(
            "coordinator.sweep_interval",
            co.sweep_interval,
            defaults::SWEEP_INTERVAL,
        )?,
        retry_base: cx.positive_duration(
            "coordinator.retry_base",
            co.retry_base,
            defaults::RETRY_BASE,
        )?,
        retry_max: cx.positive_duration(
            "coordinator.retry_max",
            co.retry_max,
            defaults::RETRY_MAX,
        )?,
        keep_logs: cx.retention(
            "coordinator.keep_logs",
            co.keep_logs.as_deref(),
            defaults::KEEP_LOGS,
        )?,
        keep_feed: cx.retention(
            "coordinator.keep_feed",
            co.keep_feed.as_deref(),
            defaults::KEEP_FEED,
        )?,
        metrics_listen: cx.optional_addr("coordinator.metrics_listen", co.metrics_listen)?,
    };
    if coordinator.retry_base > coordinator.retry_max {
        return Err(cx.err(
            "coordinator.retry_base",
            format!(
                "{} is longer than coordinator.retry_max ({})",
                humantime::format_duration(coordinator.retry_base),
                humantime::format_duration(coordinator.retry_max)
            ),
        ));
    }

    let ag = raw.agent.unwrap_or_default();
    let name = match ag.name {
        Some(name) => cx.name("agent.name", name.trim(), "agent name")?,
        None => default_agent_name(),
    };
    let pools = ag.pools.unwrap_or_else(|| vec![defaults::POOL.into()]);
    if pools.is_empty() {
        return Err(cx.err("agent.pools", "must name at least one pool"));
    }
    for (i, pool) in pools.iter().enumerate() {
        cx.name(&format!("agent.pools[{i}]"), pool, "pool name")?;
    }
    let labels = ag.labels.unwrap_or_default();
    for (i, label) in labels.iter().enumerate() {
        if label.is_empty() || label.contains(|c: char| c.is_whitespace() || c == ',') {
            return Err(cx.err(
                &format!("agent.labels[{i}]"),
                format!("invalid label {label:?}: must be non-empty, without spaces or commas"),
            ));
        }
    }
    let agent = Agent {
        name,
        pools,
        labels,
        concurrency: cx.count(
            "agent.concurrency",
            ag.concurrency,
            defaults::CONCURRENCY,
            1,
        )?,
        shutdown_grace: cx.positive_duration(
            "agent.shutdown_grace",
            ag.shutdown_grace,
            defaults::SHUTDOWN_GRACE,
        )?,
        ssh_key: ag.ssh_key.map(PathBuf::from),
        known_hosts: ag
            .known_hosts
            .map(PathBuf::from)
            .unwrap_or_else(|| data_dir.join("known_hosts")),
        host_key_policy: match ag.host_key_policy {
            Some(p) => p
                .parse()
                .map_err(|e: String| cx.err("agent.host_key_policy", e))?,
            None => HostKeyPolicy::Strict,
        },
        git_ca_file: ag.git_ca_file.map(PathBuf::from),
        metrics_listen: cx.optional_addr("agent.metrics_listen", ag.metrics_listen)?,
    };

    let raw_artifacts = raw.artifacts.unwrap_or_default();
    let artifacts = Artifacts {
        keep: cx.retention(
            "artifacts.keep",
            raw_artifacts.keep.as_deref(),
            defaults::KEEP_ARTIFACTS,
        )?,
        url: match raw_artifacts.url {
            Some(url) => cx.url("artifacts.url", &url, false)?,
            None => {
                let dir = std::path::absolute(data_dir.join("artifacts"))
                    .map_err(|e| cx.err("data_dir", format!("cannot make it absolute: {e}")))?;
                Url::from_directory_path(&dir).map_err(|()| {
                    cx.err(
                        "data_dir",
                        format!("cannot make a file url of {}", dir.display()),
                    )
                })?
            }
        },
    };

    let gitlab = match raw.gitlab {
        None => None,
        Some(gl) => match gl.url {
            None if gl.token_env.is_some() => {
                return Err(cx.err(
                    "gitlab.url",
                    "missing required key (gitlab.token_env is set)",
                ))
            }
            None => None,
            Some(url) => Some(Gitlab {
                url: cx.url("gitlab.url", &url, true)?,
                token: cx.resolve(
                    "gitlab.token_env",
                    gl.token_env.as_deref().unwrap_or(env::GITLAB_TOKEN),
                )?,
                reconcile_interval: cx.duration(
                    "gitlab.reconcile_interval",
                    gl.reconcile_interval,
                    "10m",
                )?,
                reconcile_window: cx.positive_duration(
                    "gitlab.reconcile_window",
                    gl.reconcile_window,
                    "24h",
                )?,
            }),
        },
    };

    let mut projects = Vec::new();
    for (i, project) in raw.projects.unwrap_or_default().into_iter().enumerate() {
        projects.push(validate_project(&cx, i, project)?);
    }
    check_unique_projects(&cx, &projects)?;

    Ok(Config {
        file: file.map(Path::to_owned),
        store,
        store_ca_file: raw
            .store_ca_file
            .filter(|f| !f.trim().is_empty())
            .map(PathBuf::from),
        namespace,
        data_dir,
        gateway,
        api: Api { tokens },
        coordinator,
        agent,
        artifacts,
        gitlab,
        projects,
    })
}

fn validate_project(cx: &Ctx<'_>, i: usize, raw: RawProject) -> Result<Project> {
    let p = format!("projects[{i}].");
    let key = |k: &str| format!("{p}{k}");

    let path = cx.required(&key("path"), raw.path)?;
    if !path.split('/').all(is_name) || !path.contains('/') {
        return Err(cx.err(
            &key("path"),
            format!("invalid project path {path:?}: expected group/name"),
        ));
    }
    let webhook_token = cx.secret(
        &p,
        "webhook_token",
        raw.webhook_token,
        raw.webhook_token_env,
    )?;
    let signing_token = cx.secret(
        &p,
        "signing_token",
        raw.signing_token,
        raw.signing_token_env,
    )?;
    if let Some(token) = &signing_token {
        // (decoded as the gateway will: a token it cannot decode fails it at start)
        if crate::gateway::auth::SigningKey::from_token(token.expose()).is_err() {
            return Err(cx.err(
                &key("signing_token"),
                "expected whsec_ followed by base64 (the value is not shown)",
            ));
        }
    }
    let allow_unauthenticated = raw.allow_unauthenticated.unwrap_or(false);
    if webhook_token.is_none() && signing_token.is_none() && !allow_unauthenticated {
        return Err(cx.err(
            &key("webhook_token_env"),
            "the project has no webhook_token(_env) or signing_token(_env); set one, or set allow_unauthenticated = true",
        ));
    }

    let priority = raw.priority.unwrap_or(0);
    let deploy_priority = raw
        .deploy_priority
        .unwrap_or(priority.saturating_add(defaults::DEPLOY_PRIORITY_BOOST));
    let to_i32 = |k: &str, v: i64| {
        i32::try_from(v).map_err(|_| cx.err(&key(k), format!("{v} is out of range")))
    };

    let branches = raw.branches.unwrap_or_default();
    if let Some(j) = branches.iter().position(|b| b.trim().is_empty()) {
        return Err(cx.err(&key(&format!("branches[{j}]")), "is empty"));
    }
    let secrets = raw.secrets.unwrap_or_default();
    for (j, name) in secrets.iter().enumerate() {
        if !is_env_name(name) {
            return Err(cx.err(
                &key(&format!("secrets[{j}]")),
                format!("invalid environment variable name {name:?}"),
            ));
        }
    }

    let build_raw = cx.required(&key("build"), raw.build)?;
    let pool = cx.name(
        &key("build.pool"),
        build_raw.pool.as_deref().unwrap_or(defaults::POOL),
        "pool name",
    )?;
    let commands = cx.required(&key("build.commands"), build_raw.commands)?;
    if commands.is_empty() {
        return Err(cx.err(&key("build.commands"), "must hold at least one command"));
    }
    let artifacts = build_raw.artifacts.unwrap_or_default();
    for (j, artifact) in artifacts.iter().enumerate() {
        if !is_relative_inside(artifact) {
            return Err(cx.err(
                &key(&format!("build.artifacts[{j}]")),
                format!("invalid path {artifact:?}: must be relative, without '..'"),
            ));
        }
    }
    let env = build_raw.env.unwrap_or_default();
    for name in env.keys() {
        if !is_env_name(name) {
            return Err(cx.err(
                &key(&format!("build.env.{name}")),
                "invalid environment variable name",
            ));
        }
        if name.starts_with("FERRY_") {
            return Err(cx.err(
                &key(&format!("build.env.{name}")),
                "names starting with FERRY_ are reserved for job facts",
            ));
        }
    }
    let build = Build {
        timeout: {
            // (counted in whole seconds in the plan, where 0 would mean no limit)
            let k = key("build.timeout");
            let d = cx.duration(&k, build_raw.timeout, defaults::BUILD_TIMEOUT)?;
            if d < Duration::from_secs(1) {
                return Err(cx.err(&k, format!("{d:?} is too short: at least 1s")));
            }
            d
        },
        pool,
        commands,
        artifacts,
        env,
    };

    let mut environments = Vec::new();
    let mut names = HashSet::new();
    for (j, env) in raw.environments.unwrap_or_default().into_iter().enumerate() {
        let environment =
            validate_environment(cx, &format!("{p}environments[{j}]."), env, &build.pool)?;
        if !names.insert(environment.name.clone()) {
            return Err(cx.err(
                &key(&format!("environments[{j}].name")),
                format!("duplicate environment {:?}", environment.name),
            ));
        }
        environments.push(environment);
    }

    Ok(Project {
        id: raw.id,
        path,
        webhook_token,
        signing_token,
        allow_unauthenticated,
        clone_url: raw
            .clone_url
            .map(|url| {
                let k = key("clone_url");
                let url = cx.url(&k, &url, false)?;
                // Every job records its clone URL in its plan, which the API shows and which
                // errors quote: a password in it would be a secret in the log (invariant 10).
                if url.password().is_some() {
                    return Err(cx.err(
                        &k,
                        "must not carry a password: every job records its clone URL, and the API                          shows it; clone over ssh with the agent's key (agent.ssh_key) instead",
                    ));
                }
                Ok(url)
            })
            .transpose()?,
        auto_build: raw.auto_build.unwrap_or(true),
        auto_deploy: raw.auto_deploy.unwrap_or(true),
        priority: to_i32("priority", priority)?,
        deploy_priority: to_i32("deploy_priority", deploy_priority)?,
        on_tag_move: match raw.on_tag_move {
            Some(v) => v
                .parse()
                .map_err(|e: String| cx.err(&key("on_tag_move"), e))?,
            None => OnTagMove::Ignore,
        },
        branches,
        secrets,
        build,
        environments,
    })
}

fn validate_environment(
    cx: &Ctx<'_>,
    p: &str,
    raw: RawEnvironment,
    build_pool: &str,
) -> Result<Environment> {
    let key = |k: &str| format!("{p}{k}");
    let name = cx.required(&key("name"), raw.name)?;
    let name = cx.name(&key("name"), &name, "environment name")?;
    let hosts_raw = cx.required(&key("hosts"), raw.hosts)?;
    if hosts_raw.is_empty() {
        return Err(cx.err(&key("hosts"), "must list at least one host"));
    }
    let mut hosts = Vec::with_capacity(hosts_raw.len());
    for (k, text) in hosts_raw.iter().enumerate() {
        let at = key(&format!("hosts[{k}]"));
        let host: Host = text
            .parse()
            .map_err(|e| cx.err(&at, format!("invalid host {text:?}: {e}")))?;
        if hosts.contains(&host) {
            return Err(cx.err(&at, format!("duplicate host {host}")));
        }
        hosts.push(host);
    }
    let path = cx.required(&key("path"), raw.path)?;
    if !path.starts_with('/')
        || Path::new(&path)
            .components()
            .any(|c| c == Component::ParentDir)
    {
        return Err(cx.err(
            &key("path"),
            format!("invalid path {path:?}: must be absolute, without '..'"),
        ));
    }
    let pool = cx.name(
        &key("pool"),
        raw.pool.as_deref().unwrap_or(build_pool),
        "pool name",
    )?;
    Ok(Environment {
        name,
        hosts,
        path,
        pool,
        before_switch: raw.before_switch.unwrap_or_default(),
        after_switch: raw.after_switch.unwrap_or_default(),
        health_check: raw.health_check.filter(|c| !c.trim().is_empty()),
        health_check_retries: cx.count(
            &key("health_check_retries"),
            raw.health_check_retries,
            defaults::HEALTH_CHECK_RETRIES,
            0,
        )?,
        health_check_interval: cx.duration(
            &key("health_check_interval"),
            raw.health_check_interval,
            defaults::HEALTH_CHECK_INTERVAL,
        )?,
        command_timeout: {
            let k = key("command_timeout");
            let d = cx.duration(&k, raw.command_timeout, defaults::COMMAND_TIMEOUT)?;
            if d < Duration::from_secs(1) {
                return Err(cx.err(&k, format!("{d:?} is too short: at least 1s")));
            }
            d
        },
        max_parallel: cx.count(&key("max_parallel"), raw.max_parallel, 1, 1)?,
        max_failures: cx.count(&key("max_failures"), raw.max_failures, 0, 0)?,
        keep_releases: cx.count(
            &key("keep_releases"),
            raw.keep_releases,
            defaults::KEEP_RELEASES,
            1,
        )?,
        rollback_on_failure: raw.rollback_on_failure.unwrap_or(true),
    })
}

fn check_unique_projects(cx: &Ctx<'_>, projects: &[Project]) -> Result<()> {
    for (i, project) in projects.iter().enumerate() {
        for (j, earlier) in projects[..i].iter().enumerate() {
            if project.id.is_some() && project.id == earlier.id {
                return Err(cx.err(
                    &format!("projects[{i}].id"),
                    format!(
                        "duplicate project id {} (also projects[{j}])",
                        project.id.unwrap_or_default()
                    ),
                ));
            }
            if project.path.eq_ignore_ascii_case(&earlier.path) {
                return Err(cx.err(
                    &format!("projects[{i}].path"),
                    format!(
                        "duplicate project path {:?} (also projects[{j}])",
                        project.path
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `[A-Za-z0-9._-]+`: pool, environment and agent names, and project path segments.
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
}

/// `[A-Za-z_][A-Za-z0-9_]*`
fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn is_relative_inside(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// `hostname-pid`, with anything outside `[A-Za-z0-9._-]` in the host name replaced by `-`.
fn default_agent_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("{host}-{}", std::process::id())
}
