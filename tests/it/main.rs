//! The one integration test binary.

mod agent;
mod api;
mod cli;
mod conformance;
mod deploy;
mod flow;
mod gateway;
mod harness;
mod ordering;
mod redis;
mod tidy;
