//! The backend-agnostic conformance suite, stamped for every backend.

/// Redis: a fresh namespace on the shared test server.
mod redis {
    ferry::store_conformance!(crate::harness::redis_fixture());
}

/// SQLite: a fresh file; handles in one process share its connection.
mod sqlite {
    ferry::store_conformance!(crate::harness::sqlite_fixture());
}

/// SQLite with a connection per handle, as separate processes on one file have.
mod sqlite_separate {
    ferry::store_conformance!(crate::harness::sqlite_fixture_separate());
}
