//! Process groups for the commands an agent runs on its own machine (build commands, the local
//! deploy transport's scripts). A forked watchdog, not the command, leads each group and kills
//! the whole group when the agent process dies, even by SIGKILL, so no command runs on without
//! the agent that holds its step's lease.

use tokio::process::{Child, Command};

/// A command's process group, led by a [`Watchdog`]. Dropping it (or [`WatchedGroup::kill`])
/// sends SIGKILL to the whole group; [`WatchedGroup::release`] lets the group live on.
pub(crate) struct WatchedGroup {
    pgid: Option<i32>,
    watchdog: Option<Watchdog>,
    /// The value of [`TAG_VAR`] in the command's environment, which every process it starts
    /// inherits: what finds those that left the group (`setsid`, `setpgid`: GNU `timeout`,
    /// `ssh-agent`, a daemon), which the group's SIGKILL does not reach.
    tag: String,
}

/// The environment variable that tags every process of one command (see [`WatchedGroup`]).
pub const TAG_VAR: &str = "FERRY_PROCESS_GROUP";

impl WatchedGroup {
    /// Spawns `cmd` in a new process group led by a fresh watchdog. Without a watchdog (the fork
    /// failed, which is logged) the command leads its own group, which then outlives an agent
    /// that dies.
    pub(crate) fn spawn(cmd: &mut Command) -> std::io::Result<(Child, WatchedGroup)> {
        let watchdog = match Watchdog::spawn() {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no watchdog for a command: its processes will outlive the agent if it dies");
                None
            }
        };
        let mut group = WatchedGroup {
            pgid: watchdog.as_ref().map(|w| w.pid),
            watchdog,
            tag: uuid::Uuid::new_v4().to_string(),
        };
        cmd.process_group(group.pgid.unwrap_or(0));
        cmd.env(TAG_VAR, &group.tag);
        // On an error the group (just the watchdog) is dropped: killed and reaped.
        let child = cmd.spawn()?;
        if group.pgid.is_none() {
            group.pgid = child.id().map(|pid| pid as i32);
        }
        Ok((child, group))
    }

    /// Sends SIGKILL to every process of the group, and to every process of the agent's user
    /// that carries the group's tag in its environment (those that left the group).
    pub(crate) fn kill(&self) {
        if let Some(pgid) = self.pgid {
            // SAFETY: kill(2) with a negative pid signals the process group; no memory is
            // involved. ESRCH (the group is already gone) is the expected, harmless failure.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            // (a few rounds: one that forked while we looked is found by the next)
            for _ in 0..3 {
                if kill_tagged(&self.tag) == 0 {
                    break;
                }
            }
        }
    }

    /// Lets whatever the command left running outlive this guard and the agent (a deploy
    /// script that started a service on purpose): only the watchdog is stopped.
    pub(crate) fn release(mut self) {
        self.pgid = None;
        if let Some(w) = self.watchdog.take() {
            // SAFETY: SIGKILL to our own child, the watchdog only.
            unsafe {
                libc::kill(w.pid, libc::SIGKILL);
            }
            w.reap();
        }
    }
}

impl Drop for WatchedGroup {
    fn drop(&mut self) {
        self.kill();
        if let Some(w) = self.watchdog.take() {
            w.reap();
        }
    }
}

/// Sends SIGKILL to every process whose initial environment holds `TAG_VAR=tag` (readable: the
/// agent's user's processes); returns how many.
fn kill_tagged(tag: &str) -> usize {
    let needle = format!("{TAG_VAR}={tag}\0");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    let mut killed = 0;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
        {
            // SAFETY: kill(2) of a pid; a process gone since is ESRCH, harmless.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            killed += 1;
        }
    }
    killed
}

/// A forked child of the agent that leads a command's process group and does nothing but watch
/// its parent: when the agent process is gone (killed with SIGKILL, say), it kills its whole
/// group, so a command never runs on without the agent that holds its lease. While the agent
/// lives, [`WatchedGroup`] ends the group (watchdog included) or the watchdog alone.
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
/// another command held open here would never report end of file) and makes only
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
