//! In-process wake-ups for blocking reads: a waiter subscribes to keys (the feed, a pool, a
//! job's log) *before* it looks at the database, and a writer notifies the keys it touched
//! *after* its commit. So a write that the waiter's look missed always wakes it, and nobody
//! polls the database to find out.

use futures_util::future::select_all;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, PoisonError};
use tokio::sync::watch;
use tokio::time::Instant;

/// Wake-up channels by key, created when the first waiter subscribes and dropped when the last
/// one leaves, so keys nobody waits for cost nothing.
pub(super) struct Signals<K> {
    senders: Mutex<HashMap<K, watch::Sender<u64>>>,
}

impl<K: Eq + Hash + Clone> Signals<K> {
    pub(super) fn new() -> Self {
        Signals {
            senders: Mutex::new(HashMap::new()),
        }
    }

    /// A subscription to `keys`: its [`wait`](Subscription::wait) returns once any of them is
    /// notified after this call.
    pub(super) fn subscribe(&self, keys: impl IntoIterator<Item = K>) -> Subscription<'_, K> {
        let mut senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner);
        let receivers = keys
            .into_iter()
            .map(|k| {
                let rx = senders
                    .entry(k.clone())
                    .or_insert_with(|| watch::channel(0).0)
                    .subscribe();
                (k, rx)
            })
            .collect();
        Subscription {
            signals: self,
            receivers,
        }
    }

    /// Wakes the waiters of `key`, if any.
    pub(super) fn notify(&self, key: &K) {
        let senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = senders.get(key) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every waiter (another process changed the database: anything may have arrived).
    pub(super) fn notify_all(&self) {
        let senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner);
        for tx in senders.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    fn release(&self, keys: impl Iterator<Item = K>) {
        let mut senders = self.senders.lock().unwrap_or_else(PoisonError::into_inner);
        for k in keys {
            if senders.get(&k).is_some_and(|tx| tx.receiver_count() == 0) {
                senders.remove(&k);
            }
        }
    }
}

/// One waiter's interest in some keys.
pub(super) struct Subscription<'a, K: Eq + Hash + Clone> {
    signals: &'a Signals<K>,
    receivers: Vec<(K, watch::Receiver<u64>)>,
}

impl<K: Eq + Hash + Clone> Subscription<'_, K> {
    /// Waits until one of the keys was notified since the subscription was made or the last
    /// wait returned, or until `until`. Returns false when it timed out.
    pub(super) async fn wait(&mut self, until: Instant) -> bool {
        if self.receivers.is_empty() {
            tokio::time::sleep_until(until).await;
            return false;
        }
        let changes = self.receivers.iter_mut().map(|(_, rx)| {
            Box::pin(async move {
                // The sender lives as long as a receiver does, so this never ends in an error;
                // if it did, waiting out the deadline is the safe answer.
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            })
        });
        tokio::select! {
            _ = select_all(changes) => true,
            _ = tokio::time::sleep_until(until) => false,
        }
    }
}

impl<K: Eq + Hash + Clone> Drop for Subscription<'_, K> {
    fn drop(&mut self) {
        let keys: Vec<K> = self.receivers.drain(..).map(|(k, _)| k).collect();
        self.signals.release(keys.into_iter());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_notify_after_subscribing_wakes_and_unused_keys_are_dropped() {
        let s: Signals<&str> = Signals::new();
        let soon = || Instant::now() + Duration::from_millis(50);
        s.notify(&"a"); // nobody listens: nothing happens, nothing is kept
        assert!(s.senders.lock().unwrap().is_empty());
        {
            let mut sub = s.subscribe(["a", "b"]);
            assert!(!sub.wait(soon()).await, "no notification yet");
            s.notify(&"c");
            assert!(!sub.wait(soon()).await, "another key");
            s.notify(&"b");
            assert!(sub.wait(soon()).await);
            s.notify_all();
            assert!(sub.wait(soon()).await);
        }
        assert!(s.senders.lock().unwrap().is_empty());
    }
}
