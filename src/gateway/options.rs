//! The gateway's typed inputs. The config module maps the validated configuration into these, so
//! the gateway never reads configuration itself.

use super::auth::SigningKey;
use std::time::Duration;

/// How the webhook endpoint behaves, independent of any one project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayOptions {
    /// Bodies larger than this are refused with 413 before they are parsed. GitLab's own limit is
    /// 25 MB, but tag and branch pushes list at most 20 commits, so a few hundred KiB is plenty.
    pub max_body_bytes: usize,
    /// How long a delivery key and a content key are remembered: a redelivery (or the second of a
    /// project hook + group hook pair) within this window is answered as a duplicate.
    pub dedupe_window: Duration,
    /// How far `webhook-timestamp` may be from the gateway's clock, either way (replay
    /// protection; Standard Webhooks uses 5 minutes).
    pub signature_tolerance: Duration,
    /// How long a store call may take before the gateway answers 503. GitLab gives up after 10 s,
    /// and an answer it never reads counts as a failure toward auto-disabling the hook.
    pub store_timeout: Duration,
}

impl Default for GatewayOptions {
    fn default() -> Self {
        GatewayOptions {
            max_body_bytes: 1024 * 1024,
            dedupe_window: Duration::from_secs(7 * 24 * 3600),
            signature_tolerance: Duration::from_secs(5 * 60),
            store_timeout: Duration::from_secs(5),
        }
    }
}

/// What a tag that moved (neither `before` nor `after` all zeros) does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnTagMove {
    /// Record the delivery, build nothing (the default: a tag is expected to be immutable).
    #[default]
    Ignore,
    /// Build the tag's new commit.
    Rebuild,
}

/// One project the gateway accepts deliveries for.
#[derive(Clone, Debug)]
pub struct ProjectHooks {
    /// GitLab's numeric project id. When set, deliveries match on it alone (it survives renames
    /// and transfers); when unset they match on `path`.
    pub id: Option<u64>,
    /// `path_with_namespace`, e.g. `group/app`. Compared without regard to ASCII case, as GitLab
    /// does.
    pub path: String,
    /// The hook's secret token, compared with `X-Gitlab-Token`. An empty token counts as none.
    pub webhook_token: Option<Secret>,
    /// The hook's signing key (the decoded part of `whsec_...`), checked against
    /// `webhook-signature`. Wins over `webhook_token` when a delivery carries a signature.
    pub signing_key: Option<SigningKey>,
    /// Accept deliveries without any credential when neither a token nor a key is set. Off by
    /// default: an operator must say so explicitly.
    pub allow_unauthenticated: bool,
    pub on_tag_move: OnTagMove,
    /// Short branch names whose pushes build (`main`); empty = branch pushes never build.
    pub branches: Vec<String>,
    /// The clone URL to record instead of the payload's `project.git_http_url`.
    pub clone_url: Option<String>,
    /// When off, deliveries that would build are recorded as ignored.
    pub auto_build: bool,
}

impl ProjectHooks {
    /// A project matched by path, with no credentials, that builds tag creations only.
    pub fn new(path: impl Into<String>) -> Self {
        ProjectHooks {
            id: None,
            path: path.into(),
            webhook_token: None,
            signing_key: None,
            allow_unauthenticated: false,
            on_tag_move: OnTagMove::Ignore,
            branches: Vec::new(),
            clone_url: None,
            auto_build: true,
        }
    }

    /// The project's identity in dedupe keys: the numeric id when known, else the path.
    pub fn key(&self) -> String {
        match self.id {
            Some(id) => id.to_string(),
            None => self.path.to_ascii_lowercase(),
        }
    }
}

/// Tokens are the configuration's [`Secret`](crate::config::Secret): masked in `Debug` and
/// `Display`, compared only in constant time.
pub use crate::config::Secret;
