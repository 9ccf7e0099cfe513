//! The restore drill: proves the newest backup can be restored, end to end.
//!
//! 1. download the newest committed backup, check its sha256 against the manifest,
//!    decompress, check the raw sha256, run the verifier (all in `restore`);
//! 2. when `etcdutl` and `etcd` are available: `etcdutl snapshot restore` into a temporary
//!    data directory, start a throwaway etcd on free loopback ports, and check that it
//!    serves the manifest's revision and live key count;
//! 3. stop it and remove everything, on every way out.

use crate::config::Config;
use crate::restore;
use crate::store::manifest::Manifest;
use crate::store::BackupStore;
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

fn find_tool(dir: Option<&Path>, name: &str) -> Option<PathBuf> {
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

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
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
    let dir = cfg
        .backup
        .spool_dir
        .join(format!("drill-{}-{}", std::process::id(), m.id));
    std::fs::create_dir_all(&dir).map_err(|e| {
        format!(
            "cannot create {}: {e}; check backup.spool_dir",
            dir.display()
        )
    })?;
    let _guard = TempDir(dir.clone());
    let file = dir.join("snapshot.db");
    restore::fetch_to_file(store, &m, &file, None, identities.as_ref())
        .await
        .map_err(|e| e.to_string())?;

    let tools = cfg.drill.etcd_dir.as_deref();
    let (Some(etcdutl), Some(etcd)) = (find_tool(tools, "etcdutl"), find_tool(tools, "etcd"))
    else {
        let why = "etcdutl and etcd were not found (set [drill] etcd_dir); the backup was downloaded and verified but not restored into etcd".to_string();
        tracing::warn!("{why}");
        return Ok(DrillReport {
            id: m.id.to_string(),
            revision: m.revision,
            served_keys: None,
            not_restored: Some(why),
            duration: started.elapsed(),
        });
    };
    let served = restore_and_check(&etcdutl, &etcd, &file, &dir, &m, cfg.drill.timeout).await?;
    Ok(DrillReport {
        id: m.id.to_string(),
        revision: m.revision,
        served_keys: Some(served),
        not_restored: None,
        duration: started.elapsed(),
    })
}

async fn restore_and_check(
    etcdutl: &Path,
    etcd: &Path,
    file: &Path,
    dir: &Path,
    m: &Manifest,
    timeout: Duration,
) -> Result<u64, String> {
    let data = dir.join("data");
    let (client_port, peer_port) = (free_port()?, free_port()?);
    let peer = format!("http://127.0.0.1:{peer_port}");
    let client = format!("http://127.0.0.1:{client_port}");
    let out = tokio::process::Command::new(etcdutl)
        .args(["snapshot", "restore"])
        .arg(file)
        .arg("--data-dir")
        .arg(&data)
        .args(["--name", "drill", "--initial-cluster"])
        .arg(format!("drill={peer}"))
        .arg("--initial-advertise-peer-urls")
        .arg(&peer)
        .output()
        .await
        .map_err(|e| format!("cannot run {}: {e}", etcdutl.display()))?;
    if !out.status.success() {
        return Err(format!(
            "etcdutl snapshot restore failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mut cmd = tokio::process::Command::new(etcd);
    // etcd reads ETCD_* variables as flags; start it with none.
    for (k, _) in std::env::vars() {
        if k.starts_with("ETCD_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .args(["--name", "drill", "--data-dir"])
        .arg(&data)
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
        .arg("--initial-cluster")
        .arg(format!("drill={peer}"))
        .arg("--listen-metrics-urls")
        .arg(format!("http://127.0.0.1:{}", free_port()?))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", etcd.display()))?;
    let r = tokio::time::timeout(timeout, check(&client, m)).await;
    let _ = child.kill().await;
    match r {
        Ok(r) => r,
        Err(_) => Err(format!(
            "the restored etcd did not serve the backup within {}",
            humantime::format_duration(timeout)
        )),
    }
}

/// Waits for the restored member and compares what it serves with the manifest.
async fn check(endpoint: &str, m: &Manifest) -> Result<u64, String> {
    let mut last_err = String::new();
    for _ in 0..200 {
        match crate::etcd::revision_and_key_count(endpoint).await {
            Ok((revision, count)) => {
                if revision != m.revision {
                    return Err(format!(
                        "the restored etcd is at revision {revision}, the manifest says {}",
                        m.revision
                    ));
                }
                if count != m.verification.live_keys {
                    return Err(format!(
                        "the restored etcd serves {count} keys, the manifest says {}",
                        m.verification.live_keys
                    ));
                }
                return Ok(count);
            }
            Err(e) => last_err = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("the restored etcd did not answer: {last_err}"))
}
