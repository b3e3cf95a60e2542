//! Deploy benchmark: one release archive (20 MiB by default) to 10 hosts — real OpenSSH `sshd`
//! servers on loopback, each with its own host key and a private target root (the test harness's
//! `Fleet`) — with ferry's deploy module, and in the same run, interleaved, with Ansible doing
//! the same work (`benches/ansible/deploy.yml`: copy + unarchive into `releases/<name>`, symlink
//! switch of `current`, one command).
//!
//! Both tools start every run from hosts with an empty target directory (cleaned between runs,
//! outside the timing), deploy a release name they have not used before, and are checked
//! afterwards: every host's `current` must point to the new release and the command must have
//! run once.
//!
//! Ansible runs with its defaults except: `forks` = the number of hosts (ferry's `max_parallel`),
//! no fact gathering, the Python interpreter named (no discovery), fresh SSH control sockets per
//! run; each run is done twice, without and with SSH pipelining.
//!
//! Settings (environment):
//! - `DEPLOY_HOSTS` (10), `DEPLOY_MIB` (20), `DEPLOY_RUNS` (5): hosts, archive size, runs per
//!   tool;
//! - `ANSIBLE_PLAYBOOK`: the `ansible-playbook` to run (default: the one on `PATH`; without one
//!   the Ansible half is skipped and said so).
//!
//! Prints `RESULT name value unit` lines like the other benches.

#[allow(dead_code)]
#[path = "../tests/it/sshd.rs"]
mod sshd;

use async_trait::async_trait;
use ferry::config::HostKeyPolicy;
use ferry::deploy::ssh::SshConnector;
use ferry::deploy::transport::{Hosts, PinnedKey};
use ferry::deploy::{self, HostReport, Phase, Progress, Release};
use ferry_proto::{DeploySpec, FencingToken, JobId};
use sha2::Digest;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn setting(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Progress that records nothing (the agent would append each as an event); with
/// `DEPLOY_TRACE` set it prints when each host reached each phase.
struct Quiet {
    start: Instant,
    trace: bool,
}

impl Quiet {
    fn trace(&self, host: &str, what: &str) {
        if self.trace {
            println!(
                "  {:>8.3} s {host} {what}",
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

#[async_trait]
impl Progress for Quiet {
    async fn host_started(&self, host: &str) -> Result<(), String> {
        self.trace(host, "started");
        Ok(())
    }
    async fn checkpoint(&self, host: &str, phase: Phase) -> Result<(), String> {
        self.trace(host, phase.as_str());
        Ok(())
    }
    async fn host_finished(&self, r: &HostReport) -> Result<(), String> {
        self.trace(&r.host, "finished");
        Ok(())
    }
    async fn host_key_pinned(&self, _: &PinnedKey) -> Result<(), String> {
        Ok(())
    }
    fn log(&self, _: &str, _: &str, _: &str) {}
}

/// A tar.gz holding `app.sh` and `mib` MiB of incompressible bytes: the archive is about `mib`
/// MiB itself.
fn artifact(dir: &Path, mib: usize) -> (PathBuf, String) {
    let mut data = vec![0u8; mib * 1024 * 1024];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let path = dir.join("release.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes).unwrap();
    };
    add("app.sh", b"echo app\n");
    add("payload.bin", &data);
    tar.into_inner().unwrap().finish().unwrap();
    let sum = sha2::Sha256::digest(std::fs::read(&path).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (path, sum)
}

/// Every host has `current` → `releases/<release>` and ran the command once; then the target
/// directories are emptied for the next run.
fn check_and_clean(fleet: &sshd::Fleet, release: &str, tool: &str) {
    for i in 0..fleet.len() {
        let current = fleet.current(i);
        assert_eq!(
            current.as_deref(),
            Some(format!("releases/{release}").as_str()),
            "{tool}: host {i}"
        );
        assert_eq!(
            fleet.lines(i, "restarts"),
            ["restarted"],
            "{tool}: host {i}"
        );
        let payload = fleet.file(i, &format!("releases/{release}/payload.bin"));
        assert!(payload.metadata().unwrap().len() > 0, "{tool}: host {i}");
        std::fs::remove_dir_all(fleet.file(i, "")).unwrap();
    }
}

fn ferry_run(
    rt: &tokio::runtime::Runtime,
    fleet: &sshd::Fleet,
    hosts: &Hosts,
    art: &Path,
    sum: &str,
    run: usize,
) -> Duration {
    let spec = DeploySpec {
        environment: "bench".into(),
        hosts: fleet.targets(),
        path: fleet.path(),
        after_switch: vec![r#"echo restarted >> "$FERRY_PATH/restarts""#.into()],
        max_parallel: fleet.len() as u32,
        ..Default::default()
    };
    let tag = format!("ferry{run}");
    let sha = "0123456789abcdef0123456789abcdef01234567";
    let release = Release {
        project: "bench/app",
        tag: &tag,
        sha,
        job: JobId::new(),
        attempt: 1,
        token: FencingToken(run as u64 + 1),
        artifact: art,
        sha256: sum,
    };
    let start = Instant::now();
    let progress = Quiet {
        start,
        trace: std::env::var_os("DEPLOY_TRACE").is_some(),
    };
    let out = rt
        .block_on(deploy::deploy(
            &spec,
            &release,
            hosts,
            &BTreeSet::new(),
            &progress,
        ))
        .expect("ferry deploy");
    let took = start.elapsed();
    assert!(out.failed().is_empty(), "ferry: {out:?}");
    check_and_clean(fleet, &release.name(), "ferry");
    took
}

struct Ansible {
    playbook_bin: PathBuf,
    dir: PathBuf,
    inventory: PathBuf,
}

impl Ansible {
    fn new(bin: PathBuf, fleet: &sshd::Fleet, known_hosts: &Path, dir: &Path) -> Ansible {
        let inventory = dir.join("inventory.ini");
        let mut text = String::from("[fleet]\n");
        for (i, h) in fleet.hosts().iter().enumerate() {
            text.push_str(&format!(
                "h{i} ansible_host=127.0.0.1 ansible_port={}\n",
                h.port()
            ));
        }
        text.push_str(&format!(
            "[fleet:vars]\nansible_user=root\nansible_ssh_private_key_file={}\n\
             ansible_ssh_common_args='-o UserKnownHostsFile={} -o StrictHostKeyChecking=yes'\n\
             ansible_python_interpreter=/usr/bin/python3\n",
            sshd::client_key().private.display(),
            known_hosts.display()
        ));
        std::fs::write(&inventory, text).unwrap();
        Ansible {
            playbook_bin: bin,
            dir: dir.to_path_buf(),
            inventory,
        }
    }

    /// Runs a playbook of `benches/ansible/` with `extra` variables, `forks` hosts at once, with
    /// fresh SSH control sockets (no connection survives from an earlier run), and SSH
    /// pipelining when `pipelining`.
    fn play(
        &self,
        playbook: &str,
        extra: &[(&str, String)],
        forks: usize,
        pipelining: bool,
        run: &str,
    ) -> Duration {
        let book = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("benches/ansible")
            .join(playbook);
        let control = self.dir.join(format!("cp-{run}"));
        std::fs::create_dir_all(&control).unwrap();
        let mut cmd = Command::new(&self.playbook_bin);
        cmd.arg("-i")
            .arg(&self.inventory)
            .arg(&book)
            .env("ANSIBLE_FORKS", forks.to_string())
            .env(
                "ANSIBLE_PIPELINING",
                if pipelining { "True" } else { "False" },
            )
            .env("ANSIBLE_HOME", self.dir.join("home"))
            .env("ANSIBLE_SSH_CONTROL_PATH_DIR", &control)
            .env("ANSIBLE_REMOTE_TMP", "/tmp/.ferry-bench-ansible")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("ANSIBLE_LOCALHOST_WARNING", "0")
            .env("ANSIBLE_INVENTORY_UNPARSED_WARNING", "0");
        for (k, v) in extra {
            cmd.arg("-e").arg(format!("{k}={v}"));
        }
        let start = Instant::now();
        let out = cmd.output().expect("run ansible-playbook");
        let took = start.elapsed();
        assert!(
            out.status.success(),
            "ansible-playbook failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        took
    }
}

fn version(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|e| format!("{cmd}: {e}"))
}

fn stats(name: &str, runs: &[Duration]) -> f64 {
    let mut s: Vec<f64> = runs.iter().map(Duration::as_secs_f64).collect();
    s.sort_by(f64::total_cmp);
    let median = s[s.len() / 2];
    println!(
        "{name}: runs {} s; median {median:.3} s, min {:.3} s",
        runs.iter()
            .map(|d| format!("{:.3}", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" "),
        s[0]
    );
    println!("RESULT {name}_median {median:.3} s");
    println!("RESULT {name}_min {:.3} s", s[0]);
    median
}

fn main() {
    let n_hosts = setting("DEPLOY_HOSTS", 10);
    let mib = setting("DEPLOY_MIB", 20);
    let runs = setting("DEPLOY_RUNS", 5);
    let ansible_bin = std::env::var_os("ANSIBLE_PLAYBOOK")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("PATH").and_then(|p| {
                std::env::split_paths(&p)
                    .map(|d| d.join("ansible-playbook"))
                    .find(|f| f.exists())
            })
        });

    println!("machine: {} cpus; {}", num_cpus(), version("uptime", &[]));
    println!("openssh: {}", version("ssh", &["-V"]));
    if let Some(bin) = &ansible_bin {
        println!(
            "ansible: {}",
            version(bin.to_str().unwrap(), &["--version"])
        );
        println!(
            "ansible python: {}",
            version("/usr/bin/python3", &["--version"])
        );
    }

    let fleet = sshd::Fleet::start(n_hosts);
    let work = fleet.scratch();
    let known_hosts = work.join("known_hosts");
    fleet.known_hosts(&known_hosts);
    let (art, sum) = artifact(&work, mib);
    let size = std::fs::metadata(&art).unwrap().len();
    println!(
        "artifact: {:.2} MiB tar.gz ({mib} MiB of incompressible data); {n_hosts} hosts; {runs} \
         runs per tool, interleaved",
        size as f64 / (1024.0 * 1024.0)
    );
    let ssh = SshConnector::new(
        &sshd::client_key().private,
        &known_hosts,
        HostKeyPolicy::Strict,
    )
    .expect("client key");
    let hosts = Hosts::new(Some(ssh));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let ansible = ansible_bin.map(|b| Ansible::new(b, &fleet, &known_hosts, &work));

    let (mut ferry_times, mut ansible_times, mut piped_times, mut empty_times) =
        (vec![], vec![], vec![], vec![]);
    for run in 0..runs {
        let t = ferry_run(&rt, &fleet, &hosts, &art, &sum, run);
        println!("run {run}: ferry {:.3} s", t.as_secs_f64());
        ferry_times.push(t);
        if let Some(a) = &ansible {
            for (pipelining, times) in [(false, &mut ansible_times), (true, &mut piped_times)] {
                let release = format!("ansible{run}{}", if pipelining { "p" } else { "" });
                let t = a.play(
                    "deploy.yml",
                    &[
                        ("artifact", art.display().to_string()),
                        ("deploy_path", fleet.path()),
                        ("release", release.clone()),
                    ],
                    n_hosts,
                    pipelining,
                    &format!("deploy-{release}"),
                );
                check_and_clean(&fleet, &release, "ansible");
                println!(
                    "run {run}: ansible{} {:.3} s",
                    if pipelining { " (pipelining)" } else { "" },
                    t.as_secs_f64()
                );
                times.push(t);
            }
            empty_times.push(a.play("empty.yml", &[], n_hosts, false, &format!("empty-{run}")));
        }
    }
    let f = stats("deploy_ferry", &ferry_times);
    if ansible.is_some() {
        let a = stats("deploy_ansible", &ansible_times);
        let p = stats("deploy_ansible_pipelining", &piped_times);
        stats("ansible_empty_playbook", &empty_times);
        println!("RESULT deploy_ansible_over_ferry {:.2} x", a / f);
        println!("RESULT deploy_ansible_pipelining_over_ferry {:.2} x", p / f);
    } else {
        println!("ansible-playbook not found (set ANSIBLE_PLAYBOOK): Ansible not measured");
    }
    println!("after: {}", version("uptime", &[]));
}

fn num_cpus() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
