//! One backup cycle, as ordered stages:
//!
//! 1. **snapshot**: connect to the one local member, read its status (revision, DB size),
//!    open the snapshot stream and write it to the spool file (trailer check, sha256) as
//!    fast as etcd sends it and the disk takes it. Compression, encryption and the upload
//!    follow the spool file as it grows, so they overlap with the stream on a fast link,
//!    and a slow link never holds etcd's read transaction: the stream ends at disk speed;
//! 2. **verify**: the trailer must match, and the spooled file must pass the bbolt/etcd
//!    verifier, with a revision not lower than the one observed before the snapshot. It
//!    runs as soon as the stream has ended, while the upload finishes from the spool;
//! 3. **upload**: once every byte is uploaded and the snapshot verified, the multipart
//!    upload is completed;
//! 4. **commit**: the manifest is written last. A backup exists only once it is.
//!
//! With an election, the leadership is checked (fencing) before the snapshot, before the
//! upload is completed and before the manifest is written, and losing it at any point
//! aborts the cycle.
//!
//! Every way out before the commit — an error, the cycle timeout, cancellation — aborts the
//! multipart upload and removes the spool file, so a failed cycle leaves nothing behind.

pub mod pace;
pub mod pipeline;
pub mod source;
pub mod spool;

use crate::config::Config;
use crate::error::{CycleError, CycleErrorKind, Stage};
use crate::etcd::election::Term;
use crate::etcd::MemberStatus;
use crate::store::manifest::{
    Encryption, EncryptionMethod, Manifest, Verification, FORMAT_VERSION,
};
use crate::store::naming::BackupId;
use crate::store::{BackupStore, Upload};
use crate::systemd::Heartbeat;
use crate::verify::{self, VerifyOptions, VerifyReport};
use chrono::{DateTime, Utc};
use pipeline::{PipelineError, PipelineReport, SpoolProgress};
use source::SnapshotSource;
use spool::SpoolFile;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Durations of a successful cycle's stages.
#[derive(Debug, Clone, Default)]
pub struct StageTimes {
    /// How long etcd's snapshot stream was held: from opening it to its last byte (etcd
    /// keeps a read transaction open for this long).
    pub stream: Duration,
    /// Connect, status and the whole stream, until it is on disk and its trailer checked
    /// (compression and upload overlap with it).
    pub snapshot: Duration,
    /// The verifier pass over the spooled file (it overlaps with the upload's end).
    pub verify: Duration,
    /// From the end of the stream until the upload is completed: what compression and the
    /// link had left to do, and the last part.
    pub upload: Duration,
    /// Writing the manifest.
    pub commit: Duration,
}

/// A committed backup.
#[derive(Debug, Clone)]
pub struct CycleReport {
    /// The manifest that was written.
    pub manifest: Manifest,
    /// How long each stage took.
    pub times: StageTimes,
}

/// Everything a cycle needs.
pub struct CycleInput<'a> {
    /// The configuration in force for this cycle.
    pub config: &'a Config,
    /// Where to store the backup.
    pub store: &'a BackupStore,
    /// The member to snapshot (the first of `etcd.endpoints` unless overridden).
    pub source: &'a dyn SnapshotSource,
    /// Cancelled on shutdown.
    pub cancel: &'a CancellationToken,
    /// Beaten while the cycle makes progress (feeds the systemd watchdog).
    pub heartbeat: Option<&'a Heartbeat>,
    /// Shows the snapshot's progress to a person (one-shot runs).
    pub progress: Option<&'a crate::progress::Progress>,
    /// The leadership term the daemon runs this cycle under: checked before the snapshot,
    /// before the upload is completed and before the manifest is written; losing it aborts
    /// the cycle. `None`: no election (one-shot runs, `[election] enabled = false`).
    pub term: Option<&'a Term>,
    /// The scheduled time the cycle runs for (recorded in the manifest).
    pub slot: Option<DateTime<Utc>>,
}

/// Fails with a fenced error unless this node still leads (always passes without a term).
async fn fence(term: Option<&Term>, stage: Stage, before: &str) -> Result<(), CycleError> {
    match term {
        None => Ok(()),
        Some(t) => t
            .check(before)
            .await
            .map_err(|e| CycleError::fenced(stage, e)),
    }
}

/// Resolves when the term ends; never without a term.
async fn term_lost(term: Option<&Term>) {
    match term {
        Some(t) => t.lost().cancelled().await,
        None => std::future::pending().await,
    }
}

/// Runs one cycle.
///
/// # Errors
/// [`CycleError`] naming the stage that failed; nothing is left in the store or the spool.
pub async fn run(input: CycleInput<'_>) -> Result<CycleReport, CycleError> {
    let mut upload: Option<Upload> = None;
    let started = tokio::time::Instant::now();
    // The limit grows with the database once its size is known (see backup.timeout_per_gib).
    let db_size = AtomicU64::new(0);
    let mut timeout = input.config.backup.timeout;
    let deadline = tokio::time::sleep(timeout);
    tokio::pin!(deadline);
    let mut beat = tokio::time::interval(Duration::from_secs(1));
    // The work future borrows `upload`; it is dropped at the end of this block so the
    // upload can be aborted below.
    let mut result = {
        let work = stages(&input, &mut upload, &db_size);
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => break r,
                () = input.cancel.cancelled() => break Err(CycleError::of_kind(CycleErrorKind::Cancelled, Stage::Snapshot, "cancelled: the daemon is shutting down")),
                () = term_lost(input.term) => break Err(CycleError::fenced(
                    Stage::Snapshot,
                    "this node lost the leadership during the cycle; the cycle is aborted and another node takes over the backups",
                )),
                () = &mut deadline => break Err(CycleError::of_kind(
                    CycleErrorKind::TimedOut,
                    Stage::Snapshot,
                    format!(
                        "the cycle did not finish within {} (backup.timeout plus backup.timeout_per_gib for a {} database); raise them for slow links",
                        humantime::format_duration(Duration::from_secs(timeout.as_secs())),
                        crate::units::human_bytes(db_size.load(Ordering::Relaxed)),
                    ),
                )),
                _ = beat.tick() => {
                    if let Some(h) = input.heartbeat {
                        h.beat();
                    }
                    let scaled = input.config.backup.cycle_timeout(db_size.load(Ordering::Relaxed));
                    if scaled != timeout {
                        timeout = scaled;
                        deadline.as_mut().reset(started + timeout);
                    }
                }
            }
        }
    };
    // A cycle that fails while its term is gone failed because of what ended the term: a
    // pause or a partition past the lease also starves the snapshot stream, and whichever
    // notices first must not decide how the failure is reported.
    if let (Err(e), Some(t)) = (&mut result, input.term) {
        if !e.is_fenced() && t.has_ended() {
            *e = CycleError::fenced(
                e.stage,
                format!(
                    "this node lost the leadership during the cycle (paused or cut off from etcd past its lease); the cycle is aborted and another node takes over the backups. It had failed with: {}",
                    e.message
                ),
            );
        }
    }
    if let Some(up) = upload.take() {
        let key = up.key().to_string();
        match up.abort().await {
            Ok(()) => tracing::info!(key = %key, "aborted the incomplete upload"),
            Err(e) => {
                tracing::warn!(error = %e, key = %key, "could not abort the incomplete upload; the daemon retries after its next cycle, and prune aborts stale ones");
                if let Err(ce) = &mut result {
                    ce.unaborted_upload = Some(key);
                }
            }
        }
    }
    result
}

/// The stages, top to bottom. `upload_slot` holds the multipart upload while it is open, so
/// that [`run`] can abort it on every way out.
async fn stages(
    input: &CycleInput<'_>,
    upload_slot: &mut Option<Upload>,
    db_size: &AtomicU64,
) -> Result<CycleReport, CycleError> {
    let snap = snapshot(input, upload_slot, db_size).await?;
    upload(input, upload_slot, &snap.data_key).await?;
    let upload_time = snap.spooled_at.elapsed();
    let t = Instant::now();
    let manifest = commit(input, &snap).await?;
    let commit_time = t.elapsed();
    tracing::info!(
        stage = "commit",
        duration_ms = commit_time.as_millis() as u64,
        id = %manifest.id,
        stream_ms = snap.stream_time.as_millis() as u64,
        cycle_ms = snap.started.elapsed().as_millis() as u64,
        "manifest written; backup committed"
    );
    Ok(CycleReport {
        manifest,
        times: StageTimes {
            stream: snap.stream_time,
            snapshot: snap.time,
            verify: snap.verify_time,
            upload: upload_time,
            commit: commit_time,
        },
    })
}

/// What the snapshot stage hands to the later ones.
struct Snapshot {
    id: BackupId,
    started_at: DateTime<Utc>,
    /// The member's status just before the snapshot.
    status: MemberStatus,
    /// The spooled raw snapshot, held until the cycle ends and removed then.
    _spool: SpoolFile,
    /// Key of the (still incomplete) data object.
    data_key: String,
    piped: PipelineReport,
    /// The verifier's report.
    report: VerifyReport,
    /// When the cycle started.
    started: Instant,
    /// Connect, status and stream, until the stream was on disk.
    time: Duration,
    /// How long etcd's stream was held.
    stream_time: Duration,
    /// When the stream was on disk (the upload went on from there).
    spooled_at: Instant,
    verify_time: Duration,
}

fn snap_err(e: &dyn std::fmt::Display) -> CycleError {
    CycleError::new(Stage::Snapshot, e)
}

/// Stage 1: the member's status, then its snapshot stream through the pipeline (spool copy,
/// trailer check, sha256; compression and encryption following the spool) into a new
/// multipart upload. Stage 2, the verifier, runs as soon as the stream is on disk, while
/// the upload goes on; this returns once both are done.
async fn snapshot(
    input: &CycleInput<'_>,
    upload_slot: &mut Option<Upload>,
    db_size: &AtomicU64,
) -> Result<Snapshot, CycleError> {
    let cfg = input.config;
    let started_at = Utc::now();
    let t0 = Instant::now();
    let id = BackupId::new(started_at);
    let source = input.source;

    let status = source.status().await.map_err(|e| snap_err(&e))?;
    tracing::info!(
        endpoint = %source.endpoint(),
        member = %status.member_name,
        version = %status.version,
        revision = status.revision,
        db_size = status.db_size,
        "connected to etcd"
    );
    let size = u64::try_from(status.db_size).unwrap_or(0);
    db_size.store(size, Ordering::Relaxed);
    spool::ensure_space(&cfg.backup.spool_dir, size).map_err(|e| snap_err(&e))?;
    fence(input.term, Stage::Snapshot, "before the snapshot").await?;
    let (spool, spool_file) = SpoolFile::create(&cfg.backup.spool_dir, &id.to_string())
        .map_err(|e| {
            snap_err(&format!(
                "cannot create a spool file in {}: {e}; check backup.spool_dir exists and is writable",
                cfg.backup.spool_dir.display()
            ))
        })?;

    let recipients = cfg.encryption.recipients.keys().to_vec();
    let suffix = format!(
        "{}{}",
        cfg.backup.compression.suffix(),
        if recipients.is_empty() {
            ""
        } else {
            crate::codec::crypt::SUFFIX
        }
    );
    let data_key = input.store.layout().data_key(&id, &suffix);
    let upload = upload_slot.insert(
        input
            .store
            .begin_upload(&data_key)
            .await
            .map_err(|e| CycleError::new(Stage::Upload, e))?,
    );
    if let Some(p) = input.progress {
        p.set_total(size + pipeline::TRAILER_LEN as u64);
    }
    let streamed = stream(
        input,
        spool_file,
        spool.path(),
        recipients,
        upload,
        status.revision,
        t0,
    )
    .await?;
    tracing::info!(
        stage = "upload",
        duration_ms = streamed.spooled_at.elapsed().as_millis() as u64,
        stored_size = streamed.piped.stored_size,
        "every part uploaded"
    );
    Ok(Snapshot {
        id,
        started_at,
        status,
        _spool: spool,
        data_key,
        piped: streamed.piped,
        report: streamed.report,
        started: t0,
        time: streamed.spooled_at - t0,
        stream_time: streamed.stream_time,
        spooled_at: streamed.spooled_at,
        verify_time: streamed.verify_time,
    })
}

/// What [`stream`] hands back.
struct Streamed {
    piped: PipelineReport,
    report: VerifyReport,
    stream_time: Duration,
    spooled_at: Instant,
    verify_time: Duration,
}

/// Stops the pipeline's threads when the cycle leaves [`stream`] by any way.
struct StopOnDrop(std::sync::Arc<SpoolProgress>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Moves the snapshot stream into the spool file, and from there (following it as it grows)
/// through compression and encryption into the upload; once the stream is on disk, runs the
/// verifier while the upload goes on. The first error ends it all: the others only say that
/// their input or output went away. The error kinds rank by cause: a broken stream or a
/// failed upload stop the pipeline, whose own error is then a consequence.
#[allow(clippy::too_many_arguments)]
async fn stream(
    input: &CycleInput<'_>,
    spool_file: std::fs::File,
    spool_path: &std::path::Path,
    recipients: Vec<age::x25519::Recipient>,
    upload: &mut Upload,
    revision_before: i64,
    cycle_started: Instant,
) -> Result<Streamed, CycleError> {
    let opened = Instant::now();
    let mut chunks = input.source.snapshot().await.map_err(|e| snap_err(&e))?;
    let progress = input.progress;
    let (raw_tx, raw_rx) = mpsc::channel(pipeline::RAW_QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<bytes::Bytes>(pipeline::OUT_QUEUE);
    let (spooled_tx, spooled_rx) = tokio::sync::oneshot::channel();
    let spool_progress = SpoolProgress::new();
    let _stop = StopOnDrop(spool_progress.clone());
    let path = spool_path.to_path_buf();
    let (compression, level) = (
        input.config.backup.compression,
        input.config.backup.compression_level,
    );
    let worker = tokio::task::spawn_blocking(move || {
        pipeline::run(
            raw_rx,
            spool_file,
            &path,
            compression,
            level,
            &recipients,
            out_tx,
            &spool_progress,
            spooled_tx,
        )
    });
    // etcd's side: ends, and releases etcd's read transaction, at disk speed.
    let read = async move {
        use futures::FutureExt;
        let mut more = true;
        while more {
            let Some(first) = chunks.next_chunk().await.map_err(|e| snap_err(&e))? else {
                break;
            };
            // Whatever else has already arrived goes with it (never waiting for more).
            let mut len = first.len();
            let mut burst = vec![first];
            while len < pipeline::RAW_BURST {
                match chunks.next_chunk().now_or_never() {
                    None => break,
                    Some(Ok(Some(c))) => {
                        len += c.len();
                        burst.push(c);
                    }
                    Some(Ok(None)) => {
                        more = false;
                        break;
                    }
                    Some(Err(e)) => return Err(snap_err(&e)),
                }
            }
            if let Some(p) = progress {
                p.inc(len as u64);
            }
            if raw_tx.send(burst).await.is_err() {
                // The pipeline stopped; its own error says why.
                break;
            }
        }
        Ok::<Duration, CycleError>(opened.elapsed())
    };
    // Owns the receiver: if the upload fails, dropping it stops the pipeline.
    let mut pacer = input
        .config
        .storage
        .requests
        .max_upload_rate
        .map(pace::Pacer::new);
    let send = async move {
        while let Some(chunk) = out_rx.recv().await {
            if let Some(p) = &mut pacer {
                p.pace(chunk.len()).await;
            }
            upload
                .put(chunk)
                .await
                .map_err(|e| CycleError::new(Stage::Upload, e))?;
        }
        Ok::<(), CycleError>(())
    };
    let process = async {
        worker
            .await
            .map_err(|e| CycleError::new(Stage::Snapshot, format!("pipeline thread failed: {e}")))?
            .map_err(|e| match e {
                PipelineError::Trailer(t) => CycleError::new(Stage::Verify, t),
                PipelineError::Spool { .. } | PipelineError::Stopped => {
                    CycleError::new(Stage::Snapshot, e)
                }
                PipelineError::Compress(_) => CycleError::new(Stage::Upload, e),
            })
    };
    // Once the whole stream is on disk, its trailer checked: the verifier, while the upload
    // goes on. Without the signal the stream failed, and `process` says how.
    let check = async {
        let Ok(raw) = spooled_rx.await else {
            return Ok(None);
        };
        let spooled_at = Instant::now();
        tracing::info!(
            stage = "snapshot",
            duration_ms = (spooled_at - cycle_started).as_millis() as u64,
            stream_ms = opened.elapsed().as_millis() as u64,
            size = raw.size,
            "snapshot streamed to the spool, sha256 trailer verified; etcd is released"
        );
        let (report, time) = verify(spool_path, revision_before).await?;
        Ok::<_, CycleError>(Some((report, time, spooled_at)))
    };
    let (stream_time, (), piped, checked) = tokio::try_join!(read, send, process, check)?;
    let Some((report, verify_time, spooled_at)) = checked else {
        return Err(CycleError::new(
            Stage::Verify,
            "the pipeline finished without its trailer check (a bug: please report it)",
        ));
    };
    Ok(Streamed {
        piped,
        report,
        stream_time,
        spooled_at,
        verify_time,
    })
}

/// Stage 2: the verifier over the spooled file; the snapshot must not be older than the
/// member's revision before it started.
async fn verify(
    spool: &std::path::Path,
    revision_before: i64,
) -> Result<(VerifyReport, Duration), CycleError> {
    let t = Instant::now();
    let path = spool.to_path_buf();
    let report = tokio::task::spawn_blocking(move || {
        verify::verify_file(
            &path,
            &VerifyOptions {
                check_trailer: false,
            },
        )
    })
    .await
    .map_err(|e| CycleError::new(Stage::Verify, format!("verifier thread failed: {e}")))?
    .map_err(|e| CycleError::new(Stage::Verify, e))?;
    if report.revision < revision_before {
        return Err(CycleError::new(
            Stage::Verify,
            format!(
                "the snapshot's revision {} is lower than the member's revision {} before the snapshot started: the member served stale data; check its health and whether it is a learner or partitioned",
                report.revision, revision_before
            ),
        ));
    }
    let time = t.elapsed();
    tracing::info!(
        stage = "verify",
        duration_ms = time.as_millis() as u64,
        revision = report.revision,
        keys = report.live_keys,
        hash = report.hash,
        "snapshot verified"
    );
    Ok((report, time))
}

/// Stage 3: completes the multipart upload, which makes the data object visible.
async fn upload(
    input: &CycleInput<'_>,
    upload_slot: &mut Option<Upload>,
    data_key: &str,
) -> Result<Duration, CycleError> {
    let t = Instant::now();
    fence(input.term, Stage::Upload, "before completing the upload").await?;
    let Some(up) = upload_slot.take() else {
        return Err(CycleError::new(
            Stage::Upload,
            "no upload in progress (a bug: please report it)",
        ));
    };
    up.finish()
        .await
        .map_err(|e| CycleError::new(Stage::Upload, e))?;
    let time = t.elapsed();
    tracing::info!(stage = "upload", duration_ms = time.as_millis() as u64, key = %data_key, "upload completed");
    Ok(time)
}

/// Stage 4: writes the manifest, the commit marker. When that fails the complete but
/// uncommitted data object is removed, so nothing half-done stays.
async fn commit(input: &CycleInput<'_>, snap: &Snapshot) -> Result<Manifest, CycleError> {
    let manifest = manifest(input, snap, &snap.report);
    let committed = match fence(input.term, Stage::Commit, "before writing the manifest").await {
        Ok(()) => input
            .store
            .put_manifest(&snap.id, &manifest)
            .await
            .map_err(|e| CycleError::new(Stage::Commit, e)),
        Err(e) => Err(e),
    };
    if let Err(e) = committed {
        if let Err(de) = input.store.delete(&snap.data_key).await {
            tracing::warn!(error = %de, key = %snap.data_key, "cannot remove the uncommitted data object; prune will remove it as an orphan");
        }
        return Err(e);
    }
    Ok(manifest)
}

/// The manifest of a verified, uploaded snapshot.
fn manifest(input: &CycleInput<'_>, snap: &Snapshot, report: &VerifyReport) -> Manifest {
    let cfg = input.config;
    let (status, piped) = (&snap.status, &snap.piped);
    Manifest {
        format_version: FORMAT_VERSION,
        id: snap.id.clone(),
        time: snap.started_at,
        revision: report.revision,
        size: piped.raw.size,
        stored_size: piped.stored_size,
        sha256: hex::encode(piped.raw.sha256),
        compression: cfg.backup.compression,
        etcd_version: status.version.clone(),
        cluster_id: format!("{:016x}", status.cluster_id),
        member: format!("{:016x}", status.member_id),
        member_name: status.member_name.clone(),
        endpoint: input.source.endpoint().to_string(),
        cluster_name: cfg.backup.cluster_name.clone(),
        // The file name only: the backup's directory is wherever its manifest is.
        object: snap
            .data_key
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_string(),
        stored_sha256: hex::encode(piped.stored_sha256),
        revision_before: status.revision,
        db_size: status.db_size,
        db_size_in_use: status.db_size_in_use,
        verification: Verification {
            hash: report.hash,
            total_key_entries: report.total_key_entries,
            live_keys: report.live_keys,
            page_size: report.page_size,
            consistent_index: report.consistent_index,
        },
        started_at: snap.started_at,
        finished_at: Utc::now(),
        stream_seconds: Some(snap.stream_time.as_secs_f64()),
        node: cfg.election.node_name.clone(),
        tool_version: env!("CARGO_PKG_VERSION").to_string(),
        slot: input.slot,
        fencing_token: input.term.map(Term::token),
        encryption: cfg.encryption.enabled().then(|| Encryption {
            method: EncryptionMethod::Age,
            recipients: cfg.encryption.recipients.texts().to_vec(),
        }),
        members: status
            .members
            .iter()
            .map(|m| crate::store::manifest::ClusterMember {
                id: format!("{:016x}", m.id),
                name: m.name.clone(),
                peer_urls: m.peer_urls.clone(),
                client_urls: m.client_urls.clone(),
                is_learner: m.is_learner,
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests;
