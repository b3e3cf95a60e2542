//! ferry: an event-sourced, distributed CI/CD job system for GitLab. See ARCHITECTURE.md.

pub mod agent;
pub mod app;
pub mod build;
pub mod cli;
pub mod config;
pub mod coordinator;
pub mod domain;
pub mod gateway;
pub mod replay;
pub mod store;
