//! The Redis key layout. Only this module knows key names; the Lua scripts derive the per-item
//! keys (`ready:<pool>`, `lease:<member>`, ...) from the same prefix, so both sides must agree
//! with the table below.
//!
//! Every key starts with `{<namespace>}:`; the braces are a Redis Cluster hash tag, so all keys
//! of one namespace live in one slot and every script works unchanged on a cluster.
//!
//! | key | type | content |
//! |---|---|---|
//! | `{ns}:log` | stream | the global log; also the feed read by consumer groups |
//! | `{ns}:s:<stream>` | stream | one stream (`job:<uuid>`, `webhooks`, `agents`); version = XLEN; entries carry `l` = log id |
//! | `{ns}:jobs` | zset | job ids, score = creation ms (store clock) |
//! | `{ns}:ready:<pool>` | zset | member `<job>/<step>`, score = `queue_score(priority, enqueue ms)` |
//! | `{ns}:delayed` | zset | member `<job>/<step>`, score = due ms |
//! | `{ns}:items` | hash | member → `attempt\|priority\|pool` for every queued (ready or delayed) member (listing the queues reads the pools from it) |
//! | `{ns}:jobitems:<job>` | set | the job's members that are queued or leased (every such member is in it) |
//! | `{ns}:lease:<job>/<step>` | hash | `token`, `agent`, `attempt`, `deadline`, `pool` |
//! | `{ns}:leases` | zset | member → lease deadline ms |
//! | `{ns}:fence` | string | INCR counter for lease and lock tokens |
//! | `{ns}:lock:<name>` | string | `holder\|token`, with a PX expiry |
//! | `{ns}:dedupe:<key>` | string | log id of the original event, with a PX expiry |
//! | `{ns}:wake:<pool>` | list | wake-up tokens for `wait_for_work` (bounded) |
//! | `{ns}:snap:<name>` | string | snapshot bytes |
//! | `{ns}:idx:<key>` | set | job ids indexed under `tag:<project>:<tag>`, `live:tag:<project>:<tag>`, `env:<project>:<env>`, `live:env:<project>:<env>` (`live:` sets lose a job when it ends) |
//! | `{ns}:logs:<job>` | stream | the job's step output, field `p` = rmp named `StepLog`, trimmed to ~`LOG_MAX_LINES` |
//! | `{ns}:jobidx:<job>` | set | the `live:` index keys of a job, for removing it when it ends |
//! | `{ns}:ended:<job>` | string | set when the job ended: queueing effects on it are no-ops |
//! | `{ns}:agents` | zset | agent name → heartbeat deadline ms (store clock) |
//! | `{ns}:stop:<agent>` | string | the reason of a stop requested of the agent, returned by its heartbeats |
//! | `{ns}:pause:<agent>` | string | the reason the agent is paused, returned by its heartbeats |
//! | `{ns}:kept_logs` | zset | ended jobs whose logs are still kept, score = the `at_ms` of the job's first terminal event |
//! | `{ns}:kept_logs_listed` | string | `1` once every job ended by a build older than `kept_logs` is listed in it too |
//! | `{ns}:layout` | string | `fields` while an installation is upgraded from builds that read only the one-field-each entry layout |
//!
//! Entry fields (the packed layout: `s`, `h`, `p` in the log; `h`, `p`, `l` in a stream; and the
//! older one-field-each layout) are in `proto/README.md`, "Stream entry fields".

use crate::store::{Error, Result};

/// The keys of one namespace.
#[derive(Clone, Debug)]
pub(crate) struct Keys {
    /// `{ns}:`, the prefix every key (and every script) uses.
    prefix: String,
}

impl Keys {
    pub(crate) fn new(namespace: &str) -> Result<Keys> {
        if namespace.is_empty()
            || namespace
                .chars()
                .any(|c| c.is_whitespace() || c == '{' || c == '}')
        {
            return Err(Error::Invalid(format!(
                "namespace {namespace:?} must be non-empty, without whitespace or braces"
            )));
        }
        Ok(Keys {
            prefix: format!("{{{namespace}}}:"),
        })
    }

    /// `{ns}:`, passed to scripts so they can derive per-item keys.
    pub(crate) fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    pub(crate) fn log(&self) -> String {
        self.key("log")
    }
    pub(crate) fn stream(&self, name: &str) -> String {
        self.key(&format!("s:{name}"))
    }
    pub(crate) fn jobs(&self) -> String {
        self.key("jobs")
    }
    pub(crate) fn logs(&self, job: &str) -> String {
        self.key(&format!("logs:{job}"))
    }
    pub(crate) fn kept_logs(&self) -> String {
        self.key("kept_logs")
    }
    pub(crate) fn kept_logs_listed(&self) -> String {
        self.key("kept_logs_listed")
    }
    pub(crate) fn log_trimmed(&self) -> String {
        self.key("log_trimmed")
    }
    pub(crate) fn index(&self, key: &str) -> String {
        self.key(&format!("idx:{key}"))
    }
    pub(crate) fn ready(&self, pool: &str) -> String {
        self.key(&format!("ready:{pool}"))
    }
    pub(crate) fn delayed(&self) -> String {
        self.key("delayed")
    }
    pub(crate) fn items(&self) -> String {
        self.key("items")
    }
    pub(crate) fn lease(&self, member: &str) -> String {
        self.key(&format!("lease:{member}"))
    }
    pub(crate) fn leases(&self) -> String {
        self.key("leases")
    }
    pub(crate) fn fence(&self) -> String {
        self.key("fence")
    }
    pub(crate) fn lock(&self, name: &str) -> String {
        self.key(&format!("lock:{name}"))
    }
    pub(crate) fn wake(&self, pool: &str) -> String {
        self.key(&format!("wake:{pool}"))
    }
    pub(crate) fn snap(&self, name: &str) -> String {
        self.key(&format!("snap:{name}"))
    }
    pub(crate) fn agents(&self) -> String {
        self.key("agents")
    }

    pub(crate) fn stop(&self, agent: &str) -> String {
        self.key(&format!("stop:{agent}"))
    }

    pub(crate) fn pause(&self, agent: &str) -> String {
        self.key(&format!("pause:{agent}"))
    }
}

/// The queue member of a job's step: `<job>/<step>`.
pub(crate) fn member(job: &str, step: &str) -> String {
    format!("{job}/{step}")
}

/// Splits a member back into job and step (the job id never contains `/`).
pub(crate) fn split_member(member: &str) -> Option<(&str, &str)> {
    member.split_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_the_hash_tag() {
        let k = Keys::new("p3").unwrap();
        for key in [
            k.log(),
            k.stream("job:x"),
            k.ready("linux"),
            k.lease("a/b"),
            k.agents(),
            k.stop("a1"),
            k.pause("a1"),
            k.kept_logs(),
            k.kept_logs_listed(),
            k.log_trimmed(),
        ] {
            assert!(key.starts_with("{p3}:"), "{key}");
        }
        assert!(Keys::new("a b").is_err());
        assert!(Keys::new("a{").is_err());
    }

    #[test]
    fn members_split_at_the_first_slash() {
        assert_eq!(split_member("j/deploy:x"), Some(("j", "deploy:x")));
    }
}
