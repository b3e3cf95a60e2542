//! ferry: an event-sourced, distributed CI/CD job system for GitLab. See ARCHITECTURE.md.

pub mod cli;
pub mod config;
pub mod store;
