//! Running the build's commands: `sh -c` in the checkout, each in its own process group with an
//! explicit environment, output streamed line by line through the masker, the whole group killed
//! on timeout, cancellation, or when the command's shell exits (so nothing it left behind runs on),
//! and by a watchdog when the agent itself dies.

use super::mask::Masker;
use super::{Error, LogLine, Stream};
use crate::process::WatchedGroup;
use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::time::Instant;

/// A line longer than this is cut into pieces: one command printing without newlines must not
/// grow the agent's memory without bound.
const MAX_LINE: usize = 64 * 1024;

/// After the group is killed, how long to keep reading output still in the pipes. Only a process
/// that left the group (`setsid`) can hold them open longer; we stop listening to it.
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Runs `commands` one after another; stops at the first failure. `deadline` (when, and the
/// timeout it came from, for the error) bounds them all together.
pub(super) async fn run_all(
    commands: &[String],
    dir: &Path,
    vars: &[(String, String)],
    deadline: Option<(Instant, Duration)>,
    masker: &Masker,
    log: &(dyn Fn(LogLine) + Send + Sync),
    mut cancel: Pin<&mut impl Future<Output = ()>>,
) -> Result<(), Error> {
    for (i, command) in commands.iter().enumerate() {
        let index = i + 1;
        log(LogLine {
            stream: Stream::Ferry,
            line: masker.mask(&format!("$ {command}")),
        });
        run_one(
            index,
            command,
            dir,
            vars,
            deadline,
            masker,
            log,
            cancel.as_mut(),
        )
        .await?;
    }
    Ok(())
}

enum End {
    Exited(std::process::ExitStatus),
    TimedOut(Duration),
    Cancelled,
    WaitFailed(std::io::Error),
}

#[allow(clippy::too_many_arguments)]
async fn run_one(
    index: usize,
    command: &str,
    dir: &Path,
    vars: &[(String, String)],
    deadline: Option<(Instant, Duration)>,
    masker: &Masker,
    log: &(dyn Fn(LogLine) + Send + Sync),
    mut cancel: Pin<&mut impl Future<Output = ()>>,
) -> Result<(), Error> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(dir)
        .env_clear()
        .envs(vars.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // The command runs in a group led by a watchdog, which kills the group if the agent dies
    // (even by SIGKILL). The guard kills the group however this function ends, including when
    // the build future is dropped.
    let (mut child, group) =
        WatchedGroup::spawn(&mut cmd).map_err(|source| Error::Spawn { index, source })?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");

    let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
    let status = async {
        let end = tokio::select! {
            s = child.wait() => match s {
                Ok(s) => End::Exited(s),
                Err(e) => End::WaitFailed(e),
            },
            _ = sleep_until(deadline) => End::TimedOut(deadline.map(|d| d.1).unwrap_or_default()),
            _ = cancel.as_mut() => End::Cancelled,
        };
        // Whatever ended it, nothing of this command may run on: kill the whole group (also
        // background children of a shell that exited normally), then reap the shell.
        group.kill();
        if !matches!(end, End::Exited(_)) {
            let _ = child.wait().await;
        }
        let _ = ended_tx.send(());
        end
    };
    let drain = async {
        let both = async {
            tokio::join!(
                read_lines(stdout, Stream::Stdout, masker, log),
                read_lines(stderr, Stream::Stderr, masker, log)
            )
        };
        tokio::select! {
            _ = both => {}
            _ = async {
                let _ = ended_rx.await;
                tokio::time::sleep(DRAIN_GRACE).await;
            } => {
                tracing::warn!(command = index, "output pipes still open after the process group was killed; stopped reading");
            }
        }
    };
    let (end, ()) = tokio::join!(status, drain);
    match end {
        End::Exited(s) if s.success() => Ok(()),
        End::Exited(s) => Err(Error::CommandFailed {
            index,
            command: masker.mask(command),
            how: match (s.code(), s.signal()) {
                (Some(c), _) => format!("exited with code {c}"),
                (None, Some(sig)) => format!("was killed by signal {sig}"),
                (None, None) => "failed".into(),
            },
            code: s.code(),
        }),
        End::TimedOut(after) => Err(Error::TimedOut { after }),
        End::Cancelled => Err(Error::Cancelled),
        End::WaitFailed(source) => Err(Error::Spawn { index, source }),
    }
}

pub(super) async fn sleep_until(deadline: Option<(Instant, Duration)>) {
    match deadline {
        Some((at, _)) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Reads `r` line by line (lossy UTF-8, lines cut at [`MAX_LINE`]) into `log`, masked.
async fn read_lines(
    r: impl AsyncRead + Unpin,
    stream: Stream,
    masker: &Masker,
    log: &(dyn Fn(LogLine) + Send + Sync),
) {
    let mut r = BufReader::new(r);
    let mut buf = Vec::new();
    // What a line cut for its length left for the next one (see `Masker::safe_cut`).
    let mut carry: Vec<u8> = Vec::new();
    loop {
        buf.clear();
        buf.append(&mut carry);
        let mut done = false;
        let mut cut = false;
        // Read up to a newline, but never more than MAX_LINE bytes into one line.
        loop {
            let available = match r.fill_buf().await {
                Ok(b) => b,
                Err(_) => {
                    done = true;
                    break;
                }
            };
            if available.is_empty() {
                done = true;
                break;
            }
            let room = MAX_LINE.saturating_sub(buf.len());
            let take = available.len().min(room);
            if let Some(nl) = available[..take].iter().position(|&b| b == b'\n') {
                buf.extend_from_slice(&available[..nl]);
                r.consume(nl + 1);
                break;
            }
            buf.extend_from_slice(&available[..take]);
            r.consume(take);
            if buf.len() >= MAX_LINE {
                cut = true;
                break;
            }
        }
        if cut {
            // Cut where no secret spans the cut, carrying the rest into the next line.
            let at = masker.safe_cut(&buf, buf.len());
            carry = buf.split_off(at);
        }
        if !buf.is_empty() || !done {
            let text = String::from_utf8_lossy(&buf);
            let text = text.strip_suffix('\r').unwrap_or(&text);
            log(LogLine {
                stream,
                line: masker.mask(text),
            });
        }
        if done {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line longer than MAX_LINE is cut, and a secret where the cut would fall still comes
    /// out masked whole; multi-byte characters are not split.
    #[tokio::test]
    async fn a_secret_across_the_cut_of_a_long_line_is_masked() {
        let secret = "tok-0123456789abcdef";
        let masker = Masker::new([secret.to_string()]);
        for pad in [MAX_LINE - 10, MAX_LINE - 1, MAX_LINE, MAX_LINE - 3] {
            let text = format!("{}{secret}é{}\n", "x".repeat(pad), "y".repeat(10));
            let lines = std::sync::Mutex::new(Vec::new());
            read_lines(text.as_bytes(), Stream::Stdout, &masker, &|l: LogLine| {
                lines.lock().unwrap().push(l.line)
            })
            .await;
            let lines = lines.into_inner().unwrap();
            let joined = lines.concat();
            assert!(!joined.contains("tok-"), "pad {pad}: leaked");
            assert!(
                joined.contains("***é"),
                "pad {pad}: {}",
                &joined[joined.len() - 40..]
            );
            assert_eq!(joined.len(), pad + 3 + 2 + 10, "pad {pad}: nothing lost");
            assert!(lines.iter().all(|l| !l.contains('\u{FFFD}')), "pad {pad}");
        }
    }
}
