//! etcd's layout on top of bbolt, computed the way `etcdutl snapshot status` does:
//!
//! - `hash`: CRC-32C (Castagnoli) over, for each top-level bucket in key order, its name,
//!   then each entry's key and value (a sub-bucket entry contributes its key only);
//! - `revision`: the main revision of the last key of bucket `key` (keys are 17 bytes:
//!   `main u64 BE, '_', sub u64 BE`, plus a trailing `t` for tombstones);
//! - `total_key_entries`: entries of all top-level buckets (etcd 3.5's "total keys");
//! - `live_keys`: distinct user keys alive at the end (etcd 3.6+'s "total keys"), from
//!   field 1 (`key`) of each `mvccpb.KeyValue` value, tombstones removing keys;
//! - `consistent_index`, `term` (u64 BE) and `storageVersion` from bucket `meta`.

use super::bbolt::Visitor;
use super::VerifyError;
use std::collections::HashSet;
use std::hash::{DefaultHasher, Hash, Hasher};

/// What [`EtcdLayout`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSummary {
    /// CRC-32C as etcdutl computes it.
    pub hash: u32,
    /// Main revision of the last `key` entry.
    pub revision: i64,
    /// Entries of all top-level buckets.
    pub total_key_entries: u64,
    /// Distinct live user keys.
    pub live_keys: u64,
    /// From `meta`.
    pub consistent_index: Option<u64>,
    /// From `meta`.
    pub term: Option<u64>,
    /// From `meta`.
    pub storage_version: Option<String>,
    /// Top-level bucket names.
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

/// A [`Visitor`] that checks and summarizes etcd's buckets.
#[derive(Default)]
pub struct EtcdLayout {
    crc: u32,
    current: Current,
    revision: i64,
    key_entries: u64,
    total: u64,
    live: HashSet<u64>,
    consistent_index: Option<u64>,
    term: Option<u64>,
    storage_version: Option<String>,
    buckets: Vec<String>,
}

impl EtcdLayout {
    /// The summary, once the walk is over.
    ///
    /// # Errors
    /// [`VerifyError::Etcd`] when bucket `key` or `meta` is missing.
    pub fn finish(self) -> Result<EtcdSummary, VerifyError> {
        for required in ["key", "meta"] {
            if !self.buckets.iter().any(|b| b == required) {
                return Err(VerifyError::Etcd(format!(
                    "bucket {required:?} is missing (buckets: {:?}): this is not an etcd backend database",
                    self.buckets
                )));
            }
        }
        Ok(EtcdSummary {
            hash: self.crc,
            revision: self.revision,
            total_key_entries: self.total,
            live_keys: self.live.len() as u64,
            consistent_index: self.consistent_index,
            term: self.term,
            storage_version: self.storage_version,
            buckets: self.buckets,
        })
    }

    fn key_entry(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let n = self.key_entries;
        self.key_entries += 1;
        let tombstone = match key.len() {
            17 => false,
            18 if key[17] == b't' => true,
            _ => {
                return Err(format!(
                    "entry {n} of bucket \"key\" has key {} ({} bytes), which is not a revision (17 bytes, or 18 ending in 't')",
                    hex::encode(&key[..key.len().min(32)]),
                    key.len()
                ))
            }
        };
        if key[8] != b'_' {
            return Err(format!(
                "entry {n} of bucket \"key\" has key {} without the '_' separator of a revision",
                hex::encode(key)
            ));
        }
        let main = u64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
        let sub = u64::from_be_bytes(key[9..17].try_into().expect("8 bytes"));
        let main = i64::try_from(main)
            .ok()
            .filter(|_| i64::try_from(sub).is_ok())
            .ok_or_else(|| format!("entry {n} of bucket \"key\" has a negative revision"))?;
        self.revision = main;
        let Some(value) = value else {
            return Err(format!(
                "entry {n} of bucket \"key\" is a bucket, not a key-value record"
            ));
        };
        let user_key = kv_key(value).ok_or_else(|| {
            format!(
                "the value of revision {main}_{sub} in bucket \"key\" is not a key-value record"
            )
        })?;
        let mut h = DefaultHasher::new();
        user_key.hash(&mut h);
        let id = h.finish();
        if tombstone {
            self.live.remove(&id);
        } else {
            self.live.insert(id);
        }
        Ok(())
    }

    fn meta_entry(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        let Some(v) = value else { return Ok(()) };
        let u64_of = |name: &str| {
            <[u8; 8]>::try_from(v)
                .map(u64::from_be_bytes)
                .map_err(|_| format!("meta/{name} is {} bytes, expected 8", v.len()))
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
    fn bucket_begin(&mut self, depth: usize, name: &[u8]) -> Result<(), String> {
        if depth == 1 {
            self.crc = crc32c::crc32c_append(self.crc, name);
            self.current = match name {
                b"key" => Current::Key,
                b"meta" => Current::Meta,
                _ => Current::Other,
            };
            self.buckets
                .push(String::from_utf8_lossy(name).into_owned());
        }
        Ok(())
    }

    fn entry(&mut self, depth: usize, key: &[u8], value: Option<&[u8]>) -> Result<(), String> {
        match depth {
            0 => match value {
                // Top-level buckets are reported through bucket_begin.
                None => Ok(()),
                Some(_) => Err(format!(
                    "the root holds a plain key {:?} where etcd has only buckets",
                    String::from_utf8_lossy(key)
                )),
            },
            1 => {
                self.crc = crc32c::crc32c_append(self.crc, key);
                if let Some(v) = value {
                    self.crc = crc32c::crc32c_append(self.crc, v);
                }
                self.total += 1;
                match self.current {
                    Current::Key => self.key_entry(key, value),
                    Current::Meta => self.meta_entry(key, value),
                    Current::Other | Current::None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }

    fn bucket_end(&mut self, depth: usize) -> Result<(), String> {
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
    }

    #[test]
    fn revision_keys_are_checked() {
        let mut l = EtcdLayout::default();
        l.bucket_begin(1, b"key").unwrap();
        let mut k = 7u64.to_be_bytes().to_vec();
        k.push(b'_');
        k.extend_from_slice(&0u64.to_be_bytes());
        let rec = [0x0a, 1, b'a'];
        l.entry(1, &k, Some(&rec)).unwrap();
        assert_eq!(l.revision, 7);
        assert!(l.entry(1, b"short", Some(&rec)).is_err());
        let mut bad = k.clone();
        bad[8] = b'-';
        assert!(l.entry(1, &bad, Some(&rec)).is_err());
        let mut tomb = k.clone();
        tomb.push(b't');
        l.entry(1, &tomb, Some(&rec)).unwrap();
        assert_eq!(l.live.len(), 0, "the tombstone removed the key");
    }
}
