//! Reading Redis replies: stream entries into [`Stored`] events, and small value helpers.

use crate::store::{Error, LogPos, Result, Stored};
use ferry_proto::Envelope;
use redis::Value;

pub(crate) fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

pub(crate) fn string(v: Value) -> Option<String> {
    bytes(v).and_then(|b| String::from_utf8(b).ok())
}

fn array(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

/// A flat `[k, v, k, v]` array or a RESP3 map, as pairs.
fn pairs(v: Value) -> Option<Vec<(Value, Value)>> {
    match v {
        Value::Map(m) => Some(m),
        Value::Array(a) => {
            let mut out = Vec::with_capacity(a.len() / 2);
            let mut it = a.into_iter();
            while let Some(k) = it.next() {
                out.push((k, it.next()?));
            }
            Some(out)
        }
        _ => None,
    }
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::Corrupt(what.to_string())
}

/// Where an entry was read from: the log (its id is its position, field `s` names its
/// stream) or one stream (its `l` field is its position; the stream is the one read).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source<'a> {
    Log,
    Stream(&'a str),
}

/// The id of the last entry of a list of stream entries (as `entries` reads them).
pub(crate) fn last_id(v: &Value) -> Option<String> {
    let Value::Array(list) = v else { return None };
    let Value::Array(entry) = list.last()? else {
        return None;
    };
    string(entry.first()?.clone())
}

/// A list of stream entries (`XRANGE`, or the entries part of `XREADGROUP`/`XAUTOCLAIM`).
/// Entries whose fields are nil (deleted while pending) are skipped.
pub(crate) fn entries(v: Value, source: Source<'_>) -> Result<Vec<Stored>> {
    let list = array(v).ok_or_else(|| corrupt("stream reply is not a list of entries"))?;
    let mut out = Vec::with_capacity(list.len());
    for entry in list {
        let mut parts = array(entry)
            .ok_or_else(|| corrupt("stream entry is not a list"))?
            .into_iter();
        let id = parts
            .next()
            .and_then(string)
            .ok_or_else(|| corrupt("stream entry has no id"))?;
        match parts.next() {
            None | Some(Value::Nil) => continue,
            Some(fields) => out.push(stored(id, fields, source)?),
        }
    }
    Ok(out)
}

/// One entry. Two layouts are read: the packed one written since 2026-12-05 (`s` in the log
/// only, `h` = `kind|version|at_ms|seq|token`, `p`, `l` in streams) and the one before it (one
/// field each: `s`, `k`, `v`, `t`, `n`, `f`, `p`, `l`), which entries already stored keep.
fn stored(id: String, fields: Value, source: Source<'_>) -> Result<Stored> {
    // The fields by name, without building a map: an entry has at most nine.
    let (mut s, mut h, mut k, mut v, mut t, mut n, mut f, mut p, mut l) =
        (None, None, None, None, None, None, None, None, None);
    for (key, value) in pairs(fields).ok_or_else(|| corrupt(format!("entry {id} has no fields")))? {
        let slot = match bytes(key).as_deref() {
            Some(b"s") => &mut s,
            Some(b"h") => &mut h,
            Some(b"k") => &mut k,
            Some(b"v") => &mut v,
            Some(b"t") => &mut t,
            Some(b"n") => &mut n,
            Some(b"f") => &mut f,
            Some(b"p") => &mut p,
            Some(b"l") => &mut l,
            _ => continue,
        };
        *slot = bytes(value);
    }
    if let Some(header) = h {
        // `kind|version|at|seq|token`: the same values as the one-field layout, as text.
        let mut parts = header.split(|b| *b == b'|').map(|b| b.to_vec());
        (k, v, t, n, f) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next().filter(|b| !b.is_empty()),
            parts.next().filter(|b| !b.is_empty()),
        );
        if parts.next().is_some() {
            return Err(corrupt(format!(
                "entry {id} has a header of more than 5 parts"
            )));
        }
    }
    let text = |field: &str, b: Option<Vec<u8>>| -> Result<String> {
        let b = b.ok_or_else(|| corrupt(format!("entry {id} has no field {field}")))?;
        String::from_utf8(b).map_err(|_| corrupt(format!("entry {id} field {field} is not utf-8")))
    };
    let num = |field: &str, b: Option<Vec<u8>>| -> Result<u64> {
        text(field, b)?
            .parse()
            .map_err(|_| corrupt(format!("entry {id} field {field} is not a number")))
    };
    let small = |field: &str, b: Option<Vec<u8>>| -> Result<u16> {
        u16::try_from(num(field, b)?)
            .map_err(|_| corrupt(format!("entry {id} field {field} is out of range")))
    };
    let (pos, stream) = match source {
        Source::Log => (id.clone(), text("s", s)?),
        Source::Stream(name) => (
            text("l", l)?,
            s.map(|s| text("s", Some(s)))
                .transpose()?
                .unwrap_or_else(|| name.to_string()),
        ),
    };
    let token = f.map(|f| num("f", Some(f))).transpose()?;
    let seq = n.map(|n| num("n", Some(n))).transpose()?;
    let envelope = Envelope {
        kind: small("k", k)?,
        version: small("v", v)?,
        at_ms: num("t", t)?,
        stream,
        token,
        payload: p.ok_or_else(|| corrupt(format!("entry {id} has no field p")))?,
    };
    Ok(Stored {
        pos: LogPos(pos),
        seq,
        envelope,
    })
}

/// The entry lists of an `XREAD`/`XREADGROUP` reply, one per stream read (RESP2 array of
/// `[name, entries]` or RESP3 map); none when the reply is nil (a block timed out).
fn per_stream(v: Value, command: &str) -> Result<Vec<Value>> {
    match v {
        Value::Nil => Ok(Vec::new()),
        Value::Map(m) => Ok(m.into_iter().map(|(_, v)| v).collect()),
        Value::Array(a) => a
            .into_iter()
            .map(|s| {
                array(s)
                    .and_then(|p| p.into_iter().nth(1))
                    .ok_or_else(|| corrupt(format!("{command} reply has no entries")))
            })
            .collect(),
        _ => Err(corrupt(format!("{command} reply is not a list"))),
    }
}

/// The entries of an `XREADGROUP` reply on the log (nil when a block timed out).
pub(crate) fn read_group(v: Value) -> Result<Vec<Stored>> {
    let streams = per_stream(v, "XREADGROUP")?;
    let mut out = Vec::new();
    for s in streams {
        out.extend(entries(s, Source::Log)?);
    }
    Ok(out)
}

/// An `XAUTOCLAIM` reply: the next cursor and the claimed entries.
pub(crate) fn autoclaim(v: Value) -> Result<(String, Vec<Stored>)> {
    let mut parts = array(v)
        .ok_or_else(|| corrupt("XAUTOCLAIM reply is not a list"))?
        .into_iter();
    let cursor = parts
        .next()
        .and_then(string)
        .ok_or_else(|| corrupt("XAUTOCLAIM reply has no cursor"))?;
    let claimed = entries(parts.next().unwrap_or(Value::Nil), Source::Log)?;
    Ok((cursor, claimed))
}

/// An `XREAD` reply on one job's log stream: `(position, line)` pairs (nil when a block timed
/// out).
pub(crate) fn log_lines(v: Value) -> Result<Vec<(LogPos, ferry_proto::StepLog)>> {
    let streams = per_stream(v, "XREAD")?;
    let mut out = Vec::new();
    for s in streams {
        for entry in array(s).ok_or_else(|| corrupt("log reply is not a list of entries"))? {
            let mut parts = array(entry)
                .ok_or_else(|| corrupt("log entry is not a list"))?
                .into_iter();
            let id = parts
                .next()
                .and_then(string)
                .ok_or_else(|| corrupt("log entry has no id"))?;
            let payload = pairs(parts.next().unwrap_or(Value::Nil))
                .unwrap_or_default()
                .into_iter()
                .find_map(|(k, v)| (string(k).as_deref() == Some("p")).then(|| bytes(v)))
                .flatten()
                .ok_or_else(|| corrupt(format!("log entry {id} has no field p")))?;
            let line = rmp_serde::from_slice(&payload)
                .map_err(|e| corrupt(format!("log entry {id}: {e}")))?;
            out.push((LogPos(id), line));
        }
    }
    Ok(out)
}
