//! The backend-agnostic conformance suite, stamped for Redis.

ferry::store_conformance!(crate::harness::redis_fixture());
