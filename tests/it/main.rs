//! The one integration test binary.

mod cli;
mod conformance;
mod flow;
mod gateway;
mod gitlab;
mod gitlab_mock;
mod harness;
mod redis;
