//! ferry: an event-sourced, distributed CI/CD job system for GitLab. See ARCHITECTURE.md.

pub mod agent;
pub mod api;
pub mod app;
pub mod build;
pub mod cli;
pub mod client;
pub mod config;
pub mod coordinator;
pub mod demo;
pub mod deploy;
pub mod domain;
pub mod feed;
pub mod gateway;
pub mod gitlab;
pub mod migrate;
pub mod replay;
pub mod store;
pub mod tls;
