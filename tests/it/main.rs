//! The one integration test binary.

mod conformance;
mod flow;
mod harness;
mod redis;
