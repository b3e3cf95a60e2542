//! Group commit for appends. Every append goes through one writer task per store: the appends
//! that callers submit while earlier batches are in flight are sent together, as one call of the
//! append script (`append.lua`), which applies them in order and answers each on its own.
//!
//! Why: a loaded gateway or coordinator makes hundreds of independent appends at once, and each
//! script call has a fixed cost on both sides (the call, its argument and reply handling, a
//! request to write and a reply to read). Sharing calls measured 10-25 % more webhooks and
//! 10-15 % more dispatched steps per second, with less CPU in Redis and in ferry (BENCHMARKS.md,
//! section 0); most of an append's cost is the work inside the script, which batching leaves
//! as it is. A lone append is sent at once, so an idle system pays no latency for this; under
//! load, batches grow by themselves while up to [`MAX_IN_FLIGHT`] calls are outstanding.
//!
//! Nothing about an append's meaning changes: each is still atomic and checked on its own
//! (dedupe, version, fence), and a refusal in one never affects another in the same batch. A
//! batch whose call fails (the connection dropped, a timeout) fails every append in it with
//! [`Error::Unavailable`]: as for any command, the store may or may not have applied them.

use super::keys::Keys;
use super::link::Link;
use super::{command_error, parse_num, scripts};
use crate::store::validate::{check_append, check_name, check_nonempty};
use crate::store::Version;
use crate::store::{
    effects_of, misplaced, Append, Appended, Effect, Error, Expected, Fence, LogPos, Result,
};
use redis::Value;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Appends in one script call, at most.
const MAX_BATCH: usize = 256;
/// Script calls outstanding at once. More than one keeps Redis busy while a reply travels back;
/// few enough that batches form under load.
const MAX_IN_FLIGHT: usize = 2;

/// An append encoded as the script's arguments, with what is needed to read its reply.
pub(super) struct Prepared {
    args: Vec<Vec<u8>>,
    stream: String,
    expected: Version,
    fence: Option<Fence>,
    events: usize,
}

/// Encodes `a` (validated first) as one append of the script's ARGV.
pub(super) fn prepare(a: &Append) -> Result<Prepared> {
    let window = check_append(a)?;
    let name = a.stream.name();
    let job = a.stream.job().map(|j| j.to_string()).unwrap_or_default();
    let expected: i64 = match a.expected {
        Expected::Any => -1,
        Expected::Exactly(v) => i64::try_from(v)
            .map_err(|_| Error::Invalid(format!("expected version {v} is too large")))?,
    };
    let (fence_step, fence_token) = match &a.fence {
        Some(f) => (f.step.0.clone(), f.token.0.to_string()),
        None => (String::new(), String::new()),
    };
    let mut args: Vec<Vec<u8>> =
        Vec::with_capacity(11 + a.dedupe.len() + a.forget.len() + 9 * a.events.len());
    let mut text = |s: String| args.push(s.into_bytes());
    text(name.clone());
    text(job.clone());
    text(expected.to_string());
    text(fence_step);
    text(fence_token);
    text(window.to_string());
    text(a.at_ms.to_string());
    text(a.dedupe.len().to_string());
    for d in &a.dedupe {
        text(d.clone());
    }
    text(a.forget.len().to_string());
    for d in &a.forget {
        text(d.clone());
    }
    text(a.events.len().to_string());
    let a_at_ms = a.at_ms as i64;
    for event in &a.events {
        let effect = effects_of(event);
        if let Some(why) = effect.as_ref().and_then(|e| misplaced(e, event, &a.stream)) {
            return Err(Error::Invalid(why));
        }
        let none = String::new;
        let (what, step, attempt, pool, priority, due) = match effect {
            None => ("", none(), none(), none(), none(), none()),
            Some(Effect::Enqueue {
                step,
                attempt,
                pool,
                priority,
            }) => {
                check_name("step", step.as_str())?;
                check_name("pool", &pool)?;
                let (a, p) = (attempt.to_string(), priority.to_string());
                ("enqueue", step.0, a, pool, p, none())
            }
            Some(Effect::Schedule {
                step,
                attempt,
                pool,
                priority,
                due_ms,
            }) => {
                check_name("step", step.as_str())?;
                check_name("pool", &pool)?;
                let (a, p) = (attempt.to_string(), priority.to_string());
                // The delay the writer meant (its due time less its envelope time, both on its
                // clock): the script adds it to the store's clock, so a writer whose clock is
                // off neither holds retries back nor lets them go early.
                let delay = due_ms as i64 - a_at_ms;
                ("schedule", step.0, a, pool, p, delay.to_string())
            }
            Some(Effect::Index { keys }) => {
                for key in &keys {
                    check_nonempty("index key", key)?;
                    if key.contains('\n') {
                        return Err(Error::Invalid(format!(
                            "index key {key:?} contains a newline"
                        )));
                    }
                }
                ("index", keys.join("\n"), none(), none(), none(), none())
            }
            Some(Effect::Finish { step }) => {
                check_name("step", step.as_str())?;
                ("finish", step.0, none(), none(), none(), none())
            }
            Some(Effect::ClearJob) => ("clear", none(), none(), none(), none(), none()),
            Some(Effect::DropLogs) => ("drop_logs", none(), none(), none(), none(), none()),
            Some(Effect::Leave { agent }) => {
                check_name("agent", agent.as_str())?;
                ("leave", agent.0, none(), none(), none(), none())
            }
            Some(Effect::Join { agent }) => {
                check_name("agent", agent.as_str())?;
                ("join", agent.0, none(), none(), none(), none())
            }
            Some(Effect::RequestStop { agent, reason }) => {
                check_name("agent", agent.as_str())?;
                ("stop", agent.0, none(), reason, none(), none())
            }
            Some(Effect::Pause { agent, reason }) => {
                check_name("agent", agent.as_str())?;
                ("pause", agent.0, none(), reason, none(), none())
            }
            Some(Effect::Resume { agent }) => {
                check_name("agent", agent.as_str())?;
                ("resume", agent.0, none(), none(), none(), none())
            }
        };
        args.push(event.kind().to_string().into_bytes());
        args.push(event.version().to_string().into_bytes());
        args.push(event.encode_payload());
        for field in [what.to_string(), step, attempt, pool, priority, due] {
            args.push(field.into_bytes());
        }
    }
    Ok(Prepared {
        args,
        stream: name,
        expected: expected.max(0) as Version,
        fence: a.fence.clone(),
        events: a.events.len(),
    })
}

type Waiter = oneshot::Sender<Result<Appended>>;

/// The handle callers submit appends through. Dropping every handle ends the writer task.
pub(super) struct Batcher {
    tx: mpsc::UnboundedSender<(Prepared, Waiter)>,
}

impl Batcher {
    /// Starts the writer task on the current tokio runtime.
    pub(super) fn start(conn: Link, keys: Keys) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(conn, Arc::new(keys), rx));
        Batcher { tx }
    }

    /// Appends `p` in the next batch and waits for its own answer.
    pub(super) async fn append(&self, p: Prepared) -> Result<Appended> {
        let stream = p.stream.clone();
        let (tx, rx) = oneshot::channel();
        let gone = || Error::Unavailable(format!("append to {stream}: the store's writer stopped"));
        self.tx.send((p, tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

async fn write_loop(
    conn: Link,
    keys: Arc<Keys>,
    mut rx: mpsc::UnboundedReceiver<(Prepared, Waiter)>,
) {
    let slots = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Wait for a free slot first: what arrives meanwhile joins this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (conn, keys) = (conn.clone(), keys.clone());
        tokio::spawn(async move {
            send(conn, &keys, batch).await;
            drop(slot);
        });
    }
}

/// One script call for `batch`; every waiter gets its own answer.
async fn send(conn: Link, keys: &Keys, batch: Vec<(Prepared, Waiter)>) {
    let (prepared, waiters): (Vec<Prepared>, Vec<Waiter>) = batch.into_iter().unzip();
    for (answer, waiter) in call(conn, keys, &prepared).await.into_iter().zip(waiters) {
        let _ = waiter.send(answer);
    }
}

/// One call of the append script for `appends`: one answer per append, in order.
async fn call(mut conn: Link, keys: &Keys, appends: &[Prepared]) -> Vec<Result<Appended>> {
    let mut inv = scripts::APPEND.prepare_invoke();
    inv.key(keys.log()).key(keys.jobs());
    inv.arg(keys.prefix()).arg(appends.len());
    for p in appends {
        for a in &p.args {
            inv.arg(a.as_slice());
        }
    }
    match inv.invoke_async::<Vec<Value>>(&mut conn).await {
        Ok(replies) if replies.len() == appends.len() => appends
            .iter()
            .zip(replies)
            .map(|(p, reply)| answer(p, reply))
            .collect(),
        Ok(replies) => {
            let n = replies.len();
            appends
                .iter()
                .map(|p| {
                    Err(Error::Corrupt(format!(
                        "append script answered {n} replies for a batch with the append to {}",
                        p.stream
                    )))
                })
                .collect()
        }
        Err(e) => appends
            .iter()
            .map(|p| Err(command_error(&format!("append to {}", p.stream), e.clone())))
            .collect(),
    }
}

/// Reads one append's reply.
fn answer(p: &Prepared, reply: Value) -> Result<Appended> {
    let corrupt = |reply: &dyn std::fmt::Debug| {
        Error::Corrupt(format!("append script answered {reply:?} for {}", p.stream))
    };
    let fields: Vec<String> =
        redis::FromRedisValue::from_redis_value(reply.clone()).map_err(|_| corrupt(&reply))?;
    match (fields.first().map(String::as_str), fields.len()) {
        (Some("ok"), n) if n == 2 + p.events => Ok(Appended::Written {
            version: parse_num("stream version", &fields[1])?,
            positions: fields[2..].iter().cloned().map(LogPos).collect(),
        }),
        (Some("dup"), 2) => Ok(Appended::Duplicate {
            original: LogPos(fields[1].clone()),
        }),
        (Some("conflict"), 2) => Err(Error::Conflict {
            stream: p.stream.clone(),
            expected: p.expected,
            actual: parse_num("stream version", &fields[1])?,
        }),
        (Some("stale"), 2) => match &p.fence {
            Some(f) => Err(Error::Stale {
                step: f.step.clone(),
                token: f.token,
                reason: fields[1].clone(),
            }),
            None => Err(corrupt(&fields)),
        },
        _ => Err(corrupt(&fields)),
    }
}
