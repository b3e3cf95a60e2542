//! The pure core: how events fold into the state of a job and of the whole system.
//!
//! Nothing here performs I/O or reads a clock (a tidy test in `tests/it/tidy.rs` enforces it):
//! time arrives as an argument or inside events. That is what makes replay safe —
//! `fold(all events)` is the state, whoever computes it and whenever.

pub mod job;
pub mod view;

pub use job::{JobPhase, JobState, StepState, StepStatus};
pub use view::{AgentState, View};

#[cfg(test)]
mod tests;
