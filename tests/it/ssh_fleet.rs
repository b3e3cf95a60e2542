//! Deploys to fleets of real OpenSSH servers (see `sshd.rs`): every host has its own host key,
//! `authorized_keys` and a private target root mounted at the one absolute path the environment
//! names, so each host's files can be checked on their own.

use crate::sshd::{Fleet, RefusedPort};
use std::time::{Duration, Instant};

/// Runs `script` on `target` with the system's OpenSSH client (strict host keys, the fleet's
/// `known_hosts`): the harness checks itself without going through ferry.
fn ssh(fleet: &Fleet, target: &str, script: &str) -> std::process::Output {
    let (user_host, port) = target.rsplit_once(':').unwrap();
    let kh = fleet.scratch().join("known_hosts");
    fleet.known_hosts(&kh);
    std::process::Command::new("ssh")
        .args(["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", kh.display()))
        .arg("-i")
        .arg(&crate::sshd::client_key().private)
        .args(["-p", port, user_host, script])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn processes_with(marker: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(marker))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn fleet_hosts_share_one_path_but_write_to_their_own_roots_and_die_with_the_fleet() {
    let fleet = Fleet::start(3);
    let path = fleet.path();
    for (i, host) in fleet.hosts().iter().enumerate() {
        let out = ssh(
            &fleet,
            &host.target(),
            &format!("mkdir -p '{path}' && echo host-{i} > '{path}/who'"),
        );
        assert!(out.status.success(), "{out:?}\n{}", host.log());
    }
    for i in 0..fleet.len() {
        assert_eq!(fleet.lines(i, "who"), [format!("host-{i}")]);
    }
    // Outside every host's namespace the shared directory is untouched.
    assert_eq!(std::fs::read_dir(fleet.target_dir()).unwrap().count(), 0);

    // The helpers read what a host wrote; the health check fails only where it is marked.
    let targets = fleet.targets();
    let out = ssh(
        &fleet,
        &targets[1],
        &format!("cd '{path}' && mkdir -p releases/r1 releases/.tmp && ln -s releases/r1 current"),
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(fleet.current(1).as_deref(), Some("releases/r1"));
    assert_eq!(fleet.releases(1), ["r1"]);
    assert_eq!((fleet.current(2), fleet.releases(2)), (None, vec![]));
    fleet.set_unhealthy(2, true);
    assert!(ssh(&fleet, &targets[1], &fleet.health_check())
        .status
        .success());
    assert!(!ssh(&fleet, &targets[2], &fleet.health_check())
        .status
        .success());
    fleet.set_unhealthy(2, false);
    assert!(ssh(&fleet, &targets[2], &fleet.health_check())
        .status
        .success());
    assert_eq!(fleet.host(2).sftp_sessions(), 0);
    let local = fleet.scratch().join("payload");
    std::fs::write(&local, "payload").unwrap();
    let put = std::process::Command::new("sftp")
        .args(["-b", "-", "-o", "BatchMode=yes"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            fleet.scratch().join("known_hosts").display()
        ))
        .arg("-i")
        .arg(&crate::sshd::client_key().private)
        .args(["-P", &fleet.host(2).port().to_string(), "root@127.0.0.1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(format!("put {} {path}/copied\n", local.display()).as_bytes())?;
            c.wait()
        })
        .unwrap();
    assert!(put.success());
    assert!(fleet.file(2, "copied").exists());
    assert_eq!(fleet.host(2).sftp_sessions(), 1);

    // A session that leaves a process behind: stopping the host kills it too.
    let marker = format!(
        "{}.{:06}",
        900 + fleet.host(0).port() % 100,
        std::process::id() % 1_000_000
    );
    let out = ssh(
        &fleet,
        &fleet.host(0).target(),
        &format!("nohup setsid sleep {marker} >/dev/null 2>&1 & echo started"),
    );
    assert!(out.status.success(), "{out:?}");
    let end = Instant::now() + Duration::from_secs(30);
    while processes_with(&marker).is_empty() {
        assert!(Instant::now() < end, "the session's process never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    fleet.host(0).stop();
    assert!(
        processes_with(&marker).is_empty(),
        "a session's process outlived its sshd"
    );

    // A stopped host refuses connections; restarted it answers again; a new key is new.
    let out = ssh(&fleet, &fleet.host(0).target(), "true");
    assert!(!out.status.success());
    fleet.host(0).restart();
    assert!(ssh(&fleet, &fleet.host(0).target(), "true")
        .status
        .success());
    let old = fleet.host(1).fingerprint();
    fleet.host(1).restart_with_new_key();
    assert_ne!(fleet.host(1).fingerprint(), old);
    assert_eq!(
        fleet.lines(1, "who"),
        ["host-1"],
        "the root survives a restart"
    );

    // A refused port refuses.
    let refused = RefusedPort::new();
    let (_, port) = refused
        .target()
        .rsplit_once(':')
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .unwrap();
    let err =
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
}
