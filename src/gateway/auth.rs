//! Webhook authenticity (pure: the caller passes `now`). Two schemes, per project:
//!
//! - **Signing key** (GitLab ≥ 19.0, Standard Webhooks): `webhook-signature` holds one or more
//!   space-separated `v1,<base64 HMAC-SHA256>` over `<webhook-id>.<webhook-timestamp>.<raw body>`;
//!   any may match. `webhook-timestamp` must be within the tolerance of `now`, either way.
//! - **Plain token**: `X-Gitlab-Token` equals the project's secret, compared in constant time.
//!
//! When a project has both (a migration), a delivery that carries `webhook-signature` is judged
//! by it alone; one without is judged by the token. A project with neither refuses everything
//! unless it explicitly allows unauthenticated deliveries.

use super::options::ProjectHooks;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use std::fmt;
use std::time::Duration;
use subtle::ConstantTimeEq;

/// The prefix of a Standard Webhooks signing token.
pub const SIGNING_TOKEN_PREFIX: &str = "whsec_";

/// The credential headers of one delivery, as received (raw bytes: a header need not be UTF-8).
#[derive(Clone, Copy, Debug, Default)]
pub struct Credentials<'a> {
    /// `X-Gitlab-Token`.
    pub token: Option<&'a [u8]>,
    /// `webhook-id`.
    pub webhook_id: Option<&'a [u8]>,
    /// `webhook-timestamp`.
    pub timestamp: Option<&'a [u8]>,
    /// `webhook-signature`.
    pub signature: Option<&'a [u8]>,
}

/// How a delivery proved itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Signature,
    Token,
    /// The project allows unauthenticated deliveries.
    Unauthenticated,
}

/// Why a delivery is not authentic. Messages name the header, never a secret.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(
        "project has no webhook token or signing key and does not allow unauthenticated deliveries"
    )]
    NoCredentialsConfigured,
    #[error("missing {0} header")]
    MissingHeader(&'static str),
    #[error("empty x-gitlab-token header")]
    EmptyToken,
    #[error("wrong x-gitlab-token")]
    WrongToken,
    #[error("malformed webhook-timestamp header")]
    MalformedTimestamp,
    #[error("webhook-timestamp is more than {0} s in the past")]
    Stale(u64),
    #[error("webhook-timestamp is more than {0} s in the future")]
    Future(u64),
    #[error("malformed webhook-signature header: no v1 signature")]
    MalformedSignature,
    #[error("webhook-signature does not match")]
    BadSignature,
}

/// Checks a delivery against `project`'s credentials. `now_unix` is the receiver's clock in Unix
/// seconds; `body` the raw bytes received (never re-serialized JSON).
pub fn authenticate(
    project: &ProjectHooks,
    creds: &Credentials<'_>,
    body: &[u8],
    now_unix: i64,
    tolerance: Duration,
) -> Result<Method, Error> {
    let token = project
        .webhook_token
        .as_ref()
        .map(|t| t.expose())
        .filter(|t| !t.is_empty());
    if let Some(key) = &project.signing_key {
        if creds.signature.is_some() || token.is_none() {
            verify_signature(key, creds, body, now_unix, tolerance)?;
            return Ok(Method::Signature);
        }
    }
    if let Some(expected) = token {
        verify_token(expected, creds.token)?;
        return Ok(Method::Token);
    }
    if project.allow_unauthenticated {
        return Ok(Method::Unauthenticated);
    }
    Err(Error::NoCredentialsConfigured)
}

/// Verifies Standard Webhooks headers against `key`.
pub fn verify_signature(
    key: &SigningKey,
    creds: &Credentials<'_>,
    body: &[u8],
    now_unix: i64,
    tolerance: Duration,
) -> Result<(), Error> {
    let signature = creds
        .signature
        .ok_or(Error::MissingHeader("webhook-signature"))?;
    let id = creds.webhook_id.ok_or(Error::MissingHeader("webhook-id"))?;
    let timestamp = creds
        .timestamp
        .ok_or(Error::MissingHeader("webhook-timestamp"))?;

    let sent = parse_timestamp(timestamp)?;
    let tolerance_secs = tolerance.as_secs();
    let tol = i64::try_from(tolerance_secs).unwrap_or(i64::MAX);
    if now_unix.saturating_sub(sent) > tol {
        return Err(Error::Stale(tolerance_secs));
    }
    if sent.saturating_sub(now_unix) > tol {
        return Err(Error::Future(tolerance_secs));
    }

    let candidates = v1_signatures(signature);
    if candidates.is_empty() {
        return Err(Error::MalformedSignature);
    }
    let mut mac = <Hmac<Sha256>>::new_from_slice(&key.0).expect("hmac takes keys of any length");
    mac.update(id);
    mac.update(b".");
    mac.update(timestamp);
    mac.update(b".");
    mac.update(body);
    // `verify_slice` compares in constant time; every candidate is tried so that the time taken
    // does not say which one matched.
    let mut matched = false;
    for candidate in &candidates {
        matched |= mac.clone().verify_slice(candidate).is_ok();
    }
    if matched {
        Ok(())
    } else {
        Err(Error::BadSignature)
    }
}

/// Compares `X-Gitlab-Token` with `expected` in constant time. Both sides are hashed first so
/// that not even their lengths are compared directly.
pub fn verify_token(expected: &str, sent: Option<&[u8]>) -> Result<(), Error> {
    let sent = sent.ok_or(Error::MissingHeader("x-gitlab-token"))?;
    if sent.is_empty() {
        return Err(Error::EmptyToken);
    }
    let a = Sha256::digest(expected.as_bytes());
    let b = Sha256::digest(sent);
    if bool::from(a.ct_eq(&b)) {
        Ok(())
    } else {
        Err(Error::WrongToken)
    }
}

/// Signs `body` the way GitLab does: the value of a `webhook-signature` header holding one `v1`
/// signature. For tests and load drivers that play GitLab.
pub fn sign(key: &SigningKey, webhook_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256>>::new_from_slice(&key.0).expect("hmac takes keys of any length");
    mac.update(format!("{webhook_id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

fn parse_timestamp(raw: &[u8]) -> Result<i64, Error> {
    if raw.is_empty() || raw.len() > 18 || !raw.iter().all(u8::is_ascii_digit) {
        return Err(Error::MalformedTimestamp);
    }
    std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(Error::MalformedTimestamp)
}

/// The decoded `v1` signatures of a header value. Entries of other versions, and entries that
/// are not `v1,<base64>`, are skipped.
fn v1_signatures(header: &[u8]) -> Vec<Vec<u8>> {
    header
        .split(|b| *b == b' ')
        .filter_map(|entry| entry.strip_prefix(b"v1,"))
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .filter(|signature| !signature.is_empty())
        .collect()
}

/// An HMAC key for Standard Webhooks signatures. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningKey(Vec<u8>);

/// A signing token that is not `whsec_` followed by base64.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("signing token must be whsec_ followed by base64 of the key")]
pub struct InvalidSigningToken;

impl SigningKey {
    /// Reads a token as GitLab shows it: `whsec_` + base64 of the key. The key is the decoded
    /// bytes, not the text.
    pub fn from_token(token: &str) -> Result<Self, InvalidSigningToken> {
        let encoded = token
            .strip_prefix(SIGNING_TOKEN_PREFIX)
            .ok_or(InvalidSigningToken)?;
        let key = STANDARD.decode(encoded).map_err(|_| InvalidSigningToken)?;
        if key.is_empty() {
            return Err(InvalidSigningToken);
        }
        Ok(SigningKey(key))
    }

    pub fn from_bytes(key: Vec<u8>) -> Self {
        SigningKey(key)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningKey(***)")
    }
}

#[cfg(test)]
mod tests;
