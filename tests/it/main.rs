//! The one integration test binary.

mod build;
mod cli;
mod conformance;
mod flow;
mod gateway;
mod harness;
mod redis;
