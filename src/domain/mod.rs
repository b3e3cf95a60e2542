//! The pure core: how events fold into the state of a job and of the whole system.
//!
//! Nothing here performs I/O or reads a clock (a tidy test in `tests/it/tidy.rs` enforces it):
//! time arrives as an argument or inside events. That is what makes replay safe —
//! `fold(all events)` is the state, whoever computes it and whenever.

pub mod job;
pub mod view;

pub use job::{JobPhase, JobState, StepState, StepStatus};

/// The fold's version: raise it whenever the same events fold to another state (a field added to
/// the state, an event read another way). Snapshots are stored under it, so that a snapshot a
/// build with another fold saved is never resumed from (it would carry that fold's state on for
/// good, and `replay --verify` would report the difference as the store's).
///
/// 2: steps count their hand-backs (`StepState::released`).
pub const FOLD_VERSION: u32 = 2;
pub use view::{AgentState, View};

#[cfg(test)]
mod tests;
