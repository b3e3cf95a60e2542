//! The conformance suite: backend-agnostic cases that every store must pass.
//!
//! Each case is a `pub async fn(&Fixture)` that panics on failure. A [`Fixture`] holds a fresh,
//! isolated store and can open more independent handles onto the same data (for races between
//! "nodes"). [`store_conformance!`](crate::store_conformance) stamps one
//! `#[tokio::test(flavor = "multi_thread")]` per case for a fixture factory, so every backend
//! runs the same cases:
//!
//! ```text
//! ferry::store_conformance!(crate::harness::redis_fixture());
//! ```
//!
//! Time-based cases use short TTLs and poll conditions with generous deadlines; none asserts on
//! how long anything took.

use super::{
    Append, Appended, Error, Heard, Leases, Listing, LogPos, Order, Store, Stored, StreamId,
    Version,
};
use ferry_proto::{
    AgentId, AgentLost, Event, FencingToken, JobCancelled, JobId, StepClaimed, StepQueued,
    StepRetryScheduled, StepStarted, StepSucceeded, WebhookReceived,
};
use std::collections::{BTreeMap, HashSet};
use std::future::Future;
use std::ops::Deref;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// Generous deadline for anything that depends on time passing.
pub const DEADLINE: Duration = Duration::from_secs(10);

type Opener = dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn Store>> + Send>> + Send + Sync;

/// A fresh isolated store, plus a way to open more independent handles (own connections) onto
/// the same data.
pub struct Fixture {
    pub store: Arc<dyn Store>,
    open: Box<Opener>,
}

impl Fixture {
    pub fn new<F, Fut>(store: Arc<dyn Store>, open: F) -> Fixture
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Arc<dyn Store>> + Send + 'static,
    {
        Fixture {
            store,
            open: Box::new(move || Box::pin(open())),
        }
    }

    /// Another handle onto the same store, with its own connection.
    pub async fn another(&self) -> Arc<dyn Store> {
        (self.open)().await
    }
}

impl Deref for Fixture {
    type Target = dyn Store;
    fn deref(&self) -> &Self::Target {
        &*self.store
    }
}

/// Polls `f` until it yields `Some`, panicking with `what` after `deadline`.
pub async fn wait_for<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `cond` until it is true, panicking after `deadline`.
pub async fn wait_until<F, Fut>(deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(deadline, "a condition", || {
        let c = cond();
        async move { c.await.then_some(()) }
    })
    .await
}

/// Stamps one `#[tokio::test(flavor = "multi_thread")]` per conformance case. `$fixture` is an
/// expression evaluating to a future of a fresh [`Fixture`](crate::store::conformance::Fixture).
#[macro_export]
macro_rules! store_conformance {
    ($fixture:expr) => {
        $crate::store_conformance!(@cases $fixture;
            append_and_read_in_order,
            expected_version_conflicts,
            racing_appends_have_one_winner,
            concurrent_appends_each_get_their_own_answer,
            fenced_append_needs_the_live_token,
            expired_lease_fences_out_the_old_holder,
            dedupe_returns_the_original_and_writes_nothing,
            a_forgotten_dedupe_key_counts_no_more,
            claim_orders_by_priority_then_fifo_across_pools,
            claim_many_takes_the_best_in_order,
            concurrent_claimers_take_each_step_once,
            step_claimed_event_decodes,
            a_claim_carries_the_whole_history_of_a_long_job_stream,
            renew_and_release_need_the_holder,
            the_fence_counter_is_raised_never_lowered,
            expire_due_appends_lease_expired,
            a_lease_that_ran_out_is_dead_before_the_sweep,
            scheduled_steps_are_promoted_only_when_due,
            queue_depths_count_ready_and_delayed_steps,
            clear_job_removes_queue_entries_and_leases,
            finish_drops_the_lease,
            requeueing_a_leased_step_fences_out_its_holder,
            an_ended_job_is_never_queued_again,
            job_created_indexes_the_job_by_tag_and_environment,
            artifacts_index_the_jobs_that_publish_or_ship_them,
            logs_are_fenced_ordered_and_followable,
            logs_of_ended_jobs_are_listed_until_logs_expired_drops_them,
            imported_logs_need_no_lease_and_read_back_in_order,
            feed_group_reads_new_entries_and_acks,
            feed_read_new_blocks_until_an_entry_arrives,
            restarted_consumer_reads_its_pending_first,
            claim_idle_takes_over_a_dead_consumer,
            leader_lock_is_exclusive_and_tokens_grow,
            leader_lock_lapses_after_ttl,
            snapshots_put_and_get,
            usage_reports_the_size_and_grows_with_writes,
            jobs_page_in_either_order,
            a_long_stream_reads_back_by_its_tail_and_by_pages,
            trimming_the_log_keeps_what_a_group_has_not_handled,
            wait_for_work_wakes_on_enqueue,
            bad_names_are_rejected,
            heartbeats_keep_agents_live,
            expire_agents_records_agent_lost_once,
            an_agent_that_left_is_not_live_and_never_lost,
            a_stop_request_comes_back_with_heartbeats_until_the_agent_joins_or_leaves,
            a_pause_comes_back_with_heartbeats_until_the_agent_is_resumed,
            an_agent_whose_heartbeat_ran_out_is_not_live_before_the_sweep,
        );
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $fixture.await;
                $crate::store::conformance::$case(&fixture).await;
            }
        )*
    };
}

// ---------------------------------------------------------------------------------------------
// helpers

fn queued(step: &str, pool: &str, priority: i32, attempt: u32) -> Event {
    Event::StepQueued(StepQueued {
        step: step.into(),
        attempt,
        pool: pool.into(),
        priority,
    })
}

fn started(step: &str) -> Event {
    Event::StepStarted(StepStarted {
        step: step.into(),
        attempt: 1,
        agent: "a".into(),
    })
}

fn webhook(n: u32) -> Event {
    Event::WebhookReceived(WebhookReceived {
        event: "Tag Push Hook".into(),
        action: format!("build-{n}"),
        ..Default::default()
    })
}

/// A test job of project `group/app` (id 1) at tag `tag` on commit `aaa…`: one no-op step per
/// name in `steps`, all for `pool`, priority 0. Tests, benches and this suite share it.
pub fn noop_job(job: JobId, tag: &str, pool: &str, steps: &[&str]) -> ferry_proto::JobCreated {
    ferry_proto::JobCreated {
        artifact: None,
        job,
        project_id: 1,
        project: "group/app".into(),
        tag: tag.into(),
        git_ref: format!("refs/tags/{tag}"),
        sha: "a".repeat(40),
        priority: 0,
        trigger: "test".into(),
        steps: steps
            .iter()
            .map(|s| ferry_proto::StepPlan {
                step: ferry_proto::StepId::new(*s),
                pool: pool.into(),
                priority: 0,
                spec: ferry_proto::StepSpec::Noop,
            })
            .collect(),
    }
}

async fn append(store: &dyn Store, a: Append) -> (Version, Vec<LogPos>) {
    match store.append(a).await.expect("append") {
        Appended::Written { version, positions } => (version, positions),
        other => panic!("expected a write, got {other:?}"),
    }
}

async fn enqueue(store: &dyn Store, job: JobId, step: &str, pool: &str, priority: i32) {
    append(
        store,
        Append::new(StreamId::Job(job), vec![queued(step, pool, priority, 1)]),
    )
    .await;
}

fn pools(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

const LONG: Duration = Duration::from_secs(60);

async fn events(store: &dyn Store, job: JobId) -> Vec<Event> {
    store
        .read_stream(&StreamId::Job(job), 0)
        .await
        .expect("read stream")
        .iter()
        .map(|s| s.decode().expect("decode"))
        .collect()
}

/// Waits until the local clock has moved on by a few ms, so that two enqueues get distinct
/// enqueue times (queue order is by ms).
async fn next_ms() {
    let start = super::now_ms();
    wait_until(DEADLINE, || async { super::now_ms() > start + 2 }).await;
}

// ---------------------------------------------------------------------------------------------
// event log

pub async fn append_and_read_in_order(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    let js = StreamId::Job(job);
    let (v1, p1) = append(s, Append::new(js.clone(), vec![started("a"), started("b")])).await;
    assert_eq!(v1, 2);
    assert_eq!(p1.len(), 2);
    let (w1, pw) = append(s, Append::new(StreamId::Webhooks, vec![webhook(1)])).await;
    assert_eq!(w1, 1);
    let mut a = Append::new(js.clone(), vec![started("c"), started("d")]);
    a.at_ms = 1_234;
    let (v2, p2) = append(s, a).await;
    assert_eq!(v2, 4);

    let all = s.read_stream(&js, 0).await.unwrap();
    let steps: Vec<String> = all
        .iter()
        .map(|e| match e.decode().unwrap() {
            Event::StepStarted(x) => x.step.0,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(steps, ["a", "b", "c", "d"]);
    let pos: Vec<LogPos> = all.iter().map(|e| e.pos.clone()).collect();
    assert_eq!(pos, [p1.clone(), p2.clone()].concat());
    assert_eq!(all[0].envelope.stream, js.name());
    assert_eq!(all[0].envelope.token, None);
    assert_eq!(all[2].envelope.at_ms, 1_234);
    let seqs: Vec<Option<Version>> = all.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        [Some(1), Some(2), Some(3), Some(4)],
        "each event knows its place"
    );
    let log = s.read_log(None, 100).await.unwrap();
    assert!(
        all.iter().all(|e| log.contains(e)),
        "the log holds the same entries, places included"
    );
    let tail = s.read_stream(&js, 3).await.unwrap();
    assert_eq!(tail, all[3..].to_vec());
    assert!(s.read_stream(&js, 9).await.unwrap().is_empty());
    assert!(s
        .read_stream(&StreamId::Agents, 0)
        .await
        .unwrap()
        .is_empty());

    // the global log holds everything, in append order, with the same positions and envelopes
    let log = s.read_log(None, 100).await.unwrap();
    let log_pos: Vec<LogPos> = log.iter().map(|e| e.pos.clone()).collect();
    assert_eq!(log_pos, [p1.clone(), pw.clone(), p2.clone()].concat());
    assert!(
        log_pos.windows(2).all(|w| w[0] < w[1]),
        "log positions ascend"
    );
    assert_eq!(log[0], all[0]);
    assert_eq!(log[2].envelope.stream, "webhooks");
    // paging
    let page = s.read_log(Some(&p1[1]), 2).await.unwrap();
    assert_eq!(page, log[2..4].to_vec());
    assert!(s.read_log(Some(&p2[1]), 10).await.unwrap().is_empty());
}

pub async fn expected_version_conflicts(fx: &Fixture) {
    let s = &**fx;
    let js = StreamId::Job(JobId::new());
    append(s, Append::new(js.clone(), vec![started("a")]).expect(0)).await;
    match s
        .append(Append::new(js.clone(), vec![started("b")]).expect(0))
        .await
    {
        Err(Error::Conflict {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (0, 1)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    match s
        .append(Append::new(js.clone(), vec![started("b")]).expect(5))
        .await
    {
        Err(Error::Conflict { actual, .. }) => assert_eq!(actual, 1),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(
        s.read_stream(&js, 0).await.unwrap().len(),
        1,
        "loser wrote nothing"
    );
    let (v, _) = append(s, Append::new(js.clone(), vec![started("b")]).expect(1)).await;
    assert_eq!(v, 2);
    // Any appends regardless
    let (v, _) = append(s, Append::new(js.clone(), vec![started("c")])).await;
    assert_eq!(v, 3);
}

pub async fn racing_appends_have_one_winner(fx: &Fixture) {
    let js = StreamId::Job(JobId::new());
    let (a, b) = (fx.another().await, fx.another().await);
    const ROUNDS: u64 = 40;
    for round in 0..ROUNDS {
        let barrier = Arc::new(tokio::sync::Barrier::new(2));
        let tasks: Vec<_> = [a.clone(), b.clone()]
            .into_iter()
            .enumerate()
            .map(|(i, store)| {
                let (barrier, js) = (barrier.clone(), js.clone());
                tokio::spawn(async move {
                    barrier.wait().await;
                    let ev = started(&format!("r{round}-w{i}"));
                    store.append(Append::new(js, vec![ev]).expect(round)).await
                })
            })
            .collect();
        let mut wins = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(Appended::Written { version, .. }) => {
                    assert_eq!(version, round + 1);
                    wins += 1;
                }
                Err(Error::Conflict { actual, .. }) => assert_eq!(actual, round + 1),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(wins, 1, "round {round}: exactly one writer wins");
    }
    assert_eq!(fx.read_stream(&js, 0).await.unwrap().len() as u64, ROUNDS);
}

/// Many appends in flight at once on one handle (a backend may send them together): each gets
/// the answer it would get alone, and a refused one writes nothing.
pub async fn concurrent_appends_each_get_their_own_answer(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    enqueue(s, job, "build", "linux", 0).await;
    let c = s
        .claim(&pools(&["linux"]), &"agent-1".into(), LONG)
        .await
        .unwrap()
        .expect("a claim");
    let leased = StreamId::Job(job);
    let contested = StreamId::Job(JobId::new());
    let log_before = s.read_log(None, 10_000).await.unwrap().len();

    #[derive(Debug)]
    enum Kind {
        Fresh,
        Contested,
        Deduped,
        Fenced,
        WrongToken,
    }
    let mut calls = Vec::new();
    for i in 0..120u32 {
        let (kind, append) = match i % 5 {
            0 => (
                Kind::Fresh,
                Append::new(
                    StreamId::Job(JobId::new()),
                    vec![started("a"), started("b")],
                ),
            ),
            1 => (
                Kind::Contested,
                Append::new(contested.clone(), vec![started(&format!("c{i}"))]).expect(0),
            ),
            2 => (
                Kind::Deduped,
                Append::new(StreamId::Webhooks, vec![webhook(i)])
                    .dedupe(pool_keys(&["same-delivery"]), LONG),
            ),
            3 => (
                Kind::Fenced,
                Append::new(leased.clone(), vec![started("build")]).fenced(c.step.clone(), c.token),
            ),
            _ => (
                Kind::WrongToken,
                Append::new(leased.clone(), vec![started("build")])
                    .fenced(c.step.clone(), FencingToken(c.token.0 + 1)),
            ),
        };
        calls.push(async move { (kind, s.append(append).await) });
    }
    let answers = futures_util::future::join_all(calls).await;

    let (mut written, mut contested_wins, mut deduped_wins) = (0, 0, 0);
    let mut originals = HashSet::new();
    let mut dedupe_written = None;
    for (kind, answer) in answers {
        match (&kind, answer) {
            (Kind::Fresh, Ok(Appended::Written { version, positions })) => {
                assert_eq!((version, positions.len()), (2, 2));
                written += 2;
            }
            (Kind::Contested, Ok(Appended::Written { version, .. })) => {
                assert_eq!(version, 1);
                contested_wins += 1;
                written += 1;
            }
            (
                Kind::Contested,
                Err(Error::Conflict {
                    expected, actual, ..
                }),
            ) => {
                assert_eq!((expected, actual), (0, 1));
            }
            (Kind::Deduped, Ok(Appended::Written { positions, .. })) => {
                deduped_wins += 1;
                dedupe_written = Some(positions[0].clone());
                written += 1;
            }
            (Kind::Deduped, Ok(Appended::Duplicate { original })) => {
                originals.insert(original);
            }
            (Kind::Fenced, Ok(Appended::Written { .. })) => written += 1,
            (Kind::WrongToken, Err(Error::Stale { token, .. })) => {
                assert_eq!(token, FencingToken(c.token.0 + 1));
            }
            (kind, other) => panic!("{kind:?}: unexpected answer {other:?}"),
        }
    }
    assert_eq!((contested_wins, deduped_wins), (1, 1));
    let first = dedupe_written.expect("one deduped append was written");
    assert!(
        originals.iter().all(|o| *o == first),
        "every duplicate names the one written: {originals:?} vs {first}"
    );
    let log_after = s.read_log(None, 10_000).await.unwrap().len();
    assert_eq!(
        log_after - log_before,
        written,
        "refused appends wrote nothing"
    );
    assert_eq!(s.read_stream(&contested, 0).await.unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// leases and fencing

pub async fn fenced_append_needs_the_live_token(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    enqueue(s, job, "build", "linux", 0).await;
    let c = s
        .claim(&pools(&["linux"]), &"agent-1".into(), LONG)
        .await
        .unwrap()
        .expect("a claim");
    let js = StreamId::Job(job);
    let (_, pos) = append(
        s,
        Append::new(js.clone(), vec![started("build")]).fenced(c.step.clone(), c.token),
    )
    .await;
    let last = s.read_stream(&js, 0).await.unwrap().pop().unwrap();
    assert_eq!(last.pos, pos[0]);
    assert_eq!(last.envelope.token, Some(c.token.0));

    let before = s.read_stream(&js, 0).await.unwrap().len();
    let wrong = FencingToken(c.token.0 + 1000);
    for (step, token) in [("build", wrong), ("deploy", c.token)] {
        match s
            .append(Append::new(js.clone(), vec![started(step)]).fenced(step.into(), token))
            .await
        {
            Err(Error::Stale { .. }) => {}
            other => panic!("expected stale for {step}/{token}, got {other:?}"),
        }
    }
    assert_eq!(s.read_stream(&js, 0).await.unwrap().len(), before);
}

pub async fn expired_lease_fences_out_the_old_holder(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    let js = StreamId::Job(job);
    enqueue(s, job, "build", "linux", 0).await;
    let old = s
        .claim(
            &pools(&["linux"]),
            &"old".into(),
            Duration::from_millis(150),
        )
        .await
        .unwrap()
        .expect("a claim");
    let expired = wait_for(DEADLINE, "the lease to expire", || async {
        let l = s.expire_due(10).await.unwrap();
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].token, old.token);

    // the coordinator re-queues; a new agent claims
    append(
        s,
        Append::new(js.clone(), vec![queued("build", "linux", 0, 2)]),
    )
    .await;
    let new = s
        .claim(&pools(&["linux"]), &"new".into(), LONG)
        .await
        .unwrap()
        .expect("a claim");
    assert_eq!(new.attempt, 2);
    assert!(new.token > old.token, "tokens only grow");

    match Leases::renew(s, job, &old.step, old.token, LONG).await {
        Err(Error::Stale { token, .. }) => assert_eq!(token, old.token),
        other => panic!("old holder renewed: {other:?}"),
    }
    match s
        .append(Append::new(js.clone(), vec![started("build")]).fenced(old.step.clone(), old.token))
        .await
    {
        Err(Error::Stale { .. }) => {}
        other => panic!("old holder appended: {other:?}"),
    }
    append(
        s,
        Append::new(js.clone(), vec![started("build")]).fenced(new.step.clone(), new.token),
    )
    .await;
    assert!(Leases::renew(s, job, &new.step, new.token, LONG)
        .await
        .is_ok());
}

pub async fn dedupe_returns_the_original_and_writes_nothing(fx: &Fixture) {
    let s = &**fx;
    let window = Duration::from_secs(60);
    let w = StreamId::Webhooks;
    let (_, pos) = append(
        s,
        Append::new(w.clone(), vec![webhook(1), webhook(2)])
            .dedupe(pool_keys(&["k1", "k2"]), window),
    )
    .await;
    let log_len = s.read_log(None, 1000).await.unwrap().len();
    let dup = s
        .append(Append::new(w.clone(), vec![webhook(3)]).dedupe(pool_keys(&["k3", "k2"]), window))
        .await
        .unwrap();
    assert_eq!(
        dup,
        Appended::Duplicate {
            original: pos[0].clone()
        }
    );
    // a duplicate also wins over a version check: it names the original instead of failing
    let dup = s
        .append(
            Append::new(w.clone(), vec![webhook(3)])
                .dedupe(pool_keys(&["k1"]), window)
                .expect(0),
        )
        .await
        .unwrap();
    assert_eq!(
        dup,
        Appended::Duplicate {
            original: pos[0].clone()
        }
    );
    assert_eq!(s.read_stream(&w, 0).await.unwrap().len(), 2);
    assert_eq!(s.read_log(None, 1000).await.unwrap().len(), log_len);
    // the duplicate recorded nothing, k3 included
    let (v, _) = append(
        s,
        Append::new(w.clone(), vec![webhook(4)]).dedupe(pool_keys(&["k3"]), window),
    )
    .await;
    assert_eq!(v, 3);
}

/// An append that forgets dedupe keys ends what they recorded once it is written (a tag's
/// deletion ends its creation's key); a refused one forgets nothing.
pub async fn a_forgotten_dedupe_key_counts_no_more(fx: &Fixture) {
    let s = &**fx;
    let window = Duration::from_secs(60);
    let w = StreamId::Webhooks;
    let keyed = |n: u32, key: &str| {
        Append::new(w.clone(), vec![webhook(n)]).dedupe(pool_keys(&[key]), window)
    };
    let (_, created) = append(s, keyed(1, "create")).await;
    // A duplicate that would forget: refused, and forgets nothing.
    let dup = s
        .append(keyed(2, "create").forget(pool_keys(&["create"])))
        .await
        .unwrap();
    assert_eq!(
        dup,
        Appended::Duplicate {
            original: created[0].clone()
        }
    );
    assert!(matches!(
        s.append(keyed(3, "create")).await.unwrap(),
        Appended::Duplicate { .. }
    ));
    // Written, with its own key recorded and the other forgotten.
    append(
        s,
        keyed(4, "delete").forget(pool_keys(&["create", "never recorded"])),
    )
    .await;
    let (_, again) = append(s, keyed(5, "create")).await;
    assert_ne!(again, created);
    assert!(matches!(
        s.append(keyed(6, "delete")).await.unwrap(),
        Appended::Duplicate { .. }
    ));
    // Forgetting without recording a key of its own.
    append(
        s,
        Append::new(w.clone(), vec![webhook(7)]).forget(pool_keys(&["delete"])),
    )
    .await;
    append(s, keyed(8, "delete")).await;
    let err = s
        .append(Append::new(w.clone(), vec![webhook(9)]).forget(pool_keys(&[""])))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("dedupe key to forget")),
        "{err:?}"
    );
    assert_eq!(s.read_stream(&w, 0).await.unwrap().len(), 5);
}

fn pool_keys(k: &[&str]) -> Vec<String> {
    pools(k)
}

// ---------------------------------------------------------------------------------------------
// work queue

pub async fn claim_orders_by_priority_then_fifo_across_pools(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    // Step names sort against enqueue order, so ordering by name instead of time would fail.
    let plan = [
        ("s9", "a", 0),
        ("s8", "b", 0),
        ("s7", "a", 10),
        ("s6", "b", 10),
        ("s5", "b", -5),
        ("s4", "a", 200), // clamped to the top priority band
    ];
    for (step, pool, prio) in plan {
        enqueue(s, job, step, pool, prio).await;
        next_ms().await;
    }
    let mut got = Vec::new();
    while let Some(c) = s
        .claim(&pools(&["b", "a"]), &"agent".into(), LONG)
        .await
        .unwrap()
    {
        assert_eq!(c.job, job);
        got.push((c.step.0, c.pool));
    }
    let want: Vec<(String, String)> = [
        ("s7", "a"),
        ("s6", "b"),
        ("s9", "a"),
        ("s8", "b"),
        ("s5", "b"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    assert_eq!(got[0], ("s4".to_string(), "a".to_string()));
    assert_eq!(got[1..].to_vec(), want);
    assert!(s.queued().await.unwrap().is_empty());
}

/// `claim_many` takes what successive `claim`s would, in the same order, each with its own
/// lease, token and `StepClaimed`, and each claim carries its own job's stream.
pub async fn claim_many_takes_the_best_in_order(fx: &Fixture) {
    let s = &**fx;
    let jobs: Vec<JobId> = (0..5).map(|_| JobId::new()).collect();
    for (i, (job, prio)) in jobs.iter().zip([0, 5, 0, 9, -1]).enumerate() {
        let pool = if i % 2 == 0 { "a" } else { "b" };
        enqueue(s, *job, "build", pool, prio).await;
        next_ms().await;
    }
    let both = pools(&["a", "b"]);
    assert!(s
        .claim_many(&both, &"agent".into(), LONG, 0)
        .await
        .unwrap()
        .is_empty());
    let first = s.claim_many(&both, &"agent".into(), LONG, 3).await.unwrap();
    let order: Vec<JobId> = first.iter().map(|c| c.job).collect();
    assert_eq!(order, vec![jobs[3], jobs[1], jobs[0]], "priority, then age");
    let rest = s
        .claim_many(&both, &"agent".into(), LONG, 10)
        .await
        .unwrap();
    let order: Vec<JobId> = rest.iter().map(|c| c.job).collect();
    assert_eq!(order, vec![jobs[2], jobs[4]]);
    assert!(s
        .claim_many(&both, &"agent".into(), LONG, 10)
        .await
        .unwrap()
        .is_empty());

    let all: Vec<&super::Claim> = first.iter().chain(&rest).collect();
    for pair in all.windows(2) {
        assert!(
            pair[0].token < pair[1].token,
            "every claim has its own, newer token"
        );
    }
    for c in &all {
        let stream = s.read_stream(&StreamId::Job(c.job), 0).await.unwrap();
        assert_eq!(c.history, stream, "each claim carries its own job's stream");
        match stream.last().unwrap().decode().unwrap() {
            Event::StepClaimed(x) => assert_eq!(x.token, c.token),
            other => panic!("expected StepClaimed, got {other:?}"),
        }
    }
    assert_eq!(s.leases().await.unwrap().len(), 5);
}

pub async fn concurrent_claimers_take_each_step_once(fx: &Fixture) {
    let s = &**fx;
    const JOBS: usize = 4;
    const STEPS: usize = 50;
    for _ in 0..JOBS {
        let job = JobId::new();
        let evs = (0..STEPS)
            .map(|i| {
                queued(
                    &format!("step-{i}"),
                    if i % 2 == 0 { "p1" } else { "p2" },
                    (i % 3) as i32,
                    1,
                )
            })
            .collect();
        append(s, Append::new(StreamId::Job(job), evs)).await;
    }
    assert_eq!(s.queued().await.unwrap().len(), JOBS * STEPS);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let store = fx.another().await;
        tasks.push(tokio::spawn(async move {
            let agent = AgentId::new(format!("agent-{i}"));
            let mut mine = Vec::new();
            while let Some(c) = store
                .claim(&pools(&["p1", "p2"]), &agent, LONG)
                .await
                .expect("claim")
            {
                mine.push((c.job, c.step, c.token));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), JOBS * STEPS, "every step claimed once");
    let unique: HashSet<_> = all.iter().map(|(j, s, _)| (*j, s.clone())).collect();
    assert_eq!(unique.len(), JOBS * STEPS, "no step claimed twice");
    let tokens: HashSet<_> = all.iter().map(|(_, _, t)| *t).collect();
    assert_eq!(tokens.len(), JOBS * STEPS, "every claim has its own token");
    assert_eq!(s.leases().await.unwrap().len(), JOBS * STEPS);
}

/// A job with a long history (a deploy to many hosts records several events per host): the
/// claim still carries all of it, in order, its StepClaimed last, and `read_stream` returns
/// all of it. (In Redis the adapter reads a claim's stream, and whole streams, in pages of
/// 1024.)
pub async fn a_claim_carries_the_whole_history_of_a_long_job_stream(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    for _ in 0..5 {
        let many = (0..250).map(|_| started("build")).collect();
        append(s, Append::new(StreamId::Job(job), many)).await;
    }
    enqueue(s, job, "deploy", "long", 0).await;
    let c = s
        .claim(&pools(&["long"]), &"agent-9".into(), LONG)
        .await
        .unwrap()
        .expect("a claim");
    let stream = s.read_stream(&StreamId::Job(job), 0).await.unwrap();
    assert_eq!(stream.len(), 1252, "read_stream reads every page");
    assert_eq!(c.history.len(), 1252);
    assert_eq!(c.history, stream, "the claim carries the whole stream");
    match c.history.last().unwrap().decode().unwrap() {
        Event::StepClaimed(x) => assert_eq!(x.token, c.token),
        other => panic!("expected StepClaimed last, got {other:?}"),
    }
    let places: Vec<Option<Version>> = c.history.iter().map(|e| e.seq).collect();
    let expected: Vec<Option<Version>> = (1..=1252).map(Some).collect();
    assert_eq!(places, expected);
}

pub async fn step_claimed_event_decodes(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    enqueue(s, job, "deploy:production", "deploy", 3).await;
    let c = s
        .claim(
            &pools(&["deploy"]),
            &"agent-7".into(),
            Duration::from_millis(45_000),
        )
        .await
        .unwrap()
        .expect("a claim");
    assert_eq!((c.attempt, c.pool.as_str()), (1, "deploy"));
    let stored = s.read_stream(&StreamId::Job(job), 0).await.unwrap();
    assert_eq!(stored.len(), 2);
    let e = &stored[1];
    assert_eq!(e.seq, Some(2), "script-written events know their place too");
    assert_eq!(e.envelope.stream, format!("job:{job}"));
    assert_eq!(e.envelope.token, Some(c.token.0));
    assert_eq!(
        e.decode().unwrap(),
        Event::StepClaimed(StepClaimed {
            step: "deploy:production".into(),
            attempt: 1,
            agent: "agent-7".into(),
            token: c.token,
            lease_ttl_ms: 45_000,
        })
    );
    let log = s.read_log(None, 10).await.unwrap();
    assert_eq!(log.last().unwrap(), e, "the log holds the same entry");
    assert_eq!(c.history, stored, "the claim carries the job's stream");
    let leases = s.leases().await.unwrap();
    assert_eq!(leases.len(), 1);
    assert_eq!(
        (leases[0].job, leases[0].token, leases[0].deadline_ms),
        (job, c.token, c.deadline_ms)
    );
}

/// `raise_fence` (what `ferry migrate` does to its target) makes later tokens, of leases and
/// of locks, larger than the value given; it never lowers the counter.
pub async fn the_fence_counter_is_raised_never_lowered(fx: &Fixture) {
    let s = &**fx;
    assert_eq!(s.raise_fence(800).await.unwrap(), 800);
    let job = JobId::new();
    enqueue(s, job, "a", "p", 0).await;
    let claim = s
        .claim(&pools(&["p"]), &"agent".into(), LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(claim.token, FencingToken(801));
    assert_eq!(s.raise_fence(5).await.unwrap(), 801, "never lowered");
    let lock = s.lock_acquire("l", "me", LONG).await.unwrap().unwrap();
    assert_eq!(lock, FencingToken(802));
}

pub async fn renew_and_release_need_the_holder(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    enqueue(s, job, "build", "linux", 0).await;
    let c = s
        .claim(&pools(&["linux"]), &"agent".into(), LONG)
        .await
        .unwrap()
        .unwrap();
    let later = Leases::renew(s, job, &c.step, c.token, Duration::from_secs(600))
        .await
        .unwrap();
    assert!(later > c.deadline_ms, "renewal extends the deadline");
    assert_eq!(s.leases().await.unwrap()[0].deadline_ms, later);
    let wrong = FencingToken(c.token.0 + 1);
    assert!(matches!(
        Leases::renew(s, job, &c.step, wrong, LONG).await,
        Err(Error::Stale { .. })
    ));
    assert!(matches!(
        Leases::release(s, job, &c.step, wrong, "nope").await,
        Err(Error::Stale { .. })
    ));
    assert_eq!(
        s.leases().await.unwrap().len(),
        1,
        "a wrong token releases nothing"
    );
    Leases::release(s, job, &c.step, c.token, "shutting down")
        .await
        .unwrap();
    assert!(s.leases().await.unwrap().is_empty());
    match events(s, job).await.pop().unwrap() {
        Event::StepReleased(r) => {
            assert_eq!(
                (
                    r.step,
                    r.attempt,
                    r.agent.0.as_str(),
                    r.token,
                    r.reason.as_str()
                ),
                (c.step.clone(), 1, "agent", c.token, "shutting down")
            );
        }
        other => panic!("expected StepReleased, got {other:?}"),
    }
    assert!(matches!(
        Leases::renew(s, job, &c.step, c.token, LONG).await,
        Err(Error::Stale { .. })
    ));
    assert!(matches!(
        Leases::release(s, job, &c.step, c.token, "again").await,
        Err(Error::Stale { .. })
    ));
}

pub async fn expire_due_appends_lease_expired(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    enqueue(s, job, "short", "linux", 5).await;
    enqueue(s, job, "long", "linux", 0).await;
    let short = s
        .claim(&pools(&["linux"]), &"a1".into(), Duration::from_millis(100))
        .await
        .unwrap()
        .unwrap();
    let long = s
        .claim(&pools(&["linux"]), &"a2".into(), LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((short.step.as_str(), long.step.as_str()), ("short", "long"));
    let expired = wait_for(DEADLINE, "the short lease to expire", || async {
        let l = s.expire_due(10).await.unwrap();
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(expired.len(), 1);
    let l = &expired[0];
    assert_eq!(
        (
            l.job,
            l.step.as_str(),
            l.attempt,
            l.agent.as_str(),
            l.token,
            l.deadline_ms
        ),
        (job, "short", 1, "a1", short.token, short.deadline_ms)
    );
    let left = s.leases().await.unwrap();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].token, long.token);
    let expired_events: Vec<_> = events(s, job)
        .await
        .into_iter()
        .filter_map(|e| match e {
            Event::LeaseExpired(x) => Some(x),
            _ => None,
        })
        .collect();
    assert_eq!(expired_events.len(), 1);
    assert_eq!(
        (
            expired_events[0].token,
            expired_events[0].agent.as_str(),
            expired_events[0].attempt
        ),
        (short.token, "a1", 1)
    );
    assert!(matches!(
        Leases::renew(s, job, &short.step, short.token, LONG).await,
        Err(Error::Stale { .. })
    ));
    assert!(
        s.expire_due(10).await.unwrap().is_empty(),
        "nothing expires twice"
    );
}

pub async fn a_lease_that_ran_out_is_dead_before_the_sweep(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    let js = StreamId::Job(job);
    enqueue(s, job, "build", "linux", 0).await;
    let c = s
        .claim(&pools(&["linux"]), &"a".into(), Duration::from_millis(150))
        .await
        .unwrap()
        .unwrap();
    // nobody sweeps: the deadline alone must end the token's validity
    wait_until(DEADLINE, || async {
        let a = Append::new(js.clone(), vec![started("build")]).fenced(c.step.clone(), c.token);
        match s.append(a).await {
            Ok(_) => false,
            Err(Error::Stale { .. }) => true,
            Err(e) => panic!("unexpected {e}"),
        }
    })
    .await;
    assert!(matches!(
        Leases::renew(s, job, &c.step, c.token, LONG).await,
        Err(Error::Stale { .. })
    ));
    assert!(matches!(
        Leases::release(s, job, &c.step, c.token, "late").await,
        Err(Error::Stale { .. })
    ));
    assert_eq!(
        s.expire_due(10).await.unwrap().len(),
        1,
        "the sweep still ends it"
    );
}

/// `queue_depths`: ready steps per pool, in the order asked, with when the head of each was
/// queued; delayed steps counted apart; claimed steps not at all.
pub async fn queue_depths_count_ready_and_delayed_steps(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    let later = Event::StepRetryScheduled(StepRetryScheduled {
        step: "d".into(),
        attempt: 2,
        pool: "p1".into(),
        priority: 0,
        due_ms: super::now_ms() + 3_600_000,
        reason: "flaky".into(),
    });
    let before = super::now_ms();
    append(
        s,
        Append::new(
            StreamId::Job(job),
            vec![
                queued("a", "p1", 0, 1),
                queued("b", "p1", 0, 1),
                queued("c", "p2", 0, 1),
                later,
            ],
        ),
    )
    .await;
    let after = super::now_ms();
    let all = pools(&["p2", "p1", "p3"]);
    let depths = s.queue_depths(&all).await.unwrap();
    let counts: Vec<u64> = depths.ready.iter().map(|(n, _)| *n).collect();
    assert_eq!(counts, [1, 2, 0]);
    assert_eq!(depths.delayed, 1);
    for (n, head) in &depths.ready {
        match head {
            // (the store's clock may run a little apart from this process's)
            Some(at) => assert!(*at + 1_000 >= before && *at <= after + 1_000, "{at}"),
            None => assert_eq!(*n, 0),
        }
    }
    s.claim(&pools(&["p1"]), &"a".into(), LONG)
        .await
        .unwrap()
        .expect("a claim");
    let depths = s.queue_depths(&all).await.unwrap();
    let counts: Vec<u64> = depths.ready.iter().map(|(n, _)| *n).collect();
    assert_eq!(counts, [1, 1, 0]);
    let only_delayed = s.queue_depths(&[]).await.unwrap();
    assert_eq!((only_delayed.ready.len(), only_delayed.delayed), (0, 1));
    assert!(matches!(
        s.queue_depths(&pools(&["a b"])).await,
        Err(Error::Invalid(_))
    ));
}

pub async fn scheduled_steps_are_promoted_only_when_due(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    let js = StreamId::Job(job);
    let now = super::now_ms();
    let retry = |step: &str, due_ms: u64| {
        Event::StepRetryScheduled(StepRetryScheduled {
            step: step.into(),
            attempt: 2,
            pool: "linux".into(),
            priority: 1,
            due_ms,
            reason: "flaky".into(),
        })
    };
    append(
        s,
        Append::new(
            js.clone(),
            vec![retry("soon", now + 200), retry("later", now + 3_600_000)],
        ),
    )
    .await;
    let q: BTreeMap<_, _> = s
        .queued()
        .await
        .unwrap()
        .into_iter()
        .map(|q| ((q.step.0, q.attempt), q.due_ms))
        .collect();
    let keys: Vec<_> = q.keys().cloned().collect();
    assert_eq!(keys, [("later".to_string(), 2), ("soon".to_string(), 2)]);
    // Due on the store's clock: the delay the writer meant (due_ms - at_ms), from when the
    // store wrote it, so a little after the event's due_ms.
    for ((step, _), due) in &q {
        let meant = if step == "soon" {
            now + 200
        } else {
            now + 3_600_000
        };
        let due = due.expect("delayed");
        assert!(
            (meant..meant + 5_000).contains(&due),
            "{step}: due {due}, meant {meant}"
        );
    }
    assert!(
        s.claim(&pools(&["linux"]), &"a".into(), LONG)
            .await
            .unwrap()
            .is_none(),
        "delayed steps are not ready"
    );
    let promoted = wait_for(DEADLINE, "the due step to be promoted", || async {
        let n = s.promote_due(10).await.unwrap();
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(promoted, 1, "only the due step is promoted");
    let c = s
        .claim(&pools(&["linux"]), &"a".into(), LONG)
        .await
        .unwrap()
        .expect("the promoted step is ready");
    assert_eq!((c.step.as_str(), c.attempt), ("soon", 2));
    assert!(s
        .claim(&pools(&["linux"]), &"a".into(), LONG)
        .await
        .unwrap()
        .is_none());
    let q = s.queued().await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].step.as_str(), "later");
    let queued_events = events(s, job)
        .await
        .into_iter()
        .filter(|e| matches!(e, Event::StepQueued(x) if x.step.as_str() == "soon" && x.attempt == 2 && x.priority == 1))
        .count();
    assert_eq!(queued_events, 1, "promotion appends StepQueued");
}

pub async fn clear_job_removes_queue_entries_and_leases(fx: &Fixture) {
    let s = &**fx;
    let (job, other) = (JobId::new(), JobId::new());
    let js = StreamId::Job(job);
    enqueue(s, job, "leased", "linux", 50).await;
    let c = s
        .claim(&pools(&["linux"]), &"a".into(), LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.job, job);
    enqueue(s, job, "ready", "linux", 0).await;
    enqueue(s, job, "elsewhere", "mac", 0).await;
    let retry = Event::StepRetryScheduled(StepRetryScheduled {
        step: "later".into(),
        attempt: 2,
        pool: "linux".into(),
        priority: 0,
        due_ms: super::now_ms() + 3_600_000,
        reason: "r".into(),
    });
    append(s, Append::new(js.clone(), vec![retry])).await;
    enqueue(s, other, "build", "linux", 0).await;
    assert_eq!(s.queued().await.unwrap().len(), 4);

    append(
        s,
        Append::new(
            js.clone(),
            vec![Event::JobCancelled(JobCancelled {
                reason: "tag deleted".into(),
                by: "webhook".into(),
            })],
        ),
    )
    .await;
    let q = s.queued().await.unwrap();
    assert_eq!(q.len(), 1);
    assert_eq!(q[0].job, other);
    assert!(s.leases().await.unwrap().is_empty());
    assert!(matches!(
        s.append(Append::new(js.clone(), vec![started("leased")]).fenced(c.step.clone(), c.token))
            .await,
        Err(Error::Stale { .. })
    ));
    let next = s
        .claim(&pools(&["linux", "mac"]), &"a".into(), LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.job, other);
    assert!(s
        .claim(&pools(&["linux", "mac"]), &"a".into(), LONG)
        .await
        .unwrap()
        .is_none());
}

pub async fn finish_drops_the_lease(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    enqueue(s, job, "build", "linux", 0).await;
    let c = s
        .claim(&pools(&["linux"]), &"a".into(), LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s.leases().await.unwrap().len(), 1);
    let done = Event::StepSucceeded(StepSucceeded {
        step: c.step.clone(),
        attempt: c.attempt,
    });
    append(
        s,
        Append::new(StreamId::Job(job), vec![done]).fenced(c.step.clone(), c.token),
    )
    .await;
    assert!(s.leases().await.unwrap().is_empty());
    assert!(matches!(
        Leases::renew(s, job, &c.step, c.token, LONG).await,
        Err(Error::Stale { .. })
    ));
    assert!(s.expire_due(10).await.unwrap().is_empty());
}

/// The fold says a requeued step is queued, not claimed; the store must agree, so the old
/// holder's lease goes with the requeue.
pub async fn requeueing_a_leased_step_fences_out_its_holder(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    enqueue(s, job, "build", "linux", 0).await;
    let c = s
        .claim(&pools(&["linux"]), &"a".into(), LONG)
        .await
        .unwrap()
        .unwrap();
    append(
        s,
        Append::new(StreamId::Job(job), vec![queued("build", "linux", 0, 2)]),
    )
    .await;
    assert!(s.leases().await.unwrap().is_empty());
    assert!(matches!(
        Leases::renew(s, job, &c.step, c.token, LONG).await,
        Err(Error::Stale { .. })
    ));
    let again = s
        .claim(&pools(&["linux"]), &"b".into(), LONG)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((again.job, again.attempt), (job, 2));
    assert!(again.token > c.token);
}

/// Once a job's stream holds a terminal event, queueing events appended to it change nothing
/// live (the fold freezes an ended job the same way).
pub async fn an_ended_job_is_never_queued_again(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    let js = StreamId::Job(job);
    enqueue(s, job, "build", "linux", 0).await;
    let cancelled = Event::JobCancelled(JobCancelled {
        reason: "r".into(),
        by: "api".into(),
    });
    append(s, Append::new(js.clone(), vec![cancelled])).await;
    let retry = Event::StepRetryScheduled(StepRetryScheduled {
        step: "build".into(),
        attempt: 2,
        pool: "linux".into(),
        priority: 0,
        due_ms: 0,
        reason: "r".into(),
    });
    append(
        s,
        Append::new(js, vec![queued("build", "linux", 0, 2), retry]),
    )
    .await;
    assert!(s.queued().await.unwrap().is_empty());
    assert_eq!(s.promote_due(10).await.unwrap(), 0);
    assert!(s
        .claim(&pools(&["linux"]), &"a".into(), LONG)
        .await
        .unwrap()
        .is_none());
}

/// Every `JobCreated` indexes its job under its tag and each environment it deploys to.
/// `ArtifactPublished` and a plan that carries an artifact (a manual deploy, a rollback)
/// index the job under the artifact's key, for the artifact retention; the index stays when
/// the job ends.
pub async fn artifacts_index_the_jobs_that_publish_or_ship_them(fx: &Fixture) {
    let s = &**fx;
    let key = "5f1c/group_app-v1-5f1c.tar.gz";
    let (build, deploy, other) = (JobId::new(), JobId::new(), JobId::new());
    let published = ferry_proto::ArtifactPublished {
        step: "build".into(),
        attempt: 1,
        name: "group_app-v1-5f1c.tar.gz".into(),
        key: key.into(),
        size: 10,
        sha256: "5f1c".into(),
    };
    append(
        s,
        Append::new(
            StreamId::Job(build),
            vec![
                noop_job(build, "v1", "p", &["build"]).into(),
                published.into(),
            ],
        ),
    )
    .await;
    let mut shipping = noop_job(deploy, "v1", "p", &["deploy"]);
    shipping.artifact = Some(ferry_proto::ArtifactRef {
        job: build,
        name: "group_app-v1-5f1c.tar.gz".into(),
        key: key.into(),
        size: 10,
        sha256: "5f1c".into(),
    });
    append(s, Append::new(StreamId::Job(deploy), vec![shipping.into()])).await;
    append(
        s,
        Append::new(
            StreamId::Job(other),
            vec![noop_job(other, "v2", "p", &["build"]).into()],
        ),
    )
    .await;
    append(
        s,
        Append::new(
            StreamId::Job(build),
            vec![ferry_proto::JobSucceeded {}.into()],
        ),
    )
    .await;
    let mut want = vec![build, deploy];
    want.sort();
    assert_eq!(s.indexed(&super::artifact_index(key)).await.unwrap(), want);
}

pub async fn job_created_indexes_the_job_by_tag_and_environment(fx: &Fixture) {
    use ferry_proto::{DeploySpec, JobCreated, StepPlan, StepSpec};
    let s = &**fx;
    let plan = |job: JobId, tag: &str, envs: &[&str]| -> Event {
        Event::JobCreated(JobCreated {
            artifact: None,
            job,
            project_id: 7,
            project: "group/app".into(),
            tag: tag.into(),
            git_ref: format!("refs/tags/{tag}"),
            sha: "a".repeat(40),
            priority: 0,
            trigger: "test".into(),
            steps: envs
                .iter()
                .map(|e| StepPlan {
                    step: format!("deploy:{e}").as_str().into(),
                    pool: "default".into(),
                    priority: 0,
                    spec: StepSpec::Deploy(DeploySpec {
                        environment: e.to_string(),
                        ..Default::default()
                    }),
                })
                .collect(),
        })
    };
    let (a, b, c) = (JobId::new(), JobId::new(), JobId::new());
    for (job, tag, envs) in [
        (a, "v1", &["staging", "production"][..]),
        (b, "v2", &["staging"][..]),
        (c, "v1", &[][..]),
    ] {
        append(
            s,
            Append::new(StreamId::Job(job), vec![plan(job, tag, envs)]),
        )
        .await;
    }
    let tag = |t: &str| format!("{}{}", super::LIVE, super::tag_index("group/app", t));
    let env = |e: &str| super::environment_index("group/app", e);
    let live_env = |e: &str| format!("{}{}", super::LIVE, env(e));
    assert_eq!(s.indexed(&tag("v1")).await.unwrap(), vec![a, c]);
    assert_eq!(s.indexed(&tag("v2")).await.unwrap(), vec![b]);
    assert_eq!(s.indexed(&env("staging")).await.unwrap(), vec![a, b]);
    assert_eq!(s.indexed(&live_env("staging")).await.unwrap(), vec![a, b]);
    assert_eq!(s.indexed(&env("production")).await.unwrap(), vec![a]);
    assert!(s.indexed(&tag("v3")).await.unwrap().is_empty());
    let all_tag = |t: &str| super::tag_index("group/app", t);
    assert_eq!(s.indexed(&all_tag("v1")).await.unwrap(), vec![a, c]);

    // When a job ends it leaves the live indexes, and stays in the permanent ones.
    let cancelled = Event::JobCancelled(JobCancelled {
        reason: "r".into(),
        by: "api".into(),
    });
    append(s, Append::new(StreamId::Job(a), vec![cancelled])).await;
    assert_eq!(s.indexed(&tag("v1")).await.unwrap(), vec![c]);
    assert_eq!(s.indexed(&all_tag("v1")).await.unwrap(), vec![a, c]);
    assert_eq!(s.indexed(&live_env("staging")).await.unwrap(), vec![b]);
    assert_eq!(s.indexed(&env("staging")).await.unwrap(), vec![a, b]);
}

/// Step output goes to the job's log under the step's lease; readers page and follow it.
pub async fn logs_are_fenced_ordered_and_followable(fx: &Fixture) {
    use super::Fence;
    use ferry_proto::StepLog;
    let s = &**fx;
    let job = JobId::new();
    enqueue(s, job, "build", "linux", 0).await;
    let c = s
        .claim(&pools(&["linux"]), &"a".into(), LONG)
        .await
        .unwrap()
        .unwrap();
    let line = |n: u32| StepLog {
        step: "build".into(),
        attempt: c.attempt,
        stream: "stdout".into(),
        line: format!("line {n}"),
    };
    let fence = Fence {
        step: c.step.clone(),
        token: c.token,
    };
    s.append_logs(job, &fence, &[line(1), line(2)])
        .await
        .unwrap();
    let stale = Fence {
        step: c.step.clone(),
        token: FencingToken(c.token.0 + 1000),
    };
    assert!(matches!(
        s.append_logs(job, &stale, &[line(99)]).await,
        Err(Error::Stale { .. })
    ));
    let got = s.read_logs(job, None, 10, Duration::ZERO).await.unwrap();
    assert_eq!(
        got.iter().map(|(_, l)| l.line.as_str()).collect::<Vec<_>>(),
        ["line 1", "line 2"]
    );
    let last = got[1].0.clone();
    assert!(s
        .read_logs(job, Some(&last), 10, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());

    // A follower blocked on the log wakes for the next line.
    let other = fx.another().await;
    let follower = tokio::spawn(async move {
        other
            .read_logs(job, Some(&last), 10, Duration::from_secs(10))
            .await
            .unwrap()
    });
    tokio::task::yield_now().await;
    s.append_logs(job, &fence, &[line(3)]).await.unwrap();
    let next = follower.await.unwrap();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].1, line(3));
}

/// `import_logs` (for migrations) appends without a lease, after what the log holds.
pub async fn imported_logs_need_no_lease_and_read_back_in_order(fx: &Fixture) {
    use ferry_proto::StepLog;
    let s = &**fx;
    let job = JobId::new();
    let line = |n: u32| StepLog {
        step: "build".into(),
        attempt: 1,
        stream: "stdout".into(),
        line: format!("line {n}"),
    };
    s.import_logs(job, &[line(1), line(2)]).await.unwrap();
    s.import_logs(job, &[]).await.unwrap();
    s.import_logs(job, &[line(3)]).await.unwrap();
    let got = s.read_logs(job, None, 10, Duration::ZERO).await.unwrap();
    assert_eq!(
        got.into_iter().map(|(_, l)| l).collect::<Vec<_>>(),
        [line(1), line(2), line(3)]
    );
}

/// Log retention: a job joins the list of ended jobs whose logs are kept with its first
/// terminal event (at that event's time), and `LogsExpired` deletes its log and takes it off
/// the list in the same append. A running job is never listed; a later terminal event does not
/// list a job again.
pub async fn logs_of_ended_jobs_are_listed_until_logs_expired_drops_them(fx: &Fixture) {
    use super::Fence;
    use ferry_proto::{JobSucceeded, LogsExpired, StepLog};
    let s = &**fx;
    let (done, running) = (JobId::new(), JobId::new());
    for job in [done, running] {
        enqueue(s, job, "build", "linux", 0).await;
        let c = s
            .claim(&pools(&["linux"]), &"a".into(), LONG)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.job, job);
        let fence = Fence {
            step: c.step.clone(),
            token: c.token,
        };
        let line = StepLog {
            step: "build".into(),
            attempt: c.attempt,
            stream: "stdout".into(),
            line: format!("output of {job}"),
        };
        s.append_logs(job, &fence, &[line]).await.unwrap();
    }
    assert!(s.logs_to_expire(u64::MAX, 10).await.unwrap().is_empty());

    let end = Append::new(StreamId::Job(done), vec![JobSucceeded {}.into()]);
    let ended_at = end.at_ms;
    append(s, end).await;
    let cancelled = || {
        Event::JobCancelled(JobCancelled {
            reason: "again".into(),
            by: "api".into(),
        })
    };
    // A second terminal event keeps the first end's time.
    let mut again = Append::new(StreamId::Job(done), vec![cancelled()]);
    again.at_ms = ended_at + 5_000;
    append(s, again).await;
    assert_eq!(
        s.logs_to_expire(u64::MAX, 10).await.unwrap(),
        [(done, ended_at)]
    );
    assert!(s.logs_to_expire(ended_at, 10).await.unwrap().is_empty());
    assert_eq!(
        s.logs_to_expire(ended_at + 1, 10).await.unwrap(),
        [(done, ended_at)]
    );
    assert!(s.logs_to_expire(u64::MAX, 0).await.unwrap().is_empty());

    let expired = LogsExpired { kept_for_ms: 1 };
    append(
        s,
        Append::new(StreamId::Job(done), vec![expired.clone().into()]),
    )
    .await;
    assert!(s
        .read_logs(done, None, 10, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    assert!(s.logs_to_expire(u64::MAX, 10).await.unwrap().is_empty());
    assert_eq!(
        events(s, done).await.last(),
        Some(&Event::LogsExpired(expired))
    );
    // The running job's output is untouched.
    assert_eq!(
        s.read_logs(running, None, 10, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        1
    );
    // Ending again after the logs expired lists nothing.
    append(s, Append::new(StreamId::Job(done), vec![cancelled()])).await;
    assert!(s.logs_to_expire(u64::MAX, 10).await.unwrap().is_empty());

    // Every end here listed itself: the walk for jobs that earlier builds ended lists none,
    // reaches the end, and from then on answers at once.
    let mut after = None;
    let mut walked = 0;
    loop {
        let l = s.list_ended_unlisted(after, 1).await.unwrap();
        assert_eq!(l.listed, 0);
        match l.next {
            Some(job) => after = Some(job),
            None => break,
        }
        walked += 1;
        assert!(walked <= 2, "the walk ends after the last job");
    }
    assert_eq!(
        s.list_ended_unlisted(None, 1).await.unwrap(),
        Listing::default()
    );
    assert!(s.logs_to_expire(u64::MAX, 10).await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// feed

pub async fn feed_group_reads_new_entries_and_acks(fx: &Fixture) {
    let s = &**fx;
    let (_, before) = append(s, Append::new(StreamId::Webhooks, vec![webhook(0)])).await;
    s.ensure_group("coord").await.unwrap();
    s.ensure_group("coord").await.unwrap();
    let (_, pos) = append(
        s,
        Append::new(StreamId::Agents, vec![webhook(1), webhook(2)]),
    )
    .await;
    let got = s.read_new("coord", "c1", 10, Duration::ZERO).await.unwrap();
    let got_pos: Vec<_> = got.iter().map(|e| e.pos.clone()).collect();
    assert_eq!(
        got_pos,
        [before, pos.clone()].concat(),
        "a group starts at the beginning"
    );
    assert!(s
        .read_new("coord", "c2", 10, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(s.ack("coord", &got_pos[..2]).await.unwrap(), 2);
    // Acknowledged again (another consumer took them over and acknowledged them first): none
    // of them was pending, so none counts.
    assert_eq!(s.ack("coord", &got_pos[..2]).await.unwrap(), 0);
    let pending = s.read_pending("coord", "c1", 10).await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0], got[2]);
    // another group sees everything on its own
    s.ensure_group("audit").await.unwrap();
    assert_eq!(
        s.read_new("audit", "x", 10, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        3
    );
    // count is respected
    append(
        s,
        Append::new(StreamId::Agents, vec![webhook(3), webhook(4)]),
    )
    .await;
    assert_eq!(
        s.read_new("coord", "c1", 1, Duration::ZERO)
            .await
            .unwrap()
            .len(),
        1
    );
    // a short block on nothing new returns empty
    assert_eq!(
        s.read_new("coord", "c1", 10, Duration::from_millis(100))
            .await
            .unwrap()
            .len(),
        1
    );
    assert!(s
        .read_new("coord", "c1", 10, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
}

pub async fn feed_read_new_blocks_until_an_entry_arrives(fx: &Fixture) {
    fx.ensure_group("g").await.unwrap();
    let reader = fx.another().await;
    let task =
        tokio::spawn(async move { reader.read_new("g", "c", 10, Duration::from_secs(30)).await });
    let (_, pos) = append(&**fx, Append::new(StreamId::Webhooks, vec![webhook(1)])).await;
    let got = tokio::time::timeout(DEADLINE, task)
        .await
        .expect("a blocked reader wakes when an entry arrives")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].pos, pos[0]);
}

pub async fn restarted_consumer_reads_its_pending_first(fx: &Fixture) {
    let s = &**fx;
    s.ensure_group("g").await.unwrap();
    append(
        s,
        Append::new(StreamId::Webhooks, vec![webhook(1), webhook(2)]),
    )
    .await;
    let first = s.read_new("g", "c1", 10, Duration::ZERO).await.unwrap();
    assert_eq!(first.len(), 2);
    // "restart": a new handle, same consumer name
    let again = fx.another().await;
    append(s, Append::new(StreamId::Webhooks, vec![webhook(3)])).await;
    let pending = again.read_pending("g", "c1", 10).await.unwrap();
    assert_eq!(pending, first);
    assert!(again
        .read_pending("g", "other", 10)
        .await
        .unwrap()
        .is_empty());
    let fresh = again.read_new("g", "c1", 10, Duration::ZERO).await.unwrap();
    assert_eq!(fresh.len(), 1);
    again
        .ack(
            "g",
            &[
                first[0].pos.clone(),
                first[1].pos.clone(),
                fresh[0].pos.clone(),
            ],
        )
        .await
        .unwrap();
    assert!(again.read_pending("g", "c1", 10).await.unwrap().is_empty());
}

pub async fn claim_idle_takes_over_a_dead_consumer(fx: &Fixture) {
    let s = &**fx;
    s.ensure_group("g").await.unwrap();
    append(
        s,
        Append::new(StreamId::Webhooks, vec![webhook(1), webhook(2), webhook(3)]),
    )
    .await;
    let dead = s.read_new("g", "dead", 10, Duration::ZERO).await.unwrap();
    assert_eq!(dead.len(), 3);
    assert!(
        s.claim_idle("g", "alive", Duration::from_secs(3600), 10)
            .await
            .unwrap()
            .is_empty(),
        "entries not idle long enough stay put"
    );
    let taken = std::sync::Mutex::new(Vec::new());
    wait_until(DEADLINE, || async {
        let got = s
            .claim_idle("g", "alive", Duration::from_millis(50), 10)
            .await
            .unwrap();
        let mut t = taken.lock().unwrap();
        t.extend(got);
        t.len() >= 3
    })
    .await;
    assert_eq!(taken.into_inner().unwrap(), dead);
    assert_eq!(s.read_pending("g", "alive", 10).await.unwrap(), dead);
    assert!(s.read_pending("g", "dead", 10).await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// leader lock, snapshots, jobs, wake-ups, validation

pub async fn leader_lock_is_exclusive_and_tokens_grow(fx: &Fixture) {
    let s = &**fx;
    let t1 = s
        .lock_acquire("sweep", "n1", LONG)
        .await
        .unwrap()
        .expect("free lock");
    assert!(s.lock_acquire("sweep", "n2", LONG).await.unwrap().is_none());
    assert!(
        s.lock_acquire("sweep", "n1", LONG).await.unwrap().is_none(),
        "not reentrant"
    );
    assert!(!s.lock_renew("sweep", "n2", t1, LONG).await.unwrap());
    assert!(!s
        .lock_renew("sweep", "n1", FencingToken(t1.0 + 1), LONG)
        .await
        .unwrap());
    assert!(s.lock_renew("sweep", "n1", t1, LONG).await.unwrap());
    assert!(!s.lock_release("sweep", "n2", t1).await.unwrap());
    assert!(!s
        .lock_release("sweep", "n1", FencingToken(t1.0 + 1))
        .await
        .unwrap());
    assert!(s.lock_release("sweep", "n1", t1).await.unwrap());
    assert!(!s.lock_renew("sweep", "n1", t1, LONG).await.unwrap());
    let t2 = s
        .lock_acquire("sweep", "n2", LONG)
        .await
        .unwrap()
        .expect("released");
    assert!(t2 > t1);
    // lock and lease tokens come from one counter
    let job = JobId::new();
    enqueue(s, job, "build", "linux", 0).await;
    let c = s
        .claim(&pools(&["linux"]), &"a".into(), LONG)
        .await
        .unwrap()
        .unwrap();
    assert!(c.token > t2);
    let t3 = s
        .lock_acquire("promote", "n1", LONG)
        .await
        .unwrap()
        .expect("another lock");
    assert!(t3 > c.token);
}

pub async fn leader_lock_lapses_after_ttl(fx: &Fixture) {
    let s = &**fx;
    let t1 = s
        .lock_acquire("lead", "n1", Duration::from_millis(150))
        .await
        .unwrap()
        .expect("free lock");
    let t2 = wait_for(DEADLINE, "the lock to lapse", || async {
        s.lock_acquire("lead", "n2", LONG).await.unwrap()
    })
    .await;
    assert!(t2 > t1);
    assert!(!s.lock_renew("lead", "n1", t1, LONG).await.unwrap());
    assert!(!s.lock_release("lead", "n1", t1).await.unwrap());
    assert!(s.lock_renew("lead", "n2", t2, LONG).await.unwrap());
}

pub async fn snapshots_put_and_get(fx: &Fixture) {
    let s = &**fx;
    assert_eq!(s.get_snapshot("jobs").await.unwrap(), None);
    let bytes = vec![0u8, 159, 146, 150, 0, 255];
    s.put_snapshot("jobs", &bytes).await.unwrap();
    assert_eq!(s.get_snapshot("jobs").await.unwrap(), Some(bytes));
    s.put_snapshot("jobs", b"v2").await.unwrap();
    assert_eq!(s.get_snapshot("jobs").await.unwrap(), Some(b"v2".to_vec()));
    assert_eq!(s.get_snapshot("other").await.unwrap(), None);
}

/// The store reports how much it holds, and it grows with what is written. (The Redis of the
/// tests is shared with other tests, which only add to it meanwhile: growth is asserted at
/// half of what this test writes.)
pub async fn usage_reports_the_size_and_grows_with_writes(fx: &Fixture) {
    let s = &**fx;
    let before = s.usage().await.unwrap();
    assert!(before.used_bytes > 0, "{before:?}");
    const BIG: usize = 4 << 20;
    let bytes: Vec<u8> = (0..BIG).map(|i| (i * 7919 % 251) as u8).collect();
    s.put_snapshot("usage", &bytes).await.unwrap();
    let after = s.usage().await.unwrap();
    assert!(
        after.used_bytes >= before.used_bytes + BIG as u64 / 2,
        "{before:?} -> {after:?}"
    );
    assert_eq!(after.limit_bytes, before.limit_bytes);
}

pub async fn jobs_page_in_either_order(fx: &Fixture) {
    let s = &**fx;
    let mut ids: Vec<JobId> = (0..7).map(|_| JobId::new()).collect();
    ids.sort();
    for id in &ids {
        append(s, Append::new(StreamId::Job(*id), vec![started("x")])).await;
        // a second event does not re-add or move the job
        append(s, Append::new(StreamId::Job(*id), vec![started("y")])).await;
    }
    append(s, Append::new(StreamId::Webhooks, vec![webhook(1)])).await;
    // (several jobs share a store-clock millisecond here: ties order by id, both ways)
    let newest: Vec<JobId> = ids.iter().rev().copied().collect();
    for (order, expected) in [(Order::Oldest, &ids), (Order::Newest, &newest)] {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let page = s.jobs(after, 3, order).await.unwrap();
            assert!(page.len() <= 3);
            if page.is_empty() {
                break;
            }
            after = page.last().copied();
            seen.extend(page);
        }
        assert_eq!(&seen, expected, "{order:?}");
        assert_eq!(&s.jobs(None, 100, order).await.unwrap(), expected);
        assert!(s.jobs(None, 0, order).await.unwrap().is_empty());
        assert!(
            matches!(
                s.jobs(Some(JobId::new()), 3, order).await,
                Err(Error::Invalid(_))
            ),
            "an unknown job to continue after is refused ({order:?})"
        );
    }
}

/// `read_stream(stream, from)` answers the events after the first `from` for every `from`,
/// also when the tail spans several pages of a reader that starts from the end;
/// `read_stream_page` reads the same stream a page at a time, whatever the page's size.
pub async fn a_long_stream_reads_back_by_its_tail_and_by_pages(fx: &Fixture) {
    let s = &**fx;
    let stream = StreamId::Webhooks;
    // appends of one and of several events
    for chunk in 0..100 {
        let events: Vec<Event> = (0..1 + chunk % 3).map(|i| webhook(chunk * 3 + i)).collect();
        append(s, Append::new(stream.clone(), events)).await;
    }
    let all = s.read_stream(&stream, 0).await.unwrap();
    assert_eq!(all.len(), 199);
    for from in [1, 2, 15, 16, 17, 80, 81, 150, 197, 198, 199, 200, 500] {
        let tail = s.read_stream(&stream, from).await.unwrap();
        let want = &all[(from as usize).min(all.len())..];
        assert_eq!(tail, want, "from {from}");
    }
    // a page at a time
    for count in [1, 16, 198, 199, 200] {
        let (mut read, mut cursor) = (Vec::new(), None);
        for _ in 0..=all.len() {
            let (page, next) = s
                .read_stream_page(&stream, cursor.as_ref(), count)
                .await
                .unwrap();
            assert!(page.len() <= count);
            read.extend(page);
            cursor = next;
            if cursor.is_none() {
                break;
            }
        }
        assert!(cursor.is_none(), "pages of {count} end");
        assert_eq!(read, all, "pages of {count}");
    }
    let (page, next) = s
        .read_stream_page(&StreamId::Job(JobId::new()), None, 10)
        .await
        .unwrap();
    assert!(page.is_empty() && next.is_none(), "no such stream: empty");
}

/// `trim_log` deletes only global-log entries every group has handled (never one pending or
/// not yet delivered); every event stays in its stream; from `log_complete_from` on the log
/// is whole. (Redis deletes whole nodes of old entries; the embedded store, whose log is its
/// streams' table, nothing: `tests/it/redis.rs` checks that Redis does delete.)
pub async fn trimming_the_log_keeps_what_a_group_has_not_handled(fx: &Fixture) {
    let s = &**fx;
    s.ensure_group("g").await.unwrap();
    for chunk in 0..60 {
        let events = (0..10).map(|i| webhook(chunk * 10 + i)).collect();
        append(s, Append::new(StreamId::Webhooks, events)).await;
    }
    assert_eq!(
        s.trim_log(0).await.unwrap().deleted,
        0,
        "nothing is that old"
    );
    let handled = s.read_new("g", "c", 400, Duration::ZERO).await.unwrap();
    let handled: Vec<LogPos> = handled.into_iter().map(|e| e.pos).collect();
    s.ack("g", &handled).await.unwrap();
    let pending = s.read_new("g", "c", 100, Duration::ZERO).await.unwrap();
    assert_eq!(pending.len(), 100);
    let everything = s.read_log(None, 1000).await.unwrap();
    assert_eq!(everything.len(), 600);

    let trimmed = s.trim_log(crate::store::now_ms() + 60_000).await.unwrap();
    let log = s.read_log(None, 1000).await.unwrap();
    assert_eq!(log.len() as u64, 600 - trimmed.deleted);
    assert!(
        everything[400..].iter().all(|e| log.contains(e)),
        "pending and undelivered entries stay"
    );
    match s.log_complete_from().await.unwrap() {
        None => {
            assert_eq!(trimmed.deleted, 0);
            assert_eq!(log, everything);
        }
        Some(from) => {
            assert!(trimmed.deleted > 0);
            assert!(
                from <= everything[400].pos,
                "{from} after the first pending entry"
            );
            let whole: Vec<&Stored> = everything.iter().filter(|e| e.pos >= from).collect();
            assert!(whole.iter().all(|e| log.contains(e)), "whole from {from}");
            assert_eq!(trimmed.held_by.as_deref(), Some("g"));
        }
    }
    assert_eq!(
        s.read_stream(&StreamId::Webhooks, 0).await.unwrap(),
        everything
    );
    assert_eq!(
        s.log_end().await.unwrap(),
        Some(everything[599].pos.clone())
    );
}

pub async fn wait_for_work_wakes_on_enqueue(fx: &Fixture) {
    let waiter = fx.another().await;
    let task = tokio::spawn(async move {
        waiter
            .wait_for_work(&pools(&["idle", "busy"]), Duration::from_secs(60))
            .await
    });
    enqueue(&**fx, JobId::new(), "build", "busy", 0).await;
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("a waiter wakes when work is enqueued")
        .unwrap()
        .unwrap();
    // with nothing enqueued it returns after its timeout
    tokio::time::timeout(
        DEADLINE,
        fx.wait_for_work(&pools(&["idle"]), Duration::from_millis(200)),
    )
    .await
    .expect("wait_for_work returns after its timeout")
    .unwrap();
}

pub async fn bad_names_are_rejected(fx: &Fixture) {
    let s = &**fx;
    let job = JobId::new();
    for pool in ["a b", "x/y", "p|q", "{p}", ""] {
        match s
            .append(Append::new(
                StreamId::Job(job),
                vec![queued("build", pool, 0, 1)],
            ))
            .await
        {
            Err(Error::Invalid(m)) => assert!(m.contains("pool"), "{m}"),
            other => panic!("pool {pool:?} accepted: {other:?}"),
        }
        match s.claim(&pools(&[pool]), &"a".into(), LONG).await {
            Err(Error::Invalid(m)) => assert!(m.contains("pool"), "{m}"),
            other => panic!("pool {pool:?} accepted: {other:?}"),
        }
    }
    match s
        .append(Append::new(
            StreamId::Job(job),
            vec![queued("bad step", "linux", 0, 1)],
        ))
        .await
    {
        Err(Error::Invalid(m)) => assert!(m.contains("\"bad step\""), "{m}"),
        other => panic!("step accepted: {other:?}"),
    }
    assert!(s
        .read_stream(&StreamId::Job(job), 0)
        .await
        .unwrap()
        .is_empty());
    assert!(matches!(
        s.append(Append::new(
            StreamId::Webhooks,
            vec![queued("b", "linux", 0, 1)]
        ))
        .await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        s.append(Append::new(StreamId::Webhooks, vec![])).await,
        Err(Error::Invalid(_))
    ));
    assert!(s.queued().await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------------
// agent registry

fn agent_lost(store_events: &[super::Stored]) -> Vec<AgentLost> {
    store_events
        .iter()
        .filter_map(|s| match s.decode().expect("decode") {
            Event::AgentLost(l) => Some(l),
            _ => None,
        })
        .collect()
}

async fn live(store: &dyn Store) -> Vec<(AgentId, u64)> {
    let mut l = store.live_agents().await.expect("live agents");
    l.sort();
    l
}

pub async fn heartbeats_keep_agents_live(fx: &Fixture) {
    let s = &**fx;
    assert!(live(s).await.is_empty());
    let before = super::now_ms();
    s.heartbeat(&"a1".into(), LONG).await.unwrap();
    s.heartbeat(&"a2".into(), LONG).await.unwrap();
    let first = live(s).await;
    let names: Vec<&str> = first.iter().map(|(a, _)| a.as_str()).collect();
    assert_eq!(names, ["a1", "a2"]);
    // deadlines are now + ttl on the store's clock (same machine here: allow a wide margin)
    for (_, deadline) in &first {
        let ttl = LONG.as_millis() as u64;
        assert!(
            *deadline + 5_000 >= before + ttl && *deadline <= super::now_ms() + ttl + 5_000,
            "deadline {deadline} is not about now + {ttl}"
        );
    }
    // a renewal moves the deadline; a short heartbeat replaces a long one
    next_ms().await;
    s.heartbeat(&"a1".into(), LONG * 2).await.unwrap();
    let renewed = live(s).await;
    assert!(renewed[0].1 > first[0].1, "{renewed:?} vs {first:?}");
    assert_eq!(renewed[1], first[1], "other agents are untouched");
    s.heartbeat(&"a1".into(), Duration::from_millis(50))
        .await
        .unwrap();
    wait_until(DEADLINE, || async {
        live(s).await.iter().all(|(a, _)| a.as_str() != "a1")
    })
    .await;
    // an agent that comes back is live again
    s.heartbeat(&"a1".into(), LONG).await.unwrap();
    assert_eq!(live(s).await.len(), 2);
    assert!(s.expire_agents(10).await.unwrap().is_empty());
    assert!(matches!(
        s.heartbeat(&"".into(), LONG).await,
        Err(Error::Invalid(_))
    ));
    assert!(matches!(
        s.heartbeat(&"a3".into(), Duration::ZERO).await,
        Err(Error::Invalid(_))
    ));
    assert_eq!(
        live(s).await.len(),
        2,
        "refused heartbeats register nothing"
    );
}

pub async fn expire_agents_records_agent_lost_once(fx: &Fixture) {
    let s = &**fx;
    let short = Duration::from_millis(100);
    for a in ["gone-1", "gone-2", "gone-3"] {
        s.heartbeat(&a.into(), short).await.unwrap();
    }
    s.heartbeat(&"alive".into(), LONG).await.unwrap();
    // `max` is respected: the first sweep that finds them takes two, the next one the third
    let first = wait_for(DEADLINE, "the short heartbeats to lapse", || async {
        let l = s.expire_agents(2).await.unwrap();
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert!(first.len() <= 2, "{first:?}");
    // The heartbeats were three writes, so their deadlines may lie a few ms apart: a sweep can
    // land between them. Collect the rest as they lapse.
    let lost = std::sync::Mutex::new(first);
    wait_until(DEADLINE, || async {
        let more = s.expire_agents(10).await.unwrap();
        let mut l = lost.lock().unwrap();
        l.extend(more);
        l.len() >= 3
    })
    .await;
    let mut lost = lost.into_inner().unwrap();
    lost.sort();
    let names: Vec<&str> = lost.iter().map(AgentId::as_str).collect();
    assert_eq!(names, ["gone-1", "gone-2", "gone-3"]);
    assert!(s.expire_agents(10).await.unwrap().is_empty(), "lost once");
    let names: Vec<String> = live(s).await.into_iter().map(|(a, _)| a.0).collect();
    assert_eq!(names, ["alive"]);

    let stream = s.read_stream(&StreamId::Agents, 0).await.unwrap();
    let mut recorded = agent_lost(&stream);
    recorded.sort_by(|a, b| a.agent.cmp(&b.agent));
    assert_eq!(recorded.len(), 3, "{recorded:?}");
    for (l, name) in recorded.iter().zip(["gone-1", "gone-2", "gone-3"]) {
        assert_eq!(
            (l.agent.as_str(), l.reason.as_str()),
            (name, "heartbeat expired")
        );
    }
    assert!(stream.iter().all(|e| e.envelope.stream == "agents"));
    // the global log holds the same entries
    let log = s.read_log(None, 100).await.unwrap();
    let in_log: Vec<_> = log
        .into_iter()
        .filter(|e| e.envelope.stream == "agents")
        .collect();
    assert_eq!(in_log, stream);

    // an agent that comes back and lapses again is lost again
    s.heartbeat(&"gone-1".into(), short).await.unwrap();
    let again = wait_for(DEADLINE, "the second lapse", || async {
        let l = s.expire_agents(10).await.unwrap();
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(again, vec![AgentId::new("gone-1")]);
    let stream = s.read_stream(&StreamId::Agents, 0).await.unwrap();
    assert_eq!(agent_lost(&stream).len(), 4);
}

/// `AgentLeft`, appended to the `agents` stream, takes the agent out of the live agents in the
/// same append: it is not live at once, and its lapsing heartbeat is never reported as lost.
/// The effect belongs in the agents stream only; queue effects do not belong there.
pub async fn an_agent_that_left_is_not_live_and_never_lost(fx: &Fixture) {
    let s = &**fx;
    let short = Duration::from_millis(100);
    s.heartbeat(&"leaving".into(), short).await.unwrap();
    s.heartbeat(&"staying".into(), short).await.unwrap();
    let left = Event::AgentLeft(ferry_proto::AgentLeft {
        agent: "leaving".into(),
        reason: "shut down".into(),
    });
    append(s, Append::new(StreamId::Agents, vec![left.clone()])).await;
    let names: Vec<String> = live(s).await.into_iter().map(|(a, _)| a.0).collect();
    assert_eq!(names, ["staying"]);
    let lost = wait_for(DEADLINE, "the other heartbeat to lapse", || async {
        let l = s.expire_agents(10).await.unwrap();
        (!l.is_empty()).then_some(l)
    })
    .await;
    assert_eq!(
        lost,
        vec![AgentId::new("staying")],
        "the one that left is not lost"
    );
    let stream = s.read_stream(&StreamId::Agents, 0).await.unwrap();
    assert_eq!(agent_lost(&stream).len(), 1);

    let job = JobId::new();
    for (stream, event) in [
        (StreamId::Job(job), left),
        (StreamId::Agents, queued("a", "p1", 0, 1)),
    ] {
        let name = stream.name();
        assert!(
            matches!(
                s.append(Append::new(stream, vec![event])).await,
                Err(Error::Invalid(_))
            ),
            "{name}"
        );
    }
}

/// `AgentStopRequested` is kept for the agent's heartbeats to return, until the agent joins
/// again (a restarted agent is not stopped by an old request) or leaves.
pub async fn a_stop_request_comes_back_with_heartbeats_until_the_agent_joins_or_leaves(
    fx: &Fixture,
) {
    let s = &**fx;
    let a: AgentId = "busy".into();
    let beat = || async { s.heartbeat(&a, LONG).await.unwrap().stop };
    assert_eq!(beat().await, None);
    let request = |why: &str| {
        Event::AgentStopRequested(ferry_proto::AgentStopRequested {
            agent: "busy".into(),
            reason: why.into(),
        })
    };
    append(
        s,
        Append::new(StreamId::Agents, vec![request("kernel upgrade")]),
    )
    .await;
    assert_eq!(beat().await.as_deref(), Some("kernel upgrade"));
    assert_eq!(
        beat().await.as_deref(),
        Some("kernel upgrade"),
        "every heartbeat says it until the agent acts"
    );
    assert_eq!(
        s.heartbeat(&"other".into(), LONG).await.unwrap().stop,
        None,
        "only that agent"
    );
    let joined = Event::AgentJoined(ferry_proto::AgentJoined {
        agent: "busy".into(),
        pools: vec!["p1".into()],
        labels: vec![],
        version: "1".into(),
        capacity: 1,
    });
    append(s, Append::new(StreamId::Agents, vec![joined])).await;
    assert_eq!(beat().await, None, "joining again clears it");
    append(s, Append::new(StreamId::Agents, vec![request("again")])).await;
    assert_eq!(beat().await.as_deref(), Some("again"));
    let left = Event::AgentLeft(ferry_proto::AgentLeft {
        agent: "busy".into(),
        reason: "stopped on request".into(),
    });
    append(s, Append::new(StreamId::Agents, vec![left])).await;
    assert_eq!(beat().await, None, "leaving clears it");
    assert!(matches!(
        s.append(Append::new(StreamId::Job(JobId::new()), vec![request("x")]))
            .await,
        Err(Error::Invalid(_))
    ));
}

/// `AgentPaused` is kept for the agent's heartbeats to return, across its restarts (joining,
/// leaving), until `AgentResumed`; it is not a stop request.
pub async fn a_pause_comes_back_with_heartbeats_until_the_agent_is_resumed(fx: &Fixture) {
    let s = &**fx;
    let a: AgentId = "drained".into();
    let beat = || async { s.heartbeat(&a, LONG).await.unwrap() };
    assert_eq!(beat().await, Heard::default());
    let paused = Event::AgentPaused(ferry_proto::AgentPaused {
        agent: "drained".into(),
        reason: "disk replacement".into(),
    });
    append(s, Append::new(StreamId::Agents, vec![paused.clone()])).await;
    let heard = beat().await;
    assert_eq!(heard.pause.as_deref(), Some("disk replacement"));
    assert_eq!(heard.stop, None, "a pause is not a stop");
    assert_eq!(
        s.heartbeat(&"other".into(), LONG).await.unwrap(),
        Heard::default(),
        "only that agent"
    );
    let joined = Event::AgentJoined(ferry_proto::AgentJoined {
        agent: "drained".into(),
        pools: vec!["p1".into()],
        labels: vec![],
        version: "1".into(),
        capacity: 1,
    });
    let left = Event::AgentLeft(ferry_proto::AgentLeft {
        agent: "drained".into(),
        reason: "restarted".into(),
    });
    append(s, Append::new(StreamId::Agents, vec![left, joined])).await;
    assert_eq!(
        beat().await.pause.as_deref(),
        Some("disk replacement"),
        "a restarted agent stays paused"
    );
    let resumed = Event::AgentResumed(ferry_proto::AgentResumed {
        agent: "drained".into(),
    });
    append(s, Append::new(StreamId::Agents, vec![resumed.clone()])).await;
    assert_eq!(beat().await, Heard::default());
    for event in [paused, resumed] {
        assert!(matches!(
            s.append(Append::new(StreamId::Job(JobId::new()), vec![event]))
                .await,
            Err(Error::Invalid(_))
        ));
    }
}

pub async fn an_agent_whose_heartbeat_ran_out_is_not_live_before_the_sweep(fx: &Fixture) {
    let s = &**fx;
    s.heartbeat(&"brief".into(), Duration::from_millis(50))
        .await
        .unwrap();
    wait_until(DEADLINE, || async { live(s).await.is_empty() }).await;
    assert!(
        agent_lost(&s.read_stream(&StreamId::Agents, 0).await.unwrap()).is_empty(),
        "nothing is recorded until the sweep"
    );
    assert_eq!(
        s.expire_agents(10).await.unwrap(),
        vec![AgentId::new("brief")]
    );
    assert!(s.expire_agents(0).await.unwrap().is_empty());
}
