//! Tag reconciliation: GitLab drops webhook events while a hook is disabled, and when one push
//! creates more than three tags, so a tag can exist without ferry ever hearing of it. Now and
//! then (and on `ferry reconcile`) ferry lists each project's tags and records, for every recent
//! tag it has no job for, the delivery the webhook would have made.
//!
//! The recorded `webhook_received` is shaped exactly like the gateway's (`after` = the tag's
//! `target`, `checkout_sha` = its commit) and carries the same content dedupe key
//! (`gateway::dedupe_keys`), so a webhook that did arrive, or arrives later, and a reconciliation
//! never both create a job. The coordinators then plan it like any other delivery.
//!
//! Only tags created (annotated) or committed (lightweight) within `window` are considered, so
//! turning reconciliation on never builds a project's history.

use super::client::{self, Client, Tag};
use crate::gateway::{dedupe_keys, forget_keys};
use crate::store::{self, tag_index, Append, Appended, Store, StreamId};
use ferry_proto::{JobId, WebhookReceived};
use std::time::Duration;
use tracing::info;

/// A project as reconciliation needs it.
#[derive(Clone, Debug)]
pub struct ReconcileProject {
    pub id: u64,
    pub path: String,
    /// The configured clone URL, recorded in the delivery as the gateway would.
    pub clone_url: Option<String>,
}

/// What one project's reconciliation found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Tags GitLab listed.
    pub listed: usize,
    /// Of those, tags within the window.
    pub recent: usize,
    /// Tags that had no job and no delivery: recorded now, they will be built.
    pub recorded: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Gitlab(#[from] client::Error),
    #[error(transparent)]
    Store(#[from] store::Error),
}

/// Pages of 100 tags read per project at most.
const MAX_PAGES: usize = 50;

/// Reconciles one project's tags. `now_ms` is the wall clock; `dedupe_window` the gateway's.
pub async fn reconcile_project(
    store: &dyn Store,
    gitlab: &Client,
    project: &ReconcileProject,
    window: Duration,
    dedupe_window: Duration,
    now_ms: u64,
) -> Result<Reconciled, Error> {
    let tags = gitlab.list_tags(project.id, MAX_PAGES).await?;
    let since = now_ms.saturating_sub(window.as_millis() as u64);
    let mut out = Reconciled {
        listed: tags.len(),
        ..Default::default()
    };
    for tag in tags {
        if made_at_ms(&tag).is_none_or(|t| t < since) {
            continue;
        }
        out.recent += 1;
        if !store
            .indexed(&tag_index(&project.path, &tag.name))
            .await?
            .is_empty()
        {
            continue;
        }
        let delivery = delivery(project, &tag);
        let (keys, forget) = (dedupe_keys(&delivery), forget_keys(&delivery));
        let append = Append::new(StreamId::Webhooks, vec![delivery.into()])
            .dedupe(keys, dedupe_window)
            .forget(forget);
        if let Appended::Written { .. } = store.append(append).await? {
            info!(project = %project.path, tag = %tag.name, "reconciled a tag no webhook reported");
            out.recorded.push(tag.name);
        }
    }
    Ok(out)
}

/// The delivery the Tag Push webhook for `tag` would have recorded.
fn delivery(project: &ReconcileProject, tag: &Tag) -> WebhookReceived {
    WebhookReceived {
        delivery_id: None,
        event: "Tag Push Hook".into(),
        job: Some(JobId::new()),
        project_id: Some(project.id),
        project_path: Some(project.path.clone()),
        git_ref: Some(format!("refs/tags/{}", tag.name)),
        // (as long as the object id: 64 zeros in a SHA-256 repository)
        before: Some("0".repeat(tag.target.len())),
        after: Some(tag.target.clone()),
        checkout_sha: Some(tag.commit.id.clone()),
        user: None,
        clone_url: project.clone_url.clone(),
        action: "build".into(),
        reason: Some("reconciled: GitLab lists the tag but no webhook reported it".into()),
    }
}

/// When the tag was made: an annotated tag's `created_at`, else its commit's date.
fn made_at_ms(tag: &Tag) -> Option<u64> {
    [
        tag.created_at.as_deref(),
        tag.commit.committed_date.as_deref(),
        tag.commit.created_at.as_deref(),
    ]
    .into_iter()
    .flatten()
    .find_map(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    .and_then(|t| u64::try_from(t.timestamp_millis()).ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use client::TagCommit;

    fn tag(created: Option<&str>, committed: Option<&str>) -> Tag {
        Tag {
            name: "v1".into(),
            target: "t".repeat(40),
            commit: TagCommit {
                id: "c".repeat(40),
                committed_date: committed.map(Into::into),
                created_at: None,
            },
            created_at: created.map(Into::into),
        }
    }

    #[test]
    fn a_tag_is_dated_by_its_creation_else_its_commit_in_any_offset() {
        assert_eq!(
            made_at_ms(&tag(Some("2017-07-26T11:08:53.000+02:00"), None)),
            Some(1_501_060_133_000)
        );
        assert_eq!(
            made_at_ms(&tag(None, Some("2012-05-28T04:42:42-07:00"))),
            Some(1_338_205_362_000)
        );
        assert_eq!(
            made_at_ms(&tag(
                Some("2020-01-01T00:00:00Z"),
                Some("2012-05-28T04:42:42-07:00")
            )),
            Some(1_577_836_800_000)
        );
        assert_eq!(made_at_ms(&tag(None, Some("yesterday"))), None);
    }

    #[test]
    fn the_delivery_is_what_the_webhook_would_have_recorded() {
        let p = ReconcileProject {
            id: 7,
            path: "g/app".into(),
            clone_url: None,
        };
        let d = delivery(&p, &tag(None, None));
        assert_eq!(d.after.as_deref(), Some("t".repeat(40).as_str()));
        assert_eq!(d.checkout_sha.as_deref(), Some("c".repeat(40).as_str()));
        assert_eq!(
            dedupe_keys(&d),
            [format!(
                "content:7:refs/tags/v1:{}:{}",
                "0".repeat(40),
                "t".repeat(40)
            )]
        );
        // A SHA-256 repository: its webhooks' `before` is 64 zeros.
        let sha256 = Tag {
            target: "e".repeat(64),
            ..tag(None, None)
        };
        assert_eq!(
            dedupe_keys(&delivery(&p, &sha256)),
            [format!(
                "content:7:refs/tags/v1:{}:{}",
                "0".repeat(64),
                "e".repeat(64)
            )]
        );
    }

    #[test]
    fn link_headers_give_the_next_page() {
        let h = r#"<https://gl.example/api/v4/projects/8/repository/tags?page=2&per_page=100>; rel="next", <https://gl.example/api/v4/projects/8/repository/tags?page=1&per_page=100>; rel="first""#;
        assert_eq!(
            client::next_link(h).as_deref(),
            Some("https://gl.example/api/v4/projects/8/repository/tags?page=2&per_page=100")
        );
        assert_eq!(client::next_link(r#"<https://x/a>; rel="first""#), None);
    }
}
