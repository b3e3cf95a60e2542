//! The directories an agent works in: one per step attempt under `<data_dir>/work`, holding a
//! checkout and its packed artifact, or an artifact fetched for a deploy. Several gigabytes
//! each, so none may outlive its step.
//!
//! A [`WorkDir`] is removed when it is dropped: when its step ends, and when the step's future
//! is dropped half-way (the lease was lost, the agent stops). A killed agent (SIGKILL, OOM
//! killer, power loss) drops nothing, so each directory is held under an exclusive `flock` on
//! `<name>.lock` beside it for as long as it exists, and [`remove_stale`], run when an agent
//! starts, removes the directories whose lock nobody holds: those of dead processes, never
//! those of another agent process sharing the data directory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// A step attempt's work directory, removed (with its lock file) when dropped.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: File,
}

impl WorkDir {
    /// Creates `root/name` (and `root`), empty, holding its lock first; a directory of that
    /// name left by a dead process is removed. Fails if another live process holds it.
    pub fn create(root: &Path, name: &str) -> io::Result<WorkDir> {
        std::fs::create_dir_all(root)?;
        let path = root.join(name);
        let lock_path = lock_path_of(&path);
        let lock = lock_file(&lock_path, false)?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is in use by another process", path.display()),
            )
        })?;
        remove_if_exists(&path)?;
        std::fs::create_dir(&path)?;
        Ok(WorkDir {
            path,
            lock_path,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = remove_if_exists(&self.path) {
            tracing::warn!(path = %self.path.display(), error = %e, "removing a work directory failed");
        }
        // Unlinked while still locked: a sweep that opens the name now gets a new file.
        let _ = std::fs::remove_file(&self.lock_path);
    }
}

/// Removes every directory under `root` whose lock no live process holds (left by a process
/// that was killed), and lock files without a directory. Returns the directories removed.
/// A missing `root` has nothing to remove.
pub fn remove_stale(root: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(root) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r?,
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "lock") {
            let dir = path.with_extension("");
            if !dir.exists() {
                if let Some(_held) = lock_file(&path, false)? {
                    let _ = std::fs::remove_file(&path);
                }
            }
            continue;
        }
        if !entry.file_type()?.is_dir() {
            continue;
        }
        let lock_path = lock_path_of(&path);
        let Some(_held) = lock_file(&lock_path, false)? else {
            continue; // a live process works in it
        };
        // One that cannot be removed is said and left; the others are still removed.
        if let Err(e) = remove_if_exists(&path) {
            tracing::warn!(path = %path.display(), error = %e, "removing a stale work directory failed");
            continue;
        }
        let _ = std::fs::remove_file(&lock_path);
        removed.push(path);
    }
    Ok(removed)
}

/// Bytes still free for an unprivileged process on the filesystem holding `path` (or that will
/// hold it: the nearest ancestor that exists), and the filesystem's size.
pub fn disk_space(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|p| p.exists()).unwrap_or(path);
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes())?;
    // SAFETY: statvfs(3) writes into the zeroed struct we own; the path is NUL-terminated.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unit = s.f_frsize as u64;
    Ok((
        (s.f_bavail as u64).saturating_mul(unit),
        (s.f_blocks as u64).saturating_mul(unit),
    ))
}

fn lock_path_of(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    dir.with_file_name(name)
}

/// An exclusive `flock` on `path` (created if missing), held until the returned file is
/// dropped. With `wait`, waits while another open file holds it; without, `None` then.
pub(crate) fn lock_file(path: &Path, wait: bool) -> io::Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    let how = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock(2) on a file descriptor we own for the duration of the call.
        if unsafe { libc::flock(file.as_raw_fd(), how) } == 0 {
            return Ok(Some(file));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock if !wait => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Removes `path` and everything under it. A build may leave directories without write
/// permission (Go's module cache makes its trees read-only): on a refusal, the tree is made
/// writable by its owner and removed again.
fn remove_if_exists(path: &Path) -> io::Result<()> {
    match std::fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_writable(path);
            match std::fs::remove_dir_all(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Adds owner write and search permission to every directory under `path` (symlinks are not
/// followed), so that their entries can be removed. Best effort.
fn make_writable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            make_writable(&entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_work_dir_is_removed_when_dropped() {
        let root = tempfile::tempdir().unwrap();
        let w = WorkDir::create(root.path(), "job-1").unwrap();
        std::fs::write(w.path().join("big"), b"bytes").unwrap();
        let path = w.path().to_path_buf();
        drop(w);
        assert!(!path.exists());
        assert_eq!(
            std::fs::read_dir(root.path()).unwrap().count(),
            0,
            "lock file gone too"
        );
    }

    #[test]
    fn only_directories_nobody_holds_are_stale() {
        let root = tempfile::tempdir().unwrap();
        // A killed agent's directory: no lock held (an older build left no lock file at all).
        let dead = root.path().join("job-dead");
        std::fs::create_dir_all(dead.join("src")).unwrap();
        std::fs::write(dead.join("src/file"), b"x").unwrap();
        // A lock file whose directory is gone.
        std::fs::write(root.path().join("job-gone.lock"), b"").unwrap();
        let live = WorkDir::create(root.path(), "job-live").unwrap();
        std::fs::write(live.path().join("file"), b"x").unwrap();

        let removed = remove_stale(root.path()).unwrap();
        assert_eq!(removed, std::slice::from_ref(&dead));
        assert!(!dead.exists());
        assert!(!root.path().join("job-gone.lock").exists());
        assert!(live.path().join("file").exists(), "a held directory stays");
        assert!(
            WorkDir::create(root.path(), "job-live").is_err(),
            "a held directory cannot be taken"
        );
        assert!(remove_stale(&root.path().join("missing"))
            .unwrap()
            .is_empty());
    }

    /// Makes this thread obey file permissions even as root: clears CAP_DAC_OVERRIDE and
    /// CAP_DAC_READ_SEARCH from its effective set (capabilities are per thread on Linux).
    fn obey_permissions() {
        #[repr(C)]
        struct Header {
            version: u32,
            pid: i32,
        }
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Data {
            effective: u32,
            permitted: u32,
            inheritable: u32,
        }
        let mut header = Header {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let mut data = [Data::default(); 2];
        // SAFETY: capget/capset with a version-3 header and two data structs, as capget(2) says.
        unsafe {
            assert_eq!(
                libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()),
                0
            );
            data[0].effective &= !((1 << 1) | (1 << 2));
            assert_eq!(
                libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()),
                0
            );
        }
    }

    /// Go's module cache (and other tools') leaves read-only trees: they are removed too.
    #[test]
    fn read_only_trees_are_removed() {
        std::thread::spawn(read_only_trees_are_removed_here)
            .join()
            .unwrap();
    }

    fn read_only_trees_are_removed_here() {
        use std::os::unix::fs::PermissionsExt;
        obey_permissions();
        let root = tempfile::tempdir().unwrap();
        // (the check is meaningful only where permissions apply)
        let elsewhere = tempfile::tempdir().unwrap();
        let probe = elsewhere.path().join("probe");
        std::fs::create_dir(&probe).unwrap();
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o555)).unwrap();
        assert!(
            std::fs::write(probe.join("f"), b"x").is_err(),
            "permissions apply"
        );
        std::fs::set_permissions(&probe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let w = WorkDir::create(root.path(), "job-go").unwrap();
        let cache = w.path().join("gopath/pkg/mod/example.com/m@v1");
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join("go.mod"), b"module m").unwrap();
        for dir in [cache.as_path(), cache.parent().unwrap()] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o555)).unwrap();
        }
        let path = w.path().to_path_buf();
        drop(w);
        assert!(!path.exists());
        // A stale one, left by a killed agent, too.
        let stale = root.path().join("job-dead/ro");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("f"), b"x").unwrap();
        std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o555)).unwrap();
        let removed = remove_stale(root.path()).unwrap();
        assert_eq!(removed, [root.path().join("job-dead")]);
    }

    #[test]
    fn disk_space_reads_the_filesystem() {
        let root = tempfile::tempdir().unwrap();
        let (free, size) = disk_space(root.path()).unwrap();
        assert!(size > 0 && free <= size, "{free} of {size}");
        let (_, later) = disk_space(&root.path().join("not/yet")).unwrap();
        assert_eq!(
            later, size,
            "a path to be created: the filesystem that will hold it"
        );
    }
}
