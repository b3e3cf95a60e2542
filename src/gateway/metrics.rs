//! The gateway's Prometheus metrics. Label values are small closed sets: events map to
//! [`EventKind`] labels (unknown ones to `other`), outcomes to [`Outcome`].

use super::hook::EventKind;
use prometheus::{Histogram, HistogramOpts, IntCounterVec, Opts, Registry};
use std::time::Duration;

/// What became of a delivery: the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Duplicate,
    Ignored,
    BadRequest,
    Unauthorized,
    UnknownProject,
    TooLarge,
    Unavailable,
}

impl Outcome {
    pub const ALL: [Outcome; 8] = [
        Outcome::Accepted,
        Outcome::Duplicate,
        Outcome::Ignored,
        Outcome::BadRequest,
        Outcome::Unauthorized,
        Outcome::UnknownProject,
        Outcome::TooLarge,
        Outcome::Unavailable,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::Ignored => "ignored",
            Outcome::BadRequest => "bad_request",
            Outcome::Unauthorized => "unauthorized",
            Outcome::UnknownProject => "unknown_project",
            Outcome::TooLarge => "too_large",
            Outcome::Unavailable => "unavailable",
        }
    }
}

/// `ferry_webhooks_received_total{event,outcome}` and `ferry_webhook_ingest_seconds`.
#[derive(Clone, Debug)]
pub struct Metrics {
    received: IntCounterVec,
    ingest: Histogram,
}

impl Metrics {
    /// Registers the gateway's metrics in `registry`. Every label pair starts at zero, so that
    /// rate() and alerts see a series before its first increment.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let received = IntCounterVec::new(
            Opts::new(
                "ferry_webhooks_received_total",
                "Webhook deliveries received, by event kind and outcome.",
            ),
            &["event", "outcome"],
        )?;
        let ingest = Histogram::with_opts(
            HistogramOpts::new(
                "ferry_webhook_ingest_seconds",
                "Time from a delivery's arrival to its answer, store append included.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0,
            ]),
        )?;
        registry.register(Box::new(received.clone()))?;
        registry.register(Box::new(ingest.clone()))?;
        for event in EventKind::ALL {
            for outcome in Outcome::ALL {
                received.with_label_values(&[event.label(), outcome.label()]);
            }
        }
        Ok(Metrics { received, ingest })
    }

    pub fn record(&self, event: EventKind, outcome: Outcome, took: Duration) {
        self.received
            .with_label_values(&[event.label(), outcome.label()])
            .inc();
        self.ingest.observe(took.as_secs_f64());
    }
}
