//! Running the build's commands: `sh -c` in the checkout, each in its own process group with an
//! explicit environment, output streamed line by line through the masker, the whole group killed
//! on timeout, cancellation, or when the command's shell exits (so nothing it left behind runs on),
//! and by a watchdog when the agent itself dies.

use super::mask::Masker;
use super::{Error, LogLine, Stream};
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

/// Runs `commands` one after another; stops at the first failure. `timeout` bounds them all
/// together.
pub(super) async fn run_all(
    commands: &[String],
    dir: &Path,
    vars: &[(String, String)],
    timeout: Option<Duration>,
    masker: &Masker,
    log: &(dyn Fn(LogLine) + Send + Sync),
    mut cancel: Pin<&mut impl Future<Output = ()>>,
) -> Result<(), Error> {
    let deadline = timeout.map(|t| (Instant::now() + t, t));
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
    // (even by SIGKILL). Without one (fork failed), the shell leads its own group.
    let watchdog = match Watchdog::spawn() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "no watchdog for the build command: its processes will outlive the agent if it dies");
            None
        }
    };
    cmd.process_group(watchdog.as_ref().map_or(0, |w| w.pid));
    let mut child = cmd
        .spawn()
        .map_err(|source| Error::Spawn { index, source })?;
    // The guard kills the group however this function ends, including when the build future
    // is dropped, and reaps the watchdog.
    let group = GroupGuard {
        pgid: watchdog
            .as_ref()
            .map(|w| w.pid)
            .or(child.id().map(|pid| pid as i32)),
        watchdog,
    };
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

async fn sleep_until(deadline: Option<(Instant, Duration)>) {
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
    loop {
        buf.clear();
        let mut done = false;
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
            let room = MAX_LINE - buf.len();
            let take = available.len().min(room);
            if let Some(nl) = available[..take].iter().position(|&b| b == b'\n') {
                buf.extend_from_slice(&available[..nl]);
                r.consume(nl + 1);
                break;
            }
            buf.extend_from_slice(&available[..take]);
            r.consume(take);
            if buf.len() >= MAX_LINE {
                break;
            }
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

/// Owns a process group id; [`GroupGuard::kill`] (and drop) sends SIGKILL to the whole group.
/// Drop also reaps the group's watchdog.
struct GroupGuard {
    pgid: Option<i32>,
    watchdog: Option<Watchdog>,
}

impl GroupGuard {
    fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) with a negative pid signals the process group; no memory is
            // involved. ESRCH (the group is already gone) is the expected, harmless failure.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        self.kill();
        if let Some(w) = self.watchdog.take() {
            w.reap();
        }
    }
}

/// A forked child of the agent that leads a build command's process group and does nothing but
/// watch its parent: when the agent process is gone (killed with SIGKILL, say), it kills its
/// whole group, so a build never runs on without the agent that holds its lease. The agent
/// kills the group (watchdog included) itself whenever a command ends.
///
/// It learns of the agent's death at once through `PR_SET_PDEATHSIG` (SIGTERM, blocked and
/// waited for), and checks `getppid()` every second as well: the death signal also comes when
/// only the forking thread ends, so it acts only once its parent process has changed.
struct Watchdog {
    pid: libc::pid_t,
}

impl Watchdog {
    fn spawn() -> std::io::Result<Watchdog> {
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the child runs only `watch`, which makes async-signal-safe calls (raw
        // syscalls, no allocation, no locks) and never returns.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => unsafe { watch(parent) },
            pid => {
                // The child does this too: whichever runs first, the group exists before the
                // command's shell joins it.
                // SAFETY: setpgid on our own child.
                unsafe { libc::setpgid(pid, pid) };
                Ok(Watchdog { pid })
            }
        }
    }

    /// Waits for the watchdog to end (it was sent SIGKILL with its group): at once when it has,
    /// else on a blocking thread.
    fn reap(self) {
        let pid = self.pid;
        let wait = move |flags| {
            let mut status = 0;
            // SAFETY: waitpid on our own child, with a valid status pointer.
            unsafe { libc::waitpid(pid, &mut status, flags) }
        };
        if wait(libc::WNOHANG) != 0 {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || wait(0))),
            Err(_) => {
                wait(0);
            }
        }
    }
}

/// The watchdog's life, in the forked child.
///
/// # Safety
/// Only in a child just forked from `parent`: it closes every inherited descriptor (a pipe of
/// another build held open here would never report end of file) and makes only
/// async-signal-safe calls.
unsafe fn watch(parent: libc::pid_t) -> ! {
    unsafe {
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            for fd in 0..4096 {
                libc::close(fd);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::setpgid(0, 0);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
        let second = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        // Checked after the death signal is armed: a parent that died before is seen here.
        while libc::getppid() == parent {
            libc::sigtimedwait(&set, std::ptr::null_mut(), &second);
        }
        libc::kill(0, libc::SIGKILL);
        libc::_exit(0)
    }
}
