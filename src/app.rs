//! The composition root: opens the store named by the configuration, maps the configuration into
//! each role's options and runs the roles until a shutdown signal. The only module that knows
//! both the configuration and the roles.

use crate::agent;
use crate::api;
use crate::config::{Config, Host};
use crate::coordinator::{self, decide::RetryPolicy, plan::ProjectPlan};
use crate::gateway::{self, GatewayOptions, GatewayState, ProjectHooks, SigningKey};
use crate::gitlab;
use crate::replay;
use crate::store::redis::urls::redact;
use crate::store::{redis::RedisStore, sqlite::SqliteStore, Store};
use anyhow::{bail, Context};
use ferry_proto::{AgentId, BuildSpec, DeploySpec};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Where the events live: a Redis server, or the embedded store's file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreLocation {
    Redis(String),
    Embedded(PathBuf),
}

impl StoreLocation {
    /// `redis://HOST:PORT/DB` (`rediss://` for TLS), the master Redis Sentinels name
    /// (`redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER[/DB]`), a Redis Cluster
    /// (`redis+cluster://HOST:PORT[,HOST:PORT...]`), `sqlite://PATH`
    /// (`sqlite:///abs/path` or `sqlite://rel/path`), or a bare file path for the embedded store.
    pub fn parse(text: &str) -> anyhow::Result<StoreLocation> {
        let text = text.trim();
        if text.starts_with("redis://")
            || text.starts_with("rediss://")
            || crate::store::redis::urls::check_multi_node(text).is_some()
        {
            return Ok(StoreLocation::Redis(text.to_string()));
        }
        if let Some(path) = text.strip_prefix("sqlite://") {
            if path.is_empty() {
                bail!("store {text}: sqlite:// needs a file path, e.g. sqlite://.ferry/ferry.db");
            }
            return Ok(StoreLocation::Embedded(PathBuf::from(path)));
        }
        if !crate::config::is_store_file(text) {
            bail!(
                "store {text:?}: expected redis://HOST:PORT/DB, rediss://…, redis+sentinel://HOST:PORT[,HOST:PORT…]/MASTER[/DB], redis+cluster://HOST:PORT[,HOST:PORT…], sqlite://PATH or the path of an embedded store file (*.db)"
            );
        }
        Ok(StoreLocation::Embedded(PathBuf::from(text)))
    }

    /// The configured store: `store` when set, else the embedded store at `<data_dir>/ferry.db`.
    pub fn of(config: &Config) -> anyhow::Result<StoreLocation> {
        match config.store.as_deref() {
            Some(url) => StoreLocation::parse(url),
            None => Ok(StoreLocation::Embedded(config.data_dir.join("ferry.db"))),
        }
    }

    /// Opens it. Redis keys live under `namespace`; an embedded file is one installation. A
    /// `rediss://` server's certificate must chain to the PEM certificates in `ca` when given,
    /// else to the system's trust store.
    pub async fn open(
        &self,
        namespace: &str,
        ca: Option<&std::path::Path>,
    ) -> anyhow::Result<Arc<dyn Store>> {
        Ok(match self {
            StoreLocation::Redis(url) => {
                let ca = match ca {
                    Some(path) => Some(std::fs::read(path).with_context(|| {
                        format!("store_ca_file {}: cannot read it", path.display())
                    })?),
                    None => None,
                };
                let store = RedisStore::connect_tls(url, namespace, ca)
                    .await
                    .with_context(|| format!("cannot open store {}", redact(url)))?;
                let (warnings, notes) = store.configuration_risks().await;
                for w in warnings {
                    tracing::warn!(store = %redact(url), "{w}");
                }
                for n in notes {
                    tracing::info!(store = %redact(url), "{n}");
                }
                Arc::new(store)
            }
            StoreLocation::Embedded(path) => {
                let path = path.clone();
                let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                    .await
                    .context("the embedded store's opener panicked")?
                    .with_context(|| format!("cannot open the embedded store {self}"))?;
                Arc::new(store)
            }
        })
    }
}

impl std::fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Redis(url) => f.write_str(&redact(url)),
            StoreLocation::Embedded(path) => write!(f, "sqlite://{}", path.display()),
        }
    }
}

/// Opens the configured store ([`StoreLocation::of`]).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    StoreLocation::of(config)?
        .open(&config.namespace, config.store_ca_file.as_deref())
        .await
}

/// Resolves when SIGINT or SIGTERM arrives (or `stop` is set), for graceful shutdown.
pub fn shutdown_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
        tracing::info!("shutdown requested");
        let _ = tx.send(true);
    });
    rx
}

/// A future that resolves once `rx` turns true.
pub async fn until(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The gateway's state from the configuration.
pub fn gateway_state(
    config: &Config,
    store: Arc<dyn Store>,
    registry: prometheus::Registry,
) -> anyhow::Result<GatewayState> {
    let mut projects = Vec::with_capacity(config.projects.len());
    for (i, p) in config.projects.iter().enumerate() {
        let signing_key =
            match &p.signing_token {
                Some(t) => Some(SigningKey::from_token(t.expose()).map_err(|e| {
                    anyhow::anyhow!("projects[{i}].signing_token ({}): {e}", p.path)
                })?),
                None => None,
            };
        projects.push(ProjectHooks {
            id: p.id,
            path: p.path.clone(),
            webhook_token: p.webhook_token.clone(),
            signing_key,
            allow_unauthenticated: p.allow_unauthenticated,
            on_tag_move: match p.on_tag_move {
                crate::config::OnTagMove::Ignore => gateway::OnTagMove::Ignore,
                crate::config::OnTagMove::Rebuild => gateway::OnTagMove::Rebuild,
            },
            branches: p.branches.clone(),
            clone_url: p.clone_url.as_ref().map(|u| u.to_string()),
            auto_build: p.auto_build,
        });
    }
    let options = GatewayOptions {
        max_body_bytes: usize::try_from(config.gateway.max_body_bytes).unwrap_or(usize::MAX),
        dedupe_window: config.gateway.dedupe_window,
        ..Default::default()
    };
    Ok(GatewayState::with_registry(
        store, projects, options, registry,
    )?)
}

/// Serves the gateway and the API (`/api/v1`) on the configured address until `stop`.
pub async fn run_gateway(
    config: &Config,
    store: Arc<dyn Store>,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = bind(config).await?;
    serve(config, store, listener, stop).await
}

/// Binds the gateway's listening socket.
pub async fn bind(config: &Config) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.gateway.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.gateway.listen))
}

/// Serves the gateway and the API on `listener` until `stop`.
pub async fn serve(
    config: &Config,
    store: Arc<dyn Store>,
    listener: tokio::net::TcpListener,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let state = gateway_state(config, store.clone(), prometheus::Registry::new())?;
    let api = api::ApiState::new(store, &config.api.tokens)
        .with_projects(project_plans(config))
        .with_stop(stop.clone());
    let router = gateway::router(state).merge(api::router(api));
    tracing::info!(listen = %listener.local_addr()?, "gateway listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(until(stop))
        .await?;
    Ok(())
}

/// A fresh random API token (for `ferry up` and `ferry demo` when none is configured).
pub fn generate_token() -> String {
    let bytes: [u8; 16] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `ferry up`: every role in one process, sharing one store. Prints where it listens, the store
/// and, when none was configured, the API token it generated.
pub async fn run_up(config: &Config, store: Arc<dyn Store>) -> anyhow::Result<()> {
    let mut config = config.clone();
    let generated = config.api.tokens.is_empty().then(generate_token);
    if let Some(token) = &generated {
        config.api.tokens.push(crate::config::Secret::new(token));
    }
    let listener = bind(&config).await?;
    println!("ferry up: listening on http://{}", listener.local_addr()?);
    println!("ferry up: store {}", StoreLocation::of(&config)?);
    match &generated {
        Some(token) => {
            println!("ferry up: API token {token} (generated; set [api] tokens to choose one)")
        }
        None => println!("ferry up: API tokens from the configuration"),
    }
    let config = &config;
    // Stopped by SIGINT/SIGTERM, or by the first role that fails: the others then end too, and
    // the error is returned (not kept until Ctrl-C while the process runs on without it).
    let (stop_all, stop) = watch::channel(false);
    {
        let signal = shutdown_signal();
        let stop_all = stop_all.clone();
        tokio::spawn(async move {
            until(signal).await;
            let _ = stop_all.send(true);
        });
    }
    let role = |task: tokio::task::JoinHandle<anyhow::Result<()>>| {
        let stop_all = stop_all.clone();
        async move {
            let result = task.await.map_err(anyhow::Error::from).and_then(|r| r);
            if result.is_err() {
                let _ = stop_all.send(true);
            }
            result
        }
    };
    let coordinator = {
        let (store, options, stop) = (store.clone(), coordinator_options(config)?, stop.clone());
        role(tokio::spawn(async move {
            Ok(coordinator::run(store, options, until(stop)).await?)
        }))
    };
    let agent = {
        let (store, options, stop) = (store.clone(), agent_options(config)?, stop.clone());
        role(tokio::spawn(async move {
            Ok(agent::run(store, options, until(stop)).await?)
        }))
    };
    let reporter = {
        let (store, options, stop) = (store.clone(), gitlab_reporter_options(config), stop.clone());
        role(tokio::spawn(async move {
            match options {
                Some(o) => Ok(gitlab::run(store, o, until(stop)).await?),
                None => Ok(()),
            }
        }))
    };
    let gateway = {
        let (config, stop) = (config.clone(), stop.clone());
        role(tokio::spawn(async move {
            serve(&config, store, listener, stop).await
        }))
    };
    let (gateway, coordinator, agent, reporter) =
        tokio::join!(gateway, coordinator, agent, reporter);
    gateway.and(coordinator).and(agent).and(reporter)
}

/// The commit-status reporter's options, when `[gitlab]` is configured (with tag
/// reconciliation unless its interval is zero).
pub fn gitlab_reporter_options(config: &Config) -> Option<gitlab::ReporterOptions> {
    let g = config.gitlab.as_ref()?;
    let mut opts = gitlab::ReporterOptions::new(
        format!("{}-gitlab", config.agent.name),
        g.url.clone(),
        g.token.clone(),
        config.gateway.public_url.clone(),
    );
    opts.reconcile = (!g.reconcile_interval.is_zero()).then(|| {
        let (projects, skipped) = reconcile_projects(config);
        for why in skipped {
            tracing::warn!("{why}");
        }
        gitlab::Reconciliation {
            interval: g.reconcile_interval,
            window: g.reconcile_window,
            dedupe_window: config.gateway.dedupe_window,
            projects,
        }
    });
    Some(opts)
}

/// The projects whose tags can be reconciled, and why each other one cannot: tags are listed
/// by the project's GitLab id, and building one needs a configured `clone_url` (a tag list
/// names no repository, as a webhook does). Recording a tag that cannot be built would also
/// record its dedupe key, and the webhook arriving later would be taken for a duplicate.
pub fn reconcile_projects(config: &Config) -> (Vec<gitlab::ReconcileProject>, Vec<String>) {
    let mut skipped = Vec::new();
    let projects = config
        .projects
        .iter()
        .filter_map(|p| {
            let why = match (p.id, &p.clone_url) {
                (Some(id), Some(url)) => {
                    return Some(gitlab::ReconcileProject {
                        id,
                        path: p.path.clone(),
                        clone_url: Some(url.to_string()),
                    })
                }
                (None, _) => "no id (tags are listed by project id)",
                (_, None) => "no clone_url (a tag list names no repository to clone)",
            };
            skipped.push(format!("{}: not reconciled: {why}", p.path));
            None
        })
        .collect();
    (projects, skipped)
}

/// `ferry reconcile`: lists every project's tags once and records the recent ones no webhook
/// reported; the coordinators build them. Returns whether every project could be reconciled.
pub async fn reconcile(config: &Config, window: Option<Duration>) -> anyhow::Result<bool> {
    let Some(g) = config.gitlab.as_ref() else {
        bail!("tag reconciliation needs [gitlab] (url and token) in the configuration");
    };
    let (projects, skipped) = reconcile_projects(config);
    if projects.is_empty() {
        bail!("no project can be reconciled: {}", skipped.join("; "));
    }
    for why in &skipped {
        eprintln!("{why}");
    }
    let store = open_store(config).await?;
    let client = gitlab::Client::new(&g.url, g.token.clone())?;
    let window = window.unwrap_or(g.reconcile_window);
    let mut ok = true;
    for project in &projects {
        match gitlab::reconcile_project(
            &*store,
            &client,
            project,
            window,
            config.gateway.dedupe_window,
            crate::store::now_ms(),
        )
        .await
        {
            Ok(r) => println!(
                "{}: {} tags, {} within {}, {} recorded to build{}",
                project.path,
                r.listed,
                r.recent,
                humantime::format_duration(window),
                r.recorded.len(),
                if r.recorded.is_empty() {
                    String::new()
                } else {
                    format!(": {}", r.recorded.join(", "))
                }
            ),
            Err(e) => {
                ok = false;
                eprintln!("{}: {e}", project.path);
            }
        }
    }
    Ok(ok)
}

/// The coordinator's options from the configuration; with an artifact retention, its artifact
/// store is opened here, so a bad one fails at start.
pub fn coordinator_options(config: &Config) -> anyhow::Result<coordinator::Options> {
    let artifact_retention = match config.artifacts.keep {
        Some(keep) => Some((
            crate::build::ArtifactStore::from_url(&config.artifacts.url)
                .map_err(|e| anyhow::anyhow!("artifacts.url {}: {e}", config.artifacts.url))?,
            keep,
        )),
        None => None,
    };
    Ok(coordinator::Options {
        consumer: format!("{}-coordinator", config.agent.name),
        policy: RetryPolicy {
            max_attempts: config.coordinator.max_attempts,
            base: config.coordinator.retry_base,
            max: config.coordinator.retry_max,
        },
        sweep_interval: config.coordinator.sweep_interval,
        keep_logs: config.coordinator.keep_logs,
        keep_feed: config.coordinator.keep_feed,
        projects: project_plans(config),
        artifacts_dir: (config.artifacts.url.scheme() == "file")
            .then(|| config.artifacts.url.to_file_path().ok())
            .flatten(),
        artifact_retention,
        ..Default::default()
    })
}

/// The agent's options from the configuration: its SSH key and git CA certificates are loaded
/// and its artifact store opened here, so a bad key, CA file or store fails at start.
pub fn agent_options(config: &Config) -> anyhow::Result<agent::Options> {
    let artifacts = crate::build::ArtifactStore::from_url(&config.artifacts.url)
        .map_err(|e| anyhow::anyhow!("artifacts.url {}: {e}", config.artifacts.url))?;
    let hosts = crate::deploy::transport::Hosts::from_config(&config.agent)
        .map_err(|e| anyhow::anyhow!("agent.ssh_key: {e}"))?;
    let git_ca_certs = match &config.agent.git_ca_file {
        Some(path) => crate::build::read_ca_certs(path)
            .map_err(|e| anyhow::anyhow!("agent.git_ca_file {e}"))?,
        None => Vec::new(),
    };
    Ok(agent::Options {
        name: AgentId::new(config.agent.name.clone()),
        pools: config.agent.pools.clone(),
        labels: config.agent.labels.clone(),
        concurrency: config.agent.concurrency as usize,
        lease_ttl: config.coordinator.lease_ttl,
        shutdown_grace: config.agent.shutdown_grace,
        runner: Arc::new(agent::Runner {
            connector: Arc::new(hosts),
            artifacts: Some(Arc::new(artifacts.clone())),
            build: Some(crate::build::BuildEnv {
                data_dir: config.data_dir.clone(),
                artifacts,
                secrets: Vec::new(),
                ssh_key: config.agent.ssh_key.clone(),
                known_hosts: Some(config.agent.known_hosts.clone()),
                accept_new_host_keys: config.agent.host_key_policy
                    == crate::config::HostKeyPolicy::AcceptNew,
                git_ca_certs,
            }),
            data_dir: config.data_dir.clone(),
        }),
    })
}

/// What planning needs of each project: the settings recorded into every job's plan.
pub fn project_plans(config: &Config) -> Vec<ProjectPlan> {
    config
        .projects
        .iter()
        .map(|p| ProjectPlan {
            id: p.id,
            path: p.path.clone(),
            priority: p.priority,
            deploy_priority: p.deploy_priority,
            auto_build: p.auto_build,
            auto_deploy: p.auto_deploy,
            clone_url: p.clone_url.as_ref().map(|u| u.to_string()),
            build_pool: p.build.pool.clone(),
            build: BuildSpec {
                clone_url: String::new(),
                commands: p.build.commands.clone(),
                artifacts: p.build.artifacts.clone(),
                timeout_secs: p.build.timeout.as_secs(),
                env: p.build.env.clone(),
                secrets: p.secrets.clone(),
            },
            environments: p
                .environments
                .iter()
                .map(|e| {
                    (
                        e.pool.clone(),
                        DeploySpec {
                            environment: e.name.clone(),
                            hosts: e.hosts.iter().map(host_string).collect(),
                            path: e.path.clone(),
                            before_switch: e.before_switch.clone(),
                            after_switch: e.after_switch.clone(),
                            health_check: e.health_check.clone(),
                            max_parallel: e.max_parallel,
                            max_failures: e.max_failures,
                            keep_releases: e.keep_releases,
                            rollback_on_failure: e.rollback_on_failure,
                            health_check_retries: e.health_check_retries,
                            health_check_interval_ms: e.health_check_interval.as_millis() as u64,
                            command_timeout_secs: e.command_timeout.as_secs(),
                        },
                    )
                })
                .collect(),
        })
        .collect()
}

fn host_string(h: &Host) -> String {
    match h {
        Host::Local => "local".into(),
        Host::Ssh { user, host, port } if host.contains(':') => format!("{user}@[{host}]:{port}"),
        Host::Ssh { user, host, port } => format!("{user}@{host}:{port}"),
    }
}

/// `ferry replay`: rebuilds the view, prints its summary, optionally saves a snapshot and
/// verifies against the live projection. Returns whether verification (if asked) passed.
pub async fn replay(
    store: &dyn Store,
    from_snapshot: bool,
    save_snapshot: bool,
    verify: bool,
) -> anyhow::Result<bool> {
    let mut view = if from_snapshot {
        match replay::load_snapshot(store).await? {
            Some(v) => {
                println!(
                    "resuming from the snapshot at log position {}",
                    v.position.as_deref().unwrap_or("(start)")
                );
                v
            }
            None => {
                println!("no snapshot saved yet; replaying from the start");
                Default::default()
            }
        }
    } else {
        Default::default()
    };
    if replay::catch_up(store, &mut view).await? {
        println!(
            "the log was trimmed past the snapshot's position; replayed every stream from the start instead"
        );
    }
    print!("{}", replay::summary(&view));
    if save_snapshot {
        replay::save_snapshot(store, &view).await?;
        println!(
            "snapshot saved at log position {}",
            view.position.as_deref().unwrap_or("(start)")
        );
    }
    if !verify {
        return Ok(true);
    }
    let check = replay::verify(store, &view).await?;
    if !check.skipped.is_empty() {
        println!(
            "{} jobs changed during verification and were not compared",
            check.skipped.len()
        );
    }
    match check.differences.first() {
        None => {
            println!(
                "verified: {} jobs, their queues and leases match the log",
                check.checked
            );
            Ok(true)
        }
        Some(first) => {
            println!(
                "verification failed: {} differences; the first: {first}",
                check.differences.len()
            );
            Ok(false)
        }
    }
}

/// `ferry migrate --from URL --to URL [--force]`: copies the event log and prints what it did.
pub async fn migrate(config: &Config, args: &crate::cli::MigrateArgs) -> anyhow::Result<()> {
    let from = StoreLocation::parse(&args.from).context("--from")?;
    let to = StoreLocation::parse(&args.to).context("--to")?;
    if from == to {
        bail!("--from and --to are the same store ({from})");
    }
    if let StoreLocation::Embedded(path) = &from {
        // Opening creates a missing file: reading from a store that is not there is a typo.
        if !path.exists() {
            bail!("--from {from}: no such file");
        }
    }
    let ca = config.store_ca_file.as_deref();
    let source = from.open(&config.namespace, ca).await.context("--from")?;
    let target = to.open(&config.namespace, ca).await.context("--to")?;
    let report =
        crate::migrate::migrate(&*source, &*target, args.force, config.gateway.dedupe_window)
            .await
            .with_context(|| format!("migrating {from} to {to}"))?;
    println!(
        "migrated {} events from {from} to {to}: {} written, {} already there; {} output lines copied; fencing tokens go on above {}",
        report.read, report.written, report.skipped, report.log_lines, report.fence
    );
    for (job, step) in &report.interrupted {
        println!("  job {job} step {step} was running: its lease did not move; it will run again");
    }
    println!("check it with: ferry --store {to} replay --verify");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A role of `ferry up` that fails ends the whole process with its error, instead of
    /// leaving the others running until Ctrl-C (here the gateway, given a signing token it
    /// cannot decode, which the configuration's own check now refuses).
    #[tokio::test]
    async fn ferry_up_ends_with_the_error_of_a_role_that_fails() {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            r#"
data_dir = "{}"
[gateway]
listen = "127.0.0.1:0"
[[projects]]
id = 1
path = "g/app"
allow_unauthenticated = true
build = {{ commands = ["make"] }}
"#,
            dir.path().display()
        );
        let mut config = crate::config::load_str(
            &toml,
            std::path::Path::new("/etc/ferry.toml"),
            &|_: &str| None,
            &crate::config::Overrides::default(),
        )
        .unwrap();
        config.projects[0].signing_token = Some(crate::config::Secret::new("whsec_abc"));
        let store: Arc<dyn Store> = Arc::new(
            crate::store::sqlite::SqliteStore::open(&dir.path().join("ferry.db")).unwrap(),
        );
        let ended = tokio::time::timeout(Duration::from_secs(60), run_up(&config, store))
            .await
            .expect("ferry up ended");
        let error = format!("{:#}", ended.unwrap_err());
        assert!(error.contains("signing"), "{error}");
    }

    #[test]
    fn only_projects_with_an_id_and_a_clone_url_are_reconciled() {
        let toml = r#"
[[projects]]
id = 1
path = "g/full"
allow_unauthenticated = true
clone_url = "https://gitlab.example/g/full.git"
build = { commands = ["make"] }
[[projects]]
path = "g/no-id"
allow_unauthenticated = true
clone_url = "https://gitlab.example/g/no-id.git"
build = { commands = ["make"] }
[[projects]]
id = 3
path = "g/no-url"
allow_unauthenticated = true
build = { commands = ["make"] }
"#;
        let config = crate::config::load_str(
            toml,
            std::path::Path::new("/etc/ferry.toml"),
            &|_: &str| None,
            &crate::config::Overrides::default(),
        )
        .unwrap();
        let (projects, skipped) = reconcile_projects(&config);
        let paths: Vec<&str> = projects.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["g/full"]);
        assert_eq!(
            skipped,
            [
                "g/no-id: not reconciled: no id (tags are listed by project id)",
                "g/no-url: not reconciled: no clone_url (a tag list names no repository to clone)"
            ]
        );
    }

    #[test]
    fn store_urls_name_their_kind_and_print_without_passwords() {
        let sentinel = "redis+sentinel://ferry:secret@s1:26379,s2/main/1?sentinel_password=hush";
        assert_eq!(
            StoreLocation::parse(sentinel).unwrap(),
            StoreLocation::Redis(sentinel.into())
        );
        assert_eq!(
            redact(sentinel),
            "redis+sentinel://ferry:***@s1:26379,s2/main/1?sentinel_password=***"
        );
        assert_eq!(
            redact("redis+sentinel://s1/main"),
            "redis+sentinel://s1/main"
        );
        assert_eq!(redact("redis://:secret@h:6379/0"), "redis://:***@h:6379/0");
        // a password with / ? @ in it, unencoded (a url too broken to parse)
        assert_eq!(
            redact("redis://u:pa/s?s@w@h:99999/0"),
            "redis://u:***@h:99999/0"
        );
        assert_eq!(redact("rediss://h:6380/2"), "rediss://h:6380/2");
        let e = StoreLocation::parse("memcached://h")
            .unwrap_err()
            .to_string();
        assert!(e.contains("redis+sentinel://"), "{e}");
    }
}
