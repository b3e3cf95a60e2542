//! The one integration test binary.

mod conformance;
mod flow;
mod gateway;
mod harness;
mod redis;
