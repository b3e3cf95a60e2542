//! Golden fixtures: every (kind, version) this crate has ever written is stored in `fixtures/`
//! and must decode forever. Regenerate the current versions with `FERRY_BLESS=1 cargo test -p
//! ferry-proto` only when adding a kind or a version — never to paper over a changed encoding.

use ferry_proto::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn job() -> JobId {
    "01890a5d-ac96-774b-bcce-b302099a8057".parse().unwrap()
}

/// One representative payload per kind. The match makes adding a kind without a sample a
/// compile error.
fn sample(kind: u16) -> Event {
    let step = StepId::new("deploy:production");
    let agent = AgentId::new("build-01");
    let e: Event = match kind {
        1 => WebhookReceived {
            delivery_id: Some("f3b2c1d0-0000-4000-8000-000000000001".into()),
            event: "Tag Push Hook".into(),
            job: Some(job()),
            project_id: Some(42),
            project_path: Some("group/app".into()),
            git_ref: Some("refs/tags/v1.0.0".into()),
            before: Some("0".repeat(40)),
            after: Some("a".repeat(40)),
            checkout_sha: Some("b".repeat(40)),
            user: Some("jsmith".into()),
            clone_url: Some("https://gitlab.example.com/group/app.git".into()),
            action: "build".into(),
            reason: None,
        }
        .into(),
        2 => JobCreated {
            job: job(),
            project_id: 42,
            project: "group/app".into(),
            tag: "v1.0.0".into(),
            git_ref: "refs/tags/v1.0.0".into(),
            sha: "b".repeat(40),
            priority: 0,
            trigger: "webhook:1700000000000-0".into(),
            steps: vec![
                StepPlan {
                    step: StepId::new("build"),
                    pool: "default".into(),
                    priority: 0,
                    spec: StepSpec::Build(BuildSpec {
                        clone_url: "https://gitlab.example.com/group/app.git".into(),
                        commands: vec!["make build".into()],
                        artifacts: vec!["bin/app".into()],
                        timeout_secs: 1800,
                        env: BTreeMap::from([("MODE".into(), "release".into())]),
                        secrets: vec!["NPM_TOKEN".into()],
                    }),
                },
                StepPlan {
                    step: step.clone(),
                    pool: "default".into(),
                    priority: 10,
                    spec: StepSpec::Deploy(DeploySpec {
                        environment: "production".into(),
                        hosts: vec!["deploy@10.0.0.5:22".into()],
                        path: "/srv/app".into(),
                        before_switch: vec![],
                        after_switch: vec!["systemctl restart app".into()],
                        health_check: Some("curl -fsS http://127.0.0.1:8000/healthz".into()),
                        max_parallel: 1,
                        max_failures: 0,
                        keep_releases: 5,
                        rollback_on_failure: true,
                        // Fields added after v1's fixture was written keep their defaults
                        // here, so the old bytes still decode to exactly this sample.
                        ..Default::default()
                    }),
                },
                StepPlan {
                    step: StepId::new("noop"),
                    pool: "bench".into(),
                    priority: 0,
                    spec: StepSpec::Noop,
                },
            ],
            // Added after v1's fixture: keeps its default, so the old bytes still match.
            artifact: None,
        }
        .into(),
        3 => StepQueued {
            step,
            attempt: 1,
            pool: "default".into(),
            priority: 10,
        }
        .into(),
        4 => StepClaimed {
            step,
            attempt: 1,
            agent,
            token: FencingToken(7),
            lease_ttl_ms: 15000,
        }
        .into(),
        5 => StepStarted {
            step,
            attempt: 1,
            agent,
        }
        .into(),
        6 => StepLog {
            step,
            attempt: 1,
            stream: "stdout".into(),
            line: "building...".into(),
        }
        .into(),
        7 => StepSucceeded { step, attempt: 1 }.into(),
        8 => StepFailed {
            step,
            attempt: 1,
            error: "exit status 2".into(),
            retryable: false,
            exit_code: Some(2),
        }
        .into(),
        9 => StepRetryScheduled {
            step,
            attempt: 2,
            pool: "default".into(),
            priority: 10,
            due_ms: 1_700_000_002_000,
            reason: "lease expired".into(),
        }
        .into(),
        10 => LeaseExpired {
            step,
            attempt: 1,
            agent,
            token: FencingToken(7),
        }
        .into(),
        11 => JobSucceeded {}.into(),
        12 => JobFailed {
            reason: "build failed".into(),
            step: Some(StepId::new("build")),
        }
        .into(),
        13 => JobCancelled {
            reason: "tag deleted".into(),
            by: "webhook".into(),
        }
        .into(),
        14 => JobSuperseded {
            by_job: job(),
            environment: "production".into(),
        }
        .into(),
        15 => DeployHostStarted {
            step,
            attempt: 1,
            host: "deploy@10.0.0.5:22".into(),
        }
        .into(),
        16 => DeployHostCheckpoint {
            step,
            attempt: 1,
            host: "deploy@10.0.0.5:22".into(),
            phase: "switched".into(),
        }
        .into(),
        17 => DeployHostFinished {
            step,
            attempt: 1,
            host: "deploy@10.0.0.5:22".into(),
            ok: false,
            error: Some("health check failed".into()),
            rolled_back: true,
        }
        .into(),
        18 => AgentJoined {
            agent,
            pools: vec!["default".into()],
            labels: vec!["linux".into()],
            version: "0.1.0".into(),
            capacity: 2,
        }
        .into(),
        19 => AgentLost {
            agent,
            reason: "heartbeat expired".into(),
        }
        .into(),
        20 => CommitStatusReported {
            name: "ferry/build".into(),
            state: "success".into(),
            sha: "b".repeat(40),
            http_status: Some(201),
            error: None,
        }
        .into(),
        21 => ArtifactPublished {
            step: StepId::new("build"),
            attempt: 1,
            name: "app-v1.0.0-bbbbbbb.tar.gz".into(),
            key: "sha256/ab/abcdef".into(),
            size: 1024,
            sha256: "ab".repeat(32),
        }
        .into(),
        22 => StepReleased {
            step,
            attempt: 1,
            agent,
            token: FencingToken(7),
            reason: "agent shutting down".into(),
        }
        .into(),
        23 => HostKeyPinned {
            step,
            attempt: 1,
            host: "deploy@10.0.0.5:22".into(),
            fingerprint: "SHA256:nThbg6kXUpJWGl7E1IGOCspRomTxdCARLviKw6E5SY8".into(),
            key_type: "ssh-ed25519".into(),
        }
        .into(),
        24 => DeploymentReported {
            environment: "production".into(),
            deployment_id: Some(17),
            status: "running".into(),
            http_status: Some(201),
            error: None,
        }
        .into(),
        25 => LogsExpired {
            kept_for_ms: 30 * 24 * 3600 * 1000,
        }
        .into(),
        26 => AgentLeft {
            agent,
            reason: "shut down (SIGTERM)".into(),
        }
        .into(),
        27 => AgentStopRequested {
            agent,
            reason: "kernel upgrade".into(),
        }
        .into(),
        28 => AgentPaused {
            agent,
            reason: "disk replacement".into(),
        }
        .into(),
        29 => AgentResumed { agent }.into(),
        30 => ArtifactExpired {
            key: "9f2c7a/group_app-v1.4.0-1a2b3c4.tar.gz".into(),
            kept_for_ms: 30 * 24 * 3600 * 1000,
        }
        .into(),
        other => panic!("no sample for kind {other}: add one"),
    };
    assert_eq!(e.kind(), kind);
    e
}

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

fn file_name(kind: u16, name: &str, version: u16) -> String {
    format!("{kind:03}-{name}-v{version}.msgpack")
}

/// The golden bytes of every current (kind, version) decode to exactly the sample, and the
/// sample survives its own round trip. A renamed or retyped field breaks the first; a field
/// added with `#[serde(default)]` does not (the sample keeps the default).
#[test]
fn every_current_kind_has_a_golden_fixture_that_decodes_to_the_sample() {
    let bless = std::env::var_os("FERRY_BLESS").is_some();
    for &(kind, name, version) in KINDS {
        let path = dir().join(file_name(kind, name, version));
        let bytes = sample(kind).encode_payload();
        if bless && !path.exists() {
            std::fs::write(&path, &bytes).unwrap();
        }
        let golden = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("missing fixture {}: {e}", path.display()));
        let decoded = Event::decode_payload(kind, version, &golden)
            .unwrap_or_else(|e| panic!("{name} v{version} fixture no longer decodes: {e}"));
        assert_eq!(
            decoded,
            sample(kind),
            "{name} v{version}: a field was renamed, retyped or lost its default"
        );
        assert_eq!(
            Event::decode_payload(kind, version, &bytes).unwrap(),
            sample(kind)
        );
    }
}

#[test]
fn every_fixture_ever_written_still_decodes() {
    let mut seen = 0;
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        let file = path.file_name().unwrap().to_str().unwrap().to_string();
        if file.starts_with("envelope") {
            continue;
        }
        let (kind, rest) = file.split_once('-').unwrap();
        let version = rest
            .rsplit_once("-v")
            .and_then(|(_, v)| v.strip_suffix(".msgpack"))
            .unwrap();
        let (kind, version): (u16, u16) = (kind.parse().unwrap(), version.parse().unwrap());
        let bytes = std::fs::read(&path).unwrap();
        let event = Event::decode_payload(kind, version, &bytes)
            .unwrap_or_else(|e| panic!("{file} no longer decodes: {e}"));
        assert_eq!(event.kind(), kind, "{file}");
        seen += 1;
    }
    assert!(seen >= KINDS.len());
}

#[test]
fn envelope_golden_fixture_decodes() {
    let path = dir().join("envelope-v1.msgpack");
    let env = Envelope::new(
        &sample(4),
        "job:01890a5d-ac96-774b-bcce-b302099a8057",
        1_700_000_000_000,
        Some(7),
    );
    if std::env::var_os("FERRY_BLESS").is_some() && !path.exists() {
        std::fs::write(&path, env.to_bytes()).unwrap();
    }
    let golden = std::fs::read(&path).unwrap();
    let back = Envelope::from_bytes(&golden).unwrap();
    assert_eq!(back, env);
    assert_eq!(back.decode().unwrap(), sample(4));
}

#[test]
fn unknown_kinds_and_versions_are_errors() {
    let bytes = sample(3).encode_payload();
    assert_eq!(
        Event::decode_payload(999, 1, &bytes),
        Err(DecodeError::UnknownKind(999))
    );
    assert!(matches!(
        Event::decode_payload(3, 99, &bytes),
        Err(DecodeError::UnknownVersion {
            kind: 3,
            version: 99,
            ..
        })
    ));
    let err = Event::decode_payload(2, 1, &bytes).unwrap_err();
    assert!(
        err.to_string().contains("job_created"),
        "error names the kind: {err}"
    );
}

#[test]
fn garbage_never_panics() {
    let mut seed: u64 = 0x9e3779b97f4a7c15;
    for len in 0..300 {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        for &(kind, _, version) in KINDS {
            let _ = Event::decode_payload(kind, version, &bytes);
        }
        let _ = Envelope::from_bytes(&bytes);
    }
}

#[test]
fn a_field_added_with_a_default_reads_old_payloads() {
    // StepSucceeded v1 payload without the optional fields newer writers may add.
    #[derive(serde::Serialize)]
    struct Old<'a> {
        step: &'a str,
        attempt: u32,
    }
    let old = rmp_serde::to_vec_named(&Old {
        step: "build",
        attempt: 1,
    })
    .unwrap();
    assert!(Event::decode_payload(7, 1, &old).is_ok());
    // And a payload carrying a field this version does not know is still read.
    #[derive(serde::Serialize)]
    struct Newer<'a> {
        step: &'a str,
        attempt: u32,
        future_field: u64,
    }
    let newer = rmp_serde::to_vec_named(&Newer {
        step: "build",
        attempt: 1,
        future_field: 9,
    })
    .unwrap();
    assert!(Event::decode_payload(7, 1, &newer).is_ok());
}
