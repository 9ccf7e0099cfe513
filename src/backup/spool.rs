//! The spool directory: a private temporary copy of each snapshot, kept only for the
//! verifier, removed on every way out of a cycle.
//!
//! Spool files are named `etcd-backup-<pid>-<id>.spool`, created with mode 0600. Files whose
//! process is gone are stale (a crash, a power loss) and are removed at start-up; files of a
//! live process (a one-shot `snapshot` run next to the daemon) are left alone.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

const PREFIX: &str = "etcd-backup-";
const SUFFIX: &str = ".spool";

/// A spool file that is deleted when dropped.
#[derive(Debug)]
pub struct SpoolFile {
    path: PathBuf,
}

impl SpoolFile {
    /// Creates `dir` if needed and a new, empty spool file for backup `id` (mode 0600).
    ///
    /// # Errors
    /// I/O errors creating the directory or the file.
    pub fn create(dir: &Path, id: &str) -> io::Result<(SpoolFile, File)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("{PREFIX}{}-{id}{SUFFIX}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok((SpoolFile { path }, file))
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove spool file");
            }
        }
    }
}

/// Free bytes for an unprivileged user on the filesystem of `dir`.
///
/// # Errors
/// When the filesystem cannot be queried.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(dir).map_err(io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Creates `dir` if needed and checks it has room for a snapshot of `db_size` bytes (plus
/// 5 % and 16 MiB of headroom).
///
/// # Errors
/// A message saying how much is free, how much is needed and what to do.
pub fn ensure_space(dir: &Path, db_size: u64) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| {
        format!(
            "cannot create backup.spool_dir {}: {e}; check the path and that this user may write there",
            dir.display()
        )
    })?;
    let needed = db_size + db_size / 20 + (16 << 20);
    let free = free_space(dir)
        .map_err(|e| format!("cannot check the free space of {}: {e}", dir.display()))?;
    if free < needed {
        return Err(format!(
            "backup.spool_dir {} has {} free, but the snapshot needs about {} (the etcd database is {}); free some space, point backup.spool_dir at a larger filesystem, or defragment etcd",
            dir.display(),
            crate::units::human_bytes(free),
            crate::units::human_bytes(needed),
            crate::units::human_bytes(db_size)
        ));
    }
    Ok(())
}

/// Removes spool files left by processes that no longer run. Returns how many were removed.
pub fn clean_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .filter(|_| name.ends_with(SUFFIX))
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if pid == std::process::id() {
            continue;
        }
        match std::fs::remove_file(e.path()) {
            Ok(()) => {
                tracing::info!(path = %e.path().display(), "removed stale spool file");
                removed += 1;
            }
            Err(err) => {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove stale spool file");
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _f) = SpoolFile::create(dir.path(), "id1").unwrap();
        let mode = std::fs::metadata(s.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let p = s.path().to_path_buf();
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn stale_files_of_dead_processes_are_removed_only() {
        let dir = tempfile::tempdir().unwrap();
        // pid 4194304 is above the kernel's maximum pid, so it is never alive.
        let dead = dir.path().join("etcd-backup-4194304-x.spool");
        std::fs::write(&dead, b"x").unwrap();
        let live = dir.path().join("etcd-backup-1-x.spool"); // pid 1 always exists
        std::fs::write(&live, b"x").unwrap();
        let (mine, _f) = SpoolFile::create(dir.path(), "y").unwrap();
        let other = dir.path().join("keep-me.txt");
        std::fs::write(&other, b"x").unwrap();
        assert_eq!(clean_stale(dir.path()), 1);
        assert!(!dead.exists());
        assert!(live.exists() && other.exists() && mine.path().exists());
    }
}
