//! The conformance suite: backend-agnostic cases that every store must pass.
