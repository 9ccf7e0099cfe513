//! The streaming part of a cycle, spool first: the snapshot stream goes to the spool file as
//! fast as etcd sends it and the disk takes it; compression, encryption and the upload read
//! the spool as it grows.
//!
//! ```text
//! etcd stream ──chan──▶ [spool thread] trailer check + sha256 of the raw file,
//!                            │            batched writes to the spool file
//!                            ▼ (published length)
//!                       spool file ──▶ [follower thread] reads what is written, compresses,
//!                                       [age encryption], stored sha256 + size ──chan──▶ uploader
//! ```
//!
//! The follower never waits for the end of the stream: on a fast link it runs right behind
//! the spool writer, as the coupled pipeline did; on a slow link it falls behind and the
//! stream (and etcd's read transaction) still ends at disk speed. The upload then finishes
//! from the spool.
//!
//! While the follower keeps up, the writer also hands it each batch it wrote (the same
//! buffers, no copy), so the spool is not read back; the first time the hand-off queue is
//! full (the follower fell behind) the writer stops handing off, and the follower goes on
//! from the spool file where the hand-off ended.
//!
//! Memory stays flat whatever the database size: at most `RAW_QUEUE` bursts of snapshot
//! chunks, `HANDOFF_BYTES` handed to the follower, and one
//! `WRITE_BATCH` of them waiting to be written, one `READ_CHUNK` read buffer, one output chunk
//! being filled, `OUT_QUEUE` output chunks waiting, and the uploader's parts in flight.

use crate::codec::compress::Compression;
use crate::codec::crypt::Sealer;
use crate::codec::digest::Sha256;
use bytes::Bytes;
use std::io::{self, Read, Write};
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::{mpsc, oneshot};

/// Bursts of snapshot chunks (32 KiB each from etcd, up to `RAW_BURST` bytes per burst)
/// queued for the spool thread.
pub const RAW_QUEUE: usize = 8;
/// The chunks that arrived together are handed to the spool thread together, up to this
/// many bytes: one wake-up per burst instead of one per chunk.
pub const RAW_BURST: usize = 256 * 1024;
/// The spool thread writes at most this much at once (one `writev` of queued chunks).
pub const WRITE_BATCH: usize = 1024 * 1024;
/// The follower reads the spool in blocks of this size.
pub const READ_CHUNK: usize = 1024 * 1024;
/// Bytes of written batches handed to the follower and not yet compressed: more than this
/// means the follower fell behind, and it reads the spool file from then on.
pub const HANDOFF_BYTES: usize = 8 * 1024 * 1024;
/// Compressed chunks queued for the uploader.
pub const OUT_QUEUE: usize = 2;
/// Size of the chunks handed to the uploader.
pub const OUT_CHUNK: usize = 1024 * 1024;

/// Size of etcd's sha256 trailer.
pub const TRAILER_LEN: usize = 32;

/// The checked result of a snapshot stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawDigest {
    /// Bytes of the whole file, trailer included.
    pub size: u64,
    /// sha256 of the whole file, trailer included.
    pub sha256: [u8; 32],
}

/// Why the trailer check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrailerError {
    /// The stream is too short or its length is not `n*512 + 32`.
    #[error("the snapshot has no sha256 trailer ({size} bytes; a snapshot is a multiple of 512 bytes plus 32): the stream was cut short or is not an etcd snapshot")]
    Missing {
        /// Bytes received.
        size: u64,
    },
    /// The trailer does not match the data.
    #[error("the snapshot's sha256 trailer does not match its data (expected {expected}, computed {computed}): the snapshot was corrupted in transit")]
    Mismatch {
        /// Trailer value (hex).
        expected: String,
        /// Computed value (hex).
        computed: String,
    },
}

/// Checks etcd's trailer while the bytes stream by: everything but the last 32 bytes is
/// hashed; at the end the held-back 32 bytes must equal that hash. The sha256 of the whole
/// file comes from the same pass, by feeding the trailer into a copy of the state.
#[derive(Clone, Default)]
pub struct TrailerCheck {
    data: Sha256,
    tail: Vec<u8>,
    size: u64,
}

impl TrailerCheck {
    /// A check at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk.
    pub fn update(&mut self, chunk: &[u8]) {
        self.size += chunk.len() as u64;
        if chunk.len() >= TRAILER_LEN {
            self.data.update(&self.tail);
            let cut = chunk.len() - TRAILER_LEN;
            self.data.update(&chunk[..cut]);
            self.tail.clear();
            self.tail.extend_from_slice(&chunk[cut..]);
        } else {
            self.tail.extend_from_slice(chunk);
            if self.tail.len() > TRAILER_LEN {
                let cut = self.tail.len() - TRAILER_LEN;
                self.data.update(&self.tail[..cut]);
                self.tail.drain(..cut);
            }
        }
    }

    /// Ends the stream and checks the trailer.
    ///
    /// # Errors
    /// [`TrailerError`] when the trailer is missing or wrong.
    pub fn finish(self) -> Result<RawDigest, TrailerError> {
        if self.size < 512 + TRAILER_LEN as u64 || self.size % 512 != TRAILER_LEN as u64 {
            return Err(TrailerError::Missing { size: self.size });
        }
        let computed: [u8; 32] = self.data.clone().finalize();
        if computed[..] != self.tail[..] {
            return Err(TrailerError::Mismatch {
                expected: hex::encode(&self.tail),
                computed: hex::encode(computed),
            });
        }
        let mut whole = self.data;
        whole.update(&self.tail);
        Ok(RawDigest {
            size: self.size,
            sha256: whole.finalize(),
        })
    }
}

/// A `Write` that cuts the compressed stream into chunks for the uploader, counting and
/// hashing what is stored.
pub struct ChunkSink {
    tx: mpsc::Sender<Bytes>,
    buf: Vec<u8>,
    hasher: Sha256,
    size: u64,
}

impl ChunkSink {
    /// A sink sending to `tx`.
    pub fn new(tx: mpsc::Sender<Bytes>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(OUT_CHUNK),
            hasher: Sha256::new(),
            size: 0,
        }
    }

    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(OUT_CHUNK));
        self.tx
            .blocking_send(Bytes::from(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the uploader stopped"))
    }

    /// Sends what is left and returns the stored size and sha256.
    ///
    /// # Errors
    /// `BrokenPipe` when the uploader has stopped.
    pub fn close(mut self) -> io::Result<(u64, [u8; 32])> {
        self.send_buf()?;
        Ok((self.size, self.hasher.finalize()))
    }
}

impl Write for ChunkSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.hasher.update(data);
        self.size += data.len() as u64;
        self.buf.extend_from_slice(data);
        if self.buf.len() >= OUT_CHUNK {
            self.send_buf()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What the pipeline produced.
#[derive(Debug, Clone)]
pub struct PipelineReport {
    /// The raw snapshot's size and sha256 (trailer checked).
    pub raw: RawDigest,
    /// Stored (compressed) size.
    pub stored_size: u64,
    /// sha256 of the stored object.
    pub stored_sha256: [u8; 32],
}

/// Why the pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Writing or reading back the spool file failed (disk full, permissions).
    #[error("writing the spool file {path} failed: {source}; check free space and permissions of backup.spool_dir")]
    Spool {
        /// The spool file.
        path: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The compressor or the uploader failed.
    #[error("compressing failed: {0}")]
    Compress(io::Error),
    /// The trailer check failed.
    #[error(transparent)]
    Trailer(#[from] TrailerError),
    /// The other half of the pipeline (or the cycle) stopped it; the other half's error,
    /// or the cycle's, is the one to report.
    #[error("the pipeline was stopped")]
    Stopped,
}

/// How far the spool file is written, shared by the spool writer and its follower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spooled {
    /// Still being written; this many bytes are in the file.
    Growing(u64),
    /// Complete and trailer-checked, this many bytes.
    Complete(u64),
    /// The stream failed (its error is reported by whoever saw it): readers stop.
    Failed,
}

/// The spool file's progress, and the way to stop both threads of the pipeline.
#[derive(Debug)]
pub struct SpoolProgress {
    state: Mutex<(Spooled, bool)>,
    changed: Condvar,
}

impl Default for SpoolProgress {
    fn default() -> Self {
        Self {
            state: Mutex::new((Spooled::Growing(0), false)),
            changed: Condvar::new(),
        }
    }
}

impl SpoolProgress {
    /// A new, empty spool.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn set(&self, s: Spooled) {
        let mut g = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.0 = s;
        self.changed.notify_all();
    }

    /// Stops both threads at their next step (the cycle failed or is being dropped).
    pub fn stop(&self) {
        let mut g = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.1 = true;
        self.changed.notify_all();
    }

    fn stopped(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
    }

    /// Waits until the file holds more than `pos` bytes or is complete: `Ok(Some(len))`
    /// with the readable length, `Ok(None)` at the end of a complete file.
    fn wait_beyond(&self, pos: u64) -> Result<Option<u64>, PipelineError> {
        let mut g = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        loop {
            if g.1 {
                return Err(PipelineError::Stopped);
            }
            match g.0 {
                Spooled::Failed => return Err(PipelineError::Stopped),
                Spooled::Complete(n) if n <= pos => return Ok(None),
                Spooled::Complete(n) | Spooled::Growing(n) if n > pos => return Ok(Some(n)),
                _ => {}
            }
            g = self
                .changed
                .wait(g)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }
}

/// Runs on a blocking thread: consumes snapshot chunks until the channel closes, writing
/// the spool file and checking the trailer, while a scoped follower thread reads the spool
/// as it grows and compresses (and encrypts) it into `out`.
///
/// `spooled` receives the checked digest as soon as the whole stream is on disk (before the
/// follower is done): the verifier can start then. `progress` is shared with the caller,
/// which stops both threads with [`SpoolProgress::stop`] when the cycle fails elsewhere.
///
/// # Errors
/// [`PipelineError`] on the first failure; the caller aborts the upload.
#[allow(clippy::too_many_arguments)]
pub fn run(
    rx: mpsc::Receiver<Vec<Bytes>>,
    spool: std::fs::File,
    spool_path: &std::path::Path,
    compression: Compression,
    level: Option<i32>,
    recipients: &[age::x25519::Recipient],
    out: mpsc::Sender<Bytes>,
    progress: &Arc<SpoolProgress>,
    spooled: oneshot::Sender<RawDigest>,
) -> Result<PipelineReport, PipelineError> {
    let reader = std::fs::File::open(spool_path).map_err(|source| PipelineError::Spool {
        path: spool_path.display().to_string(),
        source,
    })?;
    let (handoff_tx, handoff_rx) = std::sync::mpsc::channel();
    let handed = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        let follower = scope.spawn(|| {
            let r = follow(
                Handoff {
                    rx: handoff_rx,
                    queued: &handed,
                },
                reader,
                spool_path,
                compression,
                level,
                recipients,
                out,
                progress,
            );
            if r.is_err() {
                // The stream is of no use any more: stop taking it.
                progress.stop();
            }
            r
        });
        let written = spool_and_check(
            rx,
            spool,
            spool_path,
            progress,
            Some(HandoffTx {
                tx: handoff_tx,
                queued: &handed,
            }),
        );
        match &written {
            Ok(raw) => {
                progress.set(Spooled::Complete(raw.size));
                let _ = spooled.send(raw.clone());
            }
            Err(_) => progress.set(Spooled::Failed),
        }
        let followed = follower.join().map_err(|_| {
            PipelineError::Compress(io::Error::other("the compressor thread panicked"))
        })?;
        // A failed spool write is the cause of anything else; a compressor or upload
        // failure comes next (it stops the stream early, so the trailer check fails too).
        if let Err(e @ PipelineError::Spool { .. }) = written {
            return Err(e);
        }
        if let Err(e @ (PipelineError::Compress(_) | PipelineError::Spool { .. })) = followed {
            return Err(e);
        }
        let raw = written?;
        let (stored_size, stored_sha256) = followed?;
        Ok(PipelineReport {
            raw,
            stored_size,
            stored_sha256,
        })
    })
}

/// The spool writer of [`run`]: every chunk goes to the spool file (queued chunks are written
/// together, up to [`WRITE_BATCH`], with one `writev`) and through the trailer check, until
/// the sender is dropped. Each write is published to the follower, and handed to it while
/// it keeps up.
fn spool_and_check(
    mut rx: mpsc::Receiver<Vec<Bytes>>,
    spool: std::fs::File,
    spool_path: &std::path::Path,
    progress: &SpoolProgress,
    handoff: Option<HandoffTx<'_>>,
) -> Result<RawDigest, PipelineError> {
    let mut w = SpoolWriter {
        spool,
        spool_path,
        progress,
        handoff,
        written: 0,
    };
    let mut check = TrailerCheck::new();
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batched = 0usize;
    loop {
        let next = match rx.try_recv() {
            Ok(c) => Some(c),
            Err(mpsc::error::TryRecvError::Empty) => {
                // Nothing more queued: write what is batched, then wait.
                if batched > 0 {
                    w.write(std::mem::take(&mut batch))?;
                    batched = 0;
                }
                rx.blocking_recv()
            }
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        };
        if progress.stopped() {
            return Err(PipelineError::Stopped);
        }
        let Some(burst) = next else { break };
        for chunk in burst {
            check.update(&chunk);
            batched += chunk.len();
            batch.push(chunk);
        }
        if batched >= WRITE_BATCH {
            w.write(std::mem::take(&mut batch))?;
            batched = 0;
        }
    }
    w.write(batch)?;
    Ok(check.finish()?)
}

/// The writer's end of the hand-off: batches, and the bytes the follower has not taken yet.
struct HandoffTx<'a> {
    tx: std::sync::mpsc::Sender<Vec<Bytes>>,
    queued: &'a std::sync::atomic::AtomicUsize,
}

/// The follower's end.
struct Handoff<'a> {
    rx: std::sync::mpsc::Receiver<Vec<Bytes>>,
    queued: &'a std::sync::atomic::AtomicUsize,
}

/// The spool file being written, and the hand-off to the follower.
struct SpoolWriter<'a> {
    spool: std::fs::File,
    spool_path: &'a std::path::Path,
    progress: &'a SpoolProgress,
    /// `None` once the follower fell behind: it reads the spool file from then on.
    handoff: Option<HandoffTx<'a>>,
    written: u64,
}

impl SpoolWriter<'_> {
    /// Writes `batch` to the spool file, publishes the new length, and hands the batch to
    /// the follower if it keeps up.
    fn write(&mut self, batch: Vec<Bytes>) -> Result<(), PipelineError> {
        if batch.is_empty() {
            return Ok(());
        }
        write_batch(&mut self.spool, &batch).map_err(|source| PipelineError::Spool {
            path: self.spool_path.display().to_string(),
            source,
        })?;
        let len: usize = batch.iter().map(Bytes::len).sum();
        self.written += len as u64;
        if let Some(h) = &self.handoff {
            use std::sync::atomic::Ordering;
            let queued = h.queued.fetch_add(len, Ordering::AcqRel) + len;
            if queued > HANDOFF_BYTES || h.tx.send(batch).is_err() {
                // The follower is behind (or gone): it continues from the file.
                self.handoff = None;
            }
        }
        self.progress.set(Spooled::Growing(self.written));
        Ok(())
    }
}

/// Writes all of `chunks`, in order, with as few `writev` calls as the kernel allows.
fn write_batch(file: &mut std::fs::File, chunks: &[Bytes]) -> io::Result<()> {
    let (mut i, mut off) = (0usize, 0usize);
    while i < chunks.len() {
        let mut slices: Vec<io::IoSlice<'_>> = Vec::with_capacity(chunks.len() - i);
        slices.push(io::IoSlice::new(&chunks[i][off..]));
        slices.extend(chunks[i + 1..].iter().map(|c| io::IoSlice::new(c)));
        let mut n = match file.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while n > 0 {
            let left = chunks[i].len() - off;
            if n >= left {
                n -= left;
                i += 1;
                off = 0;
            } else {
                off += n;
                n = 0;
            }
        }
        // Skip empty chunks, so the next slice list starts with data.
        while i < chunks.len() && chunks[i].len() == off {
            i += 1;
            off = 0;
        }
    }
    Ok(())
}

/// The follower of [`run`]: takes the batches the writer hands off while it keeps up, then
/// reads the spool file as the writer publishes it, and compresses (and encrypts) it all
/// into `out`, until the file is complete. Returns the stored size and sha256.
#[allow(clippy::too_many_arguments)]
fn follow(
    handoff: Handoff<'_>,
    mut reader: std::fs::File,
    spool_path: &std::path::Path,
    compression: Compression,
    level: Option<i32>,
    recipients: &[age::x25519::Recipient],
    out: mpsc::Sender<Bytes>,
    progress: &SpoolProgress,
) -> Result<(u64, [u8; 32]), PipelineError> {
    let sealer = Sealer::new(ChunkSink::new(out), recipients).map_err(PipelineError::Compress)?;
    let mut enc = compression
        .encoder(sealer, level)
        .map_err(PipelineError::Compress)?;
    let mut pos = 0u64;
    // The hand-off ends when the writer stops it (or is done): the rest is in the file.
    while let Ok(batch) = handoff.rx.recv() {
        if progress.stopped() {
            return Err(PipelineError::Stopped);
        }
        for chunk in batch {
            enc.write_all(&chunk).map_err(PipelineError::Compress)?;
            pos += chunk.len() as u64;
            handoff
                .queued
                .fetch_sub(chunk.len(), std::sync::atomic::Ordering::AcqRel);
        }
    }
    if pos > 0 {
        use std::io::Seek;
        reader
            .seek(io::SeekFrom::Start(pos))
            .map_err(|source| PipelineError::Spool {
                path: spool_path.display().to_string(),
                source,
            })?;
    }
    let mut buf = vec![0u8; READ_CHUNK];
    while let Some(len) = progress.wait_beyond(pos)? {
        while pos < len {
            let want = usize::try_from(len - pos)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let n = match reader.read(&mut buf[..want]) {
                Ok(0) => {
                    return Err(PipelineError::Spool {
                        path: spool_path.display().to_string(),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the spool file is shorter than what was written to it",
                        ),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(PipelineError::Spool {
                        path: spool_path.display().to_string(),
                        source,
                    })
                }
            };
            enc.write_all(&buf[..n]).map_err(PipelineError::Compress)?;
            pos += n as u64;
        }
    }
    let sealer = enc.finish().map_err(PipelineError::Compress)?;
    let sink = sealer.finish().map_err(PipelineError::Compress)?;
    sink.close().map_err(PipelineError::Compress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use sha2::Digest as _;

    fn snapshot_like(n_pages: usize) -> Vec<u8> {
        let mut db: Vec<u8> = (0..n_pages * 512).map(|i| (i * 31 % 251) as u8).collect();
        let h: [u8; 32] = sha2::Sha256::digest(&db).into();
        db.extend_from_slice(&h);
        db
    }

    #[test]
    fn accepts_a_good_trailer_and_hashes_the_whole_file() {
        let file = snapshot_like(9);
        let mut c = TrailerCheck::new();
        c.update(&file);
        let d = c.finish().unwrap();
        assert_eq!(d.size, file.len() as u64);
        let whole: [u8; 32] = sha2::Sha256::digest(&file).into();
        assert_eq!(d.sha256, whole);
    }

    #[test]
    fn rejects_missing_and_wrong_trailers() {
        let file = snapshot_like(4);
        let mut c = TrailerCheck::new();
        c.update(&file[..file.len() - 32]);
        assert!(matches!(c.finish(), Err(TrailerError::Missing { .. })));

        let mut bad = file.clone();
        bad[100] ^= 1;
        let mut c = TrailerCheck::new();
        c.update(&bad);
        assert!(matches!(c.finish(), Err(TrailerError::Mismatch { .. })));

        let mut bad = file;
        let n = bad.len();
        bad[n - 1] ^= 1;
        let mut c = TrailerCheck::new();
        c.update(&bad);
        assert!(matches!(c.finish(), Err(TrailerError::Mismatch { .. })));

        assert!(matches!(
            TrailerCheck::new().finish(),
            Err(TrailerError::Missing { size: 0 })
        ));
    }

    proptest! {
        #[test]
        fn chunking_does_not_matter(cuts in proptest::collection::vec(0usize..5000, 0..40)) {
            let file = snapshot_like(7);
            let mut c = TrailerCheck::new();
            let mut pos = 0;
            for cut in cuts {
                let end = (pos + cut).min(file.len());
                c.update(&file[pos..end]);
                pos = end;
            }
            c.update(&file[pos..]);
            let d = c.finish().unwrap();
            let whole: [u8; 32] = sha2::Sha256::digest(&file).into();
            prop_assert_eq!(d.sha256, whole);
        }
    }

    /// Sends `data` in 32 KiB chunks from another thread; `true` when all of it was taken.
    fn feed(raw_tx: mpsc::Sender<Vec<Bytes>>, data: &[u8]) -> std::thread::JoinHandle<bool> {
        let data = data.to_vec();
        std::thread::spawn(move || {
            data.chunks(32 * 1024).all(|c| {
                raw_tx
                    .blocking_send(vec![Bytes::copy_from_slice(c)])
                    .is_ok()
            })
        })
    }

    /// The pipeline running on its own thread over a new spool file in a directory.
    struct Started {
        raw_tx: mpsc::Sender<Vec<Bytes>>,
        out_rx: mpsc::Receiver<Bytes>,
        done_rx: oneshot::Receiver<RawDigest>,
        spool_path: std::path::PathBuf,
        thread: std::thread::JoinHandle<Result<PipelineReport, PipelineError>>,
    }

    fn start(dir: &std::path::Path, compression: Compression) -> Started {
        let spool_path = dir.join("s.spool");
        let spool = std::fs::File::create(&spool_path).unwrap();
        let (raw_tx, raw_rx) = mpsc::channel(RAW_QUEUE);
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        let (done_tx, done_rx) = oneshot::channel();
        let sp = spool_path.clone();
        let thread = std::thread::spawn(move || {
            run(
                raw_rx,
                spool,
                &sp,
                compression,
                None,
                &[],
                out_tx,
                &SpoolProgress::new(),
                done_tx,
            )
        });
        Started {
            raw_tx,
            out_rx,
            done_rx,
            spool_path,
            thread,
        }
    }

    /// Runs the pipeline over `file` in 32 KiB chunks; the feeder tolerates an early stop.
    fn run_over(
        file: &[u8],
        spool: std::fs::File,
        spool_path: &std::path::Path,
        out_tx: mpsc::Sender<Bytes>,
    ) -> Result<PipelineReport, PipelineError> {
        let (raw_tx, raw_rx) = mpsc::channel(RAW_QUEUE);
        // The pipeline may stop early: what the feeder could not send is of no matter.
        let feeder = feed(raw_tx, file);
        let (done_tx, _done_rx) = oneshot::channel();
        let r = run(
            raw_rx,
            spool,
            spool_path,
            Compression::None,
            None,
            &[],
            out_tx,
            &SpoolProgress::new(),
            done_tx,
        );
        feeder.join().unwrap();
        r
    }

    #[test]
    fn a_failed_spool_write_is_reported_as_such() {
        let file = snapshot_like(4000);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ro.spool");
        std::fs::write(&path, b"").unwrap();
        // Opened read-only: every write fails, as on a full or broken disk.
        let spool = std::fs::File::open(&path).unwrap();
        let (out_tx, mut out_rx) = mpsc::channel(OUT_QUEUE);
        let drain = std::thread::spawn(move || while out_rx.blocking_recv().is_some() {});
        let err = run_over(&file, spool, &path, out_tx).unwrap_err();
        drain.join().unwrap();
        assert!(matches!(err, PipelineError::Spool { .. }), "{err:?}");
        assert!(err.to_string().contains("check free space"), "{err}");
    }

    #[test]
    fn a_stopped_uploader_is_reported_not_a_cut_trailer() {
        let file = snapshot_like(8000); // ~4 MB, more than the output queue holds
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.spool");
        let spool = std::fs::File::create(&path).unwrap();
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        drop(out_rx);
        let err = run_over(&file, spool, &path, out_tx).unwrap_err();
        assert!(
            matches!(&err, PipelineError::Compress(e) if e.kind() == io::ErrorKind::BrokenPipe),
            "{err:?}"
        );
    }

    #[test]
    fn the_stream_is_spooled_while_the_uploader_takes_nothing() {
        // 16 MiB: many times what the output queue, the chunk being filled and the raw queue
        // hold together, so a pipeline coupled to its uploader could not take it all.
        let file = snapshot_like(32 * 1024);
        let dir = tempfile::tempdir().unwrap();
        let Started {
            raw_tx,
            mut out_rx,
            mut done_rx,
            spool_path,
            thread: t,
        } = start(dir.path(), Compression::None);
        let feeder = feed(raw_tx, &file);
        // Nobody drains the output: the stream must still end, whole and checked.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        let raw = loop {
            match done_rx.try_recv() {
                Ok(raw) => break raw,
                Err(oneshot::error::TryRecvError::Empty) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the stream did not end while the uploader was stalled"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("the pipeline failed: {e}"),
            }
        };
        assert!(feeder.join().unwrap(), "the pipeline took the whole stream");
        assert_eq!(raw.size, file.len() as u64);
        assert_eq!(std::fs::read(&spool_path).unwrap(), file);
        // The uploader got at most what the queue holds; it now catches up from the spool.
        let mut stored = Vec::new();
        while let Some(b) = out_rx.blocking_recv() {
            stored.extend_from_slice(&b);
        }
        let rep = t.join().unwrap().unwrap();
        assert_eq!(rep.raw, raw);
        assert_eq!(stored, file);
    }

    #[test]
    fn the_uploader_follows_the_spool_before_the_stream_ends() {
        let file = snapshot_like(16 * 1024); // 8 MiB
        let dir = tempfile::tempdir().unwrap();
        let Started {
            raw_tx,
            mut out_rx,
            thread: t,
            ..
        } = start(dir.path(), Compression::None);
        let (first, rest) = file.split_at(4 << 20);
        assert!(feed(raw_tx.clone(), first).join().unwrap());
        // The stream is open, half sent: compressed chunks already reach the uploader.
        let mut stored = out_rx
            .blocking_recv()
            .expect("output before the end of the stream")
            .to_vec();
        assert!(feed(raw_tx, rest).join().unwrap());
        while let Some(b) = out_rx.blocking_recv() {
            stored.extend_from_slice(&b);
        }
        t.join().unwrap().unwrap();
        assert_eq!(stored, file);
    }

    #[test]
    fn pipeline_writes_spool_and_compressed_chunks() {
        let file = snapshot_like(4000); // ~2 MB
        let dir = tempfile::tempdir().unwrap();
        let Started {
            raw_tx,
            mut out_rx,
            done_rx,
            spool_path,
            thread: t,
        } = start(dir.path(), Compression::Gzip);
        let feeder = feed(raw_tx, &file);
        let mut stored = Vec::new();
        while let Some(b) = out_rx.blocking_recv() {
            stored.extend_from_slice(&b);
        }
        assert!(feeder.join().unwrap(), "the pipeline took the whole stream");
        let rep = t.join().unwrap().unwrap();
        assert_eq!(done_rx.blocking_recv().unwrap(), rep.raw);
        assert_eq!(std::fs::read(&spool_path).unwrap(), file);
        assert_eq!(rep.stored_size, stored.len() as u64);
        let sh: [u8; 32] = sha2::Sha256::digest(&stored).into();
        assert_eq!(rep.stored_sha256, sh);
        let mut dec = flate2::read::GzDecoder::new(&stored[..]);
        let mut back = Vec::new();
        io::Read::read_to_end(&mut dec, &mut back).unwrap();
        assert_eq!(back, file);
    }
}
