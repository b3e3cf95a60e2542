//! Redis adapter.
