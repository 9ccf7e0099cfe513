//! A read-only, iterative walk of a bbolt database: both meta pages, then every page of
//! every bucket tree (nested and inline buckets included), with the checks bbolt's own
//! `tx.Check()` makes and a few stricter ones, reporting entries to a [`Visitor`] in key
//! order.
//!
//! On-disk format (little-endian):
//! - page header, 16 bytes: `id u64, flags u16, count u16, overflow u32`; flags are
//!   branch `0x01`, leaf `0x02`, meta `0x04`, freelist `0x10` (exact values); a page spans
//!   `(overflow + 1) × page_size` bytes;
//! - meta (pages 0 and 1, at offset 16): `magic u32 = 0xED0CDAED, version u32 = 2,
//!   page_size u32, flags u32, root u64, sequence u64, freelist u64, pgid u64, txid u64,
//!   checksum u64`, where `checksum` is FNV-1a 64 of the 56 bytes before it;
//! - branch element, 16 bytes: `pos u32, ksize u32, pgid u64`, key at element + pos;
//! - leaf element, 16 bytes: `flags u32, pos u32, ksize u32, vsize u32`, key at element +
//!   pos, value right after; flag `0x01` marks a sub-bucket whose value starts with
//!   `root u64, sequence u64` and, when `root == 0`, holds the bucket inline as a page.
//!
//! Nothing here trusts a length from the file: every offset is bounds-checked before use,
//! every page is reached at most once (a one-bit-per-page bitmap), and the walk keeps an
//! explicit stack of the pages on the current path only (one frame per tree level), so
//! memory is a few page spans plus the bitmap whatever the file claims.

use super::{PageFault, Source, VerifyError};

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const META: u16 = 0x04;
const FREELIST: u16 = 0x10;
const BUCKET_LEAF_FLAG: u32 = 0x01;
const HEADER: usize = 16;
const ELEMENT: usize = 16;
const META_SIZE: usize = 64;
const BUCKET_HEADER: usize = 16;
/// bbolt's `PgidNoFreelist`: no freelist is stored (etcd's default on Linux).
const NO_FREELIST: u64 = u64::MAX;
/// bbolt's `MaxKeySize`.
const MAX_KEY: u32 = 32768;
/// The largest page span (a page and its overflow pages) the verifier reads. etcd limits a
/// request to 1.5 MiB by default, so real spans are far smaller; a larger claim is treated
/// as corruption rather than allocated.
pub const MAX_SPAN: u64 = 128 << 20;
/// The most bytes of page spans held at once along the current path.
const MAX_HELD: u64 = 2 * MAX_SPAN;
/// The deepest path accepted (tree levels of all nested buckets together). A bbolt tree
/// over an 8 GiB file is about 5 levels deep, and etcd nests no buckets.
const MAX_FRAMES: usize = 256;
/// Buffers with more capacity than this are freed instead of reused.
const POOL_MAX_CAPACITY: usize = 4 << 20;
/// Page sizes probed for meta page 1 when meta page 0 is unreadable.
const PROBE_PAGE_SIZES: [u32; 11] = [
    4096,
    16384,
    65536,
    8192,
    32768,
    1024,
    2048,
    131_072,
    262_144,
    524_288,
    1 << 20,
];

/// A valid meta page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Page size.
    pub page_size: u32,
    /// Root page of the root bucket.
    pub root: u64,
    /// Freelist page, or `u64::MAX` when none is stored.
    pub freelist: u64,
    /// High-water mark: pages in the database.
    pub pgid: u64,
    /// Transaction id.
    pub txid: u64,
}

/// The meta page in use and what was wrong with the other one, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaChoice {
    /// The meta in use.
    pub meta: Meta,
    /// Which meta page it came from (0 or 1).
    pub index: u8,
    /// Why the other meta page is invalid, when it is.
    pub other_invalid: Option<String>,
}

/// Where an entry sits, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    /// The page holding the entry (for an inline bucket, the page holding the bucket).
    pub page: u64,
    /// The element index within its page (within the inline page for an inline bucket).
    pub element: usize,
    /// Whether the entry is inside an inline bucket.
    pub inline: bool,
}

impl std::fmt::Display for Loc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.inline {
            write!(
                f,
                "element {} of an inline bucket in page {}",
                self.element, self.page
            )
        } else {
            write!(f, "page {}, element {}", self.page, self.element)
        }
    }
}

/// Receives a database's contents in key order.
pub trait Visitor {
    /// An entry of the bucket at `depth` (0 is the root bucket, whose entries are the
    /// top-level buckets). `value` is `None` for a sub-bucket, whose contents follow
    /// between [`Visitor::bucket_begin`] and [`Visitor::bucket_end`].
    ///
    /// # Errors
    /// An error that ends the walk.
    fn entry(
        &mut self,
        depth: usize,
        key: &[u8],
        value: Option<&[u8]>,
        loc: Loc,
    ) -> Result<(), VerifyError>;
    /// The contents of sub-bucket `name` start; it is at `depth` (1 is top-level).
    ///
    /// # Errors
    /// An error that ends the walk.
    fn bucket_begin(&mut self, depth: usize, name: &[u8], loc: Loc) -> Result<(), VerifyError>;
    /// The bucket at `depth` ends.
    ///
    /// # Errors
    /// An error that ends the walk.
    fn bucket_end(&mut self, depth: usize) -> Result<(), VerifyError>;
}

/// What the walk found besides the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalkSummary {
    /// Pages neither reachable from the root nor the freelist page: free pages (with no
    /// freelist stored, free is by definition what is not reachable).
    pub unreachable_pages: u64,
    /// Branch pages walked.
    pub branch_pages: u64,
    /// Leaf pages walked.
    pub leaf_pages: u64,
    /// Overflow pages (beyond the first page of a span) walked.
    pub overflow_pages: u64,
    /// Inline buckets walked.
    pub inline_buckets: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    match b.get(o..o + 2) {
        Some(s) => u16::from_le_bytes([s[0], s[1]]),
        None => 0,
    }
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// FNV-1a, 64 bit.
pub fn fnv1a64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Lowercase hex of at most the first 40 bytes, for messages.
pub(crate) fn hex_prefix(b: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(b.len().min(40) * 2 + 3);
    for x in b.iter().take(40) {
        let _ = write!(s, "{x:02x}");
    }
    if b.len() > 40 {
        s.push_str("...");
    }
    s
}

/// Parses the meta page stored at `offset` as meta page `index`; `Err` says why it is
/// invalid. `expect_page_size` is the offset itself for meta page 1.
fn read_meta<S: Source + ?Sized>(
    src: &S,
    db_len: u64,
    offset: u64,
    index: u64,
    expect_page_size: Option<u32>,
) -> Result<Meta, String> {
    let mut b = [0u8; HEADER + META_SIZE];
    if offset + b.len() as u64 > db_len {
        return Err(format!(
            "it would lie at offset {offset}, beyond the end of the {db_len}-byte database"
        ));
    }
    src.read_at(offset, &mut b)
        .map_err(|e| format!("cannot read it at offset {offset}: {e}"))?;
    let (id, flags) = (u64_at(&b, 0), u16_at(&b, 8));
    let m = &b[HEADER..];
    let magic = u32_at(m, 0);
    if magic != MAGIC {
        return Err(if magic.swap_bytes() == MAGIC {
            "byte-swapped magic: the database was written on a big-endian host; not supported"
                .to_string()
        } else {
            format!("bad magic {magic:#010x} (expected {MAGIC:#010x}): not a bbolt meta page")
        });
    }
    let version = u32_at(m, 4);
    if version != VERSION {
        return Err(format!(
            "unsupported format version {version} (expected {VERSION})"
        ));
    }
    let sum = u64_at(m, 56);
    let computed = fnv1a64(&m[..56]);
    if computed != sum {
        return Err(format!(
            "checksum mismatch (stored {sum:#018x}, computed {computed:#018x}): the meta page is damaged"
        ));
    }
    if flags != META || id != index {
        return Err(format!(
            "page header says id {id}, flags {flags:#06x} (expected id {index}, meta flags {META:#06x})"
        ));
    }
    let page_size = u32_at(m, 8);
    if !page_size.is_power_of_two() || !(1024..=1 << 20).contains(&page_size) {
        return Err(format!("implausible page size {page_size}"));
    }
    if let Some(ps) = expect_page_size {
        if page_size != ps {
            return Err(format!(
                "it says page size {page_size} but sits at offset {ps}"
            ));
        }
    }
    let meta = Meta {
        page_size,
        root: u64_at(m, 16),
        freelist: u64_at(m, 32),
        pgid: u64_at(m, 40),
        txid: u64_at(m, 48),
    };
    if meta.pgid < 3 || meta.root < 2 || meta.root >= meta.pgid {
        return Err(format!(
            "root page {} is outside the {} pages of the database",
            meta.root, meta.pgid
        ));
    }
    if meta.freelist != NO_FREELIST && (meta.freelist < 2 || meta.freelist >= meta.pgid) {
        return Err(format!(
            "freelist page {} is outside the {} pages of the database",
            meta.freelist, meta.pgid
        ));
    }
    Ok(meta)
}

/// Reads both meta pages and picks the one bbolt would use: the valid one with the higher
/// transaction id, else the only valid one.
///
/// # Errors
/// [`VerifyError::Meta`] when neither is valid.
pub fn choose_meta<S: Source + ?Sized>(src: &S, db_len: u64) -> Result<MetaChoice, VerifyError> {
    let m0 = read_meta(src, db_len, 0, 0, None);
    let m1 = match &m0 {
        Ok(m) => read_meta(src, db_len, u64::from(m.page_size), 1, Some(m.page_size)),
        Err(_) => {
            // Like bbolt, look for meta page 1 at the usual page sizes.
            let mut found = Err("not found at any plausible page size".to_string());
            for ps in PROBE_PAGE_SIZES {
                let r = read_meta(src, db_len, u64::from(ps), 1, Some(ps));
                if r.is_ok() {
                    found = r;
                    break;
                }
                if ps == 4096 {
                    found = r.map_err(|e| format!("at offset 4096: {e}"));
                }
            }
            found
        }
    };
    match (m0, m1) {
        (Ok(a), Ok(b)) => Ok(if b.txid > a.txid {
            MetaChoice {
                meta: b,
                index: 1,
                other_invalid: None,
            }
        } else {
            MetaChoice {
                meta: a,
                index: 0,
                other_invalid: None,
            }
        }),
        (Ok(a), Err(e)) => Ok(MetaChoice {
            meta: a,
            index: 0,
            other_invalid: Some(format!("meta page 1: {e}")),
        }),
        (Err(e), Ok(b)) => Ok(MetaChoice {
            meta: b,
            index: 1,
            other_invalid: Some(format!("meta page 0: {e}")),
        }),
        (Err(meta0), Err(meta1)) => Err(VerifyError::Meta { meta0, meta1 }),
    }
}

/// One bit per page.
struct Bitmap(Vec<u64>);

impl Bitmap {
    fn new(bits: u64) -> Self {
        Bitmap(vec![0; usize::try_from(bits.div_ceil(64)).unwrap_or(0)])
    }
    fn get(&self, i: u64) -> bool {
        let w = usize::try_from(i / 64).unwrap_or(usize::MAX);
        self.0.get(w).is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
    fn set(&mut self, i: u64) {
        let w = usize::try_from(i / 64).unwrap_or(usize::MAX);
        if let Some(w) = self.0.get_mut(w) {
            *w |= 1 << (i % 64);
        }
    }
}

/// A page on the current path.
struct PageFrame {
    /// The page span, or an inline bucket's page.
    buf: Vec<u8>,
    /// The page id (for an inline page, the page holding it).
    pgid: u64,
    inline: bool,
    branch: bool,
    count: usize,
    /// The next element to process.
    next: usize,
}

enum Frame {
    Page(PageFrame),
    /// Closes the innermost bucket when popped.
    BucketEnd,
}

/// Per open bucket: the last key seen, for ordering across pages.
struct BucketState {
    last: Vec<u8>,
    has_last: bool,
}

struct Walker<'a, S: Source + ?Sized, V: Visitor> {
    src: &'a S,
    ps: u64,
    hwm: u64,
    reached: Bitmap,
    free: Option<Bitmap>,
    frames: Vec<Frame>,
    held: u64,
    pool: Vec<Vec<u8>>,
    buckets: Vec<BucketState>,
    expect: Vec<u8>,
    visitor: &'a mut V,
    stats: WalkSummary,
}

/// Walks the database `src[..db_len]` from `meta`'s root, checking its structure and
/// calling `visitor` for every bucket and entry in key order.
///
/// # Errors
/// [`VerifyError::Length`] when the database length disagrees with the meta page,
/// [`VerifyError::Page`] for any structural problem, [`VerifyError::Io`] when reading
/// fails, and whatever the visitor returns.
pub fn walk<S: Source + ?Sized, V: Visitor>(
    src: &S,
    meta: &Meta,
    visitor: &mut V,
) -> Result<WalkSummary, VerifyError> {
    walk_pages(src, meta, visitor).map(|(summary, _)| summary)
}

/// [`walk`], also returning which pages were reached.
fn walk_pages<S: Source + ?Sized, V: Visitor>(
    src: &S,
    meta: &Meta,
    visitor: &mut V,
) -> Result<(WalkSummary, Bitmap), VerifyError> {
    let ps = u64::from(meta.page_size);
    let mut w = Walker {
        src,
        ps,
        hwm: meta.pgid,
        reached: Bitmap::new(meta.pgid),
        free: None,
        frames: Vec::new(),
        held: 0,
        pool: Vec::new(),
        buckets: Vec::new(),
        expect: Vec::new(),
        visitor,
        stats: WalkSummary {
            unreachable_pages: 0,
            branch_pages: 0,
            leaf_pages: 0,
            overflow_pages: 0,
            inline_buckets: 0,
        },
    };
    w.reached.set(0);
    w.reached.set(1);
    if meta.freelist != NO_FREELIST {
        w.read_freelist(meta.freelist)?;
    }
    w.buckets.push(BucketState {
        last: Vec::new(),
        has_last: false,
    });
    w.push_page(meta.root, None, None)?;
    w.run()?;
    let mut unreachable = 0u64;
    // With a stored freelist, every page is either reachable or free.
    for p in 2..meta.pgid {
        if !w.reached.get(p) {
            if w.free.as_ref().is_some_and(|f| !f.get(p)) {
                return Err(w.fault(
                    p,
                    PageFault::Unreachable,
                    "is neither reachable from the root nor in the freelist: the page tree lost a subtree".to_string(),
                ));
            }
            unreachable += 1;
        }
    }
    w.stats.unreachable_pages = unreachable;
    Ok((w.stats, w.reached))
}

impl<S: Source + ?Sized, V: Visitor> Walker<'_, S, V> {
    fn fault(&self, page: u64, fault: PageFault, detail: String) -> VerifyError {
        VerifyError::Page {
            page,
            offset: page.saturating_mul(self.ps),
            fault,
            detail,
        }
    }

    fn take_buf(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_default()
    }

    fn give_buf(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() <= POOL_MAX_CAPACITY {
            buf.clear();
            self.pool.push(buf);
        }
    }

    /// Reads page `pgid` with its overflow pages into `buf`, after checking that the span
    /// is inside the database and reached for the first time (marking it). `from` names the
    /// referring page and element for messages. Returns `(flags, count)`.
    fn load(
        &mut self,
        pgid: u64,
        from: Option<(u64, usize)>,
        buf: &mut Vec<u8>,
    ) -> Result<(u16, u16), VerifyError> {
        let from_text = || match from {
            Some((p, i)) => format!("page {p} element {i}"),
            None => "the meta page".to_string(),
        };
        if pgid < 2 || pgid >= self.hwm {
            let (page, what) = match from {
                Some((p, _)) => (p, format!("{} points to page {pgid}", from_text())),
                None => (pgid, format!("the meta page points to page {pgid}")),
            };
            return Err(self.fault(
                page,
                PageFault::OutOfBounds,
                format!("{what}, outside the database's pages 2..{}", self.hwm),
            ));
        }
        if self.reached.get(pgid) {
            return Err(self.fault(
                pgid,
                PageFault::ReachedTwice,
                format!(
                    "is reached a second time (from {}): pages are shared or form a cycle",
                    from_text()
                ),
            ));
        }
        let ps = usize::try_from(self.ps).unwrap_or(usize::MAX);
        buf.clear();
        buf.resize(ps, 0);
        self.read(pgid * self.ps, buf)?;
        let id = u64_at(buf, 0);
        let flags = u16_at(buf, 8);
        let count = u16_at(buf, 10);
        let overflow = u64::from(u32_at(buf, 12));
        if id != pgid {
            return Err(self.fault(
                pgid,
                PageFault::WrongId,
                format!(
                    "has id {id} in its header (reached from {}): pages are misplaced, swapped or overwritten",
    from_text()
                ),
            ));
        }
        let last = pgid + overflow;
        if last >= self.hwm {
            return Err(self.fault(
                pgid,
                PageFault::OutOfBounds,
                format!(
                    "claims {overflow} overflow pages, running past the last page {}",
                    self.hwm - 1
                ),
            ));
        }
        let span = (overflow + 1) * self.ps;
        if span > MAX_SPAN || self.held + span > MAX_HELD {
            return Err(self.fault(
                pgid,
                PageFault::TooLarge,
                format!(
                    "claims {overflow} overflow pages ({span} bytes), more than a snapshot page can plausibly hold"
                ),
            ));
        }
        for p in pgid..=last {
            if self.reached.get(p) {
                return Err(self.fault(
                    p,
                    PageFault::ReachedTwice,
                    format!(
                        "is reached a second time, as overflow of page {pgid} (from {}): pages are shared or form a cycle",
    from_text()
                    ),
                ));
            }
            if self.free.as_ref().is_some_and(|f| f.get(p)) {
                return Err(self.fault(
                    p,
                    PageFault::FreeAndUsed,
                    format!(
                        "is both in the freelist and in use (reached from {})",
                        from_text()
                    ),
                ));
            }
            self.reached.set(p);
        }
        if overflow > 0 {
            let span = usize::try_from(span).unwrap_or(usize::MAX);
            buf.resize(span, 0);
            self.read((pgid + 1) * self.ps, &mut buf[ps..])?;
        }
        Ok((flags, count))
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), VerifyError> {
        self.src
            .read_at(offset, buf)
            .map_err(|source| VerifyError::Io {
                path: std::path::PathBuf::new(),
                source,
            })
    }

    fn read_freelist(&mut self, pgid: u64) -> Result<(), VerifyError> {
        let mut b = self.take_buf();
        let (flags, count) = self.load(pgid, None, &mut b)?;
        if flags != FREELIST {
            return Err(self.fault(
                pgid,
                PageFault::WrongType,
                format!("the meta page names it as the freelist but its flags are {flags:#06x}"),
            ));
        }
        let (n, start) = if count == 0xFFFF {
            (u64_at(&b, HEADER), HEADER + 8)
        } else {
            (u64::from(count), HEADER)
        };
        let fits = n
            .checked_mul(8)
            .and_then(|x| x.checked_add(start as u64))
            .is_some_and(|end| end <= b.len() as u64);
        if !fits {
            return Err(self.fault(
                pgid,
                PageFault::Freelist,
                format!("a freelist of {n} page ids does not fit in its page span"),
            ));
        }
        let mut free = Bitmap::new(self.hwm);
        for i in 0..usize::try_from(n).unwrap_or(0) {
            let id = u64_at(&b, start + i * 8);
            if id < 2 || id >= self.hwm {
                return Err(self.fault(
                    pgid,
                    PageFault::Freelist,
                    format!("free page id {id} (entry {i}) is outside the database"),
                ));
            }
            if free.get(id) || self.reached.get(id) {
                return Err(self.fault(
                    pgid,
                    PageFault::Freelist,
                    format!("page {id} (entry {i}) is freed twice or is the freelist itself"),
                ));
            }
            free.set(id);
        }
        self.free = Some(free);
        self.give_buf(b);
        Ok(())
    }

    /// Loads page `pgid`, checks it as a branch or leaf page of a bucket tree and pushes it
    /// on the path. `expect` is the key the parent branch has for it.
    fn push_page(
        &mut self,
        pgid: u64,
        from: Option<(u64, usize)>,
        expect: Option<&[u8]>,
    ) -> Result<(), VerifyError> {
        if self.frames.len() >= MAX_FRAMES {
            return Err(self.fault(
                from.map_or(pgid, |f| f.0),
                PageFault::TooDeep,
                format!("the page tree is more than {MAX_FRAMES} levels deep: pages form a chain or a cycle"),
            ));
        }
        let mut buf = self.take_buf();
        let (flags, count) = self.load(pgid, from, &mut buf)?;
        if flags != BRANCH && flags != LEAF {
            return Err(self.fault(
                pgid,
                PageFault::WrongType,
                format!(
                    "has flags {flags:#06x} where a branch ({BRANCH:#06x}) or leaf ({LEAF:#06x}) page of a bucket tree belongs"
                ),
            ));
        }
        let frame = PageFrame {
            buf,
            pgid,
            inline: false,
            branch: flags == BRANCH,
            count: usize::from(count),
            next: 0,
        };
        self.check_elements(&frame)?;
        if frame.branch {
            self.stats.branch_pages += 1;
        } else {
            self.stats.leaf_pages += 1;
        }
        self.stats.overflow_pages += (frame.buf.len() as u64 / self.ps).saturating_sub(1);
        if let Some(expect) = expect {
            let first = element(&frame, 0).map(|e| e.key).unwrap_or_default();
            if first != expect {
                return Err(self.fault(
                    pgid,
                    PageFault::BranchKeyMismatch,
                    format!(
                        "its first key {} differs from the key {} that {} has for it",
                        hex_prefix(first),
                        hex_prefix(expect),
                        from.map_or_else(
                            || "its parent".to_string(),
                            |(p, i)| format!("page {p} element {i}")
                        )
                    ),
                ));
            }
        }
        self.held += frame.buf.len() as u64;
        self.frames.push(Frame::Page(frame));
        Ok(())
    }

    /// Checks every element of a page: inside the page, after the element table, keys of
    /// plausible size and strictly increasing, known leaf flags.
    fn check_elements(&self, f: &PageFrame) -> Result<(), VerifyError> {
        let page = f.pgid;
        let what = if f.inline {
            "inline bucket page"
        } else if f.branch {
            "branch page"
        } else {
            "leaf page"
        };
        let fault = |fault, detail: String| {
            let detail = if f.inline {
                format!("in an inline bucket held by this page: {detail}")
            } else {
                detail
            };
            self.fault(page, fault, detail)
        };
        if f.branch && f.count == 0 {
            return Err(fault(
                PageFault::BadElement,
                "empty branch page".to_string(),
            ));
        }
        let table_end = HEADER + f.count * ELEMENT;
        if table_end > f.buf.len() {
            return Err(fault(
                PageFault::BadElement,
                format!(
                    "{} elements need {table_end} bytes but the {what} is {} bytes",
                    f.count,
                    f.buf.len()
                ),
            ));
        }
        let mut prev: Option<&[u8]> = None;
        for i in 0..f.count {
            let e = HEADER + i * ELEMENT;
            let (pos, ksize, vsize) = if f.branch {
                (u32_at(&f.buf, e), u32_at(&f.buf, e + 4), 0)
            } else {
                let flags = u32_at(&f.buf, e);
                if flags & !BUCKET_LEAF_FLAG != 0 {
                    return Err(fault(
                        PageFault::BadElement,
                        format!("leaf element {i} has unknown flags {flags:#x}"),
                    ));
                }
                (
                    u32_at(&f.buf, e + 4),
                    u32_at(&f.buf, e + 8),
                    u32_at(&f.buf, e + 12),
                )
            };
            let start = e as u64 + u64::from(pos);
            let end = start + u64::from(ksize) + u64::from(vsize);
            if ksize == 0 || ksize > MAX_KEY || start < table_end as u64 || end > f.buf.len() as u64
            {
                return Err(fault(
                    PageFault::BadElement,
                    format!(
                        "element {i} (key of {ksize} bytes at {start}, value of {vsize} bytes) lies outside the page: the {what}'s data area is {table_end}..{}",
                        f.buf.len()
                    ),
                ));
            }
            let key = &f.buf[start as usize..start as usize + ksize as usize];
            if prev.is_some_and(|p| p >= key) {
                return Err(fault(
                    PageFault::KeyOrder,
                    format!(
                        "element {i}'s key {} is not greater than element {}'s: keys out of order",
                        hex_prefix(key),
                        i - 1
                    ),
                ));
            }
            prev = Some(key);
        }
        Ok(())
    }

    fn run(&mut self) -> Result<(), VerifyError> {
        while let Some(frame) = self.frames.pop() {
            let mut f = match frame {
                Frame::BucketEnd => {
                    self.buckets.pop();
                    let depth = self.buckets.len();
                    self.visitor.bucket_end(depth)?;
                    continue;
                }
                Frame::Page(f) => f,
            };
            if f.next >= f.count {
                self.held = self.held.saturating_sub(f.buf.len() as u64);
                self.give_buf(f.buf);
                continue;
            }
            let i = f.next;
            f.next += 1;
            let Some(el) = element(&f, i) else {
                // check_elements made this unreachable; fail safe.
                return Err(self.fault(
                    f.pgid,
                    PageFault::BadElement,
                    format!("element {i} lies outside the page"),
                ));
            };
            if f.branch {
                let child = el.child;
                let mut expect = std::mem::take(&mut self.expect);
                expect.clear();
                expect.extend_from_slice(el.key);
                let pgid = f.pgid;
                self.frames.push(Frame::Page(f));
                let r = self.push_page(child, Some((pgid, i)), Some(&expect));
                self.expect = expect;
                r?;
                continue;
            }
            self.leaf_element(f, i)?;
        }
        Ok(())
    }

    /// Processes leaf element `i` of `f` (then back on the path), descending into a
    /// sub-bucket if it is one.
    fn leaf_element(&mut self, f: PageFrame, i: usize) -> Result<(), VerifyError> {
        let Some(el) = element(&f, i) else {
            return Err(self.fault(
                f.pgid,
                PageFault::BadElement,
                format!("element {i} lies outside the page"),
            ));
        };
        let loc = Loc {
            page: f.pgid,
            element: i,
            inline: f.inline,
        };
        let depth = self.buckets.len().saturating_sub(1);
        let Some(state) = self.buckets.last_mut() else {
            // Every page frame belongs to an open bucket; fail safe.
            return Err(self.fault(
                f.pgid,
                PageFault::BadElement,
                format!("element {i} lies outside any bucket"),
            ));
        };
        if state.has_last && state.last.as_slice() >= el.key {
            let detail = format!(
                "leaf element {i}'s key {} is not greater than the previous key {} of its bucket (on an earlier page): keys out of order across pages",
                hex_prefix(el.key),
                hex_prefix(&state.last)
            );
            return Err(self.fault(f.pgid, PageFault::KeyOrder, detail));
        }
        state.last.clear();
        state.last.extend_from_slice(el.key);
        state.has_last = true;
        if !el.bucket {
            self.visitor.entry(depth, el.key, Some(el.value), loc)?;
            self.frames.push(Frame::Page(f));
            return Ok(());
        }
        self.visitor.entry(depth, el.key, None, loc)?;
        if el.value.len() < BUCKET_HEADER {
            return Err(self.fault(
                f.pgid,
                PageFault::BadElement,
                format!(
                    "{}element {i} is a bucket whose {}-byte value is shorter than a bucket header",
                    if f.inline { "inline bucket " } else { "" },
                    el.value.len()
                ),
            ));
        }
        if self.frames.len() + 2 >= MAX_FRAMES {
            return Err(self.fault(
                f.pgid,
                PageFault::TooDeep,
                format!("element {i}: buckets nested more than {MAX_FRAMES} levels deep"),
            ));
        }
        let root = u64_at(el.value, 0);
        let pgid = f.pgid;
        self.visitor.bucket_begin(depth + 1, el.key, loc)?;
        if root == 0 {
            let mut buf = self.take_buf();
            buf.extend_from_slice(&el.value[BUCKET_HEADER..]);
            let flags = u16_at(&buf, 8);
            let count = usize::from(u16_at(&buf, 10));
            let inline = PageFrame {
                buf,
                pgid,
                inline: true,
                branch: false,
                count,
                next: 0,
            };
            if inline.buf.len() < HEADER || flags != LEAF {
                return Err(self.fault(
                    pgid,
                    PageFault::BadElement,
                    format!(
                        "element {i} is an inline bucket whose page ({} bytes, flags {flags:#06x}) is not a leaf page",
                        inline.buf.len()
                    ),
                ));
            }
            if self.held + inline.buf.len() as u64 > MAX_HELD {
                return Err(self.fault(
                    pgid,
                    PageFault::TooLarge,
                    format!("element {i}: inline buckets nested beyond any plausible size"),
                ));
            }
            self.check_elements(&inline)?;
            self.stats.inline_buckets += 1;
            self.held += inline.buf.len() as u64;
            self.frames.push(Frame::Page(f));
            self.frames.push(Frame::BucketEnd);
            self.buckets.push(BucketState {
                last: Vec::new(),
                has_last: false,
            });
            self.frames.push(Frame::Page(inline));
        } else {
            self.frames.push(Frame::Page(f));
            self.frames.push(Frame::BucketEnd);
            self.buckets.push(BucketState {
                last: Vec::new(),
                has_last: false,
            });
            self.push_page(root, Some((pgid, i)), None)?;
        }
        Ok(())
    }
}

/// An element of a checked page.
struct Element<'p> {
    key: &'p [u8],
    value: &'p [u8],
    bucket: bool,
    child: u64,
}

/// Element `i` of `f`, or `None` when it lies outside the page (never after
/// `check_elements`).
fn element(f: &PageFrame, i: usize) -> Option<Element<'_>> {
    let e = HEADER + i.checked_mul(ELEMENT)?;
    if i >= f.count {
        return None;
    }
    let b = &f.buf;
    let (flags, pos, ksize, vsize, child) = if f.branch {
        (0, u32_at(b, e), u32_at(b, e + 4), 0, u64_at(b, e + 8))
    } else {
        (
            u32_at(b, e),
            u32_at(b, e + 4),
            u32_at(b, e + 8),
            u32_at(b, e + 12),
            0,
        )
    };
    let start = e.checked_add(usize::try_from(pos).ok()?)?;
    let kend = start.checked_add(usize::try_from(ksize).ok()?)?;
    let vend = kend.checked_add(usize::try_from(vsize).ok()?)?;
    Some(Element {
        key: b.get(start..kend)?,
        value: b.get(kend..vend)?,
        bucket: flags & BUCKET_LEAF_FLAG != 0,
        child,
    })
}

/// Whether each page is reached by the walk (tests use it to pick pages to damage).
///
/// # Errors
/// As [`walk`].
#[cfg(test)]
pub(crate) fn reached_pages<S: Source + ?Sized>(
    src: &S,
    meta: &Meta,
) -> Result<Vec<bool>, VerifyError> {
    struct Nop;
    impl Visitor for Nop {
        fn entry(
            &mut self,
            _: usize,
            _: &[u8],
            _: Option<&[u8]>,
            _: Loc,
        ) -> Result<(), VerifyError> {
            Ok(())
        }
        fn bucket_begin(&mut self, _: usize, _: &[u8], _: Loc) -> Result<(), VerifyError> {
            Ok(())
        }
        fn bucket_end(&mut self, _: usize) -> Result<(), VerifyError> {
            Ok(())
        }
    }
    let (_, reached) = walk_pages(src, meta, &mut Nop)?;
    Ok((0..meta.pgid).map(|p| reached.get(p)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn hex_prefix_is_bounded() {
        assert_eq!(hex_prefix(&[0, 0xab]), "00ab");
        assert_eq!(hex_prefix(&[1; 100]).len(), 83);
    }

    #[test]
    fn bitmap_ignores_out_of_range() {
        let mut b = Bitmap::new(10);
        b.set(3);
        b.set(1000);
        assert!(b.get(3) && !b.get(4) && !b.get(1000));
    }
}
