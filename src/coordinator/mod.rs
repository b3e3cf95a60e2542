//! The coordinator role: consumes the feed through a consumer group, turns webhooks into jobs,
//! decides each job's next step ([`decide::next`]) and appends the decision with optimistic
//! concurrency; one coordinator at a time (leader lock) sweeps expired leases, promotes due
//! retries, records agents whose heartbeat lapsed as lost and expires old logs and artifacts.

pub mod artifacts;
pub mod decide;
pub mod plan;
pub mod releases;
mod remembered;
mod service;

pub use service::{run, Options};
