//! Tidy checks on the source text: rules the compiler cannot enforce.

use std::path::Path;

/// The pure core (folds, decisions, planning) performs no I/O and reads no clock: time arrives
/// as an argument or inside events. This is what makes replay safe (ARCHITECTURE.md).
#[test]
fn the_pure_core_does_no_io_and_reads_no_clock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pure = [
        "src/domain/mod.rs",
        "src/domain/job.rs",
        "src/domain/view.rs",
        "src/coordinator/decide.rs",
        "src/coordinator/plan.rs",
        "src/store/effects.rs",
    ];
    let forbidden = [
        "tokio",
        "SystemTime",
        "Instant",
        "std::fs",
        "std::net",
        "std::process",
        "std::env",
        "redis",
        "now_ms()",
        "rand::",
        "async fn",
    ];
    for file in pure {
        let text = std::fs::read_to_string(root.join(file)).unwrap();
        // Unit tests at the bottom may use what they like.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for word in forbidden {
            assert!(
                !code.contains(word),
                "{file} uses `{word}`: the pure core must not do I/O or read a clock"
            );
        }
    }
}

/// Only the Redis adapter knows Redis key names.
#[test]
fn only_the_redis_adapter_knows_key_names() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("store/redis") {
                    stack.push(path);
                }
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for key in [":ready:", ":lease:", ":delayed\"", ":jobitems:"] {
                assert!(
                    !text.contains(key),
                    "{} mentions the Redis key {key}",
                    path.display()
                );
            }
        }
    }
}
