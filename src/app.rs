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
use crate::store::{redis::RedisStore, Store};
use anyhow::{bail, Context};
use ferry_proto::{AgentId, BuildSpec, DeploySpec};
use std::sync::Arc;
use tokio::sync::watch;

/// Opens the configured store.
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let Some(url) = config.store.as_deref() else {
        bail!(
            "no store configured: the embedded store is not available yet; \
             pass --store redis://HOST:PORT/DB (or set FERRY_STORE, or `store` in the config file)"
        );
    };
    if url.starts_with("rediss://") {
        bail!("store {url}: TLS (rediss://) is not supported by this build yet; use redis://");
    }
    if !url.starts_with("redis://") {
        bail!("store {url}: unsupported scheme; expected redis://HOST:PORT/DB");
    }
    let store = RedisStore::connect(url, &config.namespace)
        .await
        .with_context(|| format!("cannot open store {url}"))?;
    Ok(Arc::new(store))
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
    let state = gateway_state(config, store.clone(), prometheus::Registry::new())?;
    let api = api::ApiState::new(store, &config.api.tokens).with_projects(project_plans(config));
    let router = gateway::router(state).merge(api::router(api));
    let listener = tokio::net::TcpListener::bind(config.gateway.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.gateway.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "gateway listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(until(stop))
        .await?;
    Ok(())
}

/// `ferry up`: every role in one process, sharing one store.
pub async fn run_up(config: &Config, store: Arc<dyn Store>) -> anyhow::Result<()> {
    let stop = shutdown_signal();
    let coordinator = tokio::spawn(coordinator::run(
        store.clone(),
        coordinator_options(config),
        until(stop.clone()),
    ));
    let agent = tokio::spawn(agent::run(
        store.clone(),
        agent_options(config)?,
        until(stop.clone()),
    ));
    let reporter = gitlab_reporter_options(config)
        .map(|o| tokio::spawn(gitlab::run(store.clone(), o, until(stop.clone()))));
    let gateway = run_gateway(config, store, stop.clone()).await;
    coordinator.await??;
    agent.await??;
    if let Some(reporter) = reporter {
        reporter.await??;
    }
    gateway
}

/// The commit-status reporter's options, when `[gitlab]` is configured.
pub fn gitlab_reporter_options(config: &Config) -> Option<gitlab::ReporterOptions> {
    let g = config.gitlab.as_ref()?;
    Some(gitlab::ReporterOptions::new(
        format!("{}-gitlab", config.agent.name),
        g.url.clone(),
        g.token.clone(),
        config.gateway.public_url.clone(),
    ))
}

/// The coordinator's options from the configuration.
pub fn coordinator_options(config: &Config) -> coordinator::Options {
    coordinator::Options {
        consumer: format!("{}-coordinator", config.agent.name),
        policy: RetryPolicy {
            max_attempts: config.coordinator.max_attempts,
            base: config.coordinator.retry_base,
            max: config.coordinator.retry_max,
        },
        sweep_interval: config.coordinator.sweep_interval,
        projects: project_plans(config),
        ..Default::default()
    }
}

/// The agent's options from the configuration: its SSH key is loaded and its artifact store
/// opened here, so a bad key or store fails at start.
pub fn agent_options(config: &Config) -> anyhow::Result<agent::Options> {
    let artifacts = crate::build::ArtifactStore::from_url(&config.artifacts.url)
        .map_err(|e| anyhow::anyhow!("artifacts.url {}: {e}", config.artifacts.url))?;
    let hosts = crate::deploy::transport::Hosts::from_config(&config.agent)
        .map_err(|e| anyhow::anyhow!("agent.ssh_key: {e}"))?;
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
            id: p.id.unwrap_or(0),
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
    replay::catch_up(store, &mut view).await?;
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
