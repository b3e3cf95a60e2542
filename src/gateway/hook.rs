//! What a GitLab delivery means (pure: no I/O, no clock). [`Hook::parse`] reads the few fields
//! ferry uses out of a body, tolerating unknown, missing and deprecated fields; [`classify`]
//! decides what the delivery does for one project.
//!
//! Tag semantics (GitLab's contract): `before` all zeros = created, `after` all zeros = deleted,
//! neither = moved (or GitLab's "Test" button). "All zeros" is tested as such, never as 40
//! characters: SHA-256 repositories use 64. An annotated tag's `after` is the tag *object*; the
//! commit is `checkout_sha`, and that is what gets built.

use super::options::{OnTagMove, ProjectHooks};
use serde::de::{IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// The values of `WebhookReceived.action`.
pub mod action {
    /// Build `checkout_sha` as the job named in the event.
    pub const BUILD: &str = "build";
    /// The tag was deleted: cancel its queued work, build nothing.
    pub const DELETE: &str = "delete";
    /// Recorded, not acted on; the event's `reason` says why.
    pub const IGNORED: &str = "ignored";
}

/// The kind of delivery, from `X-Gitlab-Event`. Its label is the `event` metric label, so the set
/// stays small and closed: every other header value is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    TagPush,
    Push,
    MergeRequest,
    Other,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [
        EventKind::TagPush,
        EventKind::Push,
        EventKind::MergeRequest,
        EventKind::Other,
    ];

    pub fn from_header(value: Option<&str>) -> Self {
        match value.map(str::trim) {
            Some("Tag Push Hook") => EventKind::TagPush,
            Some("Push Hook") => EventKind::Push,
            Some("Merge Request Hook") => EventKind::MergeRequest,
            _ => EventKind::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            EventKind::TagPush => "tag_push",
            EventKind::Push => "push",
            EventKind::MergeRequest => "merge_request",
            EventKind::Other => "other",
        }
    }
}

/// The fields of a delivery that ferry uses. All are optional here: [`classify`] says which ones
/// an event kind requires.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Hook {
    pub object_kind: Option<String>,
    /// `project_id`, or `project.id` (merge request payloads have only the latter).
    pub project_id: Option<u64>,
    /// `project.path_with_namespace`.
    pub project_path: Option<String>,
    /// The full ref, `refs/tags/v1.0.0`.
    pub git_ref: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
    /// `null` on a deletion, and possibly on a creation (see [`classify`]).
    pub checkout_sha: Option<String>,
    /// `user_username`, or `user.username`.
    pub user: Option<String>,
    /// `project.git_http_url`.
    pub clone_url: Option<String>,
    /// Fields present with the wrong type, and the type expected: they read as absent, but a
    /// required one is reported as wrong rather than missing.
    invalid: Vec<(&'static str, &'static str)>,
}

/// Why a body cannot be taken as a delivery (answered with 400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("body is not valid json: {0}")]
    NotJson(String),
    #[error("body is not a json object")]
    NotObject,
    #[error("missing field {0}")]
    Missing(&'static str),
    #[error("field {field} must be {expected}")]
    Invalid {
        field: &'static str,
        expected: &'static str,
    },
    #[error("fields before and after are both all zeros")]
    BothZero,
}

/// What a delivery does for its project.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Build `sha`: a tag was created, or a listed branch was pushed.
    Build { sha: String },
    /// Build `sha`, the new commit of a tag that moved (`on_tag_move = rebuild`).
    Rebuild { sha: String },
    /// A tag was deleted: cancel its queued work, build nothing.
    Delete,
    /// Recorded, not acted on.
    Ignore { reason: String },
}

impl Decision {
    /// `WebhookReceived.action`: see [`action`].
    pub fn action(&self) -> &'static str {
        match self {
            Decision::Build { .. } | Decision::Rebuild { .. } => action::BUILD,
            Decision::Delete => action::DELETE,
            Decision::Ignore { .. } => action::IGNORED,
        }
    }

    /// `WebhookReceived.reason`.
    pub fn reason(&self) -> Option<String> {
        match self {
            Decision::Rebuild { .. } => Some(REBUILD_MOVED.to_string()),
            Decision::Ignore { reason } => Some(reason.clone()),
            Decision::Build { .. } | Decision::Delete => None,
        }
    }

    /// Whether the delivery creates a job.
    pub fn builds(&self) -> bool {
        matches!(self, Decision::Build { .. } | Decision::Rebuild { .. })
    }
}

pub const REBUILD_MOVED: &str = "tag moved; on_tag_move is rebuild";
pub const IGNORE_MOVED: &str = "tag moved; on_tag_move is ignore";
pub const IGNORE_NULL_CHECKOUT: &str =
    "checkout_sha is null: the ref moved or vanished before gitlab built the payload";
pub const IGNORE_MERGE_REQUEST: &str = "merge request events are not acted on";
pub const IGNORE_OTHER_EVENT: &str = "x-gitlab-event is not one ferry acts on";
pub const IGNORE_BRANCH_DELETED: &str = "branch deleted";
pub const IGNORE_BRANCH_UNLISTED: &str = "branch is not in the project's branches";
pub const IGNORE_NO_AUTO_BUILD: &str = "auto_build is off for this project";

impl Hook {
    /// Reads a body. Fails only on a body that is not a JSON object; fields of the wrong type
    /// read as absent (an event ferry ignores must not be refused for a field it never uses).
    pub fn parse(body: &[u8]) -> Result<Hook, Error> {
        let not_json = |e: serde_json::Error| {
            Error::NotJson(format!("line {} column {}", e.line(), e.column()))
        };
        // A derived struct also reads a JSON array positionally: look at the first byte.
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            serde_json::from_slice::<serde::de::IgnoredAny>(body).map_err(not_json)?;
            return Err(Error::NotObject);
        }
        // Every field reads leniently (see `Field`), so a data error here is a duplicate key.
        let raw: Raw = serde_json::from_slice(body).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => Error::NotJson(e.to_string()),
            _ => not_json(e),
        })?;
        let mut hook = Hook::default();
        hook.object_kind = hook.string(raw.object_kind, "object_kind");
        hook.git_ref = hook.string(raw.git_ref, "ref");
        hook.before = hook.string(raw.before, "before");
        hook.after = hook.string(raw.after, "after");
        hook.checkout_sha = hook.string(raw.checkout_sha, "checkout_sha");
        hook.project_id = hook.unsigned(raw.project_id, "project_id");
        hook.user = hook.string(raw.user_username, "user_username");
        match raw.project {
            Nested::Object(project) => {
                if hook.project_id.is_none() {
                    hook.project_id = hook.unsigned(project.id, "project.id");
                }
                hook.project_path =
                    hook.string(project.path_with_namespace, "project.path_with_namespace");
                hook.clone_url = hook.string(project.git_http_url, "project.git_http_url");
            }
            Nested::Null => {}
            Nested::Other => hook.invalid.push(("project", "an object")),
        }
        if hook.user.is_none() {
            if let Nested::Object(user) = raw.user {
                hook.user = hook.string(user.username, "user.username");
            }
        }
        Ok(hook)
    }

    fn string(&mut self, value: Field, field: &'static str) -> Option<String> {
        match value {
            Field::Null => None,
            Field::Str(s) => Some(s),
            Field::Unsigned(_) | Field::Other => {
                self.invalid.push((field, "a string"));
                None
            }
        }
    }

    fn unsigned(&mut self, value: Field, field: &'static str) -> Option<u64> {
        match value {
            Field::Null => None,
            Field::Unsigned(n) => Some(n),
            Field::Str(_) | Field::Other => {
                self.invalid.push((field, "an unsigned integer"));
                None
            }
        }
    }

    /// A required field: absent → `Missing`, wrong type → `Invalid`.
    fn require<'a, T: ?Sized>(
        &self,
        value: Option<&'a T>,
        field: &'static str,
    ) -> Result<&'a T, Error> {
        value.ok_or_else(|| match self.invalid.iter().find(|(f, _)| *f == field) {
            Some((field, expected)) => Error::Invalid { field, expected },
            None => Error::Missing(field),
        })
    }
}

/// Decides what a delivery of `kind` does for `project`. Errors name the field that is missing or
/// malformed.
pub fn classify(kind: EventKind, hook: &Hook, project: &ProjectHooks) -> Result<Decision, Error> {
    let decision = match kind {
        EventKind::MergeRequest => ignore(IGNORE_MERGE_REQUEST),
        EventKind::Other => ignore(IGNORE_OTHER_EVENT),
        EventKind::TagPush => classify_tag(hook, project)?,
        EventKind::Push => classify_branch(hook, project)?,
    };
    if decision.builds() && !project.auto_build {
        return Ok(ignore(IGNORE_NO_AUTO_BUILD));
    }
    Ok(decision)
}

/// The short name of a ref under `prefix` when it is a well-formed git ref name.
pub fn short_ref<'a>(git_ref: &'a str, prefix: &str) -> Option<&'a str> {
    git_ref
        .strip_prefix(prefix)
        .filter(|n| is_valid_ref_name(n))
}

/// `git check-ref-format` rules for the part after `refs/tags/` or `refs/heads/`. GitLab only
/// sends valid names; checking anyway means nothing odd (control characters, `..`, a leading
/// `/`) travels further, even into environment variables and commit-status calls.
pub fn is_valid_ref_name(name: &str) -> bool {
    let bad_char = |c: char| c.is_ascii_control() || " ~^:?*[\\".contains(c);
    !name.is_empty()
        && name.len() <= 255
        && name != "@"
        && !name.chars().any(bad_char)
        && !name.contains("..")
        && !name.contains("@{")
        && !name.ends_with('.')
        && name
            .split('/')
            .all(|c| !c.is_empty() && !c.starts_with('.') && !c.ends_with(".lock"))
}

/// `before`/`after` of a creation or deletion: "all zeros", whatever the hash length.
pub fn is_all_zeros(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b == b'0')
}

#[derive(Deserialize)]
struct Raw {
    #[serde(default)]
    object_kind: Field,
    #[serde(default)]
    project_id: Field,
    #[serde(default)]
    project: Nested<RawProject>,
    #[serde(default, rename = "ref")]
    git_ref: Field,
    #[serde(default)]
    before: Field,
    #[serde(default)]
    after: Field,
    #[serde(default)]
    checkout_sha: Field,
    #[serde(default)]
    user_username: Field,
    #[serde(default)]
    user: Nested<RawUser>,
}

/// The fields of `project` that ferry reads (the others are skipped unparsed).
#[derive(Default)]
struct RawProject {
    id: Field,
    path_with_namespace: Field,
    git_http_url: Field,
}

/// The field of `user` that ferry reads.
#[derive(Default)]
struct RawUser {
    username: Field,
}

/// One scalar field, read without building a tree: arrays and objects are skipped and read as
/// `Other` (a wrong type), as do booleans and numbers that are not unsigned integers.
#[derive(Default)]
enum Field {
    #[default]
    Null,
    Str(String),
    Unsigned(u64),
    Other,
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Field;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any json value")
            }
            fn visit_unit<E>(self) -> Result<Field, E> {
                Ok(Field::Null)
            }
            fn visit_none<E>(self) -> Result<Field, E> {
                Ok(Field::Null)
            }
            fn visit_str<E>(self, v: &str) -> Result<Field, E> {
                Ok(Field::Str(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Field, E> {
                Ok(Field::Str(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Field, E> {
                Ok(Field::Unsigned(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Field, E> {
                Ok(u64::try_from(v).map_or(Field::Other, Field::Unsigned))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Field, E> {
                Ok(Field::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Field, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Field, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Field::Other)
            }
        }
        d.deserialize_any(V)
    }
}

/// A nested object of which ferry reads a few fields: `null`, the object, or anything else
/// (a wrong type). Unknown keys are skipped unparsed; a repeated key's last value wins.
#[derive(Default)]
enum Nested<T> {
    #[default]
    Null,
    Object(T),
    Other,
}

/// The fields a [`Nested`] object reads, by key.
trait Fields: Default {
    fn slot(&mut self, key: &str) -> Option<&mut Field>;
}

impl Fields for RawProject {
    fn slot(&mut self, key: &str) -> Option<&mut Field> {
        match key {
            "id" => Some(&mut self.id),
            "path_with_namespace" => Some(&mut self.path_with_namespace),
            "git_http_url" => Some(&mut self.git_http_url),
            _ => None,
        }
    }
}

impl Fields for RawUser {
    fn slot(&mut self, key: &str) -> Option<&mut Field> {
        (key == "username").then_some(&mut self.username)
    }
}

impl<'de, T: Fields> Deserialize<'de> for Nested<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Fields> Visitor<'de> for V<T> {
            type Value = Nested<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any json value")
            }
            fn visit_unit<E>(self) -> Result<Nested<T>, E> {
                Ok(Nested::Null)
            }
            fn visit_none<E>(self) -> Result<Nested<T>, E> {
                Ok(Nested::Null)
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Nested<T>, A::Error> {
                let mut fields = T::default();
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    match fields.slot(key.as_str()) {
                        Some(slot) => *slot = map.next_value()?,
                        None => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Nested::Object(fields))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Nested<T>, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Nested::Other)
            }
            fn visit_str<E>(self, _: &str) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Nested<T>, E> {
                Ok(Nested::Other)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

/// An object key, borrowed from the body when it has no escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl Key<'_> {
    fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

fn ignore(reason: &str) -> Decision {
    Decision::Ignore {
        reason: reason.to_string(),
    }
}

/// The fields every push (tag or branch) must carry, checked.
struct Push<'a> {
    name: &'a str,
    before: &'a str,
    after: &'a str,
    checkout_sha: Option<&'a str>,
}

fn push_fields<'a>(hook: &'a Hook, kind: EventKind) -> Result<Push<'a>, Error> {
    let (object_kind, prefix, ref_expected) = match kind {
        EventKind::TagPush => ("tag_push", "refs/tags/", "a tag ref (refs/tags/<name>)"),
        _ => ("push", "refs/heads/", "a branch ref (refs/heads/<name>)"),
    };
    if hook
        .object_kind
        .as_deref()
        .is_some_and(|k| k != object_kind)
    {
        return Err(Error::Invalid {
            field: "object_kind",
            expected: if kind == EventKind::TagPush {
                "tag_push for a tag push hook"
            } else {
                "push for a push hook"
            },
        });
    }
    hook.require(hook.project_id.as_ref(), "project_id")?;
    let git_ref = hook.require(hook.git_ref.as_deref(), "ref")?;
    let before = object_id(hook, hook.before.as_deref(), "before")?;
    let after = object_id(hook, hook.after.as_deref(), "after")?;
    let checkout_sha = match hook.checkout_sha.as_deref() {
        Some(sha) => Some(object_id(hook, Some(sha), "checkout_sha")?),
        None => None,
    };
    let name = short_ref(git_ref, prefix).ok_or(Error::Invalid {
        field: "ref",
        expected: ref_expected,
    })?;
    if is_all_zeros(before) && is_all_zeros(after) {
        return Err(Error::BothZero);
    }
    Ok(Push {
        name,
        before,
        after,
        checkout_sha,
    })
}

fn object_id<'a>(
    hook: &Hook,
    value: Option<&'a str>,
    field: &'static str,
) -> Result<&'a str, Error> {
    let id = hook.require(value, field)?;
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Invalid {
            field,
            expected: "a hex object id",
        });
    }
    Ok(id)
}

fn build(checkout_sha: Option<&str>, rebuild: bool) -> Decision {
    match checkout_sha {
        None => ignore(IGNORE_NULL_CHECKOUT),
        Some(sha) if rebuild => Decision::Rebuild { sha: sha.into() },
        Some(sha) => Decision::Build { sha: sha.into() },
    }
}

fn classify_tag(hook: &Hook, project: &ProjectHooks) -> Result<Decision, Error> {
    let push = push_fields(hook, EventKind::TagPush)?;
    Ok(if is_all_zeros(push.after) {
        Decision::Delete
    } else if is_all_zeros(push.before) {
        build(push.checkout_sha, false)
    } else {
        match project.on_tag_move {
            OnTagMove::Ignore => ignore(IGNORE_MOVED),
            OnTagMove::Rebuild => build(push.checkout_sha, true),
        }
    })
}

fn classify_branch(hook: &Hook, project: &ProjectHooks) -> Result<Decision, Error> {
    let push = push_fields(hook, EventKind::Push)?;
    Ok(if is_all_zeros(push.after) {
        ignore(IGNORE_BRANCH_DELETED)
    } else if !project.branches.iter().any(|b| b == push.name) {
        ignore(IGNORE_BRANCH_UNLISTED)
    } else {
        build(push.checkout_sha, false)
    })
}

#[cfg(test)]
mod tests;
