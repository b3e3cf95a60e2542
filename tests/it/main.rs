//! The one integration test binary.

mod cli;
mod conformance;
mod deploy;
mod flow;
mod gateway;
mod harness;
mod ordering;
mod redis;
mod ssh;
mod sshd;
mod tidy;
