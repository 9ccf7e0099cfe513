//! Point-in-time restore: the newest snapshot at or before the target, its verified
//! segment chain, replayed into a throwaway etcd on a unix socket one transaction per
//! original revision, then a verified snapshot file of the result.
//!
//! Guarantees: the restored revision numbers equal the original ones (checked after every
//! transaction); every segment's stored sha256, hash link, decoded sha256 and counts are
//! checked before its events count; the output is a snapshot etcd wrote itself (sha256
//! trailer included) and passes the bbolt verifier at the target revision.
//!
//! Leases: keys are replayed **without** their lease (the lease may not exist in the base
//! snapshot), and the deletes that lease expiries caused in the source cluster are in the
//! watch and replayed as deletes. The base snapshot's own leases are kept alive during the
//! replay, so the throwaway etcd never expires one on its own (that would add revisions).

use super::chain::{self, Plan, Stop, Target};
use super::segment::{RevisionGroup, SegmentReader};
use super::writer::load_chain;
use crate::codec::digest::Sha256;
use crate::config::Config;
use crate::etcd::watch::{ReplayOp, Replayer};
use crate::restore::etcdutl::{self, RestoreArgs};
use crate::store::{BackupStore, Listing};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use std::io::{Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

/// What a point-in-time restore did.
#[derive(Debug, Clone)]
pub struct PitrReport {
    /// The base snapshot.
    pub base: String,
    /// Its revision.
    pub base_revision: i64,
    /// Segments read.
    pub segments: usize,
    /// Revisions replayed.
    pub replayed: u64,
    /// The restored revision.
    pub revision: i64,
    /// When the last replayed revision was observed (none when only the snapshot was used).
    pub observed_at: Option<DateTime<Utc>>,
    /// Live keys in the restored snapshot.
    pub live_keys: u64,
    /// Bytes written.
    pub size: u64,
    /// How long it took.
    pub duration: Duration,
}

/// Parses a `--to-time` value.
///
/// # Errors
/// When it is not RFC 3339.
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            format!("{s:?} is not an RFC 3339 time ({e}); write e.g. 2026-12-01T10:15:00Z")
        })
}

/// Plans the restore of `target` from the chains of every committed snapshot of cluster
/// `cluster_id` in `listing`.
///
/// # Errors
/// When a chain cannot be read or nothing reaches the target.
pub async fn plan(
    store: &BackupStore,
    listing: &Listing,
    cluster_id: &str,
    target: Target,
) -> Result<Plan, String> {
    let now = Utc::now();
    let mut reports = Vec::new();
    for m in listing
        .backups
        .iter()
        .filter(|m| m.cluster_id == cluster_id && !m.is_future(now))
    {
        reports.push(load_chain(store, m).await?);
    }
    chain::plan(&reports, target).map_err(|e| e.to_string())
}

/// Removes the scratch directory (or file) when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::fs::remove_dir_all(&self.0).is_err() {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

use crate::restore::etcdutl::{CLIENT_SOCKET, PEER_SOCKET};

/// Restores `target` into the new snapshot file `output`.
///
/// # Errors
/// A message saying which step failed and what to do.
pub async fn restore_to(
    cfg: &Config,
    store: &BackupStore,
    cluster_id: &str,
    target: Target,
    output: &Path,
    identity: Option<&Path>,
) -> Result<PitrReport, String> {
    let listing = store.list().await.map_err(|e| e.to_string())?;
    let plan = plan(store, &listing, cluster_id, target).await?;
    restore_plan(cfg, store, &listing, &plan, output, identity).await
}

/// Carries out `plan` (made from `listing`) into the new snapshot file `output`.
///
/// # Errors
/// A message saying which step failed and what to do.
pub async fn restore_plan(
    cfg: &Config,
    store: &BackupStore,
    listing: &Listing,
    plan: &Plan,
    output: &Path,
    identity: Option<&Path>,
) -> Result<PitrReport, String> {
    let started = Instant::now();
    if output.exists() {
        return Err(format!(
            "{} already exists; restore never overwrites a file: choose another --output",
            output.display()
        ));
    }
    let identities =
        crate::codec::crypt::identities_for(cfg.encryption.identity_file.as_deref(), identity)?
            .map(Arc::new);
    let base = listing
        .backups
        .iter()
        .find(|m| m.id == plan.base.id)
        .ok_or_else(|| format!("backup {} disappeared from the store", plan.base.id))?
        .clone();
    let tools = cfg.drill.etcd_dir.as_deref();
    let (Some(etcdutl_bin), Some(etcd_bin)) = (
        etcdutl::find(tools, "etcdutl"),
        etcdutl::find(tools, "etcd"),
    ) else {
        return Err("a point-in-time restore replays events into a throwaway etcd: etcd and etcdutl were not found (put them on PATH or set [drill] etcd_dir)".into());
    };

    let dir = scratch_dir(&cfg.backup.spool_dir)?;
    let _scratch = Scratch(dir.clone());
    let base_file = dir.join("base.db");
    crate::restore::fetch_to_file(store, &base, &base_file, None, identities.as_deref())
        .await
        .map_err(|e| e.to_string())?;

    // The throwaway etcd: restored without a revision bump, so revisions stay the
    // original ones; unix sockets only.
    let data = dir.join("data");
    let peer = format!("unix://{PEER_SOCKET}");
    let initial_cluster = etcdutl::throwaway_initial_cluster("pitr");
    let token = etcdutl::cluster_token(&base.id);
    etcdutl::run(
        &etcdutl_bin,
        &RestoreArgs {
            snapshot: &base_file,
            data_dir: &data,
            name: "pitr",
            peer_url: &peer,
            initial_cluster: &initial_cluster,
            cluster_token: &token,
            bump: None,
        },
    )
    .await?;
    let _ = std::fs::remove_file(&base_file);
    // Large transactions replay as one request each.
    let (mut child, log) = etcdutl::start_throwaway_etcd(
        &etcd_bin,
        &dir,
        &data,
        "pitr",
        &token,
        &[
            "--max-request-bytes",
            "67108864",
            "--max-txn-ops",
            "1000000",
        ],
    )?;
    let socket = dir.join(CLIENT_SOCKET);
    let r = replay(cfg, store, plan, &socket, output, identities, &mut child).await;
    let _ = child.kill().await;
    let (replayed, revision, observed_at, size, live_keys) = r.map_err(|e| {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let last = tail
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("(empty)");
        format!(
            "{e} (the throwaway etcd's log ends: {})",
            last.chars().take(400).collect::<String>()
        )
    })?;
    Ok(PitrReport {
        base: base.id.to_string(),
        base_revision: base.revision,
        segments: plan.segments.len(),
        replayed,
        revision,
        observed_at,
        live_keys,
        size,
        duration: started.elapsed(),
    })
}

/// A private (0700) scratch directory for one point-in-time restore under the spool
/// directory.
fn scratch_dir(spool: &Path) -> Result<std::path::PathBuf, String> {
    std::fs::create_dir_all(spool).map_err(|e| {
        format!(
            "cannot create {}: {e}; check backup.spool_dir",
            spool.display()
        )
    })?;
    let dir = spool.join(format!("pitr-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| {
            format!(
                "cannot create {}: {e}; check backup.spool_dir",
                dir.display()
            )
        })?;
    Ok(dir)
}

async fn connect(
    socket: &Path,
    child: &mut tokio::process::Child,
    timeout: Duration,
) -> Result<Replayer, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("the throwaway etcd exited ({status})"));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the throwaway etcd did not answer within {} ([drill] timeout): {last}",
                humantime::format_duration(timeout)
            ));
        }
        if socket.exists() {
            match Replayer::connect(socket).await {
                Ok(mut r) => match r.revision().await {
                    Ok(_) => return Ok(r),
                    Err(e) => last = e,
                },
                Err(e) => last = e,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps every lease of the base snapshot alive until dropped.
async fn keep_leases_alive(replayer: &mut Replayer) -> Result<tokio::task::JoinHandle<()>, String> {
    let ids = replayer.leases().await?;
    let mut client = replayer.lease_client();
    Ok(tokio::spawn(async move {
        let mut keepers = Vec::new();
        for id in ids {
            if let Ok((k, s)) = client.keep_alive(id).await {
                keepers.push((k, s));
            }
        }
        loop {
            for (k, s) in &mut keepers {
                if k.keep_alive().await.is_ok() {
                    let _ = s.message().await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Downloads segment `m` into `path`, checking its stored size and sha256.
async fn download(
    store: &BackupStore,
    m: &chain::SegmentManifest,
    path: &Path,
) -> Result<(), String> {
    let key = chain::object_key(store.layout(), m);
    let mut stream = store.get_stream(&key).await.map_err(|e| e.to_string())?;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .await
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut hash = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("reading segment {key}: {e}"))?;
        hash.update(&chunk);
        size += chunk.len() as u64;
        file.write_all(&chunk)
            .await
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    file.flush().await.map_err(|e| e.to_string())?;
    let sha = hex::encode(hash.finalize());
    if size != m.stored_size || sha != m.stored_sha256 {
        return Err(format!(
            "segment {key} is damaged: {size} bytes with sha256 {sha}, its manifest says {} bytes with sha256 {}",
            m.stored_size, m.stored_sha256
        ));
    }
    Ok(())
}

/// Downloads segment `m` into the directory `scratch` and reads it through: its stored
/// size and sha256, decryption, decompression, every record, and the decoded summary
/// against the manifest. Returns the number of revisions read. The file is removed after.
///
/// # Errors
/// What is wrong with the segment, or why it could not be read.
pub async fn check_segment(
    store: &BackupStore,
    m: &chain::SegmentManifest,
    scratch: &Path,
    identities: Option<Arc<crate::codec::crypt::Identities>>,
) -> Result<u64, String> {
    let path = scratch.join(format!("{}.seg", m.stem()));
    let _ = std::fs::remove_file(&path);
    let removed = Scratch(path.clone());
    let r = async {
        download(store, m, &path).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let (p, mm) = (path.clone(), m.clone());
        let decoder = tokio::task::spawn_blocking(move || decode_thread(p, mm, identities, tx));
        let mut revisions = 0u64;
        while let Some(g) = rx.recv().await {
            g?;
            revisions += 1;
        }
        decoder.await.map_err(|e| e.to_string())?;
        if revisions != m.revisions {
            return Err(format!(
                "segment {} holds {revisions} revisions, its manifest says {}",
                m.stem(),
                m.revisions
            ));
        }
        Ok(revisions)
    }
    .await;
    drop(removed);
    r
}

/// Decodes a downloaded segment on a blocking thread, sending its groups (bounded queue)
/// and finally its checked summary.
fn decode_thread(
    path: PathBuf,
    m: chain::SegmentManifest,
    identities: Option<Arc<crate::codec::crypt::Identities>>,
    tx: tokio::sync::mpsc::Sender<Result<RevisionGroup, String>>,
) {
    let run = || -> Result<(), String> {
        let file = std::io::BufReader::new(
            std::fs::File::open(&path)
                .map_err(|e| format!("cannot open {}: {e}", path.display()))?,
        );
        let decrypted: Box<dyn Read> = if m.encryption.is_some() {
            let ids = identities.as_ref().ok_or(
                "the segments are encrypted: pass --identity FILE (or set [encryption] identity_file)",
            )?;
            let d =
                age::Decryptor::new_buffered(file).map_err(|e| format!("cannot decrypt: {e}"))?;
            Box::new(
                d.decrypt(ids.as_dyn())
                    .map_err(|e| format!("cannot decrypt the segment: {e}"))?,
            )
        } else {
            Box::new(file)
        };
        let plain: Box<dyn Read> = match m.compression {
            crate::codec::compress::Compression::Zstd => {
                Box::new(zstd::stream::read::Decoder::new(decrypted).map_err(|e| e.to_string())?)
            }
            crate::codec::compress::Compression::Gzip => {
                Box::new(flate2::read::GzDecoder::new(decrypted))
            }
            crate::codec::compress::Compression::None => decrypted,
        };
        let mut r =
            SegmentReader::new(std::io::BufReader::new(plain)).map_err(|e| e.to_string())?;
        if r.after_revision() != m.after_revision {
            return Err(format!(
                "segment {} starts after revision {}, its manifest says {}",
                m.stem(),
                r.after_revision(),
                m.after_revision
            ));
        }
        while let Some(g) = r
            .next_group()
            .map_err(|e| format!("segment {}: {e}", m.stem()))?
        {
            if tx.blocking_send(Ok(g)).is_err() {
                return Ok(()); // the replay stopped early
            }
        }
        let s = r.summary().expect("after the end record");
        if s.last_revision != m.last_revision
            || s.events != m.events
            || hex::encode(s.sha256) != m.sha256
        {
            return Err(format!(
                "segment {} does not match its manifest (last revision {}, {} events, sha256 {})",
                m.stem(),
                s.last_revision,
                s.events,
                hex::encode(s.sha256)
            ));
        }
        Ok(())
    };
    if let Err(e) = run() {
        let _ = tx.blocking_send(Err(e));
    }
}

async fn replay(
    cfg: &Config,
    store: &BackupStore,
    plan: &Plan,
    socket: &Path,
    output: &Path,
    identities: Option<Arc<crate::codec::crypt::Identities>>,
    child: &mut tokio::process::Child,
) -> Result<(u64, i64, Option<DateTime<Utc>>, u64, u64), String> {
    let mut r = connect(socket, child, cfg.drill.timeout).await?;
    let start = r.revision().await?;
    if start != plan.base.revision {
        return Err(format!(
            "the restored snapshot is at revision {start}, its manifest says {}",
            plan.base.revision
        ));
    }
    let _keepalive = AbortOnDrop(keep_leases_alive(&mut r).await?);
    let mut current = start;
    let mut replayed = 0u64;
    let mut observed_at = None;
    let dir = socket.parent().unwrap_or(Path::new("."));
    'segments: for m in &plan.segments {
        let path = dir.join(format!("{}.seg", m.stem()));
        download(store, m, &path).await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let ids = identities.clone();
        let (p, mm) = (path.clone(), m.clone());
        let decoder = tokio::task::spawn_blocking(move || decode_thread(p, mm, ids, tx));
        while let Some(g) = rx.recv().await {
            let g = g?;
            let at = DateTime::from_timestamp_millis(g.observed_at_ms).unwrap_or_default();
            let past = match plan.stop {
                Stop::AtRevision(rev) => g.revision > rev,
                Stop::AtTime(t) => at > t,
            };
            if past {
                drop(rx);
                let _ = decoder.await;
                break 'segments;
            }
            let ops: Vec<ReplayOp> = g
                .events
                .into_iter()
                .map(|e| match e {
                    super::segment::Event::Put { key, value, .. } => ReplayOp::Put(key, value),
                    super::segment::Event::Delete { key, .. } => ReplayOp::Delete(key),
                })
                .collect();
            let got = r.apply(&ops).await?;
            if got != g.revision {
                return Err(format!(
                    "replaying revision {} produced revision {got} in the throwaway etcd: the replay is not faithful (was revision {current} the last one before it?)",
                    g.revision
                ));
            }
            current = got;
            replayed += 1;
            observed_at = Some(at);
        }
        let _ = decoder.await;
        let _ = std::fs::remove_file(&path);
    }
    if let Stop::AtRevision(rev) = plan.stop {
        if current != rev {
            return Err(format!(
                "the chain ends at revision {current} before the target revision {rev}"
            ));
        }
    }
    let final_rev = r.revision().await?;
    if final_rev != current {
        return Err(format!(
            "the throwaway etcd is at revision {final_rev} after the replay, expected {current} (did it expire a lease on its own?)"
        ));
    }
    // The result: a snapshot etcd writes itself, then verified.
    let part = output.with_file_name(format!(
        ".{}.part",
        output
            .file_name()
            .map_or_else(|| "snapshot".into(), |n| n.to_string_lossy())
    ));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&part)
        .await
        .map_err(|e| format!("cannot create {}: {e}", part.display()))?;
    let part_guard = PartGuard(Some(part.clone()));
    let size = r.snapshot_to(&mut file).await?;
    file.sync_all().await.map_err(|e| e.to_string())?;
    drop(file);
    let p = part.clone();
    let report = tokio::task::spawn_blocking(move || {
        crate::verify::verify_file(
            &p,
            &crate::verify::VerifyOptions {
                check_trailer: true,
            },
        )
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("the restored snapshot does not verify: {e}"))?;
    if report.revision != current {
        return Err(format!(
            "the restored snapshot is at revision {}, expected {current}",
            report.revision
        ));
    }
    std::fs::hard_link(&part, output).map_err(|e| {
        format!(
            "cannot create {}: {e}; restore never overwrites a file",
            output.display()
        )
    })?;
    drop(part_guard);
    if let Ok(f) = std::fs::File::open(output) {
        let _ = f.sync_all();
    }
    let _ = std::io::stdout().flush();
    Ok((replayed, current, observed_at, size, report.live_keys))
}

struct PartGuard(Option<PathBuf>);

impl Drop for PartGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The target of `--to-revision` / `--to-time` / `latest`.
///
/// # Errors
/// When `--to-time` is not RFC 3339.
pub fn target(to_revision: Option<i64>, to_time: Option<&str>) -> Result<Target, String> {
    Ok(match (to_revision, to_time) {
        (Some(r), _) => Target::Revision(r),
        (None, Some(t)) => Target::Time(parse_time(t)?),
        (None, None) => Target::Latest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        assert_eq!(target(Some(5), None).unwrap(), Target::Revision(5));
        assert_eq!(target(None, None).unwrap(), Target::Latest);
        let t = target(None, Some("2026-12-01T10:15:00+01:00")).unwrap();
        assert_eq!(t, Target::Time(parse_time("2026-12-01T09:15:00Z").unwrap()));
        assert!(target(None, Some("yesterday"))
            .unwrap_err()
            .contains("RFC 3339"));
    }
}
