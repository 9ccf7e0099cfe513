//! Running `etcdutl snapshot restore` the way Kubernetes survives it: shared by
//! `restore --data-dir`, the printed runbook and the restore drill, so the drill tests what
//! an operator runs.
//!
//! After a restore etcd's revision goes back in time, and Kubernetes' watch caches and
//! informers hold resource versions newer than anything the restored cluster serves.
//! `--bump-revision N --mark-compacted` (etcdutl ≥ 3.5.10 and 3.6) moves every later
//! revision past anything a client saw and makes watches from before the restore fail with
//! "compacted", so clients re-list instead of silently missing events.

use crate::store::manifest::Manifest;
use chrono::{DateTime, Utc};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The bump etcd's Kubernetes recovery guide suggests. Revisions are 64-bit, so a billion
/// costs nothing, and it is far more than any cluster writes between its newest backup and
/// a restore (1,000 writes a second for 11 days).
pub const DEFAULT_BUMP: u64 = 1_000_000_000;

/// The etcdutl release that first has `--bump-revision` and `--mark-compacted`.
pub const BUMP_SINCE: &str = "3.5.10 or later (or 3.6)";

/// Whether `etcdutl snapshot restore --help` lists both flags.
pub fn help_supports_bump(help: &str) -> bool {
    help.contains("--bump-revision") && help.contains("--mark-compacted")
}

/// An etcdutl binary and what it supports.
#[derive(Debug, Clone)]
pub struct Etcdutl {
    /// The binary.
    pub path: PathBuf,
    /// Whether it has `--bump-revision` and `--mark-compacted`.
    pub supports_bump: bool,
    /// Its version line (`etcdutl version`), when it printed one.
    pub version: Option<String>,
}

impl Etcdutl {
    /// The warning for an etcdutl without the flags: what it is and what to upgrade to.
    pub fn upgrade_warning(&self) -> String {
        format!(
            "{} ({}) has no --bump-revision/--mark-compacted: a cluster restored with it starts at the backup's revision, older than what Kubernetes' watch caches and controllers have seen, and they can miss changes or act on stale state; upgrade etcdutl to {BUMP_SINCE} (the restore commands below show the flags commented out)",
            self.path.display(),
            self.version.as_deref().unwrap_or("version unknown")
        )
    }
}

/// Looks for `name` in `dir`, or on `PATH` when `dir` is `None`.
pub fn find(dir: Option<&Path>, name: &str) -> Option<PathBuf> {
    if let Some(d) = dir {
        let p = d.join(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Asks `path` which flags it has (`etcdutl snapshot restore --help`) and its version.
///
/// # Errors
/// When it cannot be run.
pub async fn probe(path: &Path) -> Result<Etcdutl, String> {
    let help = tokio::process::Command::new(path)
        .args(["snapshot", "restore", "--help"])
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&help.stdout),
        String::from_utf8_lossy(&help.stderr)
    );
    let version = tokio::process::Command::new(path)
        .arg("version")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim().to_string())
        })
        .filter(|l| !l.is_empty());
    Ok(Etcdutl {
        path: path.to_path_buf(),
        supports_bump: help_supports_bump(&text),
        version,
    })
}

/// One member's `etcdutl snapshot restore`.
#[derive(Debug, Clone)]
pub struct RestoreArgs<'a> {
    /// The snapshot file.
    pub snapshot: &'a Path,
    /// The new data directory (must not exist).
    pub data_dir: &'a Path,
    /// The member's name.
    pub name: &'a str,
    /// The member's peer URL.
    pub peer_url: &'a str,
    /// `NAME=PEER_URL,...` of every member.
    pub initial_cluster: &'a str,
    /// The new cluster's token (the same on every member).
    pub cluster_token: &'a str,
    /// `--bump-revision N --mark-compacted` when `Some(N)`.
    pub bump: Option<u64>,
}

impl RestoreArgs<'_> {
    /// The arguments after `etcdutl`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec!["snapshot".into(), "restore".into()];
        a.push(self.snapshot.into());
        a.push("--data-dir".into());
        a.push(self.data_dir.into());
        for (k, v) in [
            ("--name", self.name),
            ("--initial-cluster", self.initial_cluster),
            ("--initial-cluster-token", self.cluster_token),
            ("--initial-advertise-peer-urls", self.peer_url),
        ] {
            a.push(k.into());
            a.push(v.into());
        }
        if let Some(n) = self.bump {
            a.push("--bump-revision".into());
            a.push(n.to_string().into());
            a.push("--mark-compacted".into());
        }
        a
    }
}

/// Runs `etcdutl` with `args`.
///
/// # Errors
/// When it cannot be run or fails (with what it printed).
pub async fn run(etcdutl: &Path, args: &RestoreArgs<'_>) -> Result<(), String> {
    let out = tokio::process::Command::new(etcdutl)
        .args(args.to_args())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", etcdutl.display()))?;
    if !out.status.success() {
        return Err(format!(
            "etcdutl snapshot restore failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The cluster token for a restore of backup `id`: the same on every member that restores
/// it, so members restored one by one agree, and different from the old cluster's, so a
/// member that was not restored cannot join the new cluster by mistake.
pub fn cluster_token(id: &crate::store::naming::BackupId) -> String {
    format!("etcd-restore-{id}")
}

/// The revision bump for restoring `restored`, given every committed backup in the store.
///
/// [`DEFAULT_BUMP`], unless the store shows the cluster wrote so fast that the revisions
/// clients may have seen since `restored` could come near it: then ten times that estimate.
/// The estimate is the newest known revision minus the restored one, plus the fastest write
/// rate seen between two backups of one cluster times the time since the newest backup.
pub fn choose_bump(restored: &Manifest, all: &[Manifest], now: DateTime<Utc>) -> u64 {
    let newest = all.iter().max_by_key(|m| m.time);
    let known = all
        .iter()
        .map(|m| m.revision)
        .max()
        .unwrap_or(restored.revision)
        .saturating_sub(restored.revision)
        .max(0);
    let mut by_cluster: Vec<&Manifest> = all.iter().collect();
    by_cluster.sort_by(|a, b| a.cluster_id.cmp(&b.cluster_id).then(a.time.cmp(&b.time)));
    let rate = by_cluster
        .windows(2)
        .filter(|w| w[0].cluster_id == w[1].cluster_id)
        .filter_map(|w| {
            let secs = (w[1].time - w[0].time).num_milliseconds() as f64 / 1000.0;
            let revs = (w[1].revision - w[0].revision) as f64;
            (secs > 0.0 && revs > 0.0).then_some(revs / secs)
        })
        .fold(0.0_f64, f64::max);
    let since = newest.map_or(0.0, |n| {
        ((now - n.time).num_milliseconds().max(0) as f64) / 1000.0
    });
    let estimate = known as f64 + rate * since;
    let wanted = (estimate * 10.0).ceil();
    if wanted > DEFAULT_BUMP as f64 {
        // Capped well below i64::MAX so the bumped revision always fits.
        (wanted.min(1e15)) as u64
    } else {
        DEFAULT_BUMP
    }
}

/// The client socket of a throwaway etcd, relative to its directory.
pub const CLIENT_SOCKET: &str = "client:1";
/// The peer socket of a throwaway etcd, relative to its directory.
pub const PEER_SOCKET: &str = "peer:1";

/// The `--initial-cluster` of a throwaway member called `name`.
pub fn throwaway_initial_cluster(name: &str) -> String {
    format!("{name}=unix://{PEER_SOCKET}")
}

/// Starts a throwaway etcd member `name` on the restored `data` directory, listening on
/// unix sockets inside `dir` only (run in `dir`; nothing on TCP), with no `ETCD_*`
/// variables (etcd reads them as flags). Its log goes to `dir/etcd.log`, returned with
/// the child, which is killed when dropped. `extra` flags are added.
///
/// # Errors
/// When the log file cannot be created or etcd cannot be started.
pub fn start_throwaway_etcd(
    etcd: &Path,
    dir: &Path,
    data: &Path,
    name: &str,
    token: &str,
    extra: &[&str],
) -> Result<(tokio::process::Child, PathBuf), String> {
    let peer = format!("unix://{PEER_SOCKET}");
    let client = format!("unix://{CLIENT_SOCKET}");
    let mut cmd = tokio::process::Command::new(etcd);
    for (k, _) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| k.starts_with("ETCD_")) {
            cmd.env_remove(k);
        }
    }
    let log = dir.join("etcd.log");
    let log_file =
        std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let child = cmd
        .current_dir(dir)
        .args(["--name", name, "--data-dir"])
        .arg(data)
        .args([
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
        ])
        .args([
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
        ])
        .args(["--initial-cluster", &throwaway_initial_cluster(name)])
        .args(["--initial-cluster-token", token])
        .args(extra)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", etcd.display()))?;
    Ok((child, log))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::manifest::sample;
    use chrono::TimeZone;

    const HELP_3_5_1: &str = "Flags:\n      --data-dir string   Path to the output data directory\n      --initial-cluster string   Initial cluster configuration\n      --skip-hash-check   Ignore snapshot integrity hash value\n";
    const HELP_3_5_10: &str = "Flags:\n      --bump-revision uint   How much to increase the latest revision after restore\n      --data-dir string   Path to the output data directory\n      --mark-compacted   Mark the latest revision after restore as the point of scheduled compaction (required if --bump-revision > 0, disallowed otherwise)\n";

    #[test]
    fn the_probe_needs_both_flags() {
        assert!(!help_supports_bump(HELP_3_5_1));
        assert!(help_supports_bump(HELP_3_5_10));
        assert!(!help_supports_bump("--bump-revision uint"));
        assert!(!help_supports_bump(""));
    }

    fn args(bump: Option<u64>) -> Vec<String> {
        RestoreArgs {
            snapshot: Path::new("/s.db"),
            data_dir: Path::new("/var/lib/etcd"),
            name: "cp1",
            peer_url: "https://10.0.0.1:2380",
            initial_cluster: "cp1=https://10.0.0.1:2380",
            cluster_token: "t",
            bump,
        }
        .to_args()
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect()
    }

    #[test]
    fn arguments_carry_the_bump_only_when_asked() {
        let with = args(Some(DEFAULT_BUMP));
        assert_eq!(
            with,
            [
                "snapshot",
                "restore",
                "/s.db",
                "--data-dir",
                "/var/lib/etcd",
                "--name",
                "cp1",
                "--initial-cluster",
                "cp1=https://10.0.0.1:2380",
                "--initial-cluster-token",
                "t",
                "--initial-advertise-peer-urls",
                "https://10.0.0.1:2380",
                "--bump-revision",
                "1000000000",
                "--mark-compacted"
            ]
        );
        let without = args(None);
        assert_eq!(without.len(), with.len() - 3);
        assert!(!without
            .iter()
            .any(|a| a.contains("bump") || a.contains("compacted")));
    }

    fn at(secs: i64, revision: i64, cluster: &str) -> Manifest {
        let t = Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap();
        let mut m = sample(&crate::store::naming::BackupId::new(t).to_string(), t);
        m.revision = revision;
        m.cluster_id = cluster.into();
        m
    }

    #[test]
    fn the_bump_is_a_billion_for_ordinary_clusters() {
        let all = vec![
            at(0, 1_000, "a"),
            at(3600, 50_000, "a"),
            at(7200, 90_000, "a"),
        ];
        let now = Utc.timestamp_opt(1_800_000_000 + 10_800, 0).unwrap();
        assert_eq!(choose_bump(&all[0], &all, now), DEFAULT_BUMP);
        assert_eq!(choose_bump(&all[2], &all, now), DEFAULT_BUMP);
        // One backup, no rate: the default.
        assert_eq!(choose_bump(&all[0], &all[..1], now), DEFAULT_BUMP);
    }

    #[test]
    fn the_bump_grows_with_what_clients_may_have_seen() {
        // 100,000 writes a second, the newest backup a day old, restoring a week-old one.
        let all = vec![at(0, 1, "a"), at(6 * 86_400, 6 * 86_400 * 100_000, "a")];
        let now = Utc.timestamp_opt(1_800_000_000 + 7 * 86_400, 0).unwrap();
        let bump = choose_bump(&all[0], &all, now);
        let seen = 7 * 86_400 * 100_000u64;
        assert!(bump >= seen * 9 && bump > DEFAULT_BUMP, "{bump}");
    }

    #[test]
    fn rates_are_never_mixed_across_clusters() {
        // After a restore the cluster id changes and revisions jump: that is no write rate.
        let all = vec![at(0, 10, "a"), at(60, 5_000_000_000, "b")];
        let now = Utc.timestamp_opt(1_800_000_000 + 120, 0).unwrap();
        let bump = choose_bump(&all[0], &all, now);
        // The known gap still counts (a newer cluster's revision is a lower bound).
        assert_eq!(bump, (5_000_000_000u64 - 10) * 10);
        assert_eq!(choose_bump(&all[1], &all, now), DEFAULT_BUMP);
    }
}
