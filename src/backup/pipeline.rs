//! The streaming part of a cycle: snapshot chunks in; a spool copy, the raw sha256 and the
//! trailer check, and compressed chunks for the uploader out.
//!
//! ```text
//! etcd stream ──chan──▶ [pipeline thread] ──chan──▶ uploader (multipart parts)
//!                         ├─chan─▶ [spool thread] trailer check + sha256 of the raw file,
//!                         │                      spool file (for the verifier)
//!                         └─ compressor ─▶ [age encryption] ─▶ stored sha256 + size
//! ```
//!
//! Channels are bounded, so memory stays flat whatever the database size: at most
//! `RAW_QUEUE` + `SPOOL_QUEUE` snapshot chunks, one output chunk being filled, `OUT_QUEUE`
//! output chunks waiting, and the uploader's parts in flight.

use crate::codec::compress::Compression;
use crate::codec::crypt::Sealer;
use crate::codec::digest::Sha256;
use bytes::Bytes;
use std::io::{self, Write};
use tokio::sync::mpsc;

/// Snapshot chunks (32 KiB each from etcd) queued for the pipeline thread.
pub const RAW_QUEUE: usize = 64;
/// Snapshot chunks queued for the spool thread. Small: the compressor may run only a little
/// ahead of the spool.
pub const SPOOL_QUEUE: usize = 8;
/// Compressed chunks queued for the uploader.
pub const OUT_QUEUE: usize = 4;
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

/// What the pipeline thread produced.
#[derive(Debug, Clone)]
pub struct PipelineReport {
    /// The raw snapshot's size and sha256 (trailer checked).
    pub raw: RawDigest,
    /// Stored (compressed) size.
    pub stored_size: u64,
    /// sha256 of the stored object.
    pub stored_sha256: [u8; 32],
}

/// Why the pipeline thread failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// Writing the spool file failed (disk full, permissions).
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
}

/// Runs on a blocking thread: consumes snapshot chunks until the channel closes, writing
/// the spool file, checking the trailer and compressing into `out`.
///
/// The work is split over two threads so that it overlaps: this one compresses (and
/// encrypts), a scoped helper checks the trailer and writes the spool file. Chunks are
/// shared (`Bytes`), never copied, and the helper's queue is bounded like the others.
///
/// # Errors
/// [`PipelineError`] on the first failure; the caller aborts the upload.
pub fn run(
    mut rx: mpsc::Receiver<Bytes>,
    spool: std::fs::File,
    spool_path: &std::path::Path,
    compression: Compression,
    level: Option<i32>,
    recipients: &[age::x25519::Recipient],
    out: mpsc::Sender<Bytes>,
) -> Result<PipelineReport, PipelineError> {
    let sealer = Sealer::new(ChunkSink::new(out), recipients).map_err(PipelineError::Compress)?;
    let mut enc = compression
        .encoder(sealer, level)
        .map_err(PipelineError::Compress)?;
    std::thread::scope(|scope| {
        let (spool_tx, spool_rx) = std::sync::mpsc::sync_channel::<Bytes>(SPOOL_QUEUE);
        let spooler = scope.spawn(move || spool_and_check(&spool_rx, spool, spool_path));
        let mut compressed = Ok(());
        while let Some(chunk) = rx.blocking_recv() {
            if spool_tx.send(chunk.clone()).is_err() {
                // The spool thread failed; its error is the one to report.
                break;
            }
            if let Err(e) = enc.write_all(&chunk) {
                compressed = Err(PipelineError::Compress(e));
                break;
            }
        }
        drop(spool_tx);
        let spooled = spooler
            .join()
            .map_err(|_| PipelineError::Compress(io::Error::other("the spool thread panicked")))?;
        // A failed spool write is the cause of anything else; a compressor failure comes
        // next (it ends the stream early, so the trailer check then fails too).
        let raw = match (spooled, compressed) {
            (Err(e @ PipelineError::Spool { .. }), _) | (_, Err(e)) | (Err(e), Ok(())) => {
                return Err(e)
            }
            (Ok(raw), Ok(())) => raw,
        };
        let sealer = enc.finish().map_err(PipelineError::Compress)?;
        let sink = sealer.finish().map_err(PipelineError::Compress)?;
        let (stored_size, stored_sha256) = sink.close().map_err(PipelineError::Compress)?;
        Ok(PipelineReport {
            raw,
            stored_size,
            stored_sha256,
        })
    })
}

/// The helper thread of [`run`]: writes every chunk to the spool file and checks the
/// trailer, until the sender is dropped.
fn spool_and_check(
    rx: &std::sync::mpsc::Receiver<Bytes>,
    spool: std::fs::File,
    spool_path: &std::path::Path,
) -> Result<RawDigest, PipelineError> {
    let spool_err = |source| PipelineError::Spool {
        path: spool_path.display().to_string(),
        source,
    };
    let mut spool = io::BufWriter::with_capacity(1024 * 1024, spool);
    let mut check = TrailerCheck::new();
    for chunk in rx {
        check.update(&chunk);
        spool.write_all(&chunk).map_err(spool_err)?;
    }
    spool.flush().map_err(spool_err)?;
    Ok(check.finish()?)
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

    /// Runs the pipeline over `file` in 32 KiB chunks; the feeder tolerates an early stop.
    fn run_over(
        file: &[u8],
        spool: std::fs::File,
        out_tx: mpsc::Sender<Bytes>,
    ) -> Result<PipelineReport, PipelineError> {
        let (raw_tx, raw_rx) = mpsc::channel(RAW_QUEUE);
        let feeder = {
            let file = file.to_vec();
            std::thread::spawn(move || {
                for c in file.chunks(32 * 1024) {
                    if raw_tx.blocking_send(Bytes::copy_from_slice(c)).is_err() {
                        break;
                    }
                }
            })
        };
        let r = run(
            raw_rx,
            spool,
            std::path::Path::new("test.spool"),
            Compression::None,
            None,
            &[],
            out_tx,
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
        let err = run_over(&file, spool, out_tx).unwrap_err();
        drain.join().unwrap();
        assert!(matches!(err, PipelineError::Spool { .. }), "{err:?}");
        assert!(err.to_string().contains("check free space"), "{err}");
    }

    #[test]
    fn a_stopped_uploader_is_reported_not_a_cut_trailer() {
        let file = snapshot_like(8000); // ~4 MB, more than the output queue holds
        let dir = tempfile::tempdir().unwrap();
        let spool = std::fs::File::create(dir.path().join("s.spool")).unwrap();
        let (out_tx, out_rx) = mpsc::channel(OUT_QUEUE);
        drop(out_rx);
        let err = run_over(&file, spool, out_tx).unwrap_err();
        assert!(
            matches!(&err, PipelineError::Compress(e) if e.kind() == io::ErrorKind::BrokenPipe),
            "{err:?}"
        );
    }

    #[test]
    fn pipeline_writes_spool_and_compressed_chunks() {
        let file = snapshot_like(4000); // ~2 MB
        let dir = tempfile::tempdir().unwrap();
        let spool_path = dir.path().join("s.spool");
        let spool = std::fs::File::create(&spool_path).unwrap();
        let (raw_tx, raw_rx) = mpsc::channel(RAW_QUEUE);
        let (out_tx, mut out_rx) = mpsc::channel(OUT_QUEUE);
        let sp = spool_path.clone();
        let t = std::thread::spawn(move || {
            run(raw_rx, spool, &sp, Compression::Gzip, None, &[], out_tx)
        });
        let feeder = {
            let file = file.clone();
            std::thread::spawn(move || {
                for c in file.chunks(32 * 1024) {
                    raw_tx.blocking_send(Bytes::copy_from_slice(c)).unwrap();
                }
            })
        };
        let mut stored = Vec::new();
        while let Some(b) = out_rx.blocking_recv() {
            stored.extend_from_slice(&b);
        }
        feeder.join().unwrap();
        let rep = t.join().unwrap().unwrap();
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
