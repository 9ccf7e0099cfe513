//! A read-only, iterative walk of a bbolt database: meta pages, every page of every bucket
//! tree (nested and inline buckets included), with the checks bbolt's own `tx.Check()`
//! makes, reporting entries to a [`Visitor`] in key order.
//!
//! On-disk format (little-endian):
//! - page header, 16 bytes: `id u64, flags u16, count u16, overflow u32`; flags are
//!   branch `0x01`, leaf `0x02`, meta `0x04`, freelist `0x10`; a page spans
//!   `(overflow + 1) × page_size` bytes;
//! - meta (pages 0 and 1, at offset 16): `magic u32 = 0xED0CDAED, version u32 = 2,
//!   page_size u32, flags u32, root u64, sequence u64, freelist u64, pgid u64, txid u64,
//!   checksum u64` where `checksum` is FNV-1a 64 of the 56 bytes before it;
//! - branch element, 16 bytes: `pos u32, ksize u32, pgid u64`, key at element + pos;
//! - leaf element, 16 bytes: `flags u32, pos u32, ksize u32, vsize u32`, key at element +
//!   pos, value right after; flag `0x01` marks a sub-bucket whose value starts with
//!   `root u64, sequence u64` and, when `root == 0`, holds the bucket inline as a page.
//!
//! Nothing here trusts a length from the file: every offset is bounds-checked, every page
//! is visited at most once (a bitmap), and the walk uses an explicit stack.

use super::{Source, VerifyError};

const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const META: u16 = 0x04;
const FREELIST: u16 = 0x10;
const BUCKET_LEAF_FLAG: u32 = 0x01;
const HEADER: usize = 16;
const ELEMENT: usize = 16;
const NO_FREELIST: u64 = u64::MAX;
const MAX_KEY: usize = 32768;
/// The largest page span read at once; a larger overflow count is treated as corruption.
const MAX_SPAN: u64 = 1 << 30;
/// Deepest bucket nesting accepted.
const MAX_BUCKET_DEPTH: usize = 64;

/// A valid meta page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// Page size.
    pub page_size: u32,
    /// Root page of the root bucket.
    pub root: u64,
    /// Freelist page, or `u64::MAX` when none is stored.
    pub freelist: u64,
    /// High-water mark: pages in the file.
    pub pgid: u64,
    /// Transaction id.
    pub txid: u64,
}

/// Receives a database's contents in key order.
pub trait Visitor {
    /// A bucket starts; `depth` 1 is a top-level bucket.
    ///
    /// # Errors
    /// A message that ends the walk.
    fn bucket_begin(&mut self, depth: usize, name: &[u8]) -> Result<(), String>;
    /// An entry of the bucket at `depth` (0 = the root bucket, whose entries are the
    /// top-level buckets); `value` is `None` for a sub-bucket.
    ///
    /// # Errors
    /// A message that ends the walk.
    fn entry(&mut self, depth: usize, key: &[u8], value: Option<&[u8]>) -> Result<(), String>;
    /// The bucket at `depth` ends.
    ///
    /// # Errors
    /// A message that ends the walk.
    fn bucket_end(&mut self, depth: usize) -> Result<(), String>;
}

fn corrupt(msg: String) -> VerifyError {
    VerifyError::Structure(msg)
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
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

/// Parses the meta page stored at `offset` as page `index`; `Err` says why it is invalid.
fn read_meta<S: Source + ?Sized>(src: &S, offset: u64, index: u64) -> Result<Meta, String> {
    let mut b = [0u8; HEADER + 64];
    src.read_at(offset, &mut b).map_err(|_| {
        format!("meta page {index} at offset {offset} is beyond the end of the file")
    })?;
    let (id, flags) = (u64_at(&b, 0), u16_at(&b, 8));
    let m = &b[HEADER..];
    let magic = u32_at(m, 0);
    if magic != MAGIC {
        return Err(if magic.swap_bytes() == MAGIC {
            format!("meta page {index}: big-endian database (written on a big-endian host); not supported")
        } else {
            format!("meta page {index}: bad magic {magic:#010x}")
        });
    }
    let version = u32_at(m, 4);
    if version != VERSION {
        return Err(format!("meta page {index}: unsupported version {version}"));
    }
    let sum = u64_at(m, 56);
    if fnv1a64(&m[..56]) != sum {
        return Err(format!("meta page {index}: checksum mismatch"));
    }
    if flags != META || id != index {
        return Err(format!(
            "meta page {index}: page header says id {id}, flags {flags:#06x} (expected id {index}, meta flags)"
        ));
    }
    let page_size = u32_at(m, 8);
    if !page_size.is_power_of_two() || !(512..=1 << 20).contains(&page_size) {
        return Err(format!(
            "meta page {index}: implausible page size {page_size}"
        ));
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
            "meta page {index}: root page {} outside the {} pages of the database",
            meta.root, meta.pgid
        ));
    }
    if meta.freelist != NO_FREELIST && (meta.freelist < 2 || meta.freelist >= meta.pgid) {
        return Err(format!(
            "meta page {index}: freelist page {} outside the {} pages of the database",
            meta.freelist, meta.pgid
        ));
    }
    Ok(meta)
}

/// Reads both meta pages; both must be valid (etcd writes both into every snapshot). The
/// one with the higher transaction id is used.
fn metas<S: Source + ?Sized>(src: &S) -> Result<Meta, VerifyError> {
    let m0 = read_meta(src, 0, 0);
    let page_size = match &m0 {
        Ok(m) => Some(u64::from(m.page_size)),
        Err(_) => [4096u64, 8192, 16384, 65536, 32768, 1024, 2048, 512]
            .into_iter()
            .find(|&ps| read_meta(src, ps, 1).is_ok_and(|m| u64::from(m.page_size) == ps)),
    };
    let m1 = match page_size {
        Some(ps) => read_meta(src, ps, 1),
        None => Err("meta page 1: not found at any page size".to_string()),
    };
    match (m0, m1) {
        (Ok(a), Ok(b)) => {
            if a.page_size != b.page_size {
                return Err(corrupt(format!(
                    "the meta pages disagree on the page size ({} and {})",
                    a.page_size, b.page_size
                )));
            }
            Ok(if b.txid > a.txid { b } else { a })
        }
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(corrupt(format!(
            "{e} (offset {}), while the other meta page is valid",
            if e.starts_with("meta page 0") {
                0
            } else {
                page_size.unwrap_or(0)
            }
        ))),
        (Err(a), Err(b)) => Err(corrupt(format!("both meta pages are invalid: {a}; {b}"))),
    }
}

/// Work items of the iterative walk.
enum Item {
    /// Visit page `pgid` of the current bucket; its first key must be `first`.
    Page {
        pgid: u64,
        parent: u64,
        first: Option<Vec<u8>>,
    },
    /// Continue a leaf page from element `from` (after a sub-bucket was walked).
    Resume { pgid: u64, from: usize },
    /// An inline bucket's page.
    Inline { page: Vec<u8>, from: usize },
    /// The current bucket ends.
    EndBucket,
}

/// Per-bucket state: the last key seen, for ordering across pages.
struct BucketState {
    last: Option<Vec<u8>>,
}

struct Walker<'a, S: Source + ?Sized, V: Visitor> {
    src: &'a S,
    ps: u64,
    hwm: u64,
    visited: Vec<u64>,
    free: Vec<u64>,
    buf: Vec<u8>,
    stack: Vec<Item>,
    buckets: Vec<BucketState>,
    visitor: &'a mut V,
}

fn bit(set: &[u64], i: u64) -> bool {
    set[(i / 64) as usize] & (1 << (i % 64)) != 0
}
fn set_bit(set: &mut [u64], i: u64) {
    set[(i / 64) as usize] |= 1 << (i % 64);
}

/// Walks the database in `src[..db_len]`, calling `visitor` for every bucket and entry.
///
/// # Errors
/// [`VerifyError::Structure`] for any structural problem, [`VerifyError::Etcd`] for an
/// error returned by the visitor.
pub fn walk<S: Source + ?Sized, V: Visitor>(
    src: &S,
    db_len: u64,
    visitor: &mut V,
) -> Result<Meta, VerifyError> {
    if db_len < 2 * 512 {
        return Err(corrupt(format!(
            "the file is only {db_len} bytes: too short for a database"
        )));
    }
    let meta = metas(src)?;
    let ps = u64::from(meta.page_size);
    let expected = meta
        .pgid
        .checked_mul(ps)
        .ok_or_else(|| corrupt(format!("page count {} is implausible", meta.pgid)))?;
    if db_len != expected {
        return Err(corrupt(format!(
            "the database is {db_len} bytes but its meta page says {} pages of {ps} bytes = {expected} bytes: the file is {}",
            meta.pgid,
            if db_len < expected { "truncated" } else { "longer than its database" }
        )));
    }
    let words = meta.pgid.div_ceil(64) as usize;
    let mut w = Walker {
        src,
        ps,
        hwm: meta.pgid,
        visited: vec![0; words],
        free: vec![0; words],
        buf: Vec::new(),
        stack: Vec::new(),
        buckets: Vec::new(),
        visitor,
    };
    set_bit(&mut w.visited, 0);
    set_bit(&mut w.visited, 1);
    if meta.freelist != NO_FREELIST {
        w.read_freelist(meta.freelist)?;
    }
    w.buckets.push(BucketState { last: None });
    w.stack.push(Item::EndBucket);
    w.stack.push(Item::Page {
        pgid: meta.root,
        parent: 0,
        first: None,
    });
    while let Some(item) = w.stack.pop() {
        match item {
            Item::Page {
                pgid,
                parent,
                first,
            } => w.page(pgid, parent, first.as_deref())?,
            Item::Resume { pgid, from } => {
                w.load(pgid)?;
                let page = std::mem::take(&mut w.buf);
                let r = w.leaf(&page, pgid, from);
                w.buf = page;
                r?;
            }
            Item::Inline { page, from } => w.leaf(&page, 0, from)?,
            Item::EndBucket => {
                let depth = w.buckets.len() - 1;
                w.buckets.pop();
                if depth > 0 {
                    w.visitor.bucket_end(depth).map_err(VerifyError::Etcd)?;
                }
            }
        }
    }
    if meta.freelist != NO_FREELIST {
        for p in 2..meta.pgid {
            if !bit(&w.visited, p) && !bit(&w.free, p) {
                return Err(corrupt(format!(
                    "page {p} (offset {}) is neither reachable nor free",
                    p * ps
                )));
            }
        }
    }
    Ok(meta)
}

impl<S: Source + ?Sized, V: Visitor> Walker<'_, S, V> {
    fn at(&self, pgid: u64) -> String {
        format!("page {pgid} (offset {})", pgid.saturating_mul(self.ps))
    }

    fn read_freelist(&mut self, pgid: u64) -> Result<(), VerifyError> {
        let (flags, count, overflow) = self.header(pgid)?;
        if flags != FREELIST {
            return Err(corrupt(format!(
                "{}: the meta page names it as the freelist but its flags are {flags:#06x}",
                self.at(pgid)
            )));
        }
        self.mark(pgid, overflow, u64::MAX)?;
        self.read_span(pgid, overflow)?;
        let b = std::mem::take(&mut self.buf);
        let (n, start) = if count == 0xFFFF {
            if b.len() < HEADER + 8 {
                return Err(corrupt(format!(
                    "{}: freelist count is cut off",
                    self.at(pgid)
                )));
            }
            (u64_at(&b, HEADER), HEADER + 8)
        } else {
            (u64::from(count), HEADER)
        };
        let end = (start as u64).checked_add(n.saturating_mul(8));
        if end.is_none_or(|e| e > b.len() as u64) {
            return Err(corrupt(format!(
                "{}: freelist of {n} ids does not fit in its page",
                self.at(pgid)
            )));
        }
        for i in 0..n as usize {
            let id = u64_at(&b, start + i * 8);
            if id < 2 || id >= self.hwm {
                return Err(corrupt(format!(
                    "{}: free page id {id} is outside the database",
                    self.at(pgid)
                )));
            }
            if bit(&self.free, id) {
                return Err(corrupt(format!("page {id} is freed twice")));
            }
            set_bit(&mut self.free, id);
        }
        self.buf = b;
        Ok(())
    }

    /// Reads and checks a page header: `(flags, count, overflow)`.
    fn header(&self, pgid: u64) -> Result<(u16, u16, u32), VerifyError> {
        let mut h = [0u8; HEADER];
        self.src
            .read_at(pgid * self.ps, &mut h)
            .map_err(|_| corrupt(format!("{} is beyond the end of the file", self.at(pgid))))?;
        let id = u64_at(&h, 0);
        if id != pgid {
            return Err(corrupt(format!(
                "{} has id {id} in its header: pages are misplaced or overwritten",
                self.at(pgid)
            )));
        }
        Ok((u16_at(&h, 8), u16_at(&h, 10), u32_at(&h, 12)))
    }

    /// Marks `pgid` and its overflow pages as reached, exactly once.
    fn mark(&mut self, pgid: u64, overflow: u32, parent: u64) -> Result<(), VerifyError> {
        let last = pgid.checked_add(u64::from(overflow));
        if last.is_none_or(|l| l >= self.hwm) {
            return Err(corrupt(format!(
                "{} with {overflow} overflow pages runs past the last page {}",
                self.at(pgid),
                self.hwm - 1
            )));
        }
        for p in pgid..=pgid + u64::from(overflow) {
            if bit(&self.visited, p) {
                return Err(corrupt(format!(
                    "page {p} (offset {}) is reached twice (from page {parent}): the tree has a cycle or shared pages",
                    p * self.ps
                )));
            }
            if bit(&self.free, p) {
                return Err(corrupt(format!(
                    "page {p} (offset {}) is both free and in use",
                    p * self.ps
                )));
            }
            set_bit(&mut self.visited, p);
        }
        Ok(())
    }

    fn read_span(&mut self, pgid: u64, overflow: u32) -> Result<(), VerifyError> {
        let len = (u64::from(overflow) + 1) * self.ps;
        if len > MAX_SPAN {
            return Err(corrupt(format!(
                "{} claims {overflow} overflow pages: implausibly large",
                self.at(pgid)
            )));
        }
        self.buf.resize(len as usize, 0);
        self.src
            .read_at(pgid * self.ps, &mut self.buf)
            .map_err(|_| corrupt(format!("{} runs past the end of the file", self.at(pgid))))
    }

    /// Loads a page already marked (for resuming a leaf).
    fn load(&mut self, pgid: u64) -> Result<(), VerifyError> {
        let (_, _, overflow) = self.header(pgid)?;
        self.read_span(pgid, overflow)
    }

    fn page(&mut self, pgid: u64, parent: u64, first: Option<&[u8]>) -> Result<(), VerifyError> {
        if pgid < 2 || pgid >= self.hwm {
            return Err(corrupt(format!(
                "page {parent} points to page {pgid}, outside the database's {} pages",
                self.hwm
            )));
        }
        let (flags, count, overflow) = self.header(pgid)?;
        if flags != BRANCH && flags != LEAF {
            return Err(corrupt(format!(
                "{} (child of page {parent}) has flags {flags:#06x}; a bucket tree holds only branch and leaf pages",
                self.at(pgid)
            )));
        }
        self.mark(pgid, overflow, parent)?;
        self.read_span(pgid, overflow)?;
        let page = std::mem::take(&mut self.buf);
        let r = (|| {
            if let Some(expect) = first {
                let k0 = if count == 0 {
                    None
                } else {
                    Some(self.element_key(&page, pgid, flags, 0)?)
                };
                if k0 != Some(expect) {
                    return Err(corrupt(format!(
                        "{}: its first key does not match the key its parent page {parent} has for it",
                        self.at(pgid)
                    )));
                }
            }
            if flags == BRANCH {
                self.branch(&page, pgid, count)
            } else {
                self.leaf(&page, pgid, 0)
            }
        })();
        self.buf = page;
        r
    }

    /// The key of element `i`, bounds-checked.
    fn element_key<'p>(
        &self,
        page: &'p [u8],
        pgid: u64,
        flags: u16,
        i: usize,
    ) -> Result<&'p [u8], VerifyError> {
        let e = HEADER + i * ELEMENT;
        if e + ELEMENT > page.len() {
            return Err(corrupt(format!(
                "{}: element {i} lies outside the page",
                self.at(pgid)
            )));
        }
        let (pos, ksize, vsize) = if flags == BRANCH {
            (u32_at(page, e), u32_at(page, e + 4), 0)
        } else {
            (
                u32_at(page, e + 4),
                u32_at(page, e + 8),
                u32_at(page, e + 12),
            )
        };
        let start = e as u64 + u64::from(pos);
        let end = start + u64::from(ksize) + u64::from(vsize);
        if end > page.len() as u64 || ksize as usize > MAX_KEY {
            return Err(corrupt(format!(
                "{}: element {i} (key of {ksize} bytes, value of {vsize}) lies outside the page",
                self.at(pgid)
            )));
        }
        Ok(&page[start as usize..start as usize + ksize as usize])
    }

    fn branch(&mut self, page: &[u8], pgid: u64, count: u16) -> Result<(), VerifyError> {
        if count == 0 {
            return Err(corrupt(format!("{}: empty branch page", self.at(pgid))));
        }
        let n = usize::from(count);
        if HEADER + n * ELEMENT > page.len() {
            return Err(corrupt(format!(
                "{}: {n} elements do not fit in the page",
                self.at(pgid)
            )));
        }
        let mut children = Vec::with_capacity(n);
        let mut prev: Option<&[u8]> = None;
        for i in 0..n {
            let key = self.element_key(page, pgid, BRANCH, i)?;
            if prev.is_some_and(|p| p >= key) {
                return Err(corrupt(format!(
                    "{}: branch element {i}'s key is not greater than element {}'s: keys out of order",
                    self.at(pgid),
                    i - 1
                )));
            }
            prev = Some(key);
            let child = u64_at(page, HEADER + i * ELEMENT + 8);
            children.push((child, key.to_vec()));
        }
        for (child, key) in children.into_iter().rev() {
            self.stack.push(Item::Page {
                pgid: child,
                parent: pgid,
                first: Some(key),
            });
        }
        Ok(())
    }

    /// Processes leaf elements from `from`; stops at a sub-bucket, which is walked first
    /// (the rest of the leaf resumes after it).
    fn leaf(&mut self, page: &[u8], pgid: u64, from: usize) -> Result<(), VerifyError> {
        let inline = pgid == 0;
        let where_ = if inline {
            "an inline bucket page".to_string()
        } else {
            self.at(pgid)
        };
        if page.len() < HEADER {
            return Err(corrupt(format!("{where_}: shorter than a page header")));
        }
        let flags = u16_at(page, 8);
        if flags != LEAF {
            return Err(corrupt(format!(
                "{where_}: flags {flags:#06x} where a leaf page was expected"
            )));
        }
        let n = usize::from(u16_at(page, 10));
        if HEADER + n * ELEMENT > page.len() {
            return Err(corrupt(format!(
                "{where_}: {n} elements do not fit in the page"
            )));
        }
        let depth = self.buckets.len() - 1;
        for i in from..n {
            let key = self.element_key(page, pgid, LEAF, i).map_err(|e| {
                if inline {
                    corrupt(format!("{where_}: element {i} lies outside the page"))
                } else {
                    e
                }
            })?;
            let e = HEADER + i * ELEMENT;
            let eflags = u32_at(page, e);
            let vsize = u32_at(page, e + 12) as usize;
            let vstart = e + u32_at(page, e + 4) as usize + key.len();
            let value = &page[vstart..vstart + vsize];
            let state = self.buckets.last_mut().expect("a bucket is open");
            if state.last.as_deref().is_some_and(|l| l >= key) {
                return Err(corrupt(format!(
                    "{where_}: leaf element {i}'s key is not greater than the previous key of its bucket: keys out of order"
                )));
            }
            state.last = Some(key.to_vec());
            match eflags {
                0 => self
                    .visitor
                    .entry(depth, key, Some(value))
                    .map_err(VerifyError::Etcd)?,
                BUCKET_LEAF_FLAG => {
                    if value.len() < 16 {
                        return Err(corrupt(format!(
                            "{where_}: element {i} is a bucket whose header is cut off"
                        )));
                    }
                    if depth + 1 > MAX_BUCKET_DEPTH {
                        return Err(corrupt(format!("{where_}: buckets nested too deep")));
                    }
                    self.visitor
                        .entry(depth, key, None)
                        .map_err(VerifyError::Etcd)?;
                    let root = u64_at(value, 0);
                    // Resume this leaf after the sub-bucket.
                    if i + 1 < n {
                        self.stack.push(if inline {
                            Item::Inline {
                                page: page.to_vec(),
                                from: i + 1,
                            }
                        } else {
                            Item::Resume { pgid, from: i + 1 }
                        });
                    }
                    self.stack.push(Item::EndBucket);
                    if root == 0 {
                        self.stack.push(Item::Inline {
                            page: value[16..].to_vec(),
                            from: 0,
                        });
                    } else {
                        self.stack.push(Item::Page {
                            pgid: root,
                            parent: if inline { 0 } else { pgid },
                            first: None,
                        });
                    }
                    self.visitor
                        .bucket_begin(depth + 1, key)
                        .map_err(VerifyError::Etcd)?;
                    self.buckets.push(BucketState { last: None });
                    return Ok(());
                }
                other => {
                    return Err(corrupt(format!(
                        "{where_}: element {i} has unknown flags {other:#x}"
                    )))
                }
            }
        }
        Ok(())
    }
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
}
