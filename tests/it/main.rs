//! The one integration test binary.

mod agent;
mod api;
mod build;
mod cli;
mod cluster;
mod conformance;
mod deploy;
mod e2e;
mod embedded;
mod failover;
mod flow;
mod gateway;
mod gitlab;
mod gitlab_mock;
mod harness;
mod manual;
mod migrate;
mod ordering;
mod redis;
mod sentinel;
mod sqlite;
mod ssh;
mod ssh_fleet;
mod sshd;
mod tidy;
mod tls;
