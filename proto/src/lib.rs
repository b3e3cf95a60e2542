//! ferry's wire contract: the event envelope, the closed set of event kinds, and their payloads.
//!
//! Every node of every version reads and writes these bytes, so the rules are strict:
//!
//! - An event kind has a stable number that is **never reused**, even after the event is retired.
//! - Payloads are MessagePack maps written with [`rmp_serde::to_vec_named`]: fields are named, so
//!   adding a field (with `#[serde(default)]`) does not break old readers or old data.
//! - A breaking change to a payload gets a new schema version. The old shape stays decodable
//!   forever (decode-only, converted with `From`), and golden fixtures in `fixtures/` prove it.
//! - Decoding an unknown kind or version is an error, never a panic.
//!
//! `README.md` beside this crate documents the envelope, the kinds, the Redis key layout and the
//! script contracts.

mod events;
mod ids;

pub use events::*;
pub use ids::*;

use serde::{Deserialize, Serialize};

/// One stored event: the kind and schema version that say how to read `payload`, when it was
/// written, which stream it belongs to and the fencing token of the lease it was written under.
///
/// In Redis the envelope is spread over the fields of a stream entry (see `README.md`); this
/// struct's own MessagePack form (`to_vec_named`) is used for snapshots, exports and migrations.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Stable event kind number; see [`KINDS`].
    pub kind: u16,
    /// Schema version of `payload` for this kind.
    pub version: u16,
    /// Wall-clock milliseconds since the Unix epoch when the event was written. Informational:
    /// the order of a stream is the store's order, never this field.
    pub at_ms: u64,
    /// The stream the event belongs to, e.g. `job:<uuid>`, `agents`, `webhooks`.
    pub stream: String,
    /// Fencing token of the lease the writer held, if the event was written under one.
    #[serde(default)]
    pub token: Option<u64>,
    /// The payload, `rmp_serde::to_vec_named` of the kind's struct.
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl Envelope {
    /// Wraps an event for `stream`.
    pub fn new(event: &Event, stream: impl Into<String>, at_ms: u64, token: Option<u64>) -> Self {
        Envelope {
            kind: event.kind(),
            version: event.version(),
            at_ms,
            stream: stream.into(),
            token,
            payload: event.encode_payload(),
        }
    }

    /// Decodes the payload according to `kind` and `version`.
    pub fn decode(&self) -> Result<Event, DecodeError> {
        Event::decode_payload(self.kind, self.version, &self.payload)
    }

    /// The envelope's own MessagePack form.
    pub fn to_bytes(&self) -> Vec<u8> {
        rmp_serde::to_vec_named(self).expect("an envelope always encodes")
    }

    /// Reads an envelope written by [`Envelope::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Envelope(e.to_string()))
    }
}

/// Why bytes could not be read as an event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("unknown event kind {0}")]
    UnknownKind(u16),
    #[error("unknown schema version {version} for event kind {kind} ({name})")]
    UnknownVersion {
        kind: u16,
        name: &'static str,
        version: u16,
    },
    #[error("event kind {kind} ({name}) v{version} has a malformed payload: {reason}")]
    Payload {
        kind: u16,
        name: &'static str,
        version: u16,
        reason: String,
    },
    #[error("malformed envelope: {0}")]
    Envelope(String),
}
