//! The feed consumer loop that coordinators and GitLab reporters share: a consumer of a group
//! first finishes its own pending entries (a restarted process picks up where it stopped), then
//! reads new entries, and now and then takes over the entries another consumer of the group has
//! held too long (a dead process's work). Store errors are logged and retried; the loop never
//! ends by itself.

use crate::store::{Error, Store, Stored};
use std::future::Future;
use std::time::Duration;
use tracing::{info, warn};

/// How one consumer reads its group.
#[derive(Clone, Debug)]
pub struct Consumer<'a> {
    pub group: &'a str,
    pub name: &'a str,
    /// Entries read per round trip.
    pub batch: usize,
    /// An entry pending this long with another consumer is taken over (checked every half of it).
    pub takeover_after: Duration,
}

/// How long `read_new` waits for entries.
const BLOCK: Duration = Duration::from_millis(500);

/// Feeds every batch to `handle` until the future is dropped. `handle` acknowledges what it
/// handled; what it leaves pending comes back (after a restart, or to another consumer).
pub async fn consume<F, Fut>(store: &dyn Store, c: Consumer<'_>, mut handle: F)
where
    F: FnMut(Vec<Stored>) -> Fut,
    Fut: Future<Output = ()>,
{
    // Pending entries come back from the oldest: when the oldest is still pending after its
    // handling, it failed again (a job that cannot be reconciled yet). The loop moves on to new
    // entries then, instead of spinning on it and reading nothing new; the entry comes back by
    // the takeover below once it has been idle for `takeover_after` (XAUTOCLAIM takes a
    // consumer's own idle entries too), and is tried again then.
    let mut oldest = None;
    loop {
        match store.read_pending(c.group, c.name, c.batch).await {
            Ok(batch) if batch.is_empty() => break,
            Ok(batch) if oldest.as_ref() == Some(&batch[0].pos) => {
                warn!(
                    group = c.group,
                    pos = %batch[0].pos,
                    "a pending feed entry failed again; reading new entries, it is tried again later"
                );
                break;
            }
            Ok(batch) => {
                oldest = Some(batch[0].pos.clone());
                handle(batch).await
            }
            Err(e) => recover(store, c.group, "read pending feed entries", &e).await,
        }
    }
    let mut last_takeover = tokio::time::Instant::now();
    loop {
        if last_takeover.elapsed() >= c.takeover_after / 2 {
            last_takeover = tokio::time::Instant::now();
            match store
                .claim_idle(c.group, c.name, c.takeover_after, c.batch)
                .await
            {
                Ok(batch) if !batch.is_empty() => {
                    info!(
                        group = c.group,
                        entries = batch.len(),
                        "took over feed entries of an idle consumer"
                    );
                    handle(batch).await
                }
                Ok(_) => {}
                Err(e) => recover(store, c.group, "take over idle feed entries", &e).await,
            }
        }
        match store.read_new(c.group, c.name, c.batch, BLOCK).await {
            // (a wait that found nothing is no batch)
            Ok(batch) if batch.is_empty() => {}
            Ok(batch) => handle(batch).await,
            Err(e) => recover(store, c.group, "read the feed", &e).await,
        }
    }
}

/// [`backoff`], and when the store says the group does not exist (a Redis that restarted
/// without the data that held it), creates it again: nothing else would, and every entry
/// appended from then on would wait until the process restarted.
async fn recover(store: &dyn Store, group: &str, what: &str, e: &Error) {
    if matches!(e, Error::NoGroup(_)) {
        warn!(
            group,
            "the consumer group is gone from the store (a restart that lost its data?); creating it again"
        );
        if let Err(e) = store.ensure_group(group).await {
            warn!(group, error = %e, "could not create the consumer group again");
        }
    }
    backoff(what, e).await
}

/// Logs a store error and waits before the caller tries again.
pub async fn backoff(what: &str, e: &Error) {
    warn!(error = %e, "could not {what}; retrying");
    tokio::time::sleep(Duration::from_millis(500)).await;
}
