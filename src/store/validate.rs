//! Argument checks every backend applies before it touches its data, so that what a port
//! accepts is part of its contract and not an accident of one backend's encoding (the
//! conformance case `bad_names_are_rejected` holds every backend to the same rules).

use super::{Append, Error, Result};
use std::time::Duration;

/// Pool, step and lock names become parts of Redis keys and of `|`-separated values: they must
/// be non-empty and free of `/`, `|`, whitespace and braces. Every backend refuses the same
/// names, so data can move between backends.
pub(crate) fn check_name(what: &str, value: &str) -> Result<()> {
    if value.is_empty()
        || value
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '|' | '{' | '}'))
    {
        return Err(Error::Invalid(format!(
            "{what} name {value:?} must be non-empty, without '/', '|', braces or whitespace"
        )));
    }
    Ok(())
}

/// At least one pool, each a valid name.
pub(crate) fn check_pools(pools: &[String]) -> Result<()> {
    if pools.is_empty() {
        return Err(Error::Invalid("no pools given".into()));
    }
    pools.iter().try_for_each(|p| check_name("pool", p))
}

pub(crate) fn check_nonempty(what: &str, value: &str) -> Result<()> {
    if value.is_empty() {
        return Err(Error::Invalid(format!("{what} must not be empty")));
    }
    Ok(())
}

/// Whole milliseconds, saturating.
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Whole milliseconds of a TTL or window, which must be at least 1 ms.
pub(crate) fn positive_ms(what: &str, d: Duration) -> Result<u64> {
    match ms(d) {
        0 => Err(Error::Invalid(format!("{what} must be at least 1 ms"))),
        n => Ok(n),
    }
}

/// The checks on an append: events to write, a fence only on a job stream and with a valid step
/// name, non-empty dedupe keys with a window. Returns the window in ms (0 without dedupe keys).
pub(crate) fn check_append(a: &Append) -> Result<u64> {
    let name = a.stream.name();
    if a.events.is_empty() {
        return Err(Error::Invalid(format!("append to {name} has no events")));
    }
    if let Some(f) = &a.fence {
        if a.stream.job().is_none() {
            return Err(Error::Invalid(format!(
                "fenced append to {name}: only job streams have leases"
            )));
        }
        check_name("step", f.step.as_str())?;
    }
    a.forget
        .iter()
        .try_for_each(|d| check_nonempty("dedupe key to forget", d))?;
    if a.dedupe.is_empty() {
        return Ok(0);
    }
    a.dedupe
        .iter()
        .try_for_each(|d| check_nonempty("dedupe key", d))?;
    positive_ms("dedupe window", a.dedupe_window)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(check_name("pool", "linux-x86_64").is_ok());
        assert!(check_name("step", "deploy:production").is_ok());
        for bad in ["", "a/b", "a|b", "a b", "a{b", "a}b", "a\tb"] {
            let e = check_name("pool", bad).unwrap_err().to_string();
            assert!(e.contains("pool name"), "{e}");
        }
        assert!(check_pools(&[]).is_err());
        assert!(positive_ms("ttl", Duration::from_micros(999)).is_err());
        assert_eq!(ms(Duration::MAX), u64::MAX);
    }
}
