//! The snapshot verifier: a read-only check of an etcd snapshot file (a bbolt database
//! followed by etcd's sha256 trailer), in bounded memory, with no etcd binaries.
//!
//! It checks, in order:
//! 1. the sha256 trailer (when asked): the last 32 bytes are the sha256 of the rest;
//! 2. both meta pages (magic, version, FNV-1a checksum), using the valid one with the
//!    highest transaction id; the file length is `page count × page size` (+ 32);
//! 3. the whole B+tree, from the root through every bucket, nested and inline: every page
//!    in bounds, of the right type, with the id it is stored under, reached exactly once;
//!    elements inside their page; keys strictly ordered; branch keys equal to their
//!    child's first key ([`bbolt`]);
//! 4. etcd's layout: buckets `key` and `meta` exist, every `key` bucket key is a revision,
//!    and the revision, key counts, consistent index and the CRC-32C hash are computed
//!    exactly as `etcdutl snapshot status` does ([`etcd_layout`]).
//!
//! Memory is bounded by one page span at a time, a one-bit-per-page bitmap, and (for the
//! distinct live key count) one 64-bit hash per live key.

pub mod bbolt;
pub mod etcd_layout;

use std::path::{Path, PathBuf};

/// What to check.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Check the sha256 trailer (skip it when the caller already checked it while
    /// streaming).
    pub check_trailer: bool,
}

/// What the verifier found in a valid snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Size of the file in bytes.
    pub file_size: u64,
    /// bbolt page size.
    pub page_size: u32,
    /// Pages in the database (`meta.pgid`).
    pub page_count: u64,
    /// Transaction id of the meta page in use.
    pub txid: u64,
    /// Whether the file ends with a sha256 trailer (length `n × 512 + 32`).
    pub has_trailer: bool,
    /// Main revision of the last key of bucket `key` (0 when it is empty).
    pub revision: i64,
    /// Entries in all top-level buckets: what etcd 3.5's `snapshot status` reports as
    /// total keys.
    pub total_key_entries: u64,
    /// Distinct live user keys: what etcd 3.6+ reports as total keys.
    pub live_keys: u64,
    /// CRC-32C over every top-level bucket's name, keys and values, as `etcdutl snapshot
    /// status` computes it.
    pub hash: u32,
    /// `consistent_index` from bucket `meta`.
    pub consistent_index: Option<u64>,
    /// `term` from bucket `meta`.
    pub term: Option<u64>,
    /// `storageVersion` from bucket `meta` (written by etcd 3.6+).
    pub storage_version: Option<String>,
    /// Names of the top-level buckets.
    pub buckets: Vec<String>,
}

/// Why a snapshot is not valid. Every message says what is wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The sha256 trailer is missing or wrong.
    #[error("{0}")]
    Trailer(String),
    /// The bbolt structure is broken.
    #[error(
        "corrupt snapshot: {0}; the file is damaged: take a new snapshot or use another backup"
    )]
    Structure(String),
    /// The database is valid bbolt but not a valid etcd backend.
    #[error("not a valid etcd snapshot: {0}")]
    Etcd(String),
}

/// Random-access input for the verifier.
pub trait Source {
    /// Total length in bytes.
    fn len(&self) -> u64;
    /// Whether the input is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Fills `buf` from `offset`; errors if the range is not entirely inside the input.
    ///
    /// # Errors
    /// I/O errors, or `UnexpectedEof` past the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl Source for std::fs::File {
    fn len(&self) -> u64 {
        self.metadata().map_or(0, |m| m.len())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl Source for [u8] {
    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let end = start.checked_add(buf.len()).ok_or_else(eof)?;
        let src = self.get(start..end).ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

fn eof() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end")
}

/// Verifies the snapshot file at `path`.
///
/// # Errors
/// [`VerifyError`] naming what is wrong and where.
pub fn verify_file(path: &Path, opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let f = std::fs::File::open(path).map_err(|source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    verify_source(&f, opts).map_err(|e| match e {
        VerifyError::Io { source, .. } => VerifyError::Io {
            path: path.to_path_buf(),
            source,
        },
        other => other,
    })
}

/// Verifies a snapshot held in memory (tests, fuzzing).
///
/// # Errors
/// [`VerifyError`] naming what is wrong and where.
pub fn verify_bytes(bytes: &[u8], opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    verify_source(bytes, opts)
}

/// Verifies any [`Source`].
///
/// # Errors
/// [`VerifyError`] naming what is wrong and where.
pub fn verify_source<S: Source + ?Sized>(
    src: &S,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let file_size = src.len();
    let has_trailer = file_size % 512 == 32 && file_size >= 32;
    if opts.check_trailer {
        check_trailer(src, file_size)?;
    }
    let db_len = if has_trailer {
        file_size - 32
    } else {
        file_size
    };
    let mut layout = etcd_layout::EtcdLayout::default();
    let meta = bbolt::walk(src, db_len, &mut layout)?;
    let etcd = layout.finish()?;
    Ok(VerifyReport {
        file_size,
        page_size: meta.page_size,
        page_count: meta.pgid,
        txid: meta.txid,
        has_trailer,
        revision: etcd.revision,
        total_key_entries: etcd.total_key_entries,
        live_keys: etcd.live_keys,
        hash: etcd.hash,
        consistent_index: etcd.consistent_index,
        term: etcd.term,
        storage_version: etcd.storage_version,
        buckets: etcd.buckets,
    })
}

fn check_trailer<S: Source + ?Sized>(src: &S, size: u64) -> Result<(), VerifyError> {
    use crate::digest::Sha256;
    if size % 512 != 32 || size < 512 + 32 {
        return Err(VerifyError::Trailer(format!(
            "the file has no sha256 trailer ({size} bytes; an etcd snapshot is a multiple of 512 bytes plus 32): it is truncated, or not a snapshot as etcd streams it"
        )));
    }
    let data_len = size - 32;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < data_len {
        let n = (data_len - off).min(buf.len() as u64) as usize;
        src.read_at(off, &mut buf[..n]).map_err(io_err)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    let mut trailer = [0u8; 32];
    src.read_at(data_len, &mut trailer).map_err(io_err)?;
    let computed: [u8; 32] = h.finalize();
    if computed != trailer {
        return Err(VerifyError::Trailer(format!(
            "the sha256 trailer (bytes {data_len}..{size}) does not match the data: expected {}, computed {}; the file is damaged",
            hex::encode(trailer),
            hex::encode(computed)
        )));
    }
    Ok(())
}

fn io_err(source: std::io::Error) -> VerifyError {
    VerifyError::Io {
        path: PathBuf::new(),
        source,
    }
}
