//! The one integration test binary.

mod api;
mod cli;
mod conformance;
mod flow;
mod gateway;
mod harness;
mod redis;
