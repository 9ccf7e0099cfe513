//! Object names. The one module that builds and parses keys in the store.
//!
//! Layout, under the configured prefix:
//!
//! ```text
//! PREFIX/CLUSTER_NAME/<id>/snapshot.db[.zst|.gz][.age]   the data object
//! PREFIX/CLUSTER_NAME/<id>/manifest.json           the commit marker, written last
//! PREFIX/CLUSTER_NAME/<id>/segments/…              the continuous-backup chain based on it
//! ```
//!
//! A backup is its `<id>/` directory: the manifest names its data object by file name
//! only (format 2; format 1 wrote the full key, of which only the file name is used), so a
//! backup directory copied to another prefix, bucket, cluster name or backend stays valid.
//!
//! `<id>` is `YYYYMMDDTHHMMSSZ-xxxxxx`: the UTC start time of the cycle (so names sort by
//! time in any listing) and six random hex digits (so two nodes, or a one-shot run next to
//! the daemon, never collide). Order is still always taken from manifests' timestamps,
//! never from names.

use chrono::{DateTime, NaiveDateTime, Utc};
use rand::Rng;
use std::fmt;
use std::str::FromStr;

/// File name of the manifest inside a backup's directory.
pub const MANIFEST_NAME: &str = "manifest.json";
/// File name (without compression suffix) of the data object.
pub const SNAPSHOT_STEM: &str = "snapshot.db";

const TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// The file name of a data object with `suffix` (e.g. `.zst.age`).
pub fn data_file_name(suffix: &str) -> String {
    format!("{SNAPSHOT_STEM}{suffix}")
}

/// Whether `name` is the file name of a data object this tool writes.
fn is_data_name(name: &str) -> bool {
    [".zst", ".gz", ""].iter().any(|s| {
        let rest = name.strip_prefix(SNAPSHOT_STEM);
        rest == Some(s) || rest.and_then(|r| r.strip_suffix(crate::codec::crypt::SUFFIX)) == Some(s)
    })
}

/// Directory of a chain's segments inside its base backup's directory.
pub const SEGMENTS_DIR: &str = "segments";
/// The infix between a segment's stem and its suffixes.
pub const SEGMENT_INFIX: &str = ".seg";

/// Whether `stem` is a segment stem: `<after:020>-<last:020>-<token:hex>`.
fn is_segment_stem(stem: &str) -> bool {
    let parts: Vec<&str> = stem.split('-').collect();
    parts.len() == 3
        && parts[0].len() == 20
        && parts[1].len() == 20
        && parts[..2]
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_digit()))
        && !parts[2].is_empty()
        && parts[2].bytes().all(|b| b.is_ascii_hexdigit())
}

/// The last revision a segment's file name (manifest or stored object) holds, or `None`
/// when `name` is not a segment's.
pub fn segment_last_revision(name: &str) -> Option<i64> {
    let stem = name
        .strip_suffix(".json")
        .or_else(|| name.split_once(SEGMENT_INFIX).map(|(s, _)| s))?;
    if !is_segment_stem(stem) {
        return None;
    }
    stem.split('-').nth(1)?.parse().ok()
}

/// What a file inside a chain's `segments/` directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainName {
    /// A segment manifest: `<stem>.json`.
    Manifest,
    /// A segment's stored object: `<stem>.seg[.zst|.gz][.age]`.
    Object,
    /// A chain-end record: `end-<last:020>.json`.
    End,
}

/// What the file `name` inside a `segments/` directory is, or `None` when this tool did
/// not write it.
pub fn chain_name(name: &str) -> Option<ChainName> {
    if name.contains('/') {
        return None;
    }
    if let Some(n) = name
        .strip_prefix("end-")
        .and_then(|n| n.strip_suffix(".json"))
    {
        return (n.len() == 20 && n.bytes().all(|b| b.is_ascii_digit())).then_some(ChainName::End);
    }
    if let Some(s) = name.strip_suffix(".json") {
        return is_segment_stem(s).then_some(ChainName::Manifest);
    }
    let (s, tail) = name.split_once(SEGMENT_INFIX)?;
    let tail = tail
        .strip_suffix(crate::codec::crypt::SUFFIX)
        .unwrap_or(tail);
    (is_segment_stem(s) && ["", ".zst", ".gz"].contains(&tail)).then_some(ChainName::Object)
}

/// The identifier of one backup.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackupId {
    time: DateTime<Utc>,
    suffix: String,
}

impl BackupId {
    /// A new id for a cycle starting at `time`, with a random suffix.
    pub fn new(time: DateTime<Utc>) -> Self {
        let n: u32 = rand::rng().random_range(0..0x100_0000);
        Self::with_suffix(time, format!("{n:06x}"))
    }

    fn with_suffix(time: DateTime<Utc>, suffix: String) -> Self {
        // Ids have one-second resolution.
        let time = DateTime::from_timestamp(time.timestamp(), 0).unwrap_or(time);
        Self { time, suffix }
    }

    /// The start time encoded in the id (second resolution).
    pub fn time(&self) -> DateTime<Utc> {
        self.time
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.time.format(TIME_FORMAT), self.suffix)
    }
}

impl serde::Serialize for BackupId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for BackupId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl PartialEq<str> for BackupId {
    fn eq(&self, other: &str) -> bool {
        other.parse::<BackupId>().is_ok_and(|o| o == *self)
    }
}

/// Why a string is not a backup id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a backup id (expected YYYYMMDDTHHMMSSZ-xxxxxx, as printed by `etcd-backup list`)"
)]
pub struct BadId(pub String);

impl FromStr for BackupId {
    type Err = BadId;
    fn from_str(s: &str) -> Result<Self, BadId> {
        let bad = || BadId(s.to_string());
        let (t, suffix) = s.split_once('-').ok_or_else(bad)?;
        if t.len() != 16
            || suffix.len() != 6
            || !suffix
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(bad());
        }
        let time = NaiveDateTime::parse_from_str(t, TIME_FORMAT)
            .map_err(|_| bad())?
            .and_utc();
        let id = BackupId {
            time,
            suffix: suffix.to_string(),
        };
        // Only the canonical spelling is accepted, so every id has exactly one name.
        if id.to_string() != s {
            return Err(bad());
        }
        Ok(id)
    }
}

/// What an object under the cluster's directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ObjectKind {
    /// A backup's manifest.
    Manifest(BackupId),
    /// A backup's data object.
    Data(BackupId),
    /// An object of the continuous-backup chain based on a backup (a segment, its
    /// manifest, or a chain-end record).
    Chain(BackupId, ChainName),
}

/// Builds and parses keys below `PREFIX/CLUSTER_NAME/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    base: String,
}

impl Layout {
    /// The layout for `prefix` (may be empty) and `cluster`.
    pub fn new(prefix: &str, cluster: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        let base = if prefix.is_empty() {
            cluster.to_string()
        } else {
            format!("{prefix}/{cluster}")
        };
        Layout { base }
    }

    /// The directory every object of this cluster lives under (no trailing slash).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Key of a backup's manifest.
    pub fn manifest_key(&self, id: &BackupId) -> String {
        format!("{}/{id}/{MANIFEST_NAME}", self.base)
    }

    /// Key of a backup's data object.
    pub fn data_key(&self, id: &BackupId, suffix: &str) -> String {
        format!("{}/{id}/{SNAPSHOT_STEM}{suffix}", self.base)
    }

    /// What `key` is, or `None` for anything this tool did not write.
    pub fn classify(&self, key: &str) -> Option<ObjectKind> {
        let rest = key.strip_prefix(&self.base)?.strip_prefix('/')?;
        let (id, name) = rest.split_once('/')?;
        let id: BackupId = id.parse().ok()?;
        match name {
            MANIFEST_NAME => Some(ObjectKind::Manifest(id)),
            n if is_data_name(n) => Some(ObjectKind::Data(id)),
            n => {
                let file = n.strip_prefix(SEGMENTS_DIR)?.strip_prefix('/')?;
                chain_name(file).map(|c| ObjectKind::Chain(id, c))
            }
        }
    }

    /// The key of backup `id`'s data object, named `object` in its manifest: the file name
    /// inside the backup's own directory, wherever the manifest says it was written (a
    /// format-1 manifest holds the full key of the place it was first written). `None`
    /// when `object` does not end in a data object's name.
    pub fn data_key_for(&self, id: &BackupId, object: &str) -> Option<String> {
        let name = object.rsplit('/').next()?;
        is_data_name(name).then(|| format!("{}/{id}/{name}", self.base))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    #[test]
    fn ids_sort_by_time_and_round_trip() {
        let a = BackupId::new(Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap());
        let s = a.to_string();
        assert!(s.starts_with("20260102T030405Z-"), "{s}");
        assert_eq!(s.parse::<BackupId>().unwrap(), a);
        for bad in [
            "",
            "20260102T030405Z",
            "20260102T030405Z-12345",
            "20260102T030405Z-ABCDEF",
            "20261302T030405Z-abcdef",
            "2026-01-02T03:04:05Z-abcdef",
            "20260102T030405Z-abcdef/x",
        ] {
            assert!(bad.parse::<BackupId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn classify_only_our_objects() {
        let l = Layout::new("/etcd/", "prod");
        let id: BackupId = "20260102T030405Z-0a1b2c".parse().unwrap();
        assert_eq!(l.base(), "etcd/prod");
        assert_eq!(
            l.manifest_key(&id),
            "etcd/prod/20260102T030405Z-0a1b2c/manifest.json"
        );
        assert_eq!(
            l.classify(&l.manifest_key(&id)),
            Some(ObjectKind::Manifest(id.clone()))
        );
        for suffix in [".zst", ".gz", "", ".zst.age", ".gz.age", ".age"] {
            assert_eq!(
                l.classify(&l.data_key(&id, suffix)),
                Some(ObjectKind::Data(id.clone())),
                "{suffix}"
            );
        }
        for foreign in [
            "etcd/prod/20260102T030405Z-0a1b2c/snapshot.db.age.zst",
            "etcd/prod/20260102T030405Z-0a1b2c/snapshot.db.zst.age.age",
            "etcd/prod/notes.txt",
            "etcd/prod2/20260102T030405Z-0a1b2c/manifest.json",
            "etcd/prod/20260102T030405Z-0a1b2c/manifest.json.bak",
            "etcd/prod/20260102T030405Z-0a1b2c/snapshot.db.xz",
            "etcd/prod/20260102T030405Z-0a1b2c/sub/manifest.json",
            "other/prod/20260102T030405Z-0a1b2c/manifest.json",
            "etcd/prod/20260102T030405Z-0a1b2c/segments/notes.json",
            "etcd/prod/20260102T030405Z-0a1b2c/segments/x/end-00000000000000000009.json",
            "etcd/prod/20260102T030405Z-0a1b2c/segments/end-9.json",
            "etcd/prod/20260102T030405Z-0a1b2c/segments/00000000000000000001-00000000000000000002-1.seg.xz",
            "etcd/prod/20260102T030405Z-0a1b2c/segments/1-2-1.json",
            "etcd/prod/20260102T030405Z-0a1b2c/segments/00000000000000000001-00000000000000000002-g.json",
        ] {
            assert_eq!(l.classify(foreign), None, "{foreign}");
        }
        assert_eq!(
            segment_last_revision("00000000000000000001-00000000000000000002-1f.json"),
            Some(2)
        );
        assert_eq!(
            segment_last_revision("00000000000000000001-00000000000000000042-1f.seg.zst.age"),
            Some(42)
        );
        assert_eq!(segment_last_revision("end-00000000000000000009.json"), None);
        let seg = |n: &str| format!("etcd/prod/20260102T030405Z-0a1b2c/segments/{n}");
        let stem = "00000000000000000001-00000000000000000002-1f";
        for (name, kind) in [
            (format!("{stem}.json"), ChainName::Manifest),
            (format!("{stem}.seg.zst"), ChainName::Object),
            (format!("{stem}.seg.gz.age"), ChainName::Object),
            (format!("{stem}.seg"), ChainName::Object),
            ("end-00000000000000000009.json".to_string(), ChainName::End),
        ] {
            assert_eq!(
                l.classify(&seg(&name)),
                Some(ObjectKind::Chain(id.clone(), kind)),
                "{name}"
            );
        }
        assert_eq!(Layout::new("", "c").base(), "c");
    }

    #[test]
    fn data_objects_resolve_inside_the_backup_directory() {
        let l = Layout::new("new/prefix", "prod");
        let id: BackupId = "20260102T030405Z-0a1b2c".parse().unwrap();
        let want = Some("new/prefix/prod/20260102T030405Z-0a1b2c/snapshot.db.zst".to_string());
        // Format 2: the file name.
        assert_eq!(l.data_key_for(&id, &data_file_name(".zst")), want);
        // Format 1: the full key where it was first written (other prefix and cluster name).
        assert_eq!(
            l.data_key_for(
                &id,
                "old/kubernetes/20260102T030405Z-0a1b2c/snapshot.db.zst"
            ),
            want
        );
        // Even a full key naming another id resolves inside this backup's own directory.
        assert_eq!(
            l.data_key_for(&id, "kubernetes/20990101T000000Z-ffffff/snapshot.db.zst"),
            want
        );
        for bad in [
            "",
            "manifest.json",
            "../../etc/passwd",
            "snapshot.db.zst/",
            "x/notes.txt",
        ] {
            assert_eq!(l.data_key_for(&id, bad), None, "{bad}");
        }
        assert_eq!(
            l.data_key_for(&id, "snapshot.db.gz.age"),
            Some("new/prefix/prod/20260102T030405Z-0a1b2c/snapshot.db.gz.age".to_string())
        );
    }

    proptest! {
        #[test]
        fn id_format_parse_round_trip(secs in 0i64..4_102_444_800, n in 0u32..0x100_0000) {
            let t = DateTime::from_timestamp(secs, 0).unwrap();
            let id = BackupId::with_suffix(t, format!("{n:06x}"));
            let parsed: BackupId = id.to_string().parse().unwrap();
            prop_assert_eq!(&parsed, &id);
            prop_assert_eq!(parsed.time(), t);
            let l = Layout::new("p", "c");
            prop_assert_eq!(l.classify(&l.manifest_key(&id)), Some(ObjectKind::Manifest(id.clone())));
        }

        #[test]
        fn later_ids_sort_later(a in 0i64..4_102_444_800, b in 0i64..4_102_444_800) {
            let ia = BackupId::new(DateTime::from_timestamp(a, 0).unwrap()).to_string();
            let ib = BackupId::new(DateTime::from_timestamp(b, 0).unwrap()).to_string();
            if a < b { prop_assert!(ia < ib); }
        }
    }
}
