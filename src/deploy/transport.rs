//! How a deploy reaches a host: run a shell script there with an environment, and upload a file.
//! `Local` runs on the agent's own machine (`hosts = ["local"]`); SSH ([`super::ssh`]) is the
//! other transport. [`Hosts`] is the connector an agent uses: it picks the transport per host.

use crate::process::WatchedGroup;
use async_trait::async_trait;
use std::path::Path;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};

/// What a script printed and how it ended.
#[derive(Clone, Debug, Default)]
pub struct Output {
    /// Exit status; `None` when the script was killed by a signal or the channel closed first.
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }

    /// The last stderr line (or stdout line), for error messages.
    pub fn last_line(&self) -> &str {
        fn pick(s: &str) -> Option<&str> {
            s.lines().rev().map(str::trim).find(|l| !l.is_empty())
        }
        pick(&self.stderr)
            .or_else(|| pick(&self.stdout))
            .unwrap_or("")
    }
}

/// A failure to talk to the host at all (as opposed to a script that ran and failed).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {host}: {reason}")]
    Connect { host: String, reason: String },
    #[error("host key of {host} refused: {reason}")]
    HostKey { host: String, reason: String },
    #[error("{host}: {reason}")]
    Io { host: String, reason: String },
    #[error("{host}: still running after {secs} s (command_timeout)")]
    TimedOut { host: String, secs: u64 },
}

/// Output lines as they arrive: `(stream, line)` with stream `stdout` or `stderr`.
pub type LogFn<'a> = &'a (dyn Fn(&str, &str) + Send + Sync);

#[async_trait]
pub trait Transport: Send + Sync {
    /// The host as configured (`user@host:port`, `local`).
    fn host(&self) -> &str;
    /// Runs `script` with `sh` on the host, with exactly `env` added to a minimal environment.
    async fn exec(
        &self,
        script: &str,
        env: &[(String, String)],
        log: LogFn<'_>,
    ) -> Result<Output, Error>;
    /// Copies the local file to `remote` (an absolute path), replacing it.
    async fn upload(&self, local: &Path, remote: &str) -> Result<(), Error>;
    /// Whether a script, and everything it started, is surely killed when its `exec` is
    /// dropped (the local transport's process group). Where it is not (SSH: the host kills it
    /// once it hears of the drop, which a frozen agent never sends, and only where it has
    /// `setsid`), the deploy has the host stop a command that runs past `command_timeout` itself.
    fn kills_on_drop(&self) -> bool {
        false
    }
}

/// A host key pinned on first use while connecting (`host_key_policy = "accept-new"`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PinnedKey {
    /// The host as configured (`user@host:port`).
    pub host: String,
    /// `SHA256:<base64>`.
    pub fingerprint: String,
    /// The key's algorithm, e.g. `ssh-ed25519`.
    pub key_type: String,
}

/// Opens transports to hosts.
#[async_trait]
pub trait Connector: Send + Sync {
    async fn connect(&self, host: &str) -> Result<Box<dyn Transport>, Error>;

    /// Like [`Connector::connect`], and also says which host keys were pinned on the way
    /// (`accept-new`) — even when the connection then failed, since a pin stays in
    /// `known_hosts` either way. Connectors that never pin keep this default.
    async fn connect_noting_pins(
        &self,
        host: &str,
    ) -> (Result<Box<dyn Transport>, Error>, Vec<PinnedKey>) {
        (self.connect(host).await, Vec::new())
    }
}

/// The agent's own machine.
pub struct Local;

#[async_trait]
impl Transport for Local {
    fn host(&self) -> &str {
        "local"
    }

    fn kills_on_drop(&self) -> bool {
        true
    }

    async fn exec(
        &self,
        script: &str,
        env: &[(String, String)],
        log: LogFn<'_>,
    ) -> Result<Output, Error> {
        let io = |e: std::io::Error| Error::Io {
            host: "local".into(),
            reason: e.to_string(),
        };
        let mut cmd = tokio::process::Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            )
            .env("HOME", std::env::var("HOME").unwrap_or_else(|_| "/".into()))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Whatever the script started dies with it when this future is dropped (a step that
        // is stopped, timed out or handed back leaves nothing running behind) or when the
        // agent dies while it runs (the group's watchdog). Only then: a script that finished
        // may have started a service on purpose.
        let (mut child, group) = WatchedGroup::spawn(&mut cmd).map_err(io)?;
        let (out, err) = (child.stdout.take(), child.stderr.take());
        async fn read(
            r: Option<impl tokio::io::AsyncRead + Unpin>,
            stream: &str,
            log: LogFn<'_>,
        ) -> String {
            let mut text = String::new();
            if let Some(r) = r {
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    log(stream, &line);
                    text.push_str(&line);
                    text.push('\n');
                }
            }
            text
        }
        let (stdout, stderr, status) = tokio::join!(
            read(out, "stdout", log),
            read(err, "stderr", log),
            child.wait()
        );
        group.release();
        Ok(Output {
            status: status.map_err(io)?.code(),
            stdout,
            stderr,
        })
    }

    async fn upload(&self, local: &Path, remote: &str) -> Result<(), Error> {
        let tmp = format!("{remote}.part");
        let io = |e: std::io::Error| Error::Io {
            host: "local".into(),
            reason: format!("copy {} to {remote}: {e}", local.display()),
        };
        tokio::fs::copy(local, &tmp).await.map_err(io)?;
        tokio::fs::rename(&tmp, remote).await.map_err(io)
    }
}

/// Connects `local` only; other hosts need the SSH connector.
pub struct LocalOnly;

#[async_trait]
impl Connector for LocalOnly {
    async fn connect(&self, host: &str) -> Result<Box<dyn Transport>, Error> {
        if host == "local" {
            Ok(Box::new(Local))
        } else {
            Err(Error::Connect {
                host: host.into(),
                reason: "this agent has no SSH transport configured".into(),
            })
        }
    }
}

/// The agent's connector: `local` runs on this machine, every other host goes over SSH (when the
/// agent has an SSH key configured).
pub struct Hosts {
    ssh: Option<super::ssh::SshConnector>,
}

impl Hosts {
    pub fn new(ssh: Option<super::ssh::SshConnector>) -> Hosts {
        Hosts { ssh }
    }

    /// From `[agent]`: `ssh_key`, `known_hosts`, `host_key_policy`. Fails when the key cannot be
    /// loaded.
    pub fn from_config(agent: &crate::config::Agent) -> Result<Hosts, String> {
        Ok(Hosts::new(super::ssh::SshConnector::from_config(agent)?))
    }

    pub fn ssh(&self) -> Option<&super::ssh::SshConnector> {
        self.ssh.as_ref()
    }
}

#[async_trait]
impl Connector for Hosts {
    async fn connect(&self, host: &str) -> Result<Box<dyn Transport>, Error> {
        self.connect_noting_pins(host).await.0
    }

    async fn connect_noting_pins(
        &self,
        host: &str,
    ) -> (Result<Box<dyn Transport>, Error>, Vec<PinnedKey>) {
        match &self.ssh {
            _ if host == "local" => (Ok(Box::new(Local)), Vec::new()),
            Some(ssh) => ssh.connect_noting_pins(host).await,
            None => (LocalOnly.connect(host).await, Vec::new()),
        }
    }
}
