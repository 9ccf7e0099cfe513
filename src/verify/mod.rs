//! The snapshot verifier: a read-only check of an etcd snapshot file (a bbolt database
//! followed by etcd's sha256 trailer), in bounded memory, with no etcd binaries.
//!
//! It checks:
//! 1. the sha256 trailer (when asked): the last 32 bytes are the sha256 of the rest. This
//!    runs on a second thread while the structure is walked;
//! 2. both meta pages (magic, version 2, FNV-1a checksum), using the valid one with the
//!    highest transaction id and falling back to the other, as bbolt does; the file length
//!    is `page count × page size` (+ 32 with a trailer);
//! 3. the whole B+tree, from the root through every bucket, nested and inline: every page
//!    in bounds, of the right type, with the id it is stored under, reached exactly once;
//!    elements inside their page; keys strictly ordered; branch keys equal to their
//!    child's first key ([`bbolt`]);
//! 4. etcd's layout: buckets `key` and `meta` exist, every `key` bucket key is a revision,
//!    and the revision, key counts, consistent index and the CRC-32C hash are computed
//!    exactly as `etcdutl snapshot status` does ([`etcd_layout`]).
//!
//! One invalid meta page is not an error: bbolt opens the database from the other one and
//! the snapshot restores to the same data (in a snapshot, meta page 1 is meta page 0 with
//! the transaction id lowered by one). The report says which meta page was used and why
//! the other was rejected. Restoring still needs an intact file, because restore compares
//! the sha256 trailer, which covers both meta pages: verify with `check_trailer` to catch
//! that.
//!
//! Memory: one page span per level of the current path (a page and its overflow pages; a
//! span above [`bbolt::MAX_SPAN`] is rejected as corrupt), a one-bit-per-page bitmap, a
//! 1 MiB hashing buffer, and a set of at most [`etcd_layout::LIVE_KEY_LIMIT`] 64-bit
//! hashes for the live key count (about 19 MB at most; with more live keys than that, the
//! count takes one more walk per partition of the key space). The walk is iterative and
//! reaches each page at most once, so it ends on any input.

pub mod bbolt;
pub mod etcd_layout;

use std::path::{Path, PathBuf};

/// What to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyOptions {
    /// Check the sha256 trailer. Turn it off when the caller already checked the trailer
    /// while streaming the snapshot.
    pub check_trailer: bool,
}

/// What the verifier found in a valid snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Size of the file in bytes.
    pub file_size: u64,
    /// bbolt page size.
    pub page_size: u32,
    /// Pages in the database (`meta.pgid`); the database is `page_count × page_size` bytes.
    pub page_count: u64,
    /// Transaction id of the meta page in use.
    pub txid: u64,
    /// Whether the file ends with a sha256 trailer (length `n × 512 + 32`).
    pub has_trailer: bool,
    /// Whether the trailer was compared with the data (`check_trailer` and a trailer).
    pub trailer_checked: bool,
    /// Which meta page was used (0 or 1).
    pub meta_used: u8,
    /// Why the other meta page is invalid, when it is: the database is readable from the
    /// one used, but the file is damaged (a trailer check fails on it).
    pub meta_warning: Option<String>,
    /// Pages reachable from neither the root nor the freelist: free space left by old
    /// transactions, normal in etcd snapshots.
    pub unreachable_pages: u64,
    /// Main revision of the last key of bucket `key` (0 when it is empty).
    pub revision: i64,
    /// Entries in all top-level buckets: what etcd 3.4/3.5's `snapshot status` reports as
    /// total keys.
    pub total_key_entries: u64,
    /// Distinct live user keys: what etcd 3.6+ reports as total keys.
    pub live_keys: u64,
    /// CRC-32C over every top-level bucket's name, keys and values, as `etcdutl snapshot
    /// status` computes it.
    pub hash: u32,
    /// `consistent_index` from bucket `meta`.
    pub consistent_index: Option<u64>,
    /// `term` from bucket `meta` (written by etcd 3.5+).
    pub term: Option<u64>,
    /// `storageVersion` from bucket `meta` (written by etcd 3.6+).
    pub storage_version: Option<String>,
    /// Names of the top-level buckets, in key order.
    pub buckets: Vec<String>,
}

/// What is structurally wrong with a page (see [`VerifyError::Page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFault {
    /// The page, or a page it points to, is outside the database.
    OutOfBounds,
    /// The page header's id is not the page's position.
    WrongId,
    /// The page's flags are not what its place in the tree needs.
    WrongType,
    /// The page is reached twice: shared between parents, or a cycle.
    ReachedTwice,
    /// The page is in use and also in the freelist.
    FreeAndUsed,
    /// The page is neither reachable nor free (only checked with a stored freelist).
    Unreachable,
    /// The page claims an implausibly large span.
    TooLarge,
    /// The tree is implausibly deep.
    TooDeep,
    /// An element lies outside the page, has unknown flags, or a bad bucket header.
    BadElement,
    /// Keys are not strictly increasing.
    KeyOrder,
    /// A branch element's key differs from its child's first key.
    BranchKeyMismatch,
    /// The freelist page is invalid.
    Freelist,
}

/// Why a snapshot is not valid. Every message says what is wrong, where, and what it means.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file (empty for in-memory input).
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A trailer check was asked for but the file has none.
    #[error(
        "the file has no sha256 trailer: it is {file_size} bytes, and an etcd snapshot is a multiple of 512 bytes plus 32; it is truncated, or a raw database file rather than a snapshot"
    )]
    TrailerMissing {
        /// Size of the file.
        file_size: u64,
    },
    /// The sha256 trailer does not match the data.
    #[error(
        "the sha256 trailer at bytes {offset}..{file_size} does not match the data (stored {stored}, computed {computed}): the file was damaged after etcd wrote it; use another backup"
    )]
    TrailerMismatch {
        /// Where the trailer starts.
        offset: u64,
        /// Size of the file.
        file_size: u64,
        /// The trailer, hex.
        stored: String,
        /// The sha256 of the data, hex.
        computed: String,
    },
    /// Neither meta page is valid.
    #[error(
        "neither meta page is valid (meta page 0: {meta0}; meta page 1: {meta1}): the file is not a bbolt database or its header is destroyed; it cannot be restored"
    )]
    Meta {
        /// Why meta page 0 is invalid.
        meta0: String,
        /// Why meta page 1 is invalid.
        meta1: String,
    },
    /// The database length disagrees with the meta page.
    #[error(
        "the file is {file_size} bytes, so the database is {db_len} bytes{}, but meta page {meta_used} says {page_count} pages of {page_size} bytes = {expected} bytes: the file is {}; the snapshot is incomplete or damaged",
        if *has_trailer { " before its 32-byte trailer" } else { "" },
        if u128::from(*db_len) < *expected { "truncated" } else { "longer than its database" }
    )]
    Length {
        /// Size of the file.
        file_size: u64,
        /// Size of the database part (without trailer).
        db_len: u64,
        /// Whether a trailer was assumed.
        has_trailer: bool,
        /// Meta page used.
        meta_used: u8,
        /// Pages per the meta page.
        page_count: u64,
        /// Page size per the meta page.
        page_size: u32,
        /// `page_count × page_size`.
        expected: u128,
    },
    /// A page of the B+tree is broken.
    #[error(
        "page {page} (offset {offset}): {detail}; the snapshot is corrupt: take a new one or use another backup"
    )]
    Page {
        /// The page id.
        page: u64,
        /// Its byte offset in the file.
        offset: u64,
        /// The kind of problem.
        fault: PageFault,
        /// What exactly is wrong.
        detail: String,
    },
    /// The database is valid bbolt but not a valid etcd backend.
    #[error("not a valid etcd snapshot: {detail}")]
    Etcd {
        /// What is wrong and where (bucket, entry, page, element).
        detail: String,
    },
}

impl VerifyError {
    /// The page the error is about, when there is one.
    pub fn page(&self) -> Option<u64> {
        match self {
            VerifyError::Page { page, .. } => Some(*page),
            _ => None,
        }
    }
}

/// Random-access input for the verifier.
pub trait Source: Sync {
    /// Total length in bytes.
    ///
    /// # Errors
    /// I/O errors.
    fn size(&self) -> std::io::Result<u64>;
    /// Fills `buf` from `offset`; errors if the range is not entirely inside the input.
    ///
    /// # Errors
    /// I/O errors, or `UnexpectedEof` past the end.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()>;
}

impl Source for std::fs::File {
    fn size(&self) -> std::io::Result<u64> {
        self.metadata().map(|m| m.len())
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

impl Source for [u8] {
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|start| self.get(start..start.checked_add(buf.len())?))
            .ok_or_else(|| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end")
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

/// Verifies the snapshot file at `path`.
///
/// # Errors
/// [`VerifyError`] naming what is wrong and where.
pub fn verify_file(path: &Path, opts: &VerifyOptions) -> Result<VerifyReport, VerifyError> {
    let with_path = |source| VerifyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = std::fs::File::open(path).map_err(with_path)?;
    verify_source(&f, opts).map_err(|e| match e {
        VerifyError::Io { source, .. } => with_path(source),
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
/// [`VerifyError`] naming what is wrong and where. A trailer mismatch wins over a
/// structural error, since it explains it.
pub fn verify_source<S: Source + ?Sized>(
    src: &S,
    opts: &VerifyOptions,
) -> Result<VerifyReport, VerifyError> {
    let file_size = src.size().map_err(io_err)?;
    let has_trailer = file_size % 512 == 32;
    if opts.check_trailer && !has_trailer {
        return Err(VerifyError::TrailerMissing { file_size });
    }
    let db_len = if has_trailer {
        file_size - 32
    } else {
        file_size
    };
    if !opts.check_trailer {
        return structure(src, file_size, db_len, has_trailer, false);
    }
    // Hash on a second thread while the structure is walked.
    std::thread::scope(|scope| {
        let hasher = std::thread::Builder::new()
            .name("verify-sha256".into())
            .spawn_scoped(scope, || check_trailer(src, db_len, file_size));
        let (trailer, walked) = match hasher {
            Ok(h) => {
                let walked = structure(src, file_size, db_len, has_trailer, true);
                let trailer = h.join().unwrap_or_else(|_| {
                    Err(io_err(std::io::Error::other("the hashing thread failed")))
                });
                (trailer, walked)
            }
            Err(_) => (
                check_trailer(src, db_len, file_size),
                structure(src, file_size, db_len, has_trailer, true),
            ),
        };
        trailer?;
        walked
    })
}

fn structure<S: Source + ?Sized>(
    src: &S,
    file_size: u64,
    db_len: u64,
    has_trailer: bool,
    trailer_checked: bool,
) -> Result<VerifyReport, VerifyError> {
    let choice = bbolt::choose_meta(src, db_len)?;
    let meta = &choice.meta;
    let expected = u128::from(meta.pgid) * u128::from(meta.page_size);
    if u128::from(db_len) != expected {
        return Err(VerifyError::Length {
            file_size,
            db_len,
            has_trailer,
            meta_used: choice.index,
            page_count: meta.pgid,
            page_size: meta.page_size,
            expected,
        });
    }
    let mut layout = etcd_layout::EtcdLayout::default();
    let walked = bbolt::walk(src, meta, &mut layout)?;
    let etcd = layout.finish()?;
    let live_keys = match etcd.live_keys {
        Some(n) => n,
        None => etcd_layout::EtcdLayout::live_keys_only(
            etcd.key_entries,
            etcd_layout::LIVE_KEY_LIMIT,
            |layout| bbolt::walk(src, meta, layout).map(|_| ()),
        )?,
    };
    Ok(VerifyReport {
        file_size,
        page_size: meta.page_size,
        page_count: meta.pgid,
        txid: meta.txid,
        has_trailer,
        trailer_checked,
        meta_used: choice.index,
        meta_warning: choice.other_invalid,
        unreachable_pages: walked.unreachable_pages,
        revision: etcd.revision,
        total_key_entries: etcd.total_key_entries,
        live_keys,
        hash: etcd.hash,
        consistent_index: etcd.consistent_index,
        term: etcd.term,
        storage_version: etcd.storage_version,
        buckets: etcd.buckets,
    })
}

/// Compares the last 32 bytes with the sha256 of `[0, db_len)`.
fn check_trailer<S: Source + ?Sized>(
    src: &S,
    db_len: u64,
    file_size: u64,
) -> Result<(), VerifyError> {
    // ring uses the CPU's SHA extensions where present (about 1.1 GB/s here).
    let mut h = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < db_len {
        let n = usize::try_from((db_len - off).min(buf.len() as u64)).unwrap_or(buf.len());
        src.read_at(off, &mut buf[..n]).map_err(io_err)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    let mut stored = [0u8; 32];
    src.read_at(db_len, &mut stored).map_err(io_err)?;
    let digest = h.finish();
    let computed = digest.as_ref();
    if computed != stored {
        return Err(VerifyError::TrailerMismatch {
            offset: db_len,
            file_size,
            stored: bbolt::hex_prefix(&stored),
            computed: bbolt::hex_prefix(computed),
        });
    }
    Ok(())
}

fn io_err(source: std::io::Error) -> VerifyError {
    VerifyError::Io {
        path: PathBuf::new(),
        source,
    }
}

#[cfg(test)]
mod tests;
