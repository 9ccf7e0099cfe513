//! The segment writer: watches the whole keyspace after a committed snapshot and commits
//! segments of the chain based on it.
//!
//! Events are encoded into a spool file as they arrive (through the configured
//! compression and encryption, so memory holds one revision, never a segment). A segment
//! is sealed every `segment_interval` (or at `max_segment_bytes`), uploaded, and committed
//! by its manifest, written last and only after the fencing check passes. An interval
//! without writes writes nothing. Uploads are retried until they succeed or the term ends:
//! meanwhile the watch is not read, etcd holds the events, and the lag metric grows.

use super::chain::{self, Base, ChainEnd, ChainReport, SegmentKey, SegmentManifest};
use super::segment::{Event, RevisionGroup, SegmentWriter};
use crate::codec::compress::{Compression, Encoder};
use crate::codec::crypt::Sealer;
use crate::codec::digest::Sha256;
use crate::etcd::election::Term;
use crate::etcd::watch::{KvEvent, WatchItem};
use crate::etcd::Member;
use crate::store::manifest::{Encryption, Manifest};
use crate::store::BackupStore;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// How segments are written.
#[derive(Clone)]
pub struct Settings {
    /// Seal at least this often while there are events.
    pub interval: Duration,
    /// Seal early at this encoded size.
    pub max_bytes: u64,
    /// Compression of stored segments.
    pub compression: Compression,
    /// Its level (`None`: the default).
    pub level: Option<i32>,
    /// age recipients (empty: not encrypted).
    pub recipients: Vec<age::x25519::Recipient>,
    /// What the manifests record about the encryption.
    pub encryption: Option<Encryption>,
    /// Where segments are spooled.
    pub spool_dir: PathBuf,
    /// This node's name.
    pub node: String,
}

/// What the writer reports (the daemon turns it into metrics).
pub trait Observer: Send + Sync {
    /// A segment was committed.
    fn committed(&self, m: &SegmentManifest);
    /// Writing or committing a segment failed (it is retried).
    fn failed(&self);
    /// A chain ended with a gap.
    fn gap(&self);
    /// The current data-loss window.
    fn lag(&self, seconds: f64);
}

/// Why a chain stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Shutdown, or the term ended: nothing more is committed by this node.
    Stopped,
    /// A newer snapshot was committed and this chain reached it: continue from that one.
    Superseded,
    /// The chain ended with a recorded gap (the watch was compacted past it, or was
    /// already ended): a new chain needs a new snapshot.
    Ended,
}

/// The base of the chain of `m`.
pub fn base_of(m: &Manifest) -> Base {
    Base {
        id: m.id.clone(),
        revision: m.revision,
        time: m.finished_at,
        stored_sha256: m.stored_sha256.clone(),
    }
}

/// Reads and verifies the chain based on `m` from the store.
///
/// # Errors
/// When the store cannot be listed; unreadable segment manifests are errors too (a chain
/// is never judged from part of it).
pub async fn load_chain(store: &BackupStore, m: &Manifest) -> Result<ChainReport, String> {
    let layout = store.layout();
    let dir = chain::segments_dir(layout, &m.id);
    use futures::{StreamExt, TryStreamExt};
    let keys = store.list_keys(&dir).await.map_err(|e| e.to_string())?;
    let wanted: Vec<(String, bool)> = keys
        .into_iter()
        .filter_map(|key| match chain::classify(layout, &key) {
            Some(SegmentKey::Manifest(_)) => Some((key, false)),
            Some(SegmentKey::End(_)) => Some((key, true)),
            _ => None,
        })
        .collect();
    // Small objects, many of them (one per segment interval): fetched 16 at a time.
    let fetched: Vec<(String, bool, bytes::Bytes)> = futures::stream::iter(wanted)
        .map(|(key, end)| async move {
            let b = store.get_bytes(&key).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((key, end, b))
        })
        .buffered(16)
        .try_collect()
        .await?;
    let mut segments = Vec::new();
    let mut ends = Vec::new();
    for (key, end, b) in fetched {
        if end {
            ends.push(
                ChainEnd::from_json(&b)
                    .map_err(|e| format!("chain end {key} is unreadable: {e}"))?,
            );
        } else {
            segments.push(
                SegmentManifest::from_json(&b)
                    .map_err(|e| format!("segment manifest {key} is unreadable: {e}"))?,
            );
        }
    }
    Ok(chain::verify_chain(&base_of(m), &segments, &ends))
}

/// A `Write` into the spool file that hashes what it writes.
struct Spool {
    file: io::BufWriter<std::fs::File>,
    hash: Sha256,
    bytes: u64,
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Removes the spool file when dropped.
struct SpoolPath(PathBuf);

impl Drop for SpoolPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Open {
    writer: SegmentWriter<Encoder<Sealer<Spool>>>,
    path: SpoolPath,
    started: Instant,
}

fn open_segment(s: &Settings, after: i64) -> io::Result<Open> {
    // A node that has not run a cycle yet may not have the directory.
    std::fs::create_dir_all(&s.spool_dir)?;
    let n: u64 = rand::random();
    let path = s.spool_dir.join(format!("segment-{after}-{n:016x}.spool"));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let path = SpoolPath(path);
    let spool = Spool {
        file: io::BufWriter::with_capacity(256 << 10, file),
        hash: Sha256::new(),
        bytes: 0,
    };
    let sealer = Sealer::new(spool, &s.recipients)?;
    let enc = s.compression.encoder(sealer, s.level)?;
    let writer = SegmentWriter::new(enc, after).map_err(io::Error::other)?;
    Ok(Open {
        writer,
        path,
        started: Instant::now(),
    })
}

/// Groups watch events by revision (etcd never splits a revision across responses
/// unless asked to fragment, which this watch does not).
pub fn group_events(events: Vec<KvEvent>, observed_at_ms: i64) -> Vec<RevisionGroup> {
    let mut groups: Vec<RevisionGroup> = Vec::new();
    for e in events {
        let ev = if e.delete {
            Event::Delete {
                key: e.key,
                mod_revision: e.mod_revision,
            }
        } else {
            Event::Put {
                key: e.key,
                value: e.value,
                create_revision: e.create_revision,
                mod_revision: e.mod_revision,
                version: e.version,
                lease: e.lease,
            }
        };
        match groups.last_mut() {
            Some(g) if g.revision == e.mod_revision => g.events.push(ev),
            _ => groups.push(RevisionGroup {
                revision: e.mod_revision,
                observed_at_ms,
                events: vec![ev],
            }),
        }
    }
    groups
}

/// The state of the chain being written.
struct Chain<'a> {
    store: &'a BackupStore,
    settings: &'a Settings,
    base: Base,
    term: Option<&'a Term>,
    observer: &'a dyn Observer,
    cancel: &'a CancellationToken,
    reach: i64,
    prev_sha: String,
}

impl Chain<'_> {
    fn stopped(&self) -> bool {
        self.cancel.is_cancelled() || self.term.is_some_and(Term::has_ended)
    }

    /// Seals, uploads and commits `open`. `Ok(false)`: the term ended or shutdown came
    /// first, and nothing was committed.
    async fn seal(&mut self, open: Open) -> Result<bool, String> {
        let Open { writer, path, .. } = open;
        let finished = tokio::task::spawn_blocking(move || {
            let (enc, summary) = writer.finish().map_err(|e| e.to_string())?;
            let sealer = enc.finish().map_err(|e| e.to_string())?;
            let mut spool = sealer.finish().map_err(|e| e.to_string())?;
            spool.flush().map_err(|e| e.to_string())?;
            spool.file.get_ref().sync_all().map_err(|e| e.to_string())?;
            Ok::<_, String>((summary, hex::encode(spool.hash.finalize()), spool.bytes))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let (summary, stored_sha, stored_size) = finished
            .map_err(|e| format!("cannot finish the segment in {}: {e}", path.0.display()))?;
        let ms = |v: i64| DateTime::from_timestamp_millis(v).unwrap_or_else(Utc::now);
        let token = self.term.map(Term::token);
        let stem = format!(
            "{:020}-{:020}-{:x}",
            summary.after_revision,
            summary.last_revision,
            token.unwrap_or(0)
        );
        let m = SegmentManifest {
            format_version: chain::FORMAT_VERSION,
            base: self.base.id.clone(),
            base_revision: self.base.revision,
            after_revision: summary.after_revision,
            last_revision: summary.last_revision,
            first_time: ms(summary.first_observed_ms),
            last_time: ms(summary.last_observed_ms),
            revisions: summary.revisions,
            events: summary.events,
            size: summary.size,
            sha256: hex::encode(summary.sha256),
            stored_size,
            stored_sha256: stored_sha,
            prev_sha256: self.prev_sha.clone(),
            compression: self.settings.compression,
            encryption: self.settings.encryption.clone(),
            object: chain::object_name(
                &stem,
                self.settings.compression,
                self.settings.encryption.is_some(),
            ),
            node: self.settings.node.clone(),
            fencing_token: token,
            written_at: Utc::now(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        debug_assert_eq!(m.stem(), stem);
        let mut delay = Duration::from_millis(500);
        loop {
            if self.stopped() {
                return Ok(false);
            }
            match self.commit(&m, &path.0).await {
                Ok(committed) => {
                    if committed {
                        self.reach = m.last_revision;
                        self.prev_sha.clone_from(&m.stored_sha256);
                        self.observer.committed(&m);
                        tracing::debug!(
                            after = m.after_revision,
                            last = m.last_revision,
                            events = m.events,
                            stored_size = m.stored_size,
                            "segment committed"
                        );
                    }
                    return Ok(committed);
                }
                Err(e) => {
                    self.observer.failed();
                    tracing::warn!(error = %e, retry_in = ?delay, "storing a segment failed; retrying (events wait in etcd's watch meanwhile)");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.cancel.cancelled() => return Ok(false),
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    }

    async fn commit(&self, m: &SegmentManifest, spool: &Path) -> Result<bool, String> {
        let layout = self.store.layout();
        let key = chain::object_key(layout, m);
        let mut up = self
            .store
            .begin_upload(&key)
            .await
            .map_err(|e| e.to_string())?;
        let mut file = std::fs::File::open(spool).map_err(|e| e.to_string())?;
        loop {
            let mut buf = vec![0u8; 4 << 20];
            let n = read_full(&mut file, &mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            if let Err(e) = up.put(Bytes::from(buf)).await {
                let _ = up.abort().await;
                return Err(e.to_string());
            }
        }
        up.finish().await.map_err(|e| e.to_string())?;
        if let Some(t) = self.term {
            if let Err(e) = t.check("committing a segment").await {
                tracing::warn!(error = %e, "segment not committed");
                let _ = self.store.delete(&key).await;
                return Ok(false);
            }
        }
        self.store
            .put_small(&chain::manifest_key(layout, m), m.to_json())
            .await
            .map_err(|e| e.to_string())?;
        Ok(true)
    }

    async fn record_end(&self, reason: String, compact_revision: Option<i64>) {
        let end = ChainEnd {
            format_version: chain::FORMAT_VERSION,
            base: self.base.id.clone(),
            last_revision: self.reach,
            reason,
            compact_revision,
            time: Utc::now(),
            node: self.settings.node.clone(),
        };
        self.observer.gap();
        tracing::error!(base = %self.base.id, last_revision = self.reach, reason = %end.reason, "continuous backup chain ended with a gap; a new chain starts at the next snapshot");
        let key = chain::end_key(self.store.layout(), &self.base.id, self.reach);
        if let Err(e) = self.store.put_small(&key, end.to_json()).await {
            tracing::warn!(error = %e, "cannot record the end of the chain");
        }
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Everything one chain run needs.
pub struct Input<'a> {
    /// The local member.
    pub member: &'a Member,
    /// The store.
    pub store: &'a BackupStore,
    /// How to write.
    pub settings: &'a Settings,
    /// The committed snapshot the chain is based on.
    pub base: &'a Manifest,
    /// The leadership term (`None` without an election).
    pub term: Option<&'a Term>,
    /// Newer committed snapshots, as the daemon commits them.
    pub newer: &'a mut watch::Receiver<Option<Manifest>>,
    /// Shutdown.
    pub cancel: &'a CancellationToken,
    /// Metrics.
    pub observer: &'a dyn Observer,
}

/// Continues (or starts) the chain based on `input.base` until shutdown, the end of the
/// term, a newer snapshot, or a gap.
///
/// # Errors
/// When the store or etcd fails in a way a retry of the whole run may fix (nothing
/// uncommitted is kept: a retry continues from the last committed segment).
pub async fn run_chain(input: Input<'_>) -> Result<Outcome, String> {
    let report = load_chain(input.store, input.base).await?;
    if report.ended.is_some() {
        return Ok(Outcome::Ended);
    }
    for p in &report.problems {
        tracing::warn!(base = %input.base.id, problem = %p, "continuous backup chain has a problem; continuing from its last linked segment");
    }
    let mut chain = Chain {
        store: input.store,
        settings: input.settings,
        base: report.base.clone(),
        term: input.term,
        observer: input.observer,
        cancel: input.cancel,
        reach: report.reach_revision,
        prev_sha: report.path.last().map_or_else(
            || report.base.stored_sha256.clone(),
            |s| s.stored_sha256.clone(),
        ),
    };
    input.observer.lag(0.0);
    let mut watch = input
        .member
        .watch_keyspace(chain.reach + 1)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(base = %chain.base.id, from_revision = chain.reach + 1, "continuous backup: watching");
    let mut open: Option<Open> = None;
    let mut switch_at: Option<i64> = None;
    let mut last_heard = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let term_lost = async {
        match input.term {
            Some(t) => t.lost().cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(term_lost);
    let newer = input.newer;
    loop {
        if let Some(s) = switch_at {
            if open.is_none() && chain.reach >= s {
                return Ok(Outcome::Superseded);
            }
        }
        tokio::select! {
            () = input.cancel.cancelled() => return Ok(Outcome::Stopped),
            () = &mut term_lost => return Ok(Outcome::Stopped),
            r = newer.changed() => {
                if r.is_err() {
                    return Ok(Outcome::Stopped);
                }
                let rev = newer.borrow_and_update().as_ref().map(|m| m.revision);
                if let Some(rev) = rev.filter(|r| *r > chain.base.revision) {
                    switch_at = Some(rev);
                }
            }
            _ = tick.tick() => {
                let now = Instant::now();
                let at_risk = open.as_ref().map(|o| o.started);
                let oldest = at_risk.map_or(last_heard, |s| s.min(last_heard));
                input.observer.lag(now.duration_since(oldest).as_secs_f64());
                let due = open.as_ref().is_some_and(|o| {
                    o.started.elapsed() >= input.settings.interval
                        || o.writer.bytes() >= input.settings.max_bytes
                        || switch_at.is_some_and(|s| o.writer.last_revision() >= s)
                });
                if due {
                    let o = open.take().expect("due implies open");
                    if !chain.seal(o).await? {
                        return Ok(Outcome::Stopped);
                    }
                }
                if open.is_none() {
                    // Idle: ask etcd how far it is, so the lag shows a stalled watch.
                    let _ = watch.request_progress().await;
                }
            }
            item = watch.next() => {
                let item = item.map_err(|e| e.to_string())?;
                last_heard = Instant::now();
                match item {
                    None => return Err("the watch stream ended".into()),
                    Some(WatchItem::Canceled { reason }) => {
                        return Err(format!("etcd cancelled the watch: {reason}"));
                    }
                    Some(WatchItem::Compacted { compact_revision }) => {
                        if let Some(o) = open.take() {
                            if !chain.seal(o).await? {
                                return Ok(Outcome::Stopped);
                            }
                        }
                        chain.record_end(
                            format!("etcd compacted its history to revision {compact_revision}, past the chain's next revision {}", chain.reach + 1),
                            Some(compact_revision),
                        ).await;
                        return Ok(Outcome::Ended);
                    }
                    Some(WatchItem::Events { events, .. }) => {
                        if let Some(outcome) =
                            take_events(&mut chain, &mut open, input.settings, events).await?
                        {
                            return Ok(outcome);
                        }
                    }
                }
            }
        }
    }
}

/// Adds the events of one watch response to the open segment (opening one when needed) and
/// seals it once it is full. `Some` when the chain run is over: the term ended while
/// sealing, or the watch skipped revisions (the chain ends where it is still whole).
async fn take_events(
    chain: &mut Chain<'_>,
    open: &mut Option<Open>,
    settings: &Settings,
    events: Vec<KvEvent>,
) -> Result<Option<Outcome>, String> {
    if events.is_empty() {
        return Ok(None);
    }
    let groups = group_events(events, Utc::now().timestamp_millis());
    for g in groups {
        if open.is_none() {
            let after = chain.reach;
            *open = Some(open_segment(settings, after).map_err(|e| {
                format!(
                    "cannot create a segment spool file in {}: {e}; check backup.spool_dir",
                    settings.spool_dir.display()
                )
            })?);
        }
        let o = open.as_mut().expect("opened above");
        if let Err(e) = o.writer.push(&g) {
            if let super::segment::SegmentError::Io(e) = e {
                return Err(format!(
                    "cannot write the segment spool file: {e}; check backup.spool_dir"
                ));
            }
            // A hole in the watch (events were lost), or the spool
            // failed: commit what is whole, end the chain where it
            // is still true.
            let o = open.take().expect("opened above");
            if o.writer.revisions() > 0 && !chain.seal(o).await? {
                return Ok(Some(Outcome::Stopped));
            }
            chain
                .record_end(format!("the watch skipped revisions: {e}"), None)
                .await;
            return Ok(Some(Outcome::Ended));
        }
        if o.writer.bytes() >= settings.max_bytes {
            let o = open.take().expect("opened above");
            if !chain.seal(o).await? {
                return Ok(Some(Outcome::Stopped));
            }
        }
    }
    Ok(None)
}
