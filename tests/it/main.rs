//! The one integration test binary.

mod conformance;
mod harness;
mod redis;
