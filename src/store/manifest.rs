//! The manifest: the commit marker of a backup, written after the data object is complete
//! and verified. A backup exists if and only if its manifest exists.

use crate::codec::compress::Compression;
use crate::store::naming::BackupId;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Version of the manifest and object layout written by this build. Format 2 names the data
/// object by its file name inside the backup's directory; format 1 (still read) held its
/// full key. Older builds refuse format 2 as "newer" and leave such backups alone.
pub const FORMAT_VERSION: u32 = 2;

/// A manifest is a few KiB; anything larger than this is not one and is never parsed.
pub const MAX_MANIFEST_SIZE: u64 = 1024 * 1024;

/// A manifest dated more than this after `now` is *future*: a wrong clock or a planted
/// object. It is listed, flagged and kept, but never "latest" and never aged out.
pub const FUTURE_TOLERANCE: chrono::Duration = chrono::Duration::minutes(5);

/// `s` with control characters (terminal escape sequences among them) escaped, for
/// printing strings that come from the store.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if s.chars().any(char::is_control) {
        s.chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect::<String>()
            .into()
    } else {
        s.into()
    }
}

/// Everything known about one committed backup.
///
/// The first fields are those `etcd-backup list --json` prints; their names are stable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Layout/manifest version.
    pub format_version: u32,
    /// Backup id (see `naming`), stored as its string.
    pub id: BackupId,
    /// When the snapshot was requested (UTC).
    pub time: DateTime<Utc>,
    /// etcd revision of the snapshot (from the snapshot itself when verified).
    pub revision: i64,
    /// Size in bytes of the raw snapshot file, sha256 trailer included.
    pub size: u64,
    /// Size in bytes of the stored object.
    pub stored_size: u64,
    /// sha256 (hex) of the raw snapshot file, trailer included: `sha256sum` of the file
    /// that `restore` writes.
    pub sha256: String,
    /// Compression of the stored object.
    pub compression: Compression,
    /// Version of the etcd member that served the snapshot.
    pub etcd_version: String,
    /// etcd cluster id (hex).
    pub cluster_id: String,
    /// Member id (hex) of the member that served the snapshot.
    pub member: String,

    /// Name of the member that served the snapshot.
    pub member_name: String,
    /// Client URL the snapshot was taken from.
    pub endpoint: String,
    /// Configured cluster name.
    pub cluster_name: String,
    /// The data object: its file name inside the backup's directory (format 2), or, in
    /// format-1 manifests, the full key it was first written to (only its file name is
    /// used: see `naming::Layout::data_key_for`).
    pub object: String,
    /// sha256 (hex) of the stored object, to check a download before decompressing.
    pub stored_sha256: String,
    /// The member's revision just before the snapshot was requested.
    pub revision_before: i64,
    /// The member's database size (bytes) from its status before the snapshot.
    pub db_size: i64,
    /// The member's in-use database size (bytes) from its status before the snapshot.
    pub db_size_in_use: i64,
    /// Results of the snapshot verifier.
    pub verification: Verification,
    /// When the cycle started and finished.
    pub started_at: DateTime<Utc>,
    /// When the manifest was written.
    pub finished_at: DateTime<Utc>,
    /// Node that made the backup (`[election] node_name`, default the host name).
    pub node: String,
    /// Version of etcd-backup that made the backup.
    pub tool_version: String,
    /// Seconds etcd's snapshot stream was held open (its read transaction), from opening
    /// the stream to its last byte; unset in manifests written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_seconds: Option<f64>,
    /// The scheduled time this backup was taken for (daemon runs; unset for one-shot runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot: Option<DateTime<Utc>>,
    /// The election key's revision while the node that made the backup led (daemon runs
    /// with `[election]` on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
    /// Client-side encryption of the stored object, when it is encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// The cluster's members when the backup was taken (for the restore runbook); empty in
    /// manifests written before it was recorded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<ClusterMember>,
}

/// One member of the etcd cluster as its member list showed it at backup time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMember {
    /// Member id (hex).
    pub id: String,
    /// Member name (`--name`; on kubeadm the node name).
    pub name: String,
    /// Peer URLs (`--initial-advertise-peer-urls`).
    pub peer_urls: Vec<String>,
    /// Client URLs (`--advertise-client-urls`).
    #[serde(default)]
    pub client_urls: Vec<String>,
    /// Whether it was a learner (not a voting member).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_learner: bool,
}

/// How a stored object is encrypted: the method and the public keys it was encrypted to
/// (never a secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// How it is encrypted.
    pub method: EncryptionMethod,
    /// The age recipients (`age1…`); any one of their identities decrypts the backup.
    pub recipients: Vec<String>,
}

/// An encryption method as manifests name it. A name this version does not know (from a
/// newer version) still reads, so that the backup can be listed and the error can name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum EncryptionMethod {
    /// age, X25519 recipients (`age`).
    Age,
    /// Any other name.
    Unknown(String),
}

impl From<String> for EncryptionMethod {
    fn from(s: String) -> Self {
        if s == "age" {
            EncryptionMethod::Age
        } else {
            EncryptionMethod::Unknown(s)
        }
    }
}

impl From<EncryptionMethod> for String {
    fn from(m: EncryptionMethod) -> String {
        m.to_string()
    }
}

impl std::fmt::Display for EncryptionMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncryptionMethod::Age => f.write_str("age"),
            EncryptionMethod::Unknown(s) => f.write_str(s),
        }
    }
}

/// What the verifier found in the snapshot before it was committed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// CRC-32C hash as `etcdutl snapshot status` computes it.
    pub hash: u32,
    /// Number of key/value entries in all buckets (what etcd 3.5 reports as total keys).
    pub total_key_entries: u64,
    /// Distinct live user keys (what etcd 3.6+ reports as total keys).
    pub live_keys: u64,
    /// bbolt page size.
    pub page_size: u32,
    /// Raft consistent index stored in the snapshot.
    pub consistent_index: Option<u64>,
}

impl Manifest {
    /// Whether the backup is dated more than [`FUTURE_TOLERANCE`] after `now`.
    pub fn is_future(&self, now: DateTime<Utc>) -> bool {
        now.checked_add_signed(FUTURE_TOLERANCE)
            .is_some_and(|limit| self.time > limit)
    }

    /// Serializes for storage (pretty, so operators can read it with any tool).
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("manifest serializes");
        v.push(b'\n');
        v
    }

    /// Parses a stored manifest.
    ///
    /// # Errors
    /// When the bytes are not a manifest this version understands.
    pub fn from_json(bytes: &[u8]) -> Result<Manifest, String> {
        let m: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.format_version > FORMAT_VERSION {
            return Err(format!(
                "manifest format {} is newer than this etcd-backup understands ({FORMAT_VERSION}); upgrade etcd-backup",
                m.format_version
            ));
        }
        Ok(m)
    }
}

#[cfg(test)]
pub(crate) fn sample(id: &str, time: DateTime<Utc>) -> Manifest {
    Manifest {
        format_version: FORMAT_VERSION,
        id: id.parse().expect("a backup id"),
        time,
        revision: 42,
        size: 20512,
        stored_size: 3000,
        sha256: "00".repeat(32),
        compression: Compression::Zstd,
        etcd_version: "3.5.1".into(),
        cluster_id: "cdf818194e3a8c32".into(),
        member: "8e9e05c52164694d".into(),
        member_name: "m1".into(),
        endpoint: "http://127.0.0.1:2379".into(),
        cluster_name: "kubernetes".into(),
        object: "snapshot.db.zst".into(),
        stored_sha256: "11".repeat(32),
        revision_before: 41,
        db_size: 20480,
        db_size_in_use: 16384,
        verification: Verification {
            hash: 1,
            total_key_entries: 10,
            live_keys: 5,
            page_size: 4096,
            consistent_index: Some(9),
        },
        started_at: time,
        finished_at: time,
        node: "cp1".into(),
        tool_version: "0.1.0".into(),
        stream_seconds: None,
        slot: None,
        fencing_token: None,
        encryption: None,
        members: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_newer_formats() {
        let m = sample("20260102T030405Z-0a1b2c", Utc::now());
        let back = Manifest::from_json(&m.to_json()).unwrap();
        assert_eq!(back, m);
        let mut newer = m.clone();
        newer.format_version = FORMAT_VERSION + 1;
        let err = Manifest::from_json(&newer.to_json()).unwrap_err();
        assert!(err.contains("upgrade"), "{err}");
        assert!(Manifest::from_json(b"{}").is_err());
    }

    #[test]
    fn control_characters_are_escaped_for_printing() {
        assert_eq!(printable("m1 (8e9e)"), "m1 (8e9e)");
        let p = printable("evil\x1b]0;owned\x07\nline\u{9b}2J");
        assert!(!p.chars().any(char::is_control), "{p:?}");
        assert_eq!(p, "evil\\u{1b}]0;owned\\u{7}\\nline\\u{9b}2J");
    }

    #[test]
    fn future_is_more_than_five_minutes_ahead() {
        let now = Utc::now();
        let m = |secs| {
            sample(
                "20260102T030405Z-0a1b2c",
                now + chrono::Duration::seconds(secs),
            )
        };
        assert!(!m(0).is_future(now));
        assert!(!m(300).is_future(now));
        assert!(m(301).is_future(now));
        assert!(!m(-86400 * 365).is_future(now));
        assert!(!m(1).is_future(DateTime::<Utc>::MAX_UTC));
    }

    #[test]
    fn the_id_is_typed_and_stored_as_its_string() {
        let m = sample("20260102T030405Z-0a1b2c", Utc::now());
        let v: serde_json::Value = serde_json::from_slice(&m.to_json()).unwrap();
        assert_eq!(v["id"], "20260102T030405Z-0a1b2c");
        let mut bad = v.clone();
        bad["id"] = "../../etc".into();
        let err = Manifest::from_json(&serde_json::to_vec(&bad).unwrap()).unwrap_err();
        assert!(err.contains("not a backup id"), "{err}");
    }

    #[test]
    fn members_round_trip_and_are_optional() {
        let mut m = sample("20260102T030405Z-0a1b2c", Utc::now());
        let without = String::from_utf8(m.to_json()).unwrap();
        assert!(!without.contains("members"), "{without}");
        m.members = vec![ClusterMember {
            id: "8e9e05c52164694d".into(),
            name: "cp1".into(),
            peer_urls: vec!["https://10.0.0.1:2380".into()],
            client_urls: vec!["https://10.0.0.1:2379".into()],
            is_learner: false,
        }];
        assert_eq!(Manifest::from_json(&m.to_json()).unwrap(), m);
        // Manifests written before the field existed still read, with no members.
        let old = Manifest::from_json(without.as_bytes()).unwrap();
        assert!(old.members.is_empty());
    }
}
