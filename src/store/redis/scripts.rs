//! The Lua scripts, each prefixed with the shared prelude. Every script's header comment is its
//! KEYS / ARGV / return contract.

use redis::Script;
use std::sync::LazyLock;

/// Helpers shared by every script (time, queue score, event emission, queue effects).
pub(crate) const PRELUDE: &str = include_str!("prelude.lua");

fn with_prelude(body: &str) -> Script {
    Script::new(&format!("{PRELUDE}\n{body}"))
}

pub(crate) static APPEND: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("append.lua")));
pub(crate) static CLAIM: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("claim.lua")));
pub(crate) static RENEW: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("renew.lua")));
pub(crate) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("release.lua")));
pub(crate) static SWEEP: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("sweep.lua")));
pub(crate) static PROMOTE: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("promote.lua")));
pub(crate) static LOGS: LazyLock<Script> = LazyLock::new(|| with_prelude(include_str!("logs.lua")));
pub(crate) static HEARTBEAT: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("heartbeat.lua")));
pub(crate) static LIVE_AGENTS: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("live_agents.lua")));
pub(crate) static EXPIRE_AGENTS: LazyLock<Script> =
    LazyLock::new(|| with_prelude(include_str!("expire_agents.lua")));
pub(crate) static INFO: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("info.lua")));
pub(crate) static LIST_ENDED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("list_ended.lua")));
pub(crate) static TRIM_LOG: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("trim_log.lua")));
pub(crate) static LOCK_ACQUIRE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lock_acquire.lua")));
pub(crate) static LOCK_RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lock_renew.lua")));
pub(crate) static LOCK_RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("lock_release.lua")));
pub(crate) static RAISE_FENCE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("raise_fence.lua")));

/// A script that evaluates the prelude's `queue_score(priority, ms)` for ARGV[1], ARGV[2] and
/// returns it as an integer string: lets tests check the Lua formula against the Rust one.
pub fn queue_score_probe() -> Script {
    with_prelude("return int(queue_score(ARGV[1], tonumber(ARGV[2])))")
}
