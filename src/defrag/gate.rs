//! The member gate: a snapshot and a defragmentation of the local member never run at the
//! same time from etcd-backup on this host.
//!
//! A snapshot holds a read transaction for as long as it streams; a defragmentation waits
//! for it while holding the member's write lock, so the member serves nothing until the
//! snapshot ends. The gate is an advisory lock (`flock`) on `SPOOL_DIR.lock` (next to the
//! spool directory, which holds nothing but a cycle's temporary files). Each
//! holder opens the file itself, and `flock` locks belong to the open file, so the gate
//! excludes holders in one process (the daemon's cycle and its defragmentation task) and
//! across processes that use the same spool directory (the daemon and a one-shot
//! `etcd-backup snapshot` or `defrag` with the same configuration file). It cannot see
//! other tools (`etcdctl snapshot save`).

use rustix::fs::{flock, FlockOperation};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often a waiting holder tries again.
const POLL: Duration = Duration::from_millis(100);

/// The gate of the member whose snapshots are spooled in a directory.
#[derive(Debug, Clone)]
pub struct MemberGate {
    path: PathBuf,
}

/// Held while the guard lives.
#[derive(Debug)]
pub struct GateGuard {
    _file: File,
}

impl MemberGate {
    /// The gate of `spool_dir`: the file `SPOOL_DIR.lock` next to it (inside it when it
    /// is the root directory). The file is never removed: removing a lock file that
    /// another process has open would let two holders lock two different files.
    pub fn in_spool_dir(spool_dir: &Path) -> MemberGate {
        let path = match (spool_dir.parent(), spool_dir.file_name()) {
            (Some(parent), Some(name)) => {
                let mut n = name.to_os_string();
                n.push(".lock");
                parent.join(n)
            }
            _ => spool_dir.join("etcd-backup-member.lock"),
        };
        MemberGate { path }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open(&self) -> std::io::Result<File> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // flock needs no write permission: a file created by another user (root running a
        // one-shot command) can still be locked read-only.
        File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&self.path)
            .or_else(|_| File::open(&self.path))
    }

    /// Takes the gate if it is free; `Ok(None)` when another holder has it.
    ///
    /// # Errors
    /// When the lock file cannot be opened.
    pub fn try_lock(&self) -> std::io::Result<Option<GateGuard>> {
        let file = self.open()?;
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(Some(GateGuard { _file: file })),
            Err(e) if e == rustix::io::Errno::WOULDBLOCK => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until the gate is free and takes it; `Ok(None)` when `give_up` resolves first.
    ///
    /// # Errors
    /// When the lock file cannot be opened.
    pub async fn lock_until(
        &self,
        give_up: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<Option<GateGuard>> {
        self.lock_beating(give_up, || {}).await
    }

    async fn lock_beating(
        &self,
        give_up: impl std::future::Future<Output = ()>,
        beat: impl Fn(),
    ) -> std::io::Result<Option<GateGuard>> {
        tokio::pin!(give_up);
        loop {
            if let Some(g) = self.try_lock()? {
                return Ok(Some(g));
            }
            beat();
            tokio::select! {
                () = &mut give_up => return Ok(None),
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// For a snapshot: waits while the member is being defragmented, then holds the gate.
    /// A lock file that cannot be opened does not stop the snapshot (it is logged): a
    /// backup matters more than the exclusion. `beat` is called while waiting (the
    /// daemon's watchdog).
    pub async fn for_snapshot(
        &self,
        cancel: &tokio_util::sync::CancellationToken,
        beat: impl Fn(),
    ) -> Option<GateGuard> {
        match self.try_lock() {
            Ok(Some(g)) => return Some(g),
            Ok(None) => {
                tracing::info!(lock = %self.path.display(), "the local member is being defragmented; the snapshot waits until it is done");
            }
            Err(e) => {
                tracing::warn!(lock = %self.path.display(), error = %e, "cannot open the member lock file; taking the snapshot without excluding a defragmentation");
                return None;
            }
        }
        match self.lock_beating(cancel.cancelled(), beat).await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(lock = %self.path.display(), error = %e, "cannot open the member lock file; taking the snapshot without excluding a defragmentation");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_holder_at_a_time_even_within_one_process() {
        let dir = tempfile::tempdir().unwrap();
        let gate = MemberGate::in_spool_dir(&dir.path().join("spool"));
        assert_eq!(gate.path(), dir.path().join("spool.lock"));
        let first = gate.try_lock().unwrap().expect("a free gate is taken");
        assert!(gate.try_lock().unwrap().is_none(), "a held gate is refused");
        // A waiter gives up when told to, without taking the gate.
        let waited = gate
            .lock_until(tokio::time::sleep(Duration::from_millis(250)))
            .await
            .unwrap();
        assert!(waited.is_none());
        drop(first);
        assert!(
            gate.try_lock().unwrap().is_some(),
            "a released gate is free"
        );
        // A waiter takes it as soon as the holder lets go.
        let held = gate.try_lock().unwrap().unwrap();
        let g2 = gate.clone();
        let waiter = tokio::spawn(async move {
            g2.lock_until(std::future::pending())
                .await
                .unwrap()
                .is_some()
        });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!waiter.is_finished());
        drop(held);
        assert!(waiter.await.unwrap());
    }
}
