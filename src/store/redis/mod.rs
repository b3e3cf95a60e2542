//! Redis adapter for every storage port.
//!
//! Events live in Redis streams (one per job, plus `webhooks` and `agents`) and, in the same
//! atomic script, in the global log stream that consumer groups read. Queues are sorted sets,
//! leases are hashes indexed by a deadline zset, tokens come from one `INCR` counter, and every
//! multi-key change is one Lua script (see the `.lua` files beside this module, whose header
//! comments are their contracts, and [`keys`] for the layout). Scripts read the store's clock
//! with `redis.call('TIME')`, so node clocks never matter.
//!
//! Normal commands go through a [`Link`] (see [`link`]): a [`redis::aio::ConnectionManager`]
//! (reconnects with backoff, bounded response time) to one server or to the master a set of
//! Sentinels names, followed across failovers, or a Redis Cluster client. Blocking commands
//! (`XREADGROUP ... BLOCK`, `BLPOP`) use dedicated connections from a small pool, so they never
//! delay other commands, and are bounded by the block time plus a margin.
//!
//! What Redis cannot promise: with asynchronous replication a failover can lose acknowledged
//! writes; durability is what the server's `appendonly` / `appendfsync` settings make it.

mod batch;
mod keys;
pub mod link;
mod parse;
mod scripts;
pub mod urls;

pub use scripts::queue_score_probe;

use crate::store::validate::{check_name, check_nonempty, check_pools, ms, positive_ms};
use crate::store::{
    effects_of, queued_at, Agents, Append, Appended, Capacity, Claim, Effect, Error, EventLog,
    Feed, Fence, Heard, LeaderLock, Lease, Leases, Listing, LogPos, Logs, Order, QueueDepths,
    Queued, Result, Snapshots, Stored, StreamCursor, StreamId, Trimmed, Usage, Version, WorkQueue,
    LOG_MAX_LINES,
};
use async_trait::async_trait;
use ferry_proto::{AgentId, FencingToken, JobId, StepId, StepLog};
use keys::{member, split_member, Keys};
use link::{Link, Target};
use parse::Source;
use redis::aio::ConnectionManagerConfig;
use redis::{FromRedisValue, RedisError, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a normal command may take before the store reports itself unavailable.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Extra time a blocking command gets beyond its block time.
const BLOCK_MARGIN: Duration = Duration::from_secs(5);
/// Idle blocking connections kept for reuse.
const MAX_IDLE_BLOCKING: usize = 8;
/// The `stream-node-max-bytes` ops/README.md recommends: a job's stream (a handful of small
/// entries) then starts with 2 KB instead of 4 KB of listpack, and output-line streams, which
/// fill their nodes, are as compact as with the default (BENCHMARKS.md, section 0).
const STREAM_NODE_BYTES: u64 = 2048;

/// The Redis store. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    link: Link,
    keys: Keys,
    namespace: String,
    blocking: Mutex<Vec<link::Blocking>>,
    /// Every append goes through it (group commit).
    batcher: batch::Batcher,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("namespace", &self.inner.namespace)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Connects to the Redis at `url` (`redis://host:port/db`; the master Sentinels name,
    /// `redis+sentinel://…`; a cluster, `redis+cluster://…`; see [`urls`]) and uses the keys of
    /// `namespace` (no whitespace or braces). Fails with [`Error::Unavailable`] if the server
    /// does not answer.
    pub async fn connect(url: &str, namespace: &str) -> Result<RedisStore> {
        RedisStore::connect_tls(url, namespace, None).await
    }

    /// [`RedisStore::connect`], where a `rediss://` server's certificate must chain to one of
    /// the PEM certificates `ca` (instead of the system's trust store).
    pub async fn connect_tls(
        url: &str,
        namespace: &str,
        ca: Option<Vec<u8>>,
    ) -> Result<RedisStore> {
        let keys = Keys::new(namespace)?;
        if url.starts_with("rediss") {
            crate::tls::install_provider();
        } else if ca.is_some() {
            return Err(Error::Invalid(
                "a certificate authority file applies to TLS stores (rediss://…) only".into(),
            ));
        }
        let target = Target::of(url, ca.as_deref(), || client_for(url, ca.clone()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(1));
        let link = Link::open(target, config).await?;
        let batcher = batch::Batcher::start(link.clone(), keys.clone());
        let store = RedisStore {
            inner: Arc::new(Inner {
                link,
                keys,
                batcher,
                namespace: namespace.to_string(),
                blocking: Mutex::new(Vec::new()),
            }),
        };
        store.ping().await?;
        Ok(store)
    }

    /// What could lose ferry's data on this server, read from its `INFO` (so also where
    /// `CONFIG` is denied): warnings (Redis may evict keys: `maxmemory-policy` is not
    /// `noeviction`) and notes (persistence is off). Nothing when the server cannot be read.
    pub async fn configuration_risks(&self) -> (Vec<String>, Vec<String>) {
        let (mut warnings, mut notes) = (Vec::new(), Vec::new());
        let Ok(info) = self.server_info().await else {
            return (warnings, notes);
        };
        if let Some(policy) = info.get("maxmemory_policy") {
            if policy != "noeviction" {
                warnings.push(format!(
                    "Redis may evict ferry's keys (maxmemory-policy is {policy}): under memory pressure it would silently drop events, queued steps and leases; set maxmemory-policy noeviction"
                ));
            }
        }
        if info.get("aof_enabled").map(String::as_str) == Some("0") {
            notes.push(
                "Redis persistence is off (appendonly no): a Redis restart loses the events acknowledged since its last snapshot; set appendonly yes for a fleet".into(),
            );
        }
        if let Some(bytes) = self.stream_node_max_bytes().await {
            // Redis gives a new stream node min(this, 4096) bytes up front (0 = no limit: 4096)
            // and keeps the slack until the node fills: every job's stream is one small node.
            let up_front = if bytes == 0 { 4096 } else { bytes.min(4096) };
            if up_front > STREAM_NODE_BYTES {
                notes.push(format!(
                    "Redis stream-node-max-bytes is {bytes}: every job's event stream takes {up_front} bytes or more for good; set stream-node-max-bytes {STREAM_NODE_BYTES} to keep about 2 KB less per job (ops/README.md, Sizing Redis)"
                ));
            }
        }
        (warnings, notes)
    }

    /// The server's `stream-node-max-bytes`, where `CONFIG GET` is allowed (hosted services
    /// often deny it; then nothing is said).
    async fn stream_node_max_bytes(&self) -> Option<u64> {
        let reply: HashMap<String, String> = self
            .query(
                "read stream-node-max-bytes",
                redis::cmd("CONFIG").arg("GET").arg("stream-node-max-bytes"),
            )
            .await
            .ok()?;
        reply.get("stream-node-max-bytes")?.parse().ok()
    }

    /// The `memory` and `persistence` sections of `INFO` of the server holding the namespace,
    /// by field name.
    async fn server_info(&self) -> Result<HashMap<String, String>> {
        let text: String = scripts::INFO
            .key(self.keys().log())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error("read the server's INFO", e))?;
        Ok(text
            .lines()
            .filter_map(|l| l.trim_end().split_once(':'))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect())
    }

    /// The namespace this store's keys live in.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    fn conn(&self) -> Link {
        self.inner.link.clone()
    }

    async fn query<T: FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> Result<T> {
        cmd.query_async(&mut self.conn())
            .await
            .map_err(|e| command_error(what, e))
    }

    /// Runs a blocking command on a dedicated connection, bounded by `wait` plus a margin.
    async fn blocking<T: FromRedisValue>(
        &self,
        what: &str,
        cmd: &redis::Cmd,
        wait: Duration,
    ) -> Result<T> {
        let idle = self.inner.blocking.lock().expect("pool lock").pop();
        let mut conn = match idle {
            Some(c) => c,
            None => self
                .inner
                .link
                .blocking()
                .await
                .map_err(|e| command_error(what, e))?,
        };
        match tokio::time::timeout(wait + BLOCK_MARGIN, cmd.query_async::<T>(&mut conn)).await {
            Ok(Ok(v)) => {
                let mut pool = self.inner.blocking.lock().expect("pool lock");
                if pool.len() < MAX_IDLE_BLOCKING {
                    pool.push(conn);
                }
                Ok(v)
            }
            Ok(Err(e)) => {
                self.inner.link.failed(&e);
                Err(command_error(what, e))
            }
            Err(_) => Err(Error::Unavailable(format!(
                "{what}: no answer within {:?}",
                wait + BLOCK_MARGIN
            ))),
        }
    }
}

/// One claim of the claim script's reply, its history still empty, and its StepClaimed
/// entry's id (where the history ends).
fn parse_claim(v: Value) -> Result<(Claim, String)> {
    let parts: Vec<Value> = from_value("claim", v)?;
    let [job, step, attempt, pool, token, deadline, claimed] = <[Value; 7]>::try_from(parts)
        .map_err(|r| Error::Corrupt(format!("claim script answered {r:?}")))?;
    let text = |what: &str, v: Value| from_value::<String>(&format!("claim {what}"), v);
    let claim = Claim {
        job: parse_job(&text("job", job)?)?,
        step: StepId(text("step", step)?),
        attempt: parse_num("attempt", &text("attempt", attempt)?)?,
        pool: text("pool", pool)?,
        token: FencingToken(parse_num("token", &text("token", token)?)?),
        deadline_ms: parse_num("deadline", &text("deadline", deadline)?)?,
        history: Vec::new(),
    };
    Ok((claim, text("entry id", claimed)?))
}

/// A failed command: missing consumer groups are the caller's mistake, wrong key types mean the
/// data is corrupt, everything else (I/O, timeouts, a lost connection, a server that cannot
/// serve) means the store is unavailable and the command may or may not have taken effect.
/// A client for the one server at `url`, whose certificate (`rediss://`) must chain to `ca`
/// when given.
fn client_for(url: &str, ca: Option<Vec<u8>>) -> Result<redis::Client> {
    match ca {
        Some(root) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root),
            },
        ),
        None => redis::Client::open(url),
    }
    .map_err(|e| Error::Invalid(format!("redis store url is invalid: {e}")))
}

fn command_error(what: &str, e: RedisError) -> Error {
    match e.code() {
        Some("NOGROUP") => Error::NoGroup(format!("{what}: {e}")),
        Some("WRONGTYPE") => Error::Corrupt(format!("{what}: {e}")),
        _ => Error::Unavailable(format!("{what}: {e}")),
    }
}

/// The `FERRY_*` code and detail of an error reply from one of our scripts.
fn script_failure(e: &RedisError) -> Option<(&str, &str)> {
    let code = e.code()?;
    code.starts_with("FERRY_")
        .then(|| (code, e.detail().unwrap_or("")))
}

fn parse_num<T: std::str::FromStr>(what: &str, s: &str) -> Result<T> {
    s.parse()
        .map_err(|_| Error::Corrupt(format!("{what} {s:?} is not a number")))
}

fn parse_job(s: &str) -> Result<JobId> {
    s.parse()
        .map_err(|_| Error::Corrupt(format!("job id {s:?} is not a uuid")))
}

fn from_value<T: FromRedisValue>(what: &str, v: Value) -> Result<T> {
    T::from_redis_value(v).map_err(|e| Error::Corrupt(format!("{what}: {e}")))
}

/// Entries per `XRANGE` when a long stream is read in pages.
const STREAM_PAGE: usize = 1024;

impl RedisStore {
    /// Each claim's history: its job's stream up to its StepClaimed entry, one pipelined
    /// `XRANGE` for all of them (a stream longer than a page is read on in pages). Native
    /// reads, outside the claim script: a script pays for every value it reads and returns,
    /// several times what the server's own `XRANGE` costs.
    async fn histories(&self, claims: &[(Claim, String)]) -> Result<Vec<Vec<Stored>>> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for (claim, claimed) in claims {
            pipe.cmd("XRANGE")
                .arg(self.keys().stream(&StreamId::Job(claim.job).name()))
                .arg("-")
                .arg(claimed)
                .arg("COUNT")
                .arg(STREAM_PAGE);
        }
        let pages: Vec<Value> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|e| command_error("read the claimed jobs", e))?;
        if pages.len() != claims.len() {
            return Err(Error::Corrupt(format!(
                "{} histories for {} claims",
                pages.len(),
                claims.len()
            )));
        }
        let mut out = Vec::with_capacity(claims.len());
        for ((claim, claimed), page) in claims.iter().zip(pages) {
            let name = StreamId::Job(claim.job).name();
            let last = parse::last_id(&page);
            let mut history = parse::entries(page, Source::Stream(&name))?;
            match last {
                Some(last) if &last == claimed => {}
                Some(last) if history.len() == STREAM_PAGE => {
                    history.extend(self.stream_pages(&name, Some(last), claimed).await?);
                }
                _ => {
                    return Err(Error::Corrupt(format!(
                        "{name} ends before its StepClaimed entry {claimed}"
                    )))
                }
            }
            out.push(history);
        }
        Ok(out)
    }

    /// The claims of a claim call with their histories. The leases are granted already, so
    /// a read that fails for want of the store is tried again while the leases are young
    /// (for a third of their TTL, as long as an agent waits to renew); if it still fails,
    /// the claims are handed back (`StepReleased`), so that the steps are queued again at
    /// once instead of waiting for their leases to run out, and the error is returned.
    async fn with_histories(
        &self,
        mut claims: Vec<(Claim, String)>,
        ttl: Duration,
    ) -> Result<Vec<Claim>> {
        let give_up = tokio::time::Instant::now() + ttl / 3;
        let mut pause = Duration::from_millis(20);
        let failure = loop {
            match self.histories(&claims).await {
                Ok(histories) => {
                    for ((claim, _), history) in claims.iter_mut().zip(histories) {
                        claim.history = history;
                    }
                    return Ok(claims.into_iter().map(|(claim, _)| claim).collect());
                }
                Err(e @ Error::Unavailable(_)) if tokio::time::Instant::now() + pause < give_up => {
                    tracing::debug!(error = %e, "reading the claimed jobs failed; trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => break e,
            }
        };
        let reason = format!("the agent could not read the claimed job: {failure}");
        for (claim, _) in &claims {
            if let Err(e) = self
                .release(claim.job, &claim.step, claim.token, &reason)
                .await
            {
                tracing::warn!(job = %claim.job, step = %claim.step, error = %e,
                    "could not hand back a claim whose job could not be read; its lease will run out");
            }
        }
        Err(failure)
    }

    /// The entries of stream `name` after its first `from`, read backwards from its end until
    /// the entry at `from` (every entry records its place): what a reader that already holds a
    /// stream's first `from` events pays is its tail, not the whole stream (the agents stream
    /// grows with every join and stop of the fleet). `None` when an entry written before
    /// entries recorded their place is reached: then only counting from the start tells.
    async fn stream_tail(&self, name: &str, from: Version) -> Result<Option<Vec<Stored>>> {
        let key = self.keys().stream(name);
        let mut tail: Vec<Stored> = Vec::new();
        let mut before: Option<String> = None;
        // Small pages first: a reader that is nearly up to date wants a few entries.
        let mut count = 16;
        loop {
            let end = before.map_or("+".to_string(), |b| format!("({b}"));
            let v: Value = self
                .query(
                    &format!("read the end of {name}"),
                    redis::cmd("XREVRANGE")
                        .arg(&key)
                        .arg(end)
                        .arg("-")
                        .arg("COUNT")
                        .arg(count),
                )
                .await?;
            let oldest = parse::last_id(&v);
            let page = parse::entries(v, Source::Stream(name))?;
            let full = page.len() == count;
            for stored in page {
                match stored.seq {
                    Some(seq) if seq <= from => {
                        tail.reverse();
                        return Ok(Some(tail));
                    }
                    Some(_) => tail.push(stored),
                    None => return Ok(None),
                }
            }
            if !full {
                // the start of the stream: it holds no more than `from` entries before these
                tail.reverse();
                return Ok(Some(tail));
            }
            before = oldest;
            count = (count * 4).min(STREAM_PAGE);
        }
    }

    /// Every entry of stream `name` after entry id `after` (`None`: from its start) up to
    /// `until` (`+`: its end), a page of [`STREAM_PAGE`] at a time.
    async fn stream_pages(
        &self,
        name: &str,
        mut after: Option<String>,
        until: &str,
    ) -> Result<Vec<Stored>> {
        let mut out = Vec::new();
        loop {
            let (page, last) = self
                .stream_page(name, after.as_deref(), until, STREAM_PAGE)
                .await?;
            let full = page.len() == STREAM_PAGE;
            out.extend(page);
            match last {
                Some(last) if full && last != until => after = Some(last),
                _ => return Ok(out),
            }
        }
    }

    /// Up to `count` entries of stream `name` after entry id `after` (`None`: from its start)
    /// up to `until`, and the id of the last one.
    async fn stream_page(
        &self,
        name: &str,
        after: Option<&str>,
        until: &str,
        count: usize,
    ) -> Result<(Vec<Stored>, Option<String>)> {
        let start = after.map_or("-".to_string(), |a| format!("({a}"));
        let v: Value = self
            .query(
                &format!("read {name}"),
                redis::cmd("XRANGE")
                    .arg(self.keys().stream(name))
                    .arg(start)
                    .arg(until)
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        let last = parse::last_id(&v);
        Ok((parse::entries(v, Source::Stream(name))?, last))
    }
}

#[async_trait]
impl EventLog for RedisStore {
    async fn append(&self, a: Append) -> Result<Appended> {
        let prepared = batch::prepare(&a)?;
        self.inner.batcher.append(prepared).await
    }

    async fn read_stream(&self, stream: &StreamId, from: Version) -> Result<Vec<Stored>> {
        let name = stream.name();
        if from > 0 {
            if let Some(tail) = self.stream_tail(&name, from).await? {
                return Ok(tail);
            }
        }
        let all = self.stream_pages(&name, None, "+").await?;
        Ok(all
            .into_iter()
            .skip(usize::try_from(from).unwrap_or(usize::MAX))
            .collect())
    }

    async fn read_log(&self, after: Option<&LogPos>, count: usize) -> Result<Vec<Stored>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let start = match after {
            Some(p) => format!("({p}"),
            None => "-".into(),
        };
        let v: Value = self
            .query(
                "read the log",
                redis::cmd("XRANGE")
                    .arg(self.keys().log())
                    .arg(start)
                    .arg("+")
                    .arg("COUNT")
                    .arg(count),
            )
            .await?;
        parse::entries(v, Source::Log)
    }

    async fn read_stream_page(
        &self,
        stream: &StreamId,
        after: Option<&StreamCursor>,
        count: usize,
    ) -> Result<(Vec<Stored>, Option<StreamCursor>)> {
        if count == 0 {
            return Ok((Vec::new(), after.cloned()));
        }
        // the cursor is the last entry's id in the stream
        let (page, last) = self
            .stream_page(&stream.name(), after.map(|c| c.0.as_str()), "+", count)
            .await?;
        let next = last.filter(|_| page.len() == count).map(StreamCursor);
        Ok((page, next))
    }

    async fn log_end(&self) -> Result<Option<LogPos>> {
        let v: Value = self
            .query(
                "read the end of the log",
                redis::cmd("XREVRANGE")
                    .arg(self.keys().log())
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1),
            )
            .await?;
        Ok(parse::last_id(&v).map(LogPos))
    }

    async fn log_complete_from(&self) -> Result<Option<LogPos>> {
        let from: Option<String> = self
            .query(
                "read where the log is complete from",
                redis::cmd("GET").arg(self.keys().log_trimmed()),
            )
            .await?;
        Ok(from.map(LogPos))
    }

    async fn jobs(&self, after: Option<JobId>, limit: usize, order: Order) -> Result<Vec<JobId>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let key = self.keys().jobs();
        // The zset scores jobs by creation time, ties by member (the id): its reverse order is
        // newest first.
        let (rank, range) = match order {
            Order::Oldest => ("ZRANK", "ZRANGE"),
            Order::Newest => ("ZREVRANK", "ZREVRANGE"),
        };
        let start: i64 = match after {
            None => 0,
            Some(j) => {
                let rank: Option<i64> = self
                    .query("find job", redis::cmd(rank).arg(&key).arg(j.to_string()))
                    .await?;
                rank.ok_or_else(|| Error::Invalid(format!("unknown job {j}")))? + 1
            }
        };
        let ids: Vec<String> = self
            .query(
                "list jobs",
                redis::cmd(range)
                    .arg(&key)
                    .arg(start)
                    .arg(start + limit as i64 - 1),
            )
            .await?;
        ids.iter().map(|s| parse_job(s)).collect()
    }

    async fn indexed(&self, key: &str) -> Result<Vec<JobId>> {
        check_nonempty("index key", key)?;
        let ids: Vec<String> = self
            .query(
                "read index",
                redis::cmd("SMEMBERS").arg(self.keys().index(key)),
            )
            .await?;
        let mut jobs = ids
            .iter()
            .map(|s| parse_job(s))
            .collect::<Result<Vec<_>>>()?;
        jobs.sort();
        Ok(jobs)
    }

    async fn ping(&self) -> Result<()> {
        let _: String = self.query("ping", &redis::cmd("PING")).await?;
        Ok(())
    }
}

#[async_trait]
impl Feed for RedisStore {
    async fn trim_log(&self, before_ms: u64) -> Result<Trimmed> {
        let (deleted, _bound, holder): (u64, String, String) = scripts::TRIM_LOG
            .key(self.keys().log())
            .key(self.keys().log_trimmed())
            .arg(before_ms)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error("trim the log", e))?;
        Ok(Trimmed {
            deleted,
            held_by: Some(holder).filter(|h| !h.is_empty()),
        })
    }

    async fn ensure_group(&self, group: &str) -> Result<()> {
        check_nonempty("consumer group", group)?;
        let r: Result<(), RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.keys().log())
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut self.conn())
            .await;
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(command_error(&format!("create group {group}"), e)),
        }
    }

    async fn read_new(
        &self,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Stored>> {
        check_nonempty("consumer group", group)?;
        check_nonempty("consumer", consumer)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count);
        let what = format!("read group {group}");
        let block_ms = ms(block);
        let v: Value = if block_ms == 0 {
            cmd.arg("STREAMS").arg(self.keys().log()).arg(">");
            self.query(&what, &cmd).await?
        } else {
            cmd.arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(self.keys().log())
                .arg(">");
            self.blocking(&what, &cmd, block).await?
        };
        parse::read_group(v)
    }

    async fn read_pending(&self, group: &str, consumer: &str, count: usize) -> Result<Vec<Stored>> {
        check_nonempty("consumer group", group)?;
        check_nonempty("consumer", consumer)?;
        if count == 0 {
            return Ok(Vec::new());
        }
        let v: Value = self
            .query(
                &format!("read pending of {consumer} in group {group}"),
                redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(group)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(count)
                    .arg("STREAMS")
                    .arg(self.keys().log())
                    .arg("0"),
            )
            .await?;
        parse::read_group(v)
    }

    async fn ack(&self, group: &str, positions: &[LogPos]) -> Result<u64> {
        if positions.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("XACK");
        cmd.arg(self.keys().log()).arg(group);
        for p in positions {
            cmd.arg(&p.0);
        }
        self.query(&format!("ack in group {group}"), &cmd).await
    }

    async fn claim_idle(
        &self,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Stored>> {
        check_nonempty("consumer group", group)?;
        check_nonempty("consumer", consumer)?;
        let mut out = Vec::new();
        let mut cursor = "0-0".to_string();
        while out.len() < count {
            let v: Value = self
                .query(
                    &format!("claim idle entries in group {group}"),
                    redis::cmd("XAUTOCLAIM")
                        .arg(self.keys().log())
                        .arg(group)
                        .arg(consumer)
                        .arg(ms(min_idle))
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(count - out.len()),
                )
                .await?;
            let (next, claimed) = parse::autoclaim(v)?;
            out.extend(claimed);
            if next == "0-0" {
                break;
            }
            cursor = next;
        }
        Ok(out)
    }
}

#[async_trait]
impl WorkQueue for RedisStore {
    async fn claim_many(
        &self,
        pools: &[String],
        agent: &AgentId,
        ttl: Duration,
        max: usize,
    ) -> Result<Vec<Claim>> {
        check_pools(pools)?;
        check_nonempty("agent", agent.as_str())?;
        let ttl = positive_ms("lease ttl", ttl)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let k = self.keys();
        let mut inv = scripts::CLAIM.prepare_invoke();
        inv.key(k.items())
            .key(k.leases())
            .key(k.fence())
            .arg(k.prefix())
            .arg(agent.as_str())
            .arg(ttl)
            .arg(max);
        for p in pools {
            inv.arg(p);
        }
        let reply: Vec<Value> =
            inv.invoke_async(&mut self.conn())
                .await
                .map_err(|e| match script_failure(&e) {
                    Some(("FERRY_CORRUPT", why)) => Error::Corrupt(why.to_string()),
                    _ => command_error("claim", e),
                })?;
        let claims = reply
            .into_iter()
            .map(parse_claim)
            .collect::<Result<Vec<_>>>()?;
        self.with_histories(claims, Duration::from_millis(ttl))
            .await
    }

    async fn promote_due(&self, max: usize) -> Result<usize> {
        if max == 0 {
            return Ok(0);
        }
        let k = self.keys();
        let n: i64 = scripts::PROMOTE
            .key(k.delayed())
            .key(k.items())
            .arg(k.prefix())
            .arg(max)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error("promote due steps", e))?;
        Ok(n.max(0) as usize)
    }

    async fn wait_for_work(&self, pools: &[String], timeout: Duration) -> Result<()> {
        check_pools(pools)?;
        if timeout < Duration::from_millis(1) {
            return Ok(());
        }
        let mut cmd = redis::cmd("BLPOP");
        for p in pools {
            cmd.arg(self.keys().wake(p));
        }
        cmd.arg(format!("{:.3}", timeout.as_secs_f64()));
        let _: Value = self.blocking("wait for work", &cmd, timeout).await?;
        Ok(())
    }

    async fn queue_depths(&self, pools: &[String]) -> Result<QueueDepths> {
        if !pools.is_empty() {
            check_pools(pools)?;
        }
        let mut pipe = redis::pipe();
        pipe.cmd("ZCARD").arg(self.keys().delayed());
        for p in pools {
            pipe.cmd("ZCARD").arg(self.keys().ready(p));
            pipe.cmd("ZRANGE")
                .arg(self.keys().ready(p))
                .arg(0)
                .arg(0)
                .arg("WITHSCORES");
        }
        let (delayed, ready): (u64, Vec<(u64, Vec<(String, f64)>)>) = pipe
            .query_async::<Vec<Value>>(&mut self.conn())
            .await
            .and_then(|v| {
                let mut v = v.into_iter();
                let delayed = redis::from_redis_value(v.next().unwrap_or(Value::Nil))?;
                let mut ready = Vec::new();
                while let (Some(n), Some(head)) = (v.next(), v.next()) {
                    ready.push((redis::from_redis_value(n)?, redis::from_redis_value(head)?));
                }
                Ok((delayed, ready))
            })
            .map_err(|e| command_error("count queued steps", e))?;
        Ok(QueueDepths {
            ready: ready
                .into_iter()
                .map(|(n, head)| (n, head.first().map(|(_, score)| queued_at(*score))))
                .collect(),
            delayed,
        })
    }

    async fn queued(&self) -> Result<Vec<Queued>> {
        let k = self.keys();
        // The pools come from the items (every queued member has one, naming its pool): read
        // the items, the delayed set and the ready queues of the pools known so far in one
        // transaction, and again with more pools while the items name a pool not read yet.
        let mut pools: Vec<String> = Vec::new();
        let (items, delayed, mut ready) = loop {
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("HGETALL")
                .arg(k.items())
                .cmd("ZRANGE")
                .arg(k.delayed())
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES");
            for p in &pools {
                pipe.cmd("ZRANGE").arg(k.ready(p)).arg(0).arg(-1);
            }
            let replies: Vec<Value> = pipe
                .query_async(&mut self.conn())
                .await
                .map_err(|e| command_error("list queues", e))?;
            let mut replies = replies.into_iter();
            let mut next = || replies.next().unwrap_or(Value::Nil);
            let items: HashMap<String, String> = from_value("queue items", next())?;
            let delayed: Vec<(String, f64)> = from_value("delayed set", next())?;
            let mut named: Vec<String> = items
                .values()
                .filter_map(|d| d.splitn(3, '|').nth(2))
                .filter(|p| !pools.iter().any(|known| known == p))
                .map(str::to_string)
                .collect();
            if named.is_empty() {
                let ready = pools
                    .iter()
                    .map(|_| from_value::<Vec<String>>("ready queue", next()))
                    .collect::<Result<Vec<_>>>()?;
                break (items, delayed, ready);
            }
            named.sort();
            named.dedup();
            pools.extend(named);
            pools.sort();
        };
        let item = |m: &str, due_ms: Option<u64>| -> Result<Queued> {
            let detail = items
                .get(m)
                .ok_or_else(|| Error::Corrupt(format!("queued {m} has no item")))?;
            let mut parts = detail.splitn(3, '|');
            let (Some(a), Some(p), Some(pool)) = (parts.next(), parts.next(), parts.next()) else {
                return Err(Error::Corrupt(format!("item of {m} is {detail:?}")));
            };
            let (job, step) =
                split_member(m).ok_or_else(|| Error::Corrupt(format!("bad member {m:?}")))?;
            Ok(Queued {
                job: parse_job(job)?,
                step: StepId::new(step),
                attempt: parse_num("attempt", a)?,
                pool: pool.to_string(),
                priority: parse_num("priority", p)?,
                due_ms,
            })
        };
        let mut out = Vec::new();
        for (m, due) in &delayed {
            out.push(item(m, Some(*due as u64))?);
        }
        for members in ready.drain(..) {
            for m in &members {
                out.push(item(m, None)?);
            }
        }
        Ok(out)
    }
}

fn stale_error(step: &StepId, token: FencingToken, e: RedisError, what: &str) -> Error {
    match script_failure(&e) {
        Some(("FERRY_STALE", reason)) => Error::Stale {
            step: step.clone(),
            token,
            reason: reason.to_string(),
        },
        _ => command_error(what, e),
    }
}

#[async_trait]
impl Leases for RedisStore {
    async fn renew(
        &self,
        job: JobId,
        step: &StepId,
        token: FencingToken,
        ttl: Duration,
    ) -> Result<u64> {
        check_name("step", step.as_str())?;
        let ttl = positive_ms("lease ttl", ttl)?;
        let m = member(&job.to_string(), step.as_str());
        let k = self.keys();
        scripts::RENEW
            .key(k.lease(&m))
            .key(k.leases())
            .arg(&m)
            .arg(token.0)
            .arg(ttl)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| stale_error(step, token, e, &format!("renew lease on {m}")))
    }

    async fn release(
        &self,
        job: JobId,
        step: &StepId,
        token: FencingToken,
        reason: &str,
    ) -> Result<()> {
        check_name("step", step.as_str())?;
        let job = job.to_string();
        let m = member(&job, step.as_str());
        let k = self.keys();
        let _: String = scripts::RELEASE
            .key(k.lease(&m))
            .key(k.leases())
            .arg(k.prefix())
            .arg(&job)
            .arg(step.as_str())
            .arg(token.0)
            .arg(reason)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| stale_error(step, token, e, &format!("release lease on {m}")))?;
        Ok(())
    }

    async fn expire_due(&self, max: usize) -> Result<Vec<Lease>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let k = self.keys();
        let flat: Vec<String> = scripts::SWEEP
            .key(k.leases())
            .arg(k.prefix())
            .arg(max)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error("expire due leases", e))?;
        flat.chunks(6)
            .map(|c| match c {
                [job, step, attempt, agent, token, deadline] => Ok(Lease {
                    job: parse_job(job)?,
                    step: StepId::new(step.as_str()),
                    attempt: parse_num("attempt", attempt)?,
                    agent: AgentId::new(agent.as_str()),
                    token: FencingToken(parse_num("token", token)?),
                    deadline_ms: parse_num("deadline", deadline)?,
                }),
                _ => Err(Error::Corrupt(format!("sweep script answered {flat:?}"))),
            })
            .collect()
    }

    async fn raise_fence(&self, at_least: u64) -> Result<u64> {
        let value: String = scripts::RAISE_FENCE
            .key(self.keys().fence())
            .arg(at_least)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error("raise the fencing token counter", e))?;
        parse_num("fencing token counter", &value)
    }

    async fn leases(&self) -> Result<Vec<Lease>> {
        let k = self.keys();
        let members: Vec<String> = self
            .query(
                "list leases",
                redis::cmd("ZRANGE").arg(k.leases()).arg(0).arg(-1),
            )
            .await?;
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for m in &members {
            pipe.cmd("HGETALL").arg(k.lease(m));
        }
        let hashes: Vec<HashMap<String, String>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(|e| command_error("read leases", e))?;
        let mut out = Vec::new();
        for (m, h) in members.iter().zip(hashes) {
            // A lease that ended between the two reads is simply gone.
            let (Some(token), Some(agent), Some(attempt), Some(deadline)) = (
                h.get("token"),
                h.get("agent"),
                h.get("attempt"),
                h.get("deadline"),
            ) else {
                continue;
            };
            let (job, step) =
                split_member(m).ok_or_else(|| Error::Corrupt(format!("bad lease member {m:?}")))?;
            out.push(Lease {
                job: parse_job(job)?,
                step: StepId::new(step),
                attempt: parse_num("attempt", attempt)?,
                agent: AgentId::new(agent.as_str()),
                token: FencingToken(parse_num("token", token)?),
                deadline_ms: parse_num("deadline", deadline)?,
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl LeaderLock for RedisStore {
    async fn lock_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<FencingToken>> {
        check_name("lock", name)?;
        check_nonempty("lock holder", holder)?;
        let ttl = positive_ms("lock ttl", ttl)?;
        let k = self.keys();
        let token: Option<u64> = scripts::LOCK_ACQUIRE
            .key(k.lock(name))
            .key(k.fence())
            .arg(holder)
            .arg(ttl)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error(&format!("acquire lock {name}"), e))?;
        Ok(token.map(FencingToken))
    }

    async fn lock_renew(
        &self,
        name: &str,
        holder: &str,
        token: FencingToken,
        ttl: Duration,
    ) -> Result<bool> {
        check_name("lock", name)?;
        let ttl = positive_ms("lock ttl", ttl)?;
        let ok: i64 = scripts::LOCK_RENEW
            .key(self.keys().lock(name))
            .arg(holder)
            .arg(token.0)
            .arg(ttl)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error(&format!("renew lock {name}"), e))?;
        Ok(ok == 1)
    }

    async fn lock_release(&self, name: &str, holder: &str, token: FencingToken) -> Result<bool> {
        check_name("lock", name)?;
        let ok: i64 = scripts::LOCK_RELEASE
            .key(self.keys().lock(name))
            .arg(holder)
            .arg(token.0)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error(&format!("release lock {name}"), e))?;
        Ok(ok == 1)
    }
}

#[async_trait]
impl Snapshots for RedisStore {
    async fn put_snapshot(&self, name: &str, bytes: &[u8]) -> Result<()> {
        check_nonempty("snapshot name", name)?;
        let _: () = self
            .query(
                &format!("write snapshot {name}"),
                redis::cmd("SET").arg(self.keys().snap(name)).arg(bytes),
            )
            .await?;
        Ok(())
    }

    async fn get_snapshot(&self, name: &str) -> Result<Option<Vec<u8>>> {
        check_nonempty("snapshot name", name)?;
        self.query(
            &format!("read snapshot {name}"),
            redis::cmd("GET").arg(self.keys().snap(name)),
        )
        .await
    }
}

#[async_trait]
impl Logs for RedisStore {
    async fn append_logs(&self, job: JobId, fence: &Fence, lines: &[StepLog]) -> Result<()> {
        check_name("step", fence.step.as_str())?;
        if lines.is_empty() {
            return Ok(());
        }
        let j = job.to_string();
        let m = member(&j, fence.step.as_str());
        let k = self.keys();
        let mut inv = scripts::LOGS.prepare_invoke();
        inv.key(k.lease(&m))
            .key(k.logs(&j))
            .arg(fence.token.0)
            .arg(LOG_MAX_LINES);
        for line in lines {
            inv.arg(rmp_serde::to_vec_named(line).expect("a log line always encodes"));
        }
        let _: i64 = inv.invoke_async(&mut self.conn()).await.map_err(|e| {
            stale_error(&fence.step, fence.token, e, &format!("append logs of {m}"))
        })?;
        Ok(())
    }

    async fn read_logs(
        &self,
        job: JobId,
        after: Option<&LogPos>,
        count: usize,
        block: Duration,
    ) -> Result<Vec<(LogPos, StepLog)>> {
        if count == 0 {
            return Ok(Vec::new());
        }
        let key = self.keys().logs(&job.to_string());
        let from = after.map_or("0-0".to_string(), |p| p.0.clone());
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count);
        let what = format!("read logs of job {job}");
        let block_ms = ms(block);
        let v: Value = if block_ms == 0 {
            cmd.arg("STREAMS").arg(&key).arg(&from);
            self.query(&what, &cmd).await?
        } else {
            cmd.arg("BLOCK")
                .arg(block_ms)
                .arg("STREAMS")
                .arg(&key)
                .arg(&from);
            self.blocking(&what, &cmd, block).await?
        };
        parse::log_lines(v)
    }

    async fn import_logs(&self, job: JobId, lines: &[StepLog]) -> Result<()> {
        if lines.is_empty() {
            return Ok(());
        }
        let key = self.keys().logs(&job.to_string());
        let mut pipe = redis::pipe();
        pipe.atomic();
        for l in lines {
            let payload = rmp_serde::to_vec_named(l).expect("a log line always encodes");
            pipe.cmd("XADD")
                .arg(&key)
                .arg("MAXLEN")
                .arg("~")
                .arg(LOG_MAX_LINES)
                .arg("*")
                .arg("p")
                .arg(payload)
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn())
            .await
            .map_err(|e| command_error(&format!("import logs of job {job}"), e))
    }

    async fn logs_to_expire(&self, ended_before_ms: u64, max: usize) -> Result<Vec<(JobId, u64)>> {
        if max == 0 || ended_before_ms == 0 {
            return Ok(Vec::new());
        }
        let pairs: Vec<(String, u64)> = self
            .query(
                "list ended jobs whose logs are kept",
                redis::cmd("ZRANGEBYSCORE")
                    .arg(self.keys().kept_logs())
                    .arg("-inf")
                    .arg(format!("({ended_before_ms}"))
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(max),
            )
            .await?;
        pairs
            .into_iter()
            .map(|(job, at)| Ok((parse_job(&job)?, at)))
            .collect()
    }

    async fn list_ended_unlisted(&self, after: Option<JobId>, max: usize) -> Result<Listing> {
        let marker = self.keys().kept_logs_listed();
        let done: Option<String> = self
            .query("read the kept-logs marker", redis::cmd("GET").arg(&marker))
            .await?;
        if done.is_some() || max == 0 {
            return Ok(Listing::default());
        }
        let page = self.jobs(after, max, Order::Oldest).await?;
        let mut pipe = redis::pipe();
        for job in &page {
            pipe.cmd("ZSCORE")
                .arg(self.keys().kept_logs())
                .arg(job.to_string());
        }
        let scores: Vec<Option<f64>> = if page.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut self.conn())
                .await
                .map_err(|e| command_error("read kept-logs scores", e))?
        };
        let mut listed = 0;
        for (job, score) in page.iter().zip(scores) {
            if score.is_some() {
                continue;
            }
            let stream = StreamId::Job(*job);
            let events = self.read_stream(&stream, 0).await?;
            let mut ended_ms = None;
            let mut expired = false;
            for stored in &events {
                // The events whose effects list and unlist a job.
                match effects_of(&stored.decode()?) {
                    Some(Effect::ClearJob) => {
                        ended_ms.get_or_insert(stored.envelope.at_ms);
                    }
                    Some(Effect::DropLogs) => expired = true,
                    _ => {}
                }
            }
            let Some(ended_ms) = ended_ms.filter(|_| !expired) else {
                continue;
            };
            let added: i64 = scripts::LIST_ENDED
                .key(self.keys().kept_logs())
                .key(self.keys().stream(&stream.name()))
                .arg(job.to_string())
                .arg(ended_ms)
                .arg(events.len())
                .invoke_async(&mut self.conn())
                .await
                .map_err(|e| command_error(&format!("list ended job {job}"), e))?;
            listed += added as usize;
        }
        if page.len() < max {
            self.query::<()>(
                "record that every ended job is listed",
                redis::cmd("SET").arg(&marker).arg("1"),
            )
            .await?;
            return Ok(Listing { listed, next: None });
        }
        Ok(Listing {
            listed,
            next: page.last().copied(),
        })
    }
}

#[async_trait]
impl Capacity for RedisStore {
    async fn usage(&self) -> Result<Usage> {
        let info = self.server_info().await?;
        let number = |name: &str| -> Result<u64> {
            let v = info
                .get(name)
                .ok_or_else(|| Error::Corrupt(format!("the server's INFO has no {name}")))?;
            parse_num(name, v)
        };
        Ok(Usage {
            used_bytes: number("used_memory")?,
            limit_bytes: Some(number("maxmemory")?).filter(|m| *m > 0),
        })
    }
}

#[async_trait]
impl Agents for RedisStore {
    async fn heartbeat(&self, agent: &AgentId, ttl: Duration) -> Result<Heard> {
        check_nonempty("agent", agent.as_str())?;
        let ttl = positive_ms("heartbeat ttl", ttl)?;
        let (_, stop, pause): (u64, Option<String>, Option<String>) = scripts::HEARTBEAT
            .key(self.keys().agents())
            .key(self.keys().stop(agent.as_str()))
            .key(self.keys().pause(agent.as_str()))
            .arg(agent.as_str())
            .arg(ttl)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error(&format!("heartbeat of agent {agent}"), e))?;
        Ok(Heard { stop, pause })
    }

    async fn live_agents(&self) -> Result<Vec<(AgentId, u64)>> {
        let flat: Vec<String> = scripts::LIVE_AGENTS
            .key(self.keys().agents())
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error("list live agents", e))?;
        flat.chunks(2)
            .map(|c| match c {
                [agent, deadline] => Ok((
                    AgentId::new(agent.as_str()),
                    parse_num("heartbeat deadline", deadline)?,
                )),
                _ => Err(Error::Corrupt(format!(
                    "live agents script answered {flat:?}"
                ))),
            })
            .collect()
    }

    async fn expire_agents(&self, max: usize) -> Result<Vec<AgentId>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let k = self.keys();
        let names: Vec<String> = scripts::EXPIRE_AGENTS
            .key(k.agents())
            .key(k.log())
            .key(k.stream(&StreamId::Agents.name()))
            .arg(k.prefix())
            .arg(max)
            .invoke_async(&mut self.conn())
            .await
            .map_err(|e| command_error("expire lost agents", e))?;
        Ok(names.into_iter().map(AgentId::new).collect())
    }
}
