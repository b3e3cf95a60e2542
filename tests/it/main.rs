//! The one integration test binary.

mod cli;
mod conformance;
mod flow;
mod harness;
mod redis;
