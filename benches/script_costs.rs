//! What the pieces of ferry's Lua scripts cost inside Redis: the figures behind the choice of
//! the next dispatch levers (BENCHMARKS.md section 0).
//!
//! `cargo bench --bench script_costs` (env: `SCRIPT_COSTS_CALLS` script calls per case and
//! round, default 3000; `SCRIPT_COSTS_ROUNDS`, default 5)
//!
//! Against a private redis-server, each case is a script that repeats one operation `reps`
//! times; it is called `SCRIPT_COSTS_CALLS` times with `EVALSHA` from one connection, and
//! Redis's own accounting (`INFO commandstats`, `usec_per_call` of `evalsha`) gives the time per
//! call. The empty script's time, measured in the same round, is subtracted and the rest divided
//! by `reps`: the cost of one operation as a script pays it (argument conversion, the command,
//! the reply converted back into Lua). Rounds interleave the cases so that a noisy machine
//! shifts them alike; the median of the rounds is printed.

#[path = "support/mod.rs"]
mod support;

use support::{result, RedisServer};

const PRELUDE: &str = include_str!("../src/store/redis/prelude.lua");

/// A job-stream entry in the layout written until 2026-12-05 (7 fields and the log id).
const EVENT_ENTRY: &str = "'s', 'job:01a24448-885b-7587-a27f-864cf655b407', 'k', '4', 'v', '1', \
     't', '1764900000000', 'n', '3', 'f', '12345', 'p', \
     '0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef', 'l', '1764900000000-0'";

/// The same entry as `emit` writes it now: kind, schema version, time, place and token packed
/// into one field `h`.
const PACKED_ENTRY: &str = "'h', '4|1|1764900000000|3|12345', 'p', \
     '0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef', 'l', '1764900000000-0'";

struct Case {
    name: &'static str,
    /// Operations per script call; 0 for the baselines, reported per call.
    reps: u32,
    body: String,
}

fn cases() -> Vec<Case> {
    let repeat = |op: &str| format!("for i = 1, 10 do {op} end return 1");
    vec![
        Case {
            name: "empty script (one EVALSHA)",
            reps: 0,
            body: "return 1".into(),
        },
        Case {
            name: "the prelude's definitions, per script call",
            reps: 1,
            body: format!("{PRELUDE}\nreturn 1"),
        },
        Case {
            name: "INCR",
            reps: 10,
            body: repeat("redis.call('INCR', 'n')"),
        },
        Case {
            name: "SISMEMBER (a miss)",
            reps: 10,
            body: repeat("redis.call('SISMEMBER', 'set', 'job/step')"),
        },
        Case {
            name: "HSET, 5 fields (a lease)",
            reps: 10,
            body: repeat(
                "redis.call('HSET', 'lease', 'token', '123', 'agent', 'bench-a0', 'attempt', \
                 '1', 'deadline', '1764900000000', 'pool', 'default')",
            ),
        },
        Case {
            name: "XADD, an event entry, one field each (8 fields)",
            reps: 10,
            body: repeat(&format!("redis.call('XADD', 'events', '*', {EVENT_ENTRY})")),
        },
        Case {
            name: "XADD, the entry packed (3 fields)",
            reps: 10,
            body: repeat(&format!(
                "redis.call('XADD', 'packed', '*', {PACKED_ENTRY})"
            )),
        },
        Case {
            name: "XADD, a reference (2 fields)",
            reps: 10,
            body: repeat("redis.call('XADD', 'refs', '*', 'n', '3', 'l', '1764900000000-0')"),
        },
        Case {
            name: "XADD creating a stream, then DEL",
            reps: 10,
            body: repeat(&format!(
                "redis.call('XADD', 'fresh', '*', {EVENT_ENTRY}) redis.call('DEL', 'fresh')"
            )),
        },
        Case {
            name: "XRANGE of a 2-entry job stream, read",
            reps: 10,
            body: repeat("redis.call('XRANGE', 'job', '-', '+')"),
        },
        Case {
            name: "XRANGE of a 2-entry job stream, read and returned",
            reps: 1,
            body: "return redis.call('XRANGE', 'job', '-', '+')".into(),
        },
        Case {
            name: "XRANGE of the same, packed, read",
            reps: 10,
            body: repeat("redis.call('XRANGE', 'packedjob', '-', '+')"),
        },
        Case {
            name: "XRANGE of the same, packed, read and returned",
            reps: 1,
            body: "return redis.call('XRANGE', 'packedjob', '-', '+')".into(),
        },
    ]
}

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let calls = env_or("SCRIPT_COSTS_CALLS", 3000);
    let rounds = env_or("SCRIPT_COSTS_ROUNDS", 5).max(1);
    let server = RedisServer::start();
    support::print_machine(&server);
    let mut conn = redis::Client::open(server.url())
        .expect("url")
        .get_connection()
        .expect("connect");
    // A job stream as the claim script reads it: JobCreated (a ~600-byte plan) and StepQueued.
    let plan = "x".repeat(600);
    let stream = "job:01a24448-885b-7587-a27f-864cf655b407";
    for (kind, n, payload) in [("2", "1", plan.as_str()), ("3", "2", "queued-payload")] {
        let fields = [
            "s",
            stream,
            "k",
            kind,
            "v",
            "1",
            "t",
            "1764900000000",
            "n",
            n,
        ];
        let _: String = redis::cmd("XADD")
            .arg("job")
            .arg("*")
            .arg(&fields)
            .arg(&["p", payload, "l", "1764900000000-0"])
            .query(&mut conn)
            .expect("xadd");
        let header = format!("{kind}|1|1764900000000|{n}|");
        let _: String = redis::cmd("XADD")
            .arg("packedjob")
            .arg("*")
            .arg(&["h", &header, "p", payload, "l", "1764900000000-0"])
            .query(&mut conn)
            .expect("xadd");
    }
    let cases = cases();
    let shas: Vec<String> = cases
        .iter()
        .map(|c| {
            redis::cmd("SCRIPT")
                .arg("LOAD")
                .arg(&c.body)
                .query(&mut conn)
                .expect("script load")
        })
        .collect();
    let mut per_call: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        for (i, sha) in shas.iter().enumerate() {
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query(&mut conn)
                .expect("resetstat");
            for _ in 0..calls {
                let _: redis::Value = redis::cmd("EVALSHA")
                    .arg(sha)
                    .arg(0)
                    .query(&mut conn)
                    .expect("evalsha");
            }
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut conn)
                .expect("info");
            per_call[i].push(evalsha_usec_per_call(&info));
        }
        let _: () = redis::cmd("DEL")
            .arg(&["events", "packed", "refs", "n", "lease"])
            .query(&mut conn)
            .expect("del");
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    // Each round's baseline is subtracted from that round's figure.
    println!("\n== cost inside a script, {rounds} rounds of {calls} calls per case (median) ==");
    println!("    {:<52} {:>10}", "operation", "µs each");
    for (i, case) in cases.iter().enumerate() {
        let each: Vec<f64> = per_call[i]
            .iter()
            .zip(&per_call[0])
            .map(|(t, empty)| match case.reps {
                0 => *t,
                reps => (t - empty) / f64::from(reps),
            })
            .collect();
        let m = median(&each);
        println!("    {:<52} {m:>10.2}", case.name);
        let key: String = case
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        result(&format!("script_costs.{key}"), m, "us");
    }
}

fn evalsha_usec_per_call(info: &str) -> f64 {
    info.lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("usec_per_call=")))
        .and_then(|v| v.parse().ok())
        .expect("evalsha in commandstats")
}
