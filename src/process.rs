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
        let tag = uuid::Uuid::new_v4().to_string();
        let watchdog = match Watchdog::spawn(&tag) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no watchdog for a command: its processes will outlive the agent if it dies");
                None
            }
        };
        let mut group = WatchedGroup {
            pgid: watchdog.as_ref().map(|w| w.pid),
            watchdog,
            tag,
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
            // SAFETY: kill_tagged makes only raw syscalls on its own buffers.
            unsafe { kill_tagged(&needle(&self.tag)) };
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

/// What [`kill_tagged`] looks for in a process's environment: `TAG_VAR=tag` and its terminator.
fn needle(tag: &str) -> Vec<u8> {
    format!("{TAG_VAR}={tag}\0").into_bytes()
}

/// Sends SIGKILL to every process whose initial environment holds `needle` (readable: the
/// agent's user's processes), in a few rounds (one that forked while we looked is found by the
/// next); returns how many signals it sent (a process killed but not yet gone is found again).
///
/// # Safety
/// None beyond the function's own: it makes only raw system calls on buffers of its stack (no
/// allocation, no lock), so the watchdog may call it in a child forked from a threaded process.
/// `needle` must be shorter than 256 bytes.
unsafe fn kill_tagged(needle: &[u8]) -> usize {
    let mut killed = 0;
    for _ in 0..3 {
        // SAFETY: as this function's.
        let round = unsafe { kill_tagged_once(needle) };
        killed += round;
        if round == 0 {
            break;
        }
    }
    killed
}

/// One pass of [`kill_tagged`] over `/proc`.
unsafe fn kill_tagged_once(needle: &[u8]) -> usize {
    unsafe {
        let dir = libc::open(
            c"/proc".as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if dir < 0 {
            return 0;
        }
        let mut killed = 0;
        let mut entries = [0u8; 4096];
        loop {
            let n = libc::syscall(
                libc::SYS_getdents64,
                dir,
                entries.as_mut_ptr(),
                entries.len(),
            );
            if n <= 0 {
                break;
            }
            let mut at = 0;
            while at < n as usize {
                // struct linux_dirent64: u64 d_ino, i64 d_off, u16 d_reclen, u8 d_type, d_name
                let len = u16::from_ne_bytes([entries[at + 16], entries[at + 17]]) as usize;
                let name = &entries[at + 19..at + len];
                let name = &name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())];
                at += len;
                if name.is_empty() || name.len() > 9 || !name.iter().all(u8::is_ascii_digit) {
                    continue;
                }
                let mut path = [0u8; 32];
                let mut end = 0;
                for part in [&b"/proc/"[..], name, b"/environ\0"] {
                    path[end..end + part.len()].copy_from_slice(part);
                    end += part.len();
                }
                if environ_holds(&path, needle) {
                    let pid = name
                        .iter()
                        .fold(0 as libc::pid_t, |p, d| p * 10 + (d - b'0') as libc::pid_t);
                    // A process gone since is ESRCH, harmless.
                    libc::kill(pid, libc::SIGKILL);
                    killed += 1;
                }
            }
        }
        libc::close(dir);
        killed
    }
}

/// Whether the file at `path` (nul-terminated) holds `needle`, read in pieces that overlap by
/// less than the needle.
unsafe fn environ_holds(path: &[u8], needle: &[u8]) -> bool {
    unsafe {
        let fd = libc::open(path.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let mut buf = [0u8; 4096 + 256];
        let keep = needle.len() - 1;
        let mut have = 0;
        let found = loop {
            let n = libc::read(fd, buf[have..].as_mut_ptr().cast(), buf.len() - have);
            if n <= 0 {
                break false;
            }
            have += n as usize;
            if buf[..have].windows(needle.len()).any(|w| w == needle) {
                break true;
            }
            if have > keep {
                buf.copy_within(have - keep..have, 0);
                have = keep;
            }
        };
        libc::close(fd);
        found
    }
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
    /// The watchdog of a command whose processes carry `tag` (see [`WatchedGroup`]).
    fn spawn(tag: &str) -> std::io::Result<Watchdog> {
        // Made before the fork: the child must not allocate.
        let needle = needle(tag);
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the child runs only `watch`, which makes async-signal-safe calls (raw
        // syscalls, no allocation, no locks) and never returns.
        match unsafe { libc::fork() } {
            -1 => Err(std::io::Error::last_os_error()),
            0 => unsafe { watch(parent, &needle) },
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
/// async-signal-safe calls. Once the parent is gone it kills the processes tagged with `needle`
/// (those that left the group), then its group, itself included.
unsafe fn watch(parent: libc::pid_t, needle: &[u8]) -> ! {
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
        kill_tagged(needle);
        libc::kill(0, libc::SIGKILL);
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tag is found wherever it falls in the environment, across the pieces it is read in.
    #[test]
    fn a_tag_is_found_at_any_offset_of_a_large_environment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("environ");
        let mut cpath = path.as_os_str().as_encoded_bytes().to_vec();
        cpath.push(0);
        let needle = needle("0f9b7a4e-6c2d-4a51-9e0b-3f4c5d6e7a8b");
        for pad in [0, 1, 4000, 4050, 4095, 4096, 4300, 4352, 8400, 20_000] {
            let mut environ = vec![b'x'; pad];
            environ.extend_from_slice(&needle);
            environ.extend_from_slice(b"Z=1\0");
            std::fs::write(&path, &environ).unwrap();
            // SAFETY: a nul-terminated path and a needle under 256 bytes.
            assert!(unsafe { environ_holds(&cpath, &needle) }, "padding {pad}");
            environ.truncate(pad + needle.len() - 2);
            std::fs::write(&path, &environ).unwrap();
            // SAFETY: as above.
            assert!(
                !unsafe { environ_holds(&cpath, &needle) },
                "padding {pad}, cut"
            );
        }
    }

    #[test]
    fn tagged_processes_die_and_others_live() {
        let tag = uuid::Uuid::new_v4().to_string();
        let spawn = |tag: &str| {
            std::process::Command::new("sleep")
                .arg("1000")
                .env_clear()
                // (sorted before the tag: the tag lies past the first piece read)
                .env("AAA", "p".repeat(20_000))
                .env(TAG_VAR, tag)
                .spawn()
                .unwrap()
        };
        let mut tagged = spawn(&tag);
        let mut other = spawn(&uuid::Uuid::new_v4().to_string());
        // SAFETY: a needle under 256 bytes.
        // (a process sent SIGKILL is found again by a later round until it is gone: at least 1)
        let killed = unsafe { kill_tagged(&needle(&tag)) };
        if killed == 0 {
            let _ = tagged.kill();
        }
        assert!(killed >= 1);
        let status = tagged.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert_eq!(other.try_wait().unwrap(), None, "the other process lives");
        other.kill().unwrap();
        other.wait().unwrap();
    }
}
