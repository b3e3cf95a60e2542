//! Prometheus metrics of the coordinator and agent roles, and the small HTTP server through
//! which `ferry coordinator` and `ferry agent` expose them (`/metrics`, `/healthz`) on
//! `coordinator.metrics_listen` / `agent.metrics_listen`. The gateway's `/metrics` renders
//! them too, so `ferry up` shows every role's metrics on one port.
//!
//! They live in the process's default registry: a role registers its set the first time it
//! starts, with every label value it will use at zero, so that `rate()` and alert rules see a
//! series before its first increment. Label values are small closed sets.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts,
};
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

/// Step kinds, the `kind` label of the agent's step metrics (`other`: a step its job's plan
/// lacks, which fails at once).
pub const STEP_KINDS: [&str; 4] = ["build", "deploy", "noop", "other"];

/// How an agent's run of a step ended, the `outcome` label: its result recorded as
/// `StepSucceeded` or `StepFailed`, given up because its lease was lost (`abandoned`), handed
/// back on shutdown (`released`), or ended without a recorded result (`error`: the store
/// refused or could not take the outcome).
pub const STEP_OUTCOMES: [&str; 5] = ["succeeded", "failed", "abandoned", "released", "error"];

/// Events a coordinator appends as decisions, the `event` label.
pub const DECISIONS: [&str; 8] = [
    "job_created",
    "step_queued",
    "step_retry_scheduled",
    "job_succeeded",
    "job_failed",
    "job_cancelled",
    "job_superseded",
    "other",
];

/// The coordinator's metrics.
pub struct CoordinatorMetrics {
    /// `ferry_coordinator_feed_entries_total`: feed entries handled (and acknowledged).
    pub feed_entries: IntCounter,
    /// `ferry_coordinator_decisions_total{event}`: events appended as decisions.
    pub decisions: IntCounterVec,
    /// `ferry_coordinator_conflicts_total`: decisions lost to a concurrent append (re-decided).
    pub conflicts: IntCounter,
    /// `ferry_coordinator_batch_seconds`: time to handle one feed batch.
    pub batch_seconds: Histogram,
    /// `ferry_sweep_leader`: 1 while this coordinator holds the sweep lock.
    pub sweep_leader: IntGauge,
    /// `ferry_leases_expired_total`: leases the sweep expired (their steps requeued).
    pub leases_expired: IntCounter,
    /// `ferry_retries_promoted_total`: delayed retries moved to their ready queue.
    pub retries_promoted: IntCounter,
    /// `ferry_agents_lost_total`: agents recorded lost (heartbeat expired).
    pub agents_lost: IntCounter,
    /// `ferry_logs_expired_total`: jobs whose output lines the retention removed.
    pub logs_expired: IntCounter,
    /// `ferry_artifacts_expired_total`: artifacts the retention deleted (`artifacts.keep`).
    pub artifacts_expired: IntCounter,
    /// `ferry_log_trimmed_total`: global-log entries the sweep trimmed (`coordinator.keep_feed`).
    pub log_trimmed: IntCounter,
    /// `ferry_log_trim_held{group}`: 1 for the consumer group that has not handled global-log
    /// entries older than `coordinator.keep_feed` (they are kept for it). Sweep leader only.
    pub log_trim_held: IntGaugeVec,
    /// `ferry_sweep_failures_total`: sweep duties that failed (store unreachable, say).
    pub sweep_failures: IntCounter,
    /// `ferry_steps_ready{pool}`: steps waiting in each configured pool's ready queue, set by
    /// the sweep leader only (the others expose none).
    pub steps_ready: IntGaugeVec,
    /// `ferry_steps_ready_wait_seconds{pool}`: how long the step at the head of each
    /// configured pool's ready queue (the next to be claimed) has waited; 0 when the queue is
    /// empty. Sweep leader only.
    pub ready_wait: GaugeVec,
    /// `ferry_steps_delayed`: retries waiting for their due time (all pools). Sweep leader
    /// only.
    pub steps_delayed: IntGauge,
    /// `ferry_store_used_bytes`: what the store uses (Redis `used_memory` of the server
    /// holding the namespace; the SQLite file). Sweep leader only.
    pub store_used: IntGauge,
    /// `ferry_store_limit_bytes`: the most the store may use (Redis `maxmemory`; 0: no
    /// limit). Sweep leader only.
    pub store_limit: IntGauge,
    /// `ferry_artifacts_disk_free_bytes`: free space on the filesystem of a `file://` artifact
    /// store (artifacts stay until `artifacts.keep` lets them go). Sweep leader only; 0 for
    /// other stores.
    pub artifacts_disk_free: IntGauge,
    /// `ferry_artifacts_disk_size_bytes`: that filesystem's size.
    pub artifacts_disk_size: IntGauge,
}

/// The agent's metrics.
pub struct AgentMetrics {
    /// `ferry_agent_steps_running`: steps this agent runs now.
    pub running: IntGauge,
    /// `ferry_agent_slots`: steps this agent runs at most at once (`agent.concurrency`).
    pub slots: IntGauge,
    /// `ferry_agent_claims_total{pool}`: steps claimed, by pool.
    pub claims: IntCounterVec,
    /// `ferry_agent_steps_total{kind,outcome}`: steps whose run ended, by how.
    pub steps: IntCounterVec,
    /// `ferry_agent_step_seconds{kind}`: from claim to the end of the run.
    pub step_seconds: HistogramVec,
    /// `ferry_agent_paused`: 1 while the agent is paused through the API (it claims nothing).
    pub paused: IntGauge,
    /// `ferry_agent_disk_free_bytes`: what the filesystem of the agent's `data_dir` (mirrors,
    /// work directories) still has for it, read with every heartbeat.
    pub disk_free: IntGauge,
    /// `ferry_agent_disk_size_bytes`: the size of that filesystem.
    pub disk_size: IntGauge,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(metric: T) -> T {
    // Each set is built once per process (a LazyLock), so a name is never registered twice.
    prometheus::default_registry()
        .register(Box::new(metric.clone()))
        .expect("metric registered once");
    metric
}

fn counter(name: &str, help: &str) -> IntCounter {
    register(IntCounter::new(name, help).expect("valid metric"))
}

fn gauge(name: &str, help: &str) -> IntGauge {
    register(IntGauge::new(name, help).expect("valid metric"))
}

/// Durations from a millisecond to an hour.
fn buckets() -> Vec<f64> {
    vec![
        0.001, 0.005, 0.025, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0,
    ]
}

/// The coordinator's metrics, registered at first use.
pub static COORDINATOR: LazyLock<CoordinatorMetrics> = LazyLock::new(|| {
    let decisions = register(
        IntCounterVec::new(
            Opts::new(
                "ferry_coordinator_decisions_total",
                "Events a coordinator appended as decisions, by event.",
            ),
            &["event"],
        )
        .expect("valid metric"),
    );
    for event in DECISIONS {
        decisions.with_label_values(&[event]);
    }
    CoordinatorMetrics {
        feed_entries: counter(
            "ferry_coordinator_feed_entries_total",
            "Feed entries a coordinator handled.",
        ),
        decisions,
        conflicts: counter(
            "ferry_coordinator_conflicts_total",
            "Decisions that lost a race with a concurrent append and were taken again.",
        ),
        batch_seconds: register(
            Histogram::with_opts(
                HistogramOpts::new(
                    "ferry_coordinator_batch_seconds",
                    "Time a coordinator took to handle one feed batch.",
                )
                .buckets(buckets()),
            )
            .expect("valid metric"),
        ),
        sweep_leader: gauge(
            "ferry_sweep_leader",
            "1 while this coordinator holds the sweep lock (expires leases, promotes retries).",
        ),
        leases_expired: counter(
            "ferry_leases_expired_total",
            "Step leases the sweep expired because their holder stopped renewing.",
        ),
        retries_promoted: counter(
            "ferry_retries_promoted_total",
            "Delayed retries the sweep moved to their ready queue.",
        ),
        agents_lost: counter(
            "ferry_agents_lost_total",
            "Agents the sweep recorded as lost (heartbeat expired).",
        ),
        logs_expired: counter(
            "ferry_logs_expired_total",
            "Ended jobs whose output lines were removed (coordinator.keep_logs).",
        ),
        artifacts_expired: counter(
            "ferry_artifacts_expired_total",
            "Artifacts the retention deleted from the artifact store (artifacts.keep).",
        ),
        log_trimmed: counter(
            "ferry_log_trimmed_total",
            "Global-log entries trimmed once every consumer group handled them (coordinator.keep_feed); each event stays in its own stream.",
        ),
        sweep_failures: counter(
            "ferry_sweep_failures_total",
            "Sweep duties that failed (the store was unreachable, for instance).",
        ),
        log_trim_held: register(
            IntGaugeVec::new(
                Opts::new(
                    "ferry_log_trim_held",
                    "1 for a consumer group that has not handled global-log entries older than coordinator.keep_feed, which are kept for it (from the coordinator holding the sweep lock).",
                ),
                &["group"],
            )
            .expect("valid metric"),
        ),
        steps_ready: register(
            IntGaugeVec::new(
                Opts::new(
                    "ferry_steps_ready",
                    "Steps waiting in a pool's ready queue (from the coordinator holding the sweep lock).",
                ),
                &["pool"],
            )
            .expect("valid metric"),
        ),
        ready_wait: register(
            GaugeVec::new(
                Opts::new(
                    "ferry_steps_ready_wait_seconds",
                    "How long the next step of a pool's ready queue has waited, 0 when empty (from the coordinator holding the sweep lock).",
                ),
                &["pool"],
            )
            .expect("valid metric"),
        ),
        steps_delayed: register(
            IntGauge::new(
                "ferry_steps_delayed",
                "Retries waiting for their due time (from the coordinator holding the sweep lock).",
            )
            .expect("valid metric"),
        ),
        store_used: gauge(
            "ferry_store_used_bytes",
            "Bytes the store uses: Redis used_memory of the server holding the namespace, or the SQLite file (from the coordinator holding the sweep lock).",
        ),
        artifacts_disk_free: gauge(
            "ferry_artifacts_disk_free_bytes",
            "Free bytes on the filesystem of a file:// artifact store (from the coordinator holding the sweep lock; 0 for other stores).",
        ),
        artifacts_disk_size: gauge(
            "ferry_artifacts_disk_size_bytes",
            "Size of the filesystem of a file:// artifact store (from the coordinator holding the sweep lock).",
        ),
        store_limit: gauge(
            "ferry_store_limit_bytes",
            "The most the store may use: Redis maxmemory, past which it refuses writes; 0 when unlimited (from the coordinator holding the sweep lock).",
        ),
    }
});

/// Metrics of the store connection, for every role on a Redis store.
pub struct StoreMetrics {
    /// `ferry_store_master_switches_total`: times this process moved to another master that
    /// the Redis Sentinels named (a failover or switchover).
    pub master_switches: IntCounter,
}

/// The store connection's metrics, registered at first use (when a Sentinel store is opened).
pub static STORE: LazyLock<StoreMetrics> = LazyLock::new(|| StoreMetrics {
    master_switches: counter(
        "ferry_store_master_switches_total",
        "Times this process followed the Redis Sentinels to another master.",
    ),
});

/// The agent's metrics, registered at first use.
pub static AGENT: LazyLock<AgentMetrics> = LazyLock::new(|| {
    let steps = register(
        IntCounterVec::new(
            Opts::new(
                "ferry_agent_steps_total",
                "Steps whose run on this agent ended, by kind and outcome.",
            ),
            &["kind", "outcome"],
        )
        .expect("valid metric"),
    );
    let step_seconds = register(
        HistogramVec::new(
            HistogramOpts::new(
                "ferry_agent_step_seconds",
                "Time from a step's claim to the end of its run on this agent, by kind.",
            )
            .buckets(buckets()),
            &["kind"],
        )
        .expect("valid metric"),
    );
    for kind in STEP_KINDS {
        step_seconds.with_label_values(&[kind]);
        for outcome in STEP_OUTCOMES {
            steps.with_label_values(&[kind, outcome]);
        }
    }
    AgentMetrics {
        running: gauge(
            "ferry_agent_steps_running",
            "Steps this agent is running now.",
        ),
        slots: gauge(
            "ferry_agent_slots",
            "Steps this agent runs at most at once (agent.concurrency).",
        ),
        paused: gauge(
            "ferry_agent_paused",
            "1 while this agent is paused (POST /api/v1/agents/{name}/pause): it claims no new work.",
        ),
        disk_free: gauge(
            "ferry_agent_disk_free_bytes",
            "Bytes still free for the agent on the filesystem of its data_dir (mirrors, checkouts, artifacts).",
        ),
        disk_size: gauge(
            "ferry_agent_disk_size_bytes",
            "Size of the filesystem of the agent's data_dir.",
        ),
        claims: register(
            IntCounterVec::new(
                Opts::new(
                    "ferry_agent_claims_total",
                    "Steps this agent claimed, by pool.",
                ),
                &["pool"],
            )
            .expect("valid metric"),
        ),
        steps,
        step_seconds,
    }
});

impl AgentMetrics {
    /// Records the end of a run of a `kind` step claimed `took` ago.
    pub fn ended(&self, kind: &str, outcome: &str, took: Duration) {
        self.steps.with_label_values(&[kind, outcome]).inc();
        self.step_seconds
            .with_label_values(&[kind])
            .observe(took.as_secs_f64());
    }
}

/// The text exposition of the default registry (the coordinator's and agent's metrics) followed
/// by `extra`'s (the gateway's own registry), for a `/metrics` answer.
pub fn render(extra: Option<&prometheus::Registry>) -> Response {
    let mut families = prometheus::default_registry().gather();
    if let Some(r) = extra {
        families.extend(r.gather());
    }
    match prometheus::TextEncoder::new().encode_to_string(&families) {
        Ok(text) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
            text,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics").into_response()
        }
    }
}

/// Binds `listen` and serves `/metrics` and `/healthz` there until the process ends. Fails
/// (naming `key`, the setting) when the address cannot be bound.
pub async fn serve(key: &str, listen: SocketAddr) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("{key}: cannot listen on {listen}: {e}"))?;
    let bound = listener.local_addr()?;
    let router = Router::new()
        .route("/metrics", get(|| async { render(None) }))
        .route("/healthz", get(|| async { "ok\n" }));
    tracing::info!(listen = %bound, "metrics listening");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// Every metric family a ferry process can expose.
    fn families() -> BTreeSet<String> {
        // Families of labelled gauges and counters whose label values come from the
        // configuration show once they have a child.
        COORDINATOR.steps_ready.with_label_values(&["any"]);
        COORDINATOR.ready_wait.with_label_values(&["any"]);
        COORDINATOR.log_trim_held.with_label_values(&["any"]);
        LazyLock::force(&STORE);
        AGENT.claims.with_label_values(&["any"]);
        let gateway = prometheus::Registry::new();
        crate::gateway::Metrics::register(&gateway).unwrap();
        prometheus::default_registry()
            .gather()
            .into_iter()
            .chain(gateway.gather())
            .map(|f| f.name().to_string())
            .collect()
    }

    /// The `ferry_…` metric names a text mentions.
    fn named(text: &str) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("ferry_") {
            let tail = &rest[i..];
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            out.insert(tail[..end].to_string());
            rest = &tail[end..];
        }
        out
    }

    /// The alert rules and the dashboard name only metrics ferry registers (a renamed metric
    /// would otherwise silently disable an alert), and the dashboard is valid JSON.
    #[test]
    fn the_ops_alerts_and_dashboard_name_only_metrics_that_exist() {
        let ops = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("ops");
        let known = families();
        for file in ["prometheus/alerts.yml", "grafana/ferry-dashboard.json"] {
            let text = std::fs::read_to_string(ops.join(file)).unwrap();
            let names = named(&text);
            assert!(!names.is_empty(), "{file} names no metric");
            for name in names {
                let family = ["_bucket", "_count", "_sum"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| known.contains(*f)))
                    .unwrap_or(&name);
                assert!(
                    known.contains(family),
                    "{file} names {name}, which ferry does not register"
                );
            }
        }
        let dashboard = std::fs::read_to_string(ops.join("grafana/ferry-dashboard.json")).unwrap();
        let json: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
        assert!(json["panels"].as_array().is_some_and(|p| !p.is_empty()));
        let alerts = std::fs::read_to_string(ops.join("prometheus/alerts.yml")).unwrap();
        assert!(!alerts.contains('\t'), "YAML does not allow tabs");
    }

    /// Every label value a role uses exists at zero from the start.
    #[test]
    fn label_values_start_at_zero() {
        for kind in STEP_KINDS {
            for outcome in STEP_OUTCOMES {
                assert!(AGENT
                    .steps
                    .get_metric_with_label_values(&[kind, outcome])
                    .is_ok());
            }
        }
        let exposed = prometheus::TextEncoder::new()
            .encode_to_string(&prometheus::default_registry().gather())
            .unwrap();
        assert!(exposed.contains(r#"ferry_agent_steps_total{kind="deploy",outcome="abandoned"}"#));
        let _ = &*COORDINATOR;
        let exposed = prometheus::TextEncoder::new()
            .encode_to_string(&prometheus::default_registry().gather())
            .unwrap();
        for event in DECISIONS {
            assert!(
                exposed.contains(&format!(
                    r#"ferry_coordinator_decisions_total{{event="{event}"}}"#
                )),
                "{event}"
            );
        }
    }
}
