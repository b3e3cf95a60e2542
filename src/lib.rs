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
pub mod metrics;
pub mod migrate;
pub(crate) mod process;
pub mod replay;
pub mod store;
pub mod tls;
pub mod workdir;

/// Every binary that links ferry (the `ferry` executable, tests, benches) allocates through
/// mimalloc: the gateway and the store clients allocate and free many small buffers per request,
/// and glibc's malloc took about 14 % of the gateway's CPU in the ingest bench.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
