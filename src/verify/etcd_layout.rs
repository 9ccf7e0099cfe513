//! etcd's layout on top of bbolt, computed the way `etcdutl snapshot status` does:
//!
//! - `hash`: CRC-32C (Castagnoli) over, for each top-level bucket in key order, its name,
//!   then each entry's key and value (a sub-bucket entry contributes its key only);
//! - `revision`: the main revision of the last key of bucket `key` (keys are 17 bytes:
//!   `main u64 BE, '_', sub u64 BE`, plus a trailing `t` for tombstones);
//! - `total_key_entries`: entries of all top-level buckets (etcd 3.4/3.5's "total keys");
//! - `live_keys`: distinct user keys alive at the end (etcd 3.6+'s "total keys"), from
//!   field 1 (`key`) of each `mvccpb.KeyValue` value, tombstones removing keys;
//! - `consistent_index`, `term` (u64 BE) and `storageVersion` from bucket `meta`.
//!
//! Live keys are counted with a set of 64-bit hashes of user keys (two distinct keys
//! colliding is a 2^-64 event per pair). The set is capped at [`LIVE_KEY_LIMIT`] entries
//! (about 19 MB at most); past that, [`EtcdSummary::live_keys`] is `None` and the caller
//! counts again in partitions of the hash space, one walk per partition
//! ([`EtcdLayout::live_keys_only`]), so memory stays bounded whatever the key count.

use super::bbolt::{hex_prefix, Loc, Visitor};
use super::VerifyError;
use std::collections::HashSet;
use std::hash::{BuildHasherDefault, DefaultHasher, Hash, Hasher};

/// What [`EtcdLayout`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSummary {
    /// CRC-32C as etcdutl computes it.
    pub hash: u32,
    /// Main revision of the last `key` entry (0 when the bucket is empty).
    pub revision: i64,
    /// Entries of all top-level buckets.
    pub total_key_entries: u64,
    /// Distinct live user keys, or `None` when there were more than the set could hold
    /// (then count them with [`EtcdLayout::live_keys_only`]).
    pub live_keys: Option<u64>,
    /// Entries of bucket `key`.
    pub key_entries: u64,
    /// From `meta`.
    pub consistent_index: Option<u64>,
    /// From `meta`.
    pub term: Option<u64>,
    /// From `meta`.
    pub storage_version: Option<String>,
    /// Top-level bucket names, in key order.
    pub buckets: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Current {
    #[default]
    None,
    Key,
    Meta,
    Other,
}

/// A hasher for keys that are already 64-bit hashes.
#[derive(Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The most live keys tracked at once (a bounded set of 64-bit hashes).
pub const LIVE_KEY_LIMIT: usize = 1 << 20;

/// A [`Visitor`] that checks and summarizes etcd's buckets.
pub struct EtcdLayout {
    crc: u32,
    current: Current,
    revision: i64,
    key_entries: u64,
    total: u64,
    live: HashSet<u64, BuildHasherDefault<Prehashed>>,
    live_limit: usize,
    /// Only user keys whose hash is `partition` modulo `partitions` are counted.
    partition: u64,
    partitions: u64,
    live_overflow: bool,
    consistent_index: Option<u64>,
    term: Option<u64>,
    storage_version: Option<String>,
    buckets: Vec<String>,
}

impl Default for EtcdLayout {
    fn default() -> Self {
        Self::with_live_key_limit(LIVE_KEY_LIMIT, 0, 1)
    }
}

fn etcd_err(detail: String) -> VerifyError {
    VerifyError::Etcd { detail }
}

impl EtcdLayout {
    /// A layout that counts live keys in partition `partition` of `partitions` only,
    /// tracking at most `limit` of them.
    pub fn with_live_key_limit(limit: usize, partition: u64, partitions: u64) -> Self {
        EtcdLayout {
            crc: 0,
            current: Current::None,
            revision: 0,
            key_entries: 0,
            total: 0,
            live: HashSet::default(),
            live_limit: limit,
            partition,
            partitions: partitions.max(1),
            live_overflow: false,
            consistent_index: None,
            term: None,
            storage_version: None,
            buckets: Vec::new(),
        }
    }

    /// Counts the live keys of a database whose first walk overflowed the live key set:
    /// walks it again once per partition of the user key hashes, with `key_entries` (from
    /// the first walk) sizing the partitions.
    ///
    /// # Errors
    /// Whatever the walk returns.
    pub fn live_keys_only(
        key_entries: u64,
        limit: usize,
        mut walk: impl FnMut(&mut EtcdLayout) -> Result<(), VerifyError>,
    ) -> Result<u64, VerifyError> {
        let limit = limit.max(1) as u64;
        let mut partitions = (key_entries + key_entries / 4).div_ceil(limit).max(2);
        loop {
            if let Some(live) = Self::count_partitions(partitions, limit, &mut walk)? {
                return Ok(live);
            }
            if partitions >= 1 << 24 {
                return Err(etcd_err(format!(
                    "more live keys than {partitions} partitions of {limit} can count"
                )));
            }
            partitions *= 2;
        }
    }

    /// Live keys over all `partitions`, or `None` when one of them overflows.
    fn count_partitions(
        partitions: u64,
        limit: u64,
        walk: &mut impl FnMut(&mut EtcdLayout) -> Result<(), VerifyError>,
    ) -> Result<Option<u64>, VerifyError> {
        let mut live = 0;
        for p in 0..partitions {
            let mut layout = EtcdLayout::with_live_key_limit(
                usize::try_from(limit).unwrap_or(usize::MAX),
                p,
                partitions,
            );
            walk(&mut layout)?;
            match layout.finish()?.live_keys {
                Some(n) => live += n,
                None => return Ok(None),
            }
        }
        Ok(Some(live))
    }

    /// The summary, once the walk is over.
    ///
    /// # Errors
    /// [`VerifyError::Etcd`] when bucket `key` or `meta` is missing.
    pub fn finish(self) -> Result<EtcdSummary, VerifyError> {
        for required in ["key", "meta"] {
            if !self.buckets.iter().any(|b| b == required) {
                return Err(etcd_err(format!(
                    "bucket {required:?} is missing (top-level buckets: {:?}): this is a bbolt database but not an etcd backend",
                    self.buckets
                )));
            }
        }
        Ok(EtcdSummary {
            hash: self.crc,
            revision: self.revision,
            total_key_entries: self.total,
            live_keys: (!self.live_overflow).then_some(self.live.len() as u64),
            key_entries: self.key_entries,
            consistent_index: self.consistent_index,
            term: self.term,
            storage_version: self.storage_version,
            buckets: self.buckets,
        })
    }

    fn key_entry(&mut self, key: &[u8], value: Option<&[u8]>, loc: Loc) -> Result<(), VerifyError> {
        let n = self.key_entries;
        self.key_entries += 1;
        let tombstone = match key.len() {
            17 => false,
            18 if key[17] == b't' => true,
            _ => {
                return Err(etcd_err(format!(
                    "bucket \"key\" entry {n} ({loc}): key {} ({} bytes) is not a revision (17 bytes, or 18 ending in 't')",
                    hex_prefix(key),
                    key.len()
                )))
            }
        };
        if key[8] != b'_' {
            return Err(etcd_err(format!(
                "bucket \"key\" entry {n} ({loc}): key {} lacks the '_' between main and sub revision",
                hex_prefix(key)
            )));
        }
        let main = u64::from_be_bytes(key[..8].try_into().unwrap_or_default());
        let sub = u64::from_be_bytes(key[9..17].try_into().unwrap_or_default());
        let (Ok(main), Ok(_)) = (i64::try_from(main), i64::try_from(sub)) else {
            return Err(etcd_err(format!(
                "bucket \"key\" entry {n} ({loc}): revision {main}_{sub} is negative as etcd reads it"
            )));
        };
        self.revision = main;
        let Some(value) = value else {
            return Err(etcd_err(format!(
                "bucket \"key\" entry {n} ({loc}): revision {main}_{sub} is a bucket, not a key-value record"
            )));
        };
        let Some(user_key) = kv_key(value) else {
            return Err(etcd_err(format!(
                "bucket \"key\" entry {n} ({loc}): the value of revision {main}_{sub} is not a key-value record"
            )));
        };
        let mut h = DefaultHasher::new();
        user_key.hash(&mut h);
        let id = h.finish();
        if self.live_overflow || id % self.partitions != self.partition {
            return Ok(());
        }
        if tombstone {
            self.live.remove(&id);
        } else {
            self.live.insert(id);
            if self.live.len() > self.live_limit {
                self.live_overflow = true;
                self.live = HashSet::default();
            }
        }
        Ok(())
    }

    fn meta_entry(
        &mut self,
        key: &[u8],
        value: Option<&[u8]>,
        loc: Loc,
    ) -> Result<(), VerifyError> {
        let Some(v) = value else { return Ok(()) };
        let u64_of = |name: &str| {
            <[u8; 8]>::try_from(v).map(u64::from_be_bytes).map_err(|_| {
                etcd_err(format!(
                    "bucket \"meta\" key {name:?} ({loc}) is {} bytes, expected an 8-byte integer",
                    v.len()
                ))
            })
        };
        match key {
            b"consistent_index" => self.consistent_index = Some(u64_of("consistent_index")?),
            b"term" => self.term = Some(u64_of("term")?),
            b"storageVersion" => {
                self.storage_version = Some(String::from_utf8_lossy(v).into_owned());
            }
            _ => {}
        }
        Ok(())
    }
}

impl Visitor for EtcdLayout {
    fn entry(
        &mut self,
        depth: usize,
        key: &[u8],
        value: Option<&[u8]>,
        loc: Loc,
    ) -> Result<(), VerifyError> {
        match depth {
            0 => match value {
                // Top-level buckets are reported through bucket_begin.
                None => Ok(()),
                Some(_) => Err(etcd_err(format!(
                    "the root holds a plain key {:?} ({loc}) where etcd has only buckets",
                    String::from_utf8_lossy(&key[..key.len().min(64)])
                ))),
            },
            1 => {
                self.crc = crc32c::crc32c_append(self.crc, key);
                if let Some(v) = value {
                    self.crc = crc32c::crc32c_append(self.crc, v);
                }
                self.total += 1;
                match self.current {
                    Current::Key => self.key_entry(key, value, loc),
                    Current::Meta => self.meta_entry(key, value, loc),
                    Current::Other | Current::None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn bucket_begin(&mut self, depth: usize, name: &[u8], _loc: Loc) -> Result<(), VerifyError> {
        if depth == 1 {
            self.crc = crc32c::crc32c_append(self.crc, name);
            self.current = match name {
                b"key" => Current::Key,
                b"meta" => Current::Meta,
                _ => Current::Other,
            };
            self.buckets
                .push(String::from_utf8_lossy(&name[..name.len().min(256)]).into_owned());
        }
        Ok(())
    }

    fn bucket_end(&mut self, depth: usize) -> Result<(), VerifyError> {
        if depth == 1 {
            self.current = Current::None;
        }
        Ok(())
    }
}

/// Field 1 (`key`, bytes) of a protobuf-encoded `mvccpb.KeyValue`.
fn kv_key(mut b: &[u8]) -> Option<&[u8]> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    while !b.is_empty() {
        let tag = varint(&mut b)?;
        let (field, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                varint(&mut b)?;
            }
            1 => b = b.get(8..)?,
            5 => b = b.get(4..)?,
            2 => {
                let len = usize::try_from(varint(&mut b)?).ok()?;
                let data = b.get(..len)?;
                if field == 1 {
                    return Some(data);
                }
                b = &b[len..];
            }
            _ => return None,
        }
    }
    // A record with an empty key encodes no field 1.
    Some(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOC: Loc = Loc {
        page: 7,
        element: 3,
        inline: false,
    };

    fn rev(main: u64, sub: u64) -> Vec<u8> {
        let mut k = main.to_be_bytes().to_vec();
        k.push(b'_');
        k.extend_from_slice(&sub.to_be_bytes());
        k
    }

    #[test]
    fn kv_key_reads_field_one() {
        // key="foo" (field 1), create_revision=5 (field 2), value="bar" (field 5)
        let rec = [
            0x0a, 3, b'f', b'o', b'o', 0x10, 5, 0x2a, 3, b'b', b'a', b'r',
        ];
        assert_eq!(kv_key(&rec), Some(&b"foo"[..]));
        // field 1 after others
        let rec = [0x10, 0x96, 0x01, 0x0a, 1, b'k'];
        assert_eq!(kv_key(&rec), Some(&b"k"[..]));
        // truncated length
        assert_eq!(kv_key(&[0x0a, 5, b'a']), None);
        // bad wire type
        assert_eq!(kv_key(&[0x0f]), None);
        // varint longer than 10 bytes
        assert_eq!(
            kv_key(&[0x10, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            None
        );
    }

    #[test]
    fn revisions_tombstones_and_live_keys() {
        let mut l = EtcdLayout::default();
        l.bucket_begin(1, b"key", LOC).unwrap();
        let a = [0x0a, 1, b'a'];
        let b = [0x0a, 1, b'b'];
        l.entry(1, &rev(2, 0), Some(&a), LOC).unwrap();
        l.entry(1, &rev(3, 0), Some(&b), LOC).unwrap();
        l.entry(1, &rev(4, 0), Some(&a), LOC).unwrap();
        let mut tomb = rev(5, 0);
        tomb.push(b't');
        l.entry(1, &tomb, Some(&a), LOC).unwrap();
        assert_eq!(l.revision, 5);
        assert_eq!(l.live.len(), 1, "a was deleted, b is live");
        assert_eq!(l.total, 4);
    }

    #[test]
    fn bad_revision_keys_name_the_entry_and_page() {
        let mut l = EtcdLayout::default();
        l.bucket_begin(1, b"key", LOC).unwrap();
        let rec = [0x0a, 1, b'a'];
        for bad in [
            b"short".to_vec(),
            {
                let mut k = rev(1, 0);
                k[8] = b'-';
                k
            },
            {
                let mut k = rev(1, 0);
                k.push(b'x');
                k
            },
            rev(u64::MAX, 0),
        ] {
            let e = l.entry(1, &bad, Some(&rec), LOC).unwrap_err();
            assert!(matches!(e, VerifyError::Etcd { .. }), "{e}");
            assert!(e.to_string().contains("page 7, element 3"), "{e}");
        }
        let e = l.entry(1, &rev(9, 0), Some(&[0x0a, 9]), LOC).unwrap_err();
        assert!(e.to_string().contains("not a key-value record"), "{e}");
    }

    #[test]
    fn meta_values_and_missing_buckets() {
        let mut l = EtcdLayout::default();
        l.bucket_begin(1, b"meta", LOC).unwrap();
        l.entry(1, b"consistent_index", Some(&42u64.to_be_bytes()), LOC)
            .unwrap();
        l.entry(1, b"storageVersion", Some(b"3.6.0"), LOC).unwrap();
        assert!(l.entry(1, b"term", Some(b"x"), LOC).is_err());
        l.bucket_end(1).unwrap();
        assert_eq!(l.consistent_index, Some(42));
        let e = l.finish().unwrap_err();
        assert!(e.to_string().contains("bucket \"key\" is missing"), "{e}");
    }

    /// Feeds bucket `key` with `n` user keys, every third deleted again.
    fn feed(l: &mut EtcdLayout, n: u64) -> Result<(), VerifyError> {
        l.bucket_begin(1, b"meta", LOC)?;
        l.bucket_end(1)?;
        l.bucket_begin(1, b"key", LOC)?;
        let mut r = 1;
        for i in 0..n {
            let user = format!("k{i}");
            let mut rec = vec![0x0a, user.len() as u8];
            rec.extend_from_slice(user.as_bytes());
            l.entry(1, &rev(r, 0), Some(&rec), LOC)?;
            r += 1;
            if i % 3 == 0 {
                let mut t = rev(r, 0);
                t.push(b't');
                l.entry(1, &t, Some(&rec), LOC)?;
                r += 1;
            }
        }
        l.bucket_end(1)
    }

    #[test]
    fn live_keys_past_the_limit_are_counted_in_partitions() {
        let mut l = EtcdLayout::with_live_key_limit(50, 0, 1);
        feed(&mut l, 1000).unwrap();
        let s = l.finish().unwrap();
        assert_eq!(s.live_keys, None, "over the limit");
        let mut walks = 0;
        let live = EtcdLayout::live_keys_only(s.key_entries, 50, |l| {
            walks += 1;
            feed(l, 1000)
        })
        .unwrap();
        assert_eq!(live, 666);
        assert!(walks >= 16, "{walks} walks");
        let mut all = EtcdLayout::default();
        feed(&mut all, 1000).unwrap();
        assert_eq!(all.finish().unwrap().live_keys, Some(666));
    }
}
