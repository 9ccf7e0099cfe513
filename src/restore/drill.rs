//! The restore drill: proves the newest backup can be restored, end to end, the way an
//! operator would restore it.
//!
//! 1. download the newest committed backup, check its sha256 against the manifest,
//!    decompress, check the raw sha256, run the verifier (all in `restore`);
//! 2. when `etcdutl` and `etcd` are available: `etcdutl snapshot restore` into a temporary
//!    data directory with the same arguments `restore` uses (`--bump-revision
//!    --mark-compacted` when that etcdutl has them), start a throwaway etcd and check that
//!    it serves the manifest's revision (plus the bump) and live key count;
//! 3. stop it and remove everything, on every way out.
//!
//! The throwaway etcd serves every Secret of the cluster without auth, so it listens on unix
//! sockets only (client and peer), inside the drill's own 0700 directory: no TCP listener,
//! nothing another local user or a hostNetwork pod can reach. Its metrics are served on the
//! client socket. Before downloading, the drill checks that `backup.spool_dir` has room for
//! the snapshot and the restored data directory; directories of drills and verifications
//! whose process is gone (a crash) are removed when a drill or verification starts.

use crate::config::Config;
use crate::restore;
use crate::restore::etcdutl::{self, RestoreArgs, DEFAULT_BUMP};
use crate::store::manifest::Manifest;
use crate::store::BackupStore;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What a drill proved.
#[derive(Debug, Clone)]
pub struct DrillReport {
    /// The backup that was drilled.
    pub id: String,
    /// Its revision.
    pub revision: i64,
    /// Live keys the restored etcd served (when it was started).
    pub served_keys: Option<u64>,
    /// The revision the restored etcd served (when it was started).
    pub served_revision: Option<i64>,
    /// The `--bump-revision` it was restored with (`None`: the etcdutl found has no such
    /// flag, or no etcd was started).
    pub bump: Option<u64>,
    /// Why the restore ran without `--bump-revision`, when the etcdutl is too old.
    pub warning: Option<String>,
    /// Why no etcd was started, when it was not.
    pub not_restored: Option<String>,
    /// How long the drill took.
    pub duration: Duration,
}

/// Removes the drill's directory on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Prefixes of the scratch directories under `backup.spool_dir`: `drill-<pid>…` and
/// `verify-<pid>…`.
const SCRATCH_PREFIXES: [&str; 2] = ["drill-", "verify-"];

/// The pid a scratch directory name belongs to, when it is one.
fn scratch_pid(name: &str) -> Option<u32> {
    let rest = SCRATCH_PREFIXES.iter().find_map(|p| name.strip_prefix(p))?;
    rest.split('-').next()?.parse().ok()
}

/// Removes drill and verify directories under `dir` whose process no longer runs (left by a
/// crash or a power loss). Returns how many were removed.
pub fn clean_stale(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(scratch_pid) else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        match std::fs::remove_dir_all(e.path()) {
            Ok(()) => {
                tracing::info!(path = %e.path().display(), "removed a stale drill/verify directory");
                removed += 1;
            }
            Err(err) => {
                tracing::warn!(path = %e.path().display(), error = %err, "cannot remove a stale drill/verify directory");
            }
        }
    }
    removed
}

/// Headroom on top of twice the snapshot's size: etcd preallocates 64 MiB WAL segments, one
/// by etcdutl and possibly another when the member starts.
const SPACE_MARGIN: u64 = 128 << 20;

/// The space a drill of a `size`-byte snapshot needs: the downloaded snapshot, the restored
/// data directory (about as large), and headroom for etcd's WAL and temporary files.
pub fn space_needed(size: u64) -> u64 {
    size.saturating_mul(2).saturating_add(SPACE_MARGIN)
}

/// Checks `free` bytes are enough for a drill of `m`.
///
/// # Errors
/// A message with what is free, what is needed and what to do.
pub fn check_space(dir: &Path, free: u64, m: &Manifest) -> Result<(), String> {
    let needed = space_needed(m.size);
    if free < needed {
        return Err(format!(
            "backup.spool_dir {} has {} free, but a drill of backup {} needs about {} (twice the {} snapshot, for the download and the restored data directory, plus {}); free some space or point backup.spool_dir at a larger filesystem",
            dir.display(),
            crate::units::human_bytes(free),
            m.id,
            crate::units::human_bytes(needed),
            crate::units::human_bytes(m.size),
            crate::units::human_bytes(SPACE_MARGIN)
        ));
    }
    Ok(())
}

fn free_space(dir: &Path) -> Result<u64, String> {
    let st = rustix::fs::statvfs(dir)
        .map_err(|e| format!("cannot check the free space of {}: {e}", dir.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// Runs one drill on the newest backup.
///
/// # Errors
/// A message saying which step failed and why.
pub async fn run(
    cfg: &Config,
    store: &BackupStore,
    identity: Option<&Path>,
) -> Result<DrillReport, String> {
    let started = Instant::now();
    let identities =
        crate::codec::crypt::identities_for(cfg.encryption.identity_file.as_deref(), identity)?;
    let local = crate::etcd::local_cluster_id(&cfg.etcd)
        .await
        .map_err(|e| {
            format!("cannot learn this cluster's id from etcd to pick its newest backup: {e}")
        })?;
    let (_, newest) = store
        .newest(chrono::Utc::now(), Some(&local))
        .await
        .map_err(|e| e.to_string())?;
    let m = newest.ok_or("there is no committed backup to drill")?;
    let spool = &cfg.backup.spool_dir;
    std::fs::create_dir_all(spool).map_err(|e| {
        format!(
            "cannot create {}: {e}; check backup.spool_dir",
            spool.display()
        )
    })?;
    clean_stale(spool);
    check_space(spool, free_space(spool)?, &m)?;
    // Short: the unix sockets live inside it, and a socket path has at most 107 bytes.
    let dir = spool.join(format!("drill-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            format!(
                "cannot create {}: {e}; check backup.spool_dir (a drill of this process may be running)",
                dir.display()
            )
        })?;
    let _guard = TempDir(dir.clone());
    let socket = dir.join(CLIENT_SOCKET);
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(format!(
            "the drill's socket path {} is longer than a unix socket path may be ({MAX_SOCKET_PATH} bytes); set backup.spool_dir to a shorter path",
            socket.display()
        ));
    }
    let file = dir.join("snapshot.db");
    restore::fetch_to_file(store, &m, &file, None, identities.as_ref())
        .await
        .map_err(|e| e.to_string())?;

    let tools = cfg.drill.etcd_dir.as_deref();
    let (Some(etcdutl), Some(etcd)) = (
        etcdutl::find(tools, "etcdutl"),
        etcdutl::find(tools, "etcd"),
    ) else {
        let why = "etcdutl and etcd were not found (set [drill] etcd_dir); the backup was downloaded and verified but not restored into etcd".to_string();
        tracing::warn!("{why}");
        return Ok(DrillReport {
            id: m.id.to_string(),
            revision: m.revision,
            served_keys: None,
            served_revision: None,
            bump: None,
            warning: None,
            not_restored: Some(why),
            duration: started.elapsed(),
        });
    };
    let tool = etcdutl::probe(&etcdutl).await?;
    let warning = (!tool.supports_bump).then(|| tool.upgrade_warning());
    if let Some(w) = &warning {
        tracing::warn!("restore drill: {w}");
    }
    let bump = tool.supports_bump.then_some(DEFAULT_BUMP);
    let (served_revision, served) =
        restore_and_check(&etcdutl, &etcd, &file, &dir, &m, bump, cfg.drill.timeout).await?;
    Ok(DrillReport {
        id: m.id.to_string(),
        revision: m.revision,
        served_keys: Some(served),
        served_revision: Some(served_revision),
        bump,
        warning,
        not_restored: None,
        duration: started.elapsed(),
    })
}

/// The drill's socket URLs: etcd wants `host:port` in a unix URL and makes a socket file of
/// that name in its working directory (the drill's directory).
use etcdutl::{CLIENT_SOCKET, PEER_SOCKET};
/// The longest path `connect(2)` takes for a unix socket (`sun_path` is 108 bytes).
const MAX_SOCKET_PATH: usize = 107;

#[allow(clippy::too_many_arguments)]
async fn restore_and_check(
    etcdutl: &Path,
    etcd: &Path,
    file: &Path,
    dir: &Path,
    m: &Manifest,
    bump: Option<u64>,
    timeout: Duration,
) -> Result<(i64, u64), String> {
    let data = dir.join("data");
    let peer = format!("unix://{PEER_SOCKET}");
    let initial_cluster = etcdutl::throwaway_initial_cluster("drill");
    let token = etcdutl::cluster_token(&m.id);
    etcdutl::run(
        etcdutl,
        &RestoreArgs {
            snapshot: file,
            data_dir: &data,
            name: "drill",
            peer_url: &peer,
            initial_cluster: &initial_cluster,
            cluster_token: &token,
            bump,
        },
    )
    .await?;
    let (mut child, log) = etcdutl::start_throwaway_etcd(etcd, dir, &data, "drill", &token, &[])?;
    let endpoint = format!("unix://{}", dir.join(CLIENT_SOCKET).display());
    let expected = m.revision.saturating_add_unsigned(bump.unwrap_or(0));
    let r = check(&endpoint, m, expected, &mut child, timeout).await;
    let _ = child.kill().await;
    r.map_err(|e| match e {
        CheckError::Mismatch(e) => e,
        CheckError::Exited(status) => format!(
            "the restored etcd exited ({status}) before serving the backup: {}",
            last_log_line(&log)
        ),
        CheckError::Timeout(last) => format!(
            "the restored etcd did not serve the backup within {} ([drill] timeout): {last}; its log ends: {}",
            humantime::format_duration(timeout),
            last_log_line(&log)
        ),
    })
}

/// The most telling line of etcd's log: the last fatal or error line, else the last line.
fn last_log_line(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let pick = lines
        .iter()
        .rev()
        .find(|l| l.contains("\"level\":\"fatal\"") || l.contains("\"level\":\"error\""))
        .or(lines.last())
        .map_or("(empty)", |l| l.trim());
    let mut out: String = pick.chars().take(600).collect();
    if out.len() < pick.len() {
        out.push('…');
    }
    out
}

enum CheckError {
    /// It served something else than the manifest says.
    Mismatch(String),
    /// It exited.
    Exited(std::process::ExitStatus),
    /// It did not answer in time (the last error).
    Timeout(String),
}

/// Waits for the restored member and compares what it serves with the manifest: revision
/// `expected` (the backup's, plus the bump) and the live key count.
async fn check(
    endpoint: &str,
    m: &Manifest,
    expected: i64,
    child: &mut tokio::process::Child,
    timeout: Duration,
) -> Result<(i64, u64), CheckError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last_err = "no answer yet".to_string();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(CheckError::Exited(status));
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return Err(CheckError::Timeout(last_err));
        }
        let attempt = tokio::time::timeout(
            left.min(Duration::from_secs(10)),
            crate::etcd::revision_and_key_count(endpoint),
        )
        .await
        .unwrap_or_else(|_| Err("a request timed out".to_string()));
        match attempt {
            Ok((revision, count)) => {
                if revision != expected {
                    return Err(CheckError::Mismatch(format!(
                        "the restored etcd is at revision {revision}, expected {expected} (the manifest says {}{})",
                        m.revision,
                        if expected == m.revision { String::new() } else { format!(", plus the bump of {}", expected - m.revision) }
                    )));
                }
                if count != m.verification.live_keys {
                    return Err(CheckError::Mismatch(format!(
                        "the restored etcd serves {count} keys, the manifest says {}",
                        m.verification.live_keys
                    )));
                }
                return Ok((revision, count));
            }
            Err(e) => last_err = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_scratch_directories_of_dead_processes_are_removed_only() {
        let dir = tempfile::tempdir().unwrap();
        // pid 4194304 is above the kernel's maximum pid, so it is never alive.
        let dead = [
            "drill-4194304",
            "drill-4194304-20260102T030405Z-0a1b2c",
            "verify-4194304",
        ];
        for d in dead {
            std::fs::create_dir_all(dir.path().join(d).join("data/member")).unwrap();
        }
        let keep = [
            "drill-1".to_string(),
            "verify-1".to_string(),
            format!("drill-{}", std::process::id()),
            "drills".to_string(),
            "etcd-backup-4194304-x.spool".to_string(),
        ];
        for k in &keep {
            std::fs::create_dir_all(dir.path().join(k)).unwrap();
        }
        std::fs::write(dir.path().join("verify-4194305"), b"a file, not ours").unwrap();
        assert_eq!(clean_stale(dir.path()), 3);
        for d in dead {
            assert!(!dir.path().join(d).exists(), "{d}");
        }
        for k in &keep {
            assert!(dir.path().join(k).exists(), "{k}");
        }
        assert!(dir.path().join("verify-4194305").exists());
        assert_eq!(clean_stale(Path::new("/nonexistent/etcd-backup")), 0);
    }

    #[test]
    fn the_log_line_shown_is_the_last_error() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("etcd.log");
        assert_eq!(last_log_line(&log), "(empty)");
        std::fs::write(
            &log,
            "{\"level\":\"info\",\"msg\":\"a\"}\n{\"level\":\"fatal\",\"msg\":\"boom\"}\n{\"level\":\"info\",\"msg\":\"b\"}\n\n",
        )
        .unwrap();
        assert_eq!(
            last_log_line(&log),
            "{\"level\":\"fatal\",\"msg\":\"boom\"}"
        );
        std::fs::write(&log, "plain\nlast\n").unwrap();
        assert_eq!(last_log_line(&log), "last");
        std::fs::write(&log, "x".repeat(2000)).unwrap();
        assert_eq!(last_log_line(&log).chars().count(), 601);
    }

    #[test]
    fn the_space_check_wants_twice_the_snapshot_plus_a_margin() {
        let mut m = crate::store::manifest::sample("20260102T030405Z-0a1b2c", chrono::Utc::now());
        m.size = 1 << 30;
        let needed = (2u64 << 30) + (128 << 20);
        assert_eq!(space_needed(m.size), needed);
        assert!(check_space(Path::new("/s"), needed, &m).is_ok());
        let e = check_space(Path::new("/s"), needed - 1, &m).unwrap_err();
        assert!(
            e.contains("backup.spool_dir /s has") && e.contains("free some space"),
            "{e}"
        );
        assert!(e.contains("20260102T030405Z-0a1b2c"), "{e}");
        assert_eq!(space_needed(u64::MAX), u64::MAX);
    }
}
