//! Configuration: parsed once, validated once, then handed around as typed values.
//!
//! Sources, later ones winning: the built-in defaults, the TOML file given with `--config`,
//! then environment variables `ETCD_BACKUP_<SECTION>__<KEY>` (for example
//! `ETCD_BACKUP_STORAGE__SECRET_ACCESS_KEY`). Every problem found is reported in one pass,
//! each with the file and the key it concerns, so an operator fixes them all at once.
//!
//! The raw serde mirror (`raw`) rejects unknown keys; [`Config::load`] converts it into
//! [`Config`], which holds `Duration`s, a parsed cron schedule, a parsed storage URL and
//! [`Secret`]s.

pub mod secret;

use crate::codec::compress::Compression;
use crate::schedule::Schedule;
use chrono_tz::Tz;
pub use secret::Secret;
use serde::Serialize;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The prefix of environment variables that override the file.
pub const ENV_PREFIX: &str = "ETCD_BACKUP";

/// Default kubeadm PKI paths for the etcd client certificate.
pub const KUBEADM_CA: &str = "/etc/kubernetes/pki/etcd/ca.crt";
/// kubeadm's client certificate meant for health checks; it is accepted by etcd for the
/// maintenance API (snapshot, status) that backups use.
pub const KUBEADM_CERT: &str = "/etc/kubernetes/pki/etcd/healthcheck-client.crt";
/// The key of [`KUBEADM_CERT`].
pub const KUBEADM_KEY: &str = "/etc/kubernetes/pki/etcd/healthcheck-client.key";

/// One problem in the configuration: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `storage.url`; empty when the problem is the file itself.
    pub key: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

/// Every problem found while loading a configuration.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The file that was loaded.
    pub file: PathBuf,
    /// The problems, in key order.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration in {}:", self.file.display())?;
        for p in &self.problems {
            if p.key.is_empty() {
                write!(f, "\n  - {}", p.message)?;
            } else {
                write!(f, "\n  - {}: {}", p.key, p.message)?;
            }
        }
        Ok(())
    }
}

/// The validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// `[etcd]`
    pub etcd: EtcdConfig,
    /// `[storage]`
    pub storage: StorageConfig,
    /// `[backup]`
    pub backup: BackupConfig,
    /// `[schedule]`
    pub schedule: ScheduleConfig,
    /// `[retention]`
    pub retention: RetentionConfig,
    /// `[metrics]`
    pub metrics: MetricsConfig,
    /// `[drill]`
    pub drill: DrillConfig,
    /// `[defrag]`
    pub defrag: DefragConfig,
    /// `[election]`
    pub election: ElectionConfig,
    /// `[encryption]`
    pub encryption: EncryptionConfig,
    /// `[continuous]`
    pub continuous: ContinuousConfig,
    /// The file this was loaded from.
    #[serde(skip)]
    pub source: PathBuf,
}

/// How to reach etcd.
#[derive(Debug, Clone, Serialize)]
pub struct EtcdConfig {
    /// Client URLs; the first is the local member that snapshots are taken from.
    pub endpoints: Vec<String>,
    /// TLS material, used when the endpoints are `https://`.
    pub tls: Option<TlsFiles>,
    /// etcd user name when etcd's own authentication is enabled.
    pub username: Option<String>,
    /// Password of `username`.
    pub password: Option<Secret>,
    /// Time allowed to establish a connection.
    #[serde(with = "humantime_serde_compat")]
    pub dial_timeout: Duration,
    /// Time allowed for one unary request (status, member list).
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
}

/// Paths of the CA certificate and the client certificate and key.
#[derive(Debug, Clone, Serialize)]
pub struct TlsFiles {
    /// CA that signed the etcd server certificates.
    pub ca_file: PathBuf,
    /// Client certificate (optional when etcd does not require client certificates).
    pub cert_file: Option<PathBuf>,
    /// Key of the client certificate.
    pub key_file: Option<PathBuf>,
}

/// Where backups are stored.
#[derive(Debug, Clone, Serialize)]
pub struct StorageConfig {
    /// `s3://BUCKET/PREFIX` or `file:///DIR`.
    pub url: StorageUrl,
    /// S3 endpoint URL for S3-compatible services (MinIO, Ceph, Garage, ...).
    pub endpoint: Option<String>,
    /// S3 region.
    pub region: String,
    /// Path-style requests (`endpoint/bucket/key`) instead of virtual-hosted style.
    pub path_style: bool,
    /// Access key; when unset the standard `AWS_*` variables or the instance profile are used.
    pub access_key_id: Option<String>,
    /// Secret key belonging to `access_key_id`.
    pub secret_access_key: Option<Secret>,
    /// Session token for temporary credentials.
    pub session_token: Option<Secret>,
    /// S3 storage class of the uploaded snapshots (e.g. `STANDARD_IA`).
    pub storage_class: Option<String>,
    /// S3 server-side encryption.
    pub sse: Option<Sse>,
    /// Send a SHA-256 checksum with every upload (required by buckets with Object Lock).
    pub checksum_sha256: bool,
    /// Limits and retries of S3 requests.
    pub requests: RequestLimits,
}

/// Timeouts and retries of S3 requests.
#[derive(Debug, Clone, Serialize)]
pub struct RequestLimits {
    /// Time to establish a connection.
    #[serde(with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
    /// Time for one request (one 5 MiB part at most).
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// Retries of a failed request (with exponential backoff and jitter).
    pub max_retries: u32,
    /// No retry starts after this long since the first attempt.
    #[serde(with = "humantime_serde_compat")]
    pub retry_timeout: Duration,
    /// Upper bound of the upload rate in bytes per second (`storage.max_upload_rate`);
    /// `None`: as fast as the link goes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_upload_rate: Option<u64>,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(300),
            max_retries: 5,
            retry_timeout: Duration::from_secs(180),
            max_upload_rate: None,
        }
    }
}

/// S3 server-side encryption (`storage.sse`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind")]
pub enum Sse {
    /// SSE-S3 (`AES256`): keys managed by the service.
    #[serde(rename = "AES256")]
    S3,
    /// SSE-KMS (`aws:kms`), with a key id or the bucket's default KMS key.
    #[serde(rename = "aws:kms")]
    Kms {
        /// `storage.sse_kms_key_id`.
        key_id: Option<String>,
    },
    /// DSSE-KMS (`aws:kms:dsse`).
    #[serde(rename = "aws:kms:dsse")]
    DsseKms {
        /// `storage.sse_kms_key_id`.
        key_id: Option<String>,
    },
    /// SSE-C: the service encrypts with a key we send on every request (base64, 256 bit).
    #[serde(rename = "sse-c")]
    CustomerKey {
        /// `storage.sse_customer_key`.
        key: Secret,
    },
}

/// Client-side encryption of the stored objects.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EncryptionConfig {
    /// age recipients (`age1…`): every backup is encrypted to all of them. Empty: off.
    pub recipients: crate::codec::crypt::Recipients,
    /// Where some of them came from.
    pub recipients_file: Option<PathBuf>,
    /// Identity file to decrypt with (verify, restore, drills).
    pub identity_file: Option<PathBuf>,
}

impl EncryptionConfig {
    /// Whether backups are encrypted.
    pub fn enabled(&self) -> bool {
        !self.recipients.is_empty()
    }
}

/// A parsed `storage.url`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum StorageUrl {
    /// An S3 bucket and a key prefix (without leading or trailing slashes; may be empty).
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix inside the bucket.
        prefix: String,
    },
    /// A local (or NFS-mounted) directory.
    File {
        /// Absolute directory path.
        dir: PathBuf,
    },
}

impl fmt::Display for StorageUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageUrl::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StorageUrl::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
            StorageUrl::File { dir } => write!(f, "file://{}", dir.display()),
        }
    }
}

/// How each backup is made.
#[derive(Debug, Clone, Serialize)]
pub struct BackupConfig {
    /// Name of the cluster; backups are stored under `PREFIX/CLUSTER_NAME/`.
    pub cluster_name: String,
    /// Compression of the stored object.
    pub compression: Compression,
    /// Compression level (zstd 1..=19, gzip 1..=9); `None` means the codec's default.
    pub compression_level: Option<i32>,
    /// Directory for the temporary copy of the snapshot that is verified before commit.
    pub spool_dir: PathBuf,
    /// Upper bound for a whole cycle (snapshot, verify, upload, commit), plus
    /// `timeout_per_gib` for each GiB of the database.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Added to `timeout` per GiB of the database, so large databases get the time they need.
    #[serde(with = "humantime_serde_compat")]
    pub timeout_per_gib: Duration,
    /// After a failed scheduled backup, try once more after this long (when that is before
    /// the next slot); `None`: wait for the next slot.
    #[serde(with = "humantime_serde_compat_opt")]
    pub retry_after: Option<Duration>,
}

impl BackupConfig {
    /// The time limit of a cycle for a database of `db_size` bytes.
    pub fn cycle_timeout(&self, db_size: u64) -> Duration {
        let gib = db_size as f64 / f64::from(1u32 << 30);
        let extra = Duration::try_from_secs_f64(self.timeout_per_gib.as_secs_f64() * gib)
            .unwrap_or(Duration::MAX);
        self.timeout.saturating_add(extra)
    }
}

/// When the daemon runs cycles.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleConfig {
    /// The cron expression as written.
    pub cron: String,
    /// Timezone the expression is evaluated in.
    #[serde(serialize_with = "ser_tz")]
    pub timezone: Tz,
    /// The parsed schedule.
    #[serde(skip)]
    pub parsed: Schedule,
}

/// The HTTP endpoints and how often the values behind them are refreshed.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsConfig {
    /// Address of `/metrics`, `/healthz` and `/readyz`.
    pub listen: std::net::SocketAddr,
    /// How often the local member's status (DB size) is read.
    #[serde(with = "humantime_serde_compat")]
    pub refresh_interval: Duration,
    /// How often the store is listed for the newest backup (last-success time).
    #[serde(with = "humantime_serde_compat")]
    pub store_refresh_interval: Duration,
}

/// Scheduled restore drills.
#[derive(Debug, Clone, Serialize)]
pub struct DrillConfig {
    /// The cron expression as written; `None`: drills are off.
    pub cron: Option<String>,
    /// The parsed schedule.
    #[serde(skip)]
    pub schedule: Option<Schedule>,
    /// Directory holding `etcd` and `etcdutl` (default: found on PATH).
    pub etcd_dir: Option<PathBuf>,
    /// Upper bound for starting the restored etcd and checking it.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
}

/// Scheduled defragmentation of the local member (see `defrag`).
#[derive(Debug, Clone, Serialize)]
pub struct DefragConfig {
    /// The cron expression as written; `None`: no scheduled defragmentation.
    pub cron: Option<String>,
    /// The parsed schedule.
    #[serde(skip)]
    pub schedule: Option<Schedule>,
    /// Defragment only when at least this share of the database file is free
    /// (`1 - db_size_in_use / db_size`).
    pub min_free_ratio: f64,
    /// ... and at least this many bytes are free.
    pub min_free_bytes: u64,
    /// Upper bound for waiting (for the other members' turns and a running snapshot), and
    /// separately for the defragmentation itself.
    #[serde(with = "humantime_serde_compat")]
    pub timeout: Duration,
}

/// Default `[defrag] min_free_bytes`: 64 MiB.
pub const DEFAULT_DEFRAG_MIN_FREE_BYTES: u64 = 64 << 20;

/// Continuous backup: segments of watch events after each snapshot, for point-in-time
/// restores (off by default).
#[derive(Debug, Clone, Serialize)]
pub struct ContinuousConfig {
    /// Whether the leader writes segments.
    pub enabled: bool,
    /// A segment is sealed and stored at least this often while there are writes.
    #[serde(with = "humantime_serde_compat")]
    pub segment_interval: Duration,
    /// A segment is sealed early once its encoded size reaches this many bytes.
    pub max_segment_bytes: u64,
}

/// Which node takes the backups: the daemons elect one through an etcd lease.
#[derive(Debug, Clone, Serialize)]
pub struct ElectionConfig {
    /// `false`: this daemon takes backups without an election (a single control-plane
    /// node, or an external mechanism makes sure only one daemon runs).
    pub enabled: bool,
    /// Key prefix of the election; the election name is `KEY_PREFIX/CLUSTER_NAME`.
    pub key_prefix: String,
    /// TTL of the lease the leadership is bound to.
    #[serde(with = "humantime_serde_compat")]
    pub lease_ttl: Duration,
    /// This node's name in the election and in the manifests it writes.
    pub node_name: String,
}

impl ElectionConfig {
    /// The election's name in etcd for `cluster_name`.
    pub fn election_name(&self, cluster_name: &str) -> String {
        format!("{}/{cluster_name}", self.key_prefix.trim_end_matches('/'))
    }
}

/// Default `[metrics] listen`.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9479";

/// Which backups pruning keeps (see `retention` for the rules).
#[derive(Debug, Clone, Serialize)]
pub struct RetentionConfig {
    /// Keep the N newest backups.
    pub keep_last: u32,
    /// Keep the newest backup of each of the last N hours that have backups.
    pub keep_hourly: u32,
    /// Keep the newest backup of each of the last N days that have backups.
    pub keep_daily: u32,
    /// Keep the newest backup of each of the last N ISO weeks that have backups.
    pub keep_weekly: u32,
    /// Keep the newest backup of each of the last N months that have backups.
    pub keep_monthly: u32,
    /// Backups older than this, and kept by no rule, are deleted.
    #[serde(
        serialize_with = "ser_opt_duration",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_age: Option<Duration>,
    /// At least this many backups always remain.
    pub min_keep: u32,
    /// One prune deletes at most this many backups.
    pub max_delete_per_run: u32,
}

fn ser_opt_duration<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

fn ser_tz<S: serde::Serializer>(tz: &Tz, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(tz.name())
}

/// Serializes durations the way they are written in the file ("30s", "6h").
mod humantime_serde_compat {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod humantime_serde_compat_opt {
    use std::time::Duration;
    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_str("off"),
        }
    }
}

mod raw {
    //! The serde mirror of the TOML file. Every field is optional here so that defaults
    //! and "was it set?" are decided in one place, in `Config::from_raw`.
    use super::Secret;
    use serde::{Deserialize, Deserializer};

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Raw {
        pub etcd: Etcd,
        pub storage: Storage,
        pub backup: Backup,
        pub schedule: Schedule,
        pub retention: Retention,
        pub metrics: Metrics,
        pub drill: Drill,
        pub defrag: Defrag,
        pub election: Election,
        pub encryption: Encryption,
        pub continuous: Continuous,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Continuous {
        pub enabled: Option<bool>,
        pub segment_interval: Option<String>,
        pub max_segment_bytes: Option<u64>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Etcd {
        #[serde(deserialize_with = "list_or_csv")]
        pub endpoints: Option<Vec<String>>,
        pub ca_file: Option<String>,
        pub cert_file: Option<String>,
        pub key_file: Option<String>,
        pub username: Option<String>,
        pub password: Option<Secret>,
        pub password_file: Option<String>,
        pub dial_timeout: Option<String>,
        pub request_timeout: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Storage {
        pub url: Option<String>,
        pub endpoint: Option<String>,
        pub region: Option<String>,
        pub path_style: Option<bool>,
        pub access_key_id: Option<String>,
        pub secret_access_key: Option<Secret>,
        pub secret_access_key_file: Option<String>,
        pub session_token: Option<Secret>,
        pub session_token_file: Option<String>,
        pub storage_class: Option<String>,
        pub sse: Option<String>,
        pub sse_kms_key_id: Option<String>,
        pub sse_customer_key: Option<Secret>,
        pub sse_customer_key_file: Option<String>,
        pub checksum: Option<String>,
        pub connect_timeout: Option<String>,
        pub request_timeout: Option<String>,
        pub max_retries: Option<u32>,
        pub retry_timeout: Option<String>,
        pub max_upload_rate: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Backup {
        pub cluster_name: Option<String>,
        pub compression: Option<String>,
        pub compression_level: Option<i32>,
        pub spool_dir: Option<String>,
        pub timeout: Option<String>,
        pub timeout_per_gib: Option<String>,
        pub retry_after: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Encryption {
        #[serde(deserialize_with = "list_or_csv")]
        pub recipients: Option<Vec<String>>,
        pub recipients_file: Option<String>,
        pub identity_file: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Election {
        pub enabled: Option<bool>,
        pub key_prefix: Option<String>,
        pub lease_ttl: Option<String>,
        pub node_name: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Drill {
        pub cron: Option<String>,
        pub etcd_dir: Option<String>,
        pub timeout: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Defrag {
        pub cron: Option<String>,
        pub min_free_ratio: Option<f64>,
        pub min_free_bytes: Option<u64>,
        pub timeout: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Metrics {
        pub listen: Option<String>,
        pub refresh_interval: Option<String>,
        pub store_refresh_interval: Option<String>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Retention {
        pub keep_last: Option<u32>,
        pub keep_hourly: Option<u32>,
        pub keep_daily: Option<u32>,
        pub keep_weekly: Option<u32>,
        pub keep_monthly: Option<u32>,
        pub max_age: Option<String>,
        pub min_keep: Option<u32>,
        pub max_delete_per_run: Option<u32>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    pub struct Schedule {
        pub cron: Option<String>,
        pub timezone: Option<String>,
    }

    /// Accepts a TOML array or, from the environment, a comma-separated string.
    fn list_or_csv<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum ListOrCsv {
            List(Vec<String>),
            Csv(String),
        }
        Ok(match Option::<ListOrCsv>::deserialize(d)? {
            None => None,
            Some(ListOrCsv::List(v)) => Some(v),
            Some(ListOrCsv::Csv(s)) => Some(
                s.split(',')
                    .map(|p| p.trim().to_string())
                    .filter(|p| !p.is_empty())
                    .collect(),
            ),
        })
    }
}

/// Keys that hold a secret when written into the file itself.
const SECRET_KEYS: [(&str, &str); 4] = [
    ("etcd", "password"),
    ("storage", "secret_access_key"),
    ("storage", "session_token"),
    ("storage", "sse_customer_key"),
];

/// A warning when `path` holds a secret inline and users other than this process's group
/// may read it (the package installs it `root:etcd-backup 0640`, which is fine). `None` when
/// all is well or the file cannot be checked.
pub fn permission_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).ok()?;
    let text = std::fs::read_to_string(path).ok()?;
    let doc: toml::Table = text.parse().ok()?;
    let inline: Vec<String> = SECRET_KEYS
        .iter()
        .filter(|(section, key)| doc.get(*section).and_then(|s| s.get(*key)).is_some())
        .map(|(section, key)| format!("{section}.{key}"))
        .collect();
    if inline.is_empty() {
        return None;
    }
    let mode = meta.mode() & 0o777;
    // /proc/self belongs to this process's effective user and group.
    let my_gid = std::fs::metadata("/proc/self").map(|m| m.gid()).ok();
    let who = if mode & 0o004 != 0 {
        "every user"
    } else if mode & 0o040 != 0 && Some(meta.gid()) != my_gid {
        "the members of its group"
    } else {
        return None;
    };
    Some(format!(
        "{} holds secrets ({}) and is readable by {who} (mode {mode:o}); chmod 0640 it (owner root, group etcd-backup), or move the secrets to *_file keys (e.g. storage.secret_access_key_file with systemd LoadCredential=)",
        path.display(),
        inline.join(", ")
    ))
}

/// Length of the base64 (standard alphabet, padded) `text` once decoded; `None` when it is
/// not base64.
fn base64_len(text: &str) -> Option<usize> {
    let t = text.trim();
    if t.is_empty() || !t.len().is_multiple_of(4) {
        return None;
    }
    let pad = t.bytes().rev().take_while(|&b| b == b'=').count();
    if pad > 2
        || !t[..t.len() - pad]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    {
        return None;
    }
    Some(t.len() / 4 * 3 - pad)
}

/// The longest duration any setting accepts: 100 years of 365.25 days, as humantime
/// counts them (`retention.max_age` may be this long).
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 31_557_600);
/// The longest `backup.timeout` (and `backup.timeout_per_gib`): no cycle runs for a week.
pub const MAX_CYCLE_TIMEOUT: Duration = Duration::from_secs(7 * 86400);

/// Collects problems while converting the raw file.
struct Problems(Vec<ConfigProblem>);

impl Problems {
    /// An optional cron expression (`None`: off), parsed in `tz`; a bad one is a problem.
    fn optional_cron(&mut self, key: &str, text: Option<&str>, tz: Tz) -> Option<Schedule> {
        match Schedule::parse(text?, tz) {
            Ok(s) => Some(s),
            Err(e) => {
                self.push(key, e);
                None
            }
        }
    }

    fn push(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn duration(&mut self, key: &str, value: Option<&str>, default: &str) -> Duration {
        self.duration_at_most(key, value, default, MAX_DURATION)
    }

    /// A duration no longer than `max` (every duration is bounded, so that no arithmetic
    /// on it can overflow).
    fn duration_at_most(
        &mut self,
        key: &str,
        value: Option<&str>,
        default: &str,
        max: Duration,
    ) -> Duration {
        let text = value.unwrap_or(default);
        match humantime::parse_duration(text) {
            Ok(d) if d > max => {
                self.push(
                    key,
                    format!(
                        "{text:?} is longer than the maximum of {}",
                        humantime::format_duration(max)
                    ),
                );
                Duration::from_secs(1)
            }
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.push(key, "must be greater than zero");
                Duration::from_secs(1)
            }
            Err(e) => {
                self.push(
                    key,
                    format!("{text:?} is not a duration ({e}); write e.g. \"30s\", \"5m\", \"6h\" or \"30d\""),
                );
                Duration::from_secs(1)
            }
        }
    }
}

impl Problems {
    /// A secret given inline (`key`) or in a file (`key_file`, for systemd's
    /// `LoadCredential=`): not both; the file's content without its trailing newline.
    fn secret(
        &mut self,
        key: &str,
        inline: Option<Secret>,
        file: Option<String>,
    ) -> Option<Secret> {
        match (inline, file) {
            (Some(_), Some(_)) => {
                self.push(key, format!("set either {key} or {key}_file, not both"));
                None
            }
            (Some(s), None) => Some(s),
            (None, Some(path)) => match std::fs::read_to_string(&path) {
                Ok(text) => {
                    let text = text.trim_end_matches(['\n', '\r']).to_string();
                    if text.is_empty() {
                        self.push(&format!("{key}_file"), format!("{path} is empty"));
                        None
                    } else {
                        Some(Secret::new(text))
                    }
                }
                Err(e) => {
                    self.push(
                        &format!("{key}_file"),
                        format!("cannot read {path}: {e}; check the path and that this user may read it"),
                    );
                    None
                }
            },
            (None, None) => None,
        }
    }
}

impl Config {
    /// Loads `path`, applies `ETCD_BACKUP_*` environment overrides and validates the result.
    ///
    /// # Errors
    /// A [`ConfigError`] listing every problem with its key, when the file cannot be read or
    /// parsed, or any value is invalid.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, None)
    }

    /// Like [`Config::load`], with the environment given explicitly (for tests); `None`
    /// reads the process environment.
    ///
    /// # Errors
    /// See [`Config::load`].
    pub fn load_with_env(
        path: &Path,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let fail = |key: &str, message: String| ConfigError {
            file: path.to_path_buf(),
            problems: vec![ConfigProblem {
                key: key.to_string(),
                message,
            }],
        };
        if !path.exists() {
            return Err(fail(
                "",
                "the file does not exist; create it (config.example.toml documents every key) or pass --config PATH".to_string(),
            ));
        }
        // Parse the TOML ourselves first: the parser's own message quotes the offending
        // source line, which may hold a secret. Ours names file, line, column, key and kind.
        let text = std::fs::read_to_string(path)
            .map_err(|e| fail("", format!("cannot read the file: {}", io_error_kind(&e))))?;
        if let Err(e) = text.parse::<toml::Table>() {
            let (key, message) = syntax_error_report(&text, path, &e);
            return Err(fail(&key, message));
        }
        let mut envsrc = config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .ignore_empty(true);
        if let Some(env) = env {
            envsrc = envsrc.source(Some(env.into_iter().collect()));
        }
        let built = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(envsrc)
            .build()
            .map_err(|e| fail("", clean_config_error(&e.to_string(), path)))?;
        let raw: raw::Raw = built
            .try_deserialize()
            .map_err(|e| fail("", clean_config_error(&e.to_string(), path)))?;
        Self::from_raw(raw, path)
    }

    fn from_raw(raw: raw::Raw, path: &Path) -> Result<Config, ConfigError> {
        let mut p = Problems(Vec::new());
        let etcd = Self::etcd_from_raw(raw.etcd, &mut p);
        let storage = Self::storage_from_raw(raw.storage, &mut p);
        let backup = Self::backup_from_raw(raw.backup, &mut p);
        let schedule = Self::schedule_from_raw(raw.schedule, &mut p);
        let retention = Self::retention_from_raw(raw.retention, &mut p);
        let metrics = Self::metrics_from_raw(raw.metrics, &mut p);
        let drill = Self::drill_from_raw(raw.drill, schedule.timezone, &mut p);
        let defrag = Self::defrag_from_raw(raw.defrag, schedule.timezone, &mut p);
        let election = Self::election_from_raw(raw.election, &mut p);
        let encryption = Self::encryption_from_raw(raw.encryption, &mut p);
        let continuous = Self::continuous_from_raw(raw.continuous, &mut p);

        if p.0.is_empty() {
            Ok(Config {
                etcd,
                storage,
                backup,
                schedule,
                retention,
                metrics,
                drill,
                defrag,
                election,
                encryption,
                continuous,
                source: path.to_path_buf(),
            })
        } else {
            Err(ConfigError {
                file: path.to_path_buf(),
                problems: p.0,
            })
        }
    }

    fn etcd_from_raw(r: raw::Etcd, p: &mut Problems) -> EtcdConfig {
        let endpoints = r
            .endpoints
            .unwrap_or_else(|| vec!["https://127.0.0.1:2379".to_string()]);
        if endpoints.is_empty() {
            p.push(
                "etcd.endpoints",
                "must list at least one client URL, e.g. [\"https://127.0.0.1:2379\"]",
            );
        }
        let mut https = 0;
        for e in &endpoints {
            match url::Url::parse(e) {
                Ok(u) if u.scheme() == "https" => https += 1,
                Ok(u) if u.scheme() == "http" => {}
                Ok(_) | Err(_) => p.push(
                    "etcd.endpoints",
                    format!("{e:?} is not an http:// or https:// URL (write e.g. \"https://127.0.0.1:2379\")"),
                ),
            }
        }
        if https != 0 && https != endpoints.len() {
            p.push(
                "etcd.endpoints",
                "mixes http:// and https:// URLs; use one scheme for all members",
            );
        }
        let tls = if https > 0 {
            let ca = r.ca_file.unwrap_or_else(|| KUBEADM_CA.to_string());
            let cert = r.cert_file.unwrap_or_else(|| KUBEADM_CERT.to_string());
            let key = r.key_file.unwrap_or_else(|| KUBEADM_KEY.to_string());
            let opt = |s: String| (!s.is_empty()).then(|| PathBuf::from(s));
            let files = TlsFiles {
                ca_file: PathBuf::from(&ca),
                cert_file: opt(cert),
                key_file: opt(key),
            };
            if ca.is_empty() {
                p.push("etcd.ca_file", "must name the CA certificate of the etcd servers when the endpoints are https://");
            }
            if files.cert_file.is_some() != files.key_file.is_some() {
                p.push("etcd.cert_file", "cert_file and key_file must be set together (or both set to \"\" for no client certificate)");
            }
            Some(files)
        } else {
            None
        };
        let password = p.secret("etcd.password", r.password, r.password_file);
        if password.is_some() && r.username.is_none() {
            p.push("etcd.password", "is set but etcd.username is not");
        }
        if r.username.is_some() && password.is_none() {
            p.push("etcd.username", "is set but etcd.password is not");
        }
        EtcdConfig {
            endpoints,
            tls,
            username: r.username,
            password,
            dial_timeout: p.duration("etcd.dial_timeout", r.dial_timeout.as_deref(), "5s"),
            request_timeout: p.duration(
                "etcd.request_timeout",
                r.request_timeout.as_deref(),
                "30s",
            ),
        }
    }

    fn storage_from_raw(r: raw::Storage, p: &mut Problems) -> StorageConfig {
        let url_text = r
            .url
            .unwrap_or_else(|| "file:///var/lib/etcd-backup/backups".to_string());
        let url = match parse_storage_url(&url_text) {
            Ok(u) => u,
            Err(msg) => {
                p.push("storage.url", msg);
                StorageUrl::File {
                    dir: PathBuf::from("/"),
                }
            }
        };
        if let Some(ep) = &r.endpoint {
            match url::Url::parse(ep) {
                Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
                _ => p.push(
                    "storage.endpoint",
                    format!("{ep:?} is not an http:// or https:// URL"),
                ),
            }
        }
        let secret_access_key = p.secret(
            "storage.secret_access_key",
            r.secret_access_key,
            r.secret_access_key_file,
        );
        let session_token = p.secret(
            "storage.session_token",
            r.session_token,
            r.session_token_file,
        );
        let sse_customer_key = p.secret(
            "storage.sse_customer_key",
            r.sse_customer_key,
            r.sse_customer_key_file,
        );
        let sse = Self::sse_from_raw(r.sse.as_deref(), r.sse_kms_key_id, sse_customer_key, p);
        let checksum_sha256 = match r.checksum.as_deref().unwrap_or("none") {
            "sha256" => true,
            "none" => false,
            other => {
                p.push(
                    "storage.checksum",
                    format!("{other:?} is not supported; use \"sha256\" (needed for Object Lock buckets) or \"none\""),
                );
                false
            }
        };
        if checksum_sha256 && matches!(sse, Some(Sse::CustomerKey { .. })) {
            p.push(
                "storage.checksum",
                "\"sha256\" cannot be combined with storage.sse = \"sse-c\": S3 then needs the customer key on the request that completes a multipart upload, which the S3 client does not send; for Object Lock buckets use SSE-S3/SSE-KMS, or [encryption] (client-side)",
            );
        }
        if r.access_key_id.is_some() != secret_access_key.is_some() {
            p.push(
                "storage.access_key_id",
                "access_key_id and secret_access_key must be set together (or neither, to use AWS_* variables or the instance profile)",
            );
        }
        if let StorageUrl::File { .. } = url {
            for (k, set) in [
                ("storage.endpoint", r.endpoint.is_some()),
                ("storage.access_key_id", r.access_key_id.is_some()),
                ("storage.storage_class", r.storage_class.is_some()),
                ("storage.sse", sse.is_some()),
                ("storage.checksum", checksum_sha256),
            ] {
                if set {
                    p.push(
                        k,
                        "only applies to s3:// URLs, but storage.url is a file:// URL",
                    );
                }
            }
        }
        if let Some(sc) = &r.storage_class {
            if sc.is_empty() || !sc.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                p.push(
                    "storage.storage_class",
                    format!(
                        "{sc:?} is not an S3 storage class (e.g. \"STANDARD\", \"STANDARD_IA\")"
                    ),
                );
            }
        }
        let path_style = r.path_style.unwrap_or(r.endpoint.is_some());
        StorageConfig {
            url,
            region: r.region.unwrap_or_else(|| "us-east-1".to_string()),
            path_style,
            endpoint: r.endpoint,
            access_key_id: r.access_key_id,
            secret_access_key,
            session_token,
            storage_class: r.storage_class,
            sse,
            checksum_sha256,
            requests: RequestLimits {
                connect_timeout: p.duration(
                    "storage.connect_timeout",
                    r.connect_timeout.as_deref(),
                    "10s",
                ),
                request_timeout: p.duration(
                    "storage.request_timeout",
                    r.request_timeout.as_deref(),
                    "5m",
                ),
                max_retries: r.max_retries.unwrap_or(5).min(20),
                retry_timeout: p.duration(
                    "storage.retry_timeout",
                    r.retry_timeout.as_deref(),
                    "3m",
                ),
                max_upload_rate: r.max_upload_rate.as_deref().and_then(|v| {
                    parse_rate(v)
                        .map_err(|m| p.push("storage.max_upload_rate", m))
                        .ok()
                        .flatten()
                }),
            },
        }
    }

    fn backup_from_raw(r: raw::Backup, p: &mut Problems) -> BackupConfig {
        let cluster_name = r.cluster_name.unwrap_or_else(|| "kubernetes".to_string());
        if !is_valid_cluster_name(&cluster_name) {
            p.push(
                "backup.cluster_name",
                format!("{cluster_name:?} must be 1-63 characters of a-z, A-Z, 0-9, '-', '_' or '.' (it becomes part of object names)"),
            );
        }
        let compression = match r
            .compression
            .as_deref()
            .unwrap_or("zstd")
            .parse::<Compression>()
        {
            Ok(c) => c,
            Err(e) => {
                p.push("backup.compression", e);
                Compression::Zstd
            }
        };
        if let Some(level) = r.compression_level {
            if let Err(e) = compression.check_level(level) {
                p.push("backup.compression_level", e);
            }
        }
        let spool_dir = PathBuf::from(
            r.spool_dir
                .unwrap_or_else(|| "/var/lib/etcd-backup/spool".to_string()),
        );
        if !spool_dir.is_absolute() {
            p.push("backup.spool_dir", "must be an absolute path");
        }
        BackupConfig {
            cluster_name,
            compression,
            compression_level: r.compression_level,
            spool_dir,
            timeout: p.duration_at_most(
                "backup.timeout",
                r.timeout.as_deref(),
                "30m",
                MAX_CYCLE_TIMEOUT,
            ),
            timeout_per_gib: p.duration_at_most(
                "backup.timeout_per_gib",
                r.timeout_per_gib.as_deref(),
                "10m",
                MAX_CYCLE_TIMEOUT,
            ),
            retry_after: match r.retry_after.as_deref() {
                Some("off") => None,
                other => Some(p.duration("backup.retry_after", other, "5m")),
            },
        }
    }

    fn sse_from_raw(
        kind: Option<&str>,
        kms_key_id: Option<String>,
        customer_key: Option<Secret>,
        p: &mut Problems,
    ) -> Option<Sse> {
        let sse = match kind {
            None | Some("none") => None,
            Some("AES256" | "aes256" | "sse-s3") => Some(Sse::S3),
            Some("aws:kms" | "sse-kms") => Some(Sse::Kms {
                key_id: kms_key_id.clone(),
            }),
            Some("aws:kms:dsse" | "dsse-kms") => Some(Sse::DsseKms {
                key_id: kms_key_id.clone(),
            }),
            Some("sse-c" | "SSE-C") => match &customer_key {
                Some(k) => Some(Sse::CustomerKey { key: k.clone() }),
                None => {
                    p.push("storage.sse", "\"sse-c\" needs storage.sse_customer_key (or sse_customer_key_file): a base64-encoded 256-bit key, e.g. from `openssl rand -base64 32`");
                    None
                }
            },
            Some(other) => {
                p.push(
                    "storage.sse",
                    format!("{other:?} is not a server-side encryption; use \"AES256\" (SSE-S3), \"aws:kms\", \"aws:kms:dsse\" or \"sse-c\""),
                );
                None
            }
        };
        if kms_key_id.is_some() && !matches!(sse, Some(Sse::Kms { .. } | Sse::DsseKms { .. })) {
            p.push(
                "storage.sse_kms_key_id",
                "only applies with storage.sse = \"aws:kms\" or \"aws:kms:dsse\"",
            );
        }
        if let Some(k) = &customer_key {
            if !matches!(sse, Some(Sse::CustomerKey { .. })) {
                p.push(
                    "storage.sse_customer_key",
                    if kind.is_none() {
                        "is set but storage.sse is not; set storage.sse = \"sse-c\""
                    } else {
                        "only applies with storage.sse = \"sse-c\""
                    },
                );
            }
            let decoded = base64_len(k.expose());
            if decoded != Some(32) {
                p.push(
                    "storage.sse_customer_key",
                    "must be a base64-encoded 256-bit (32-byte) key, e.g. from `openssl rand -base64 32` (the value is not shown)",
                );
            }
        }
        sse
    }

    fn encryption_from_raw(r: raw::Encryption, p: &mut Problems) -> EncryptionConfig {
        let mut recipients = r.recipients.unwrap_or_default();
        let recipients_file = r.recipients_file.map(PathBuf::from);
        if let Some(f) = &recipients_file {
            match crate::codec::crypt::read_recipients_file(f) {
                Ok(more) if more.is_empty() => p.push(
                    "encryption.recipients_file",
                    format!("{} lists no recipient", f.display()),
                ),
                Ok(more) => recipients.extend(more),
                Err(e) => p.push("encryption.recipients_file", e),
            }
        }
        for r in &recipients {
            if r.starts_with("AGE-SECRET-KEY") {
                p.push(
                    "encryption.recipients",
                    "holds a secret key (AGE-SECRET-KEY-…); list public keys (age1…) here and keep the identity in identity_file (the value is not shown)",
                );
            } else if let Err(e) = crate::codec::crypt::parse_recipient(r) {
                p.push("encryption.recipients", e);
            }
        }
        // Every one that does not parse is reported above; the set is then empty.
        let recipients = crate::codec::crypt::Recipients::parse(recipients).unwrap_or_default();
        let identity_file = r.identity_file.map(PathBuf::from);
        if let Some(f) = &identity_file {
            if !f.is_absolute() {
                p.push("encryption.identity_file", "must be an absolute path");
            }
        }
        EncryptionConfig {
            recipients,
            recipients_file,
            identity_file,
        }
    }

    fn election_from_raw(r: raw::Election, p: &mut Problems) -> ElectionConfig {
        let key_prefix = r
            .key_prefix
            .unwrap_or_else(|| "/etcd-backup/election".to_string());
        if key_prefix.trim_end_matches('/').is_empty()
            || key_prefix
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            p.push(
                "election.key_prefix",
                format!("{key_prefix:?} must be a non-empty etcd key prefix without spaces, e.g. \"/etcd-backup/election\""),
            );
        }
        let lease_ttl = p.duration("election.lease_ttl", r.lease_ttl.as_deref(), "15s");
        if lease_ttl.subsec_nanos() != 0 || !(2..=300).contains(&lease_ttl.as_secs()) {
            p.push(
                "election.lease_ttl",
                "must be whole seconds from 2s to 300s (etcd lease TTLs are in seconds); 15s suits most clusters",
            );
        }
        let node_name = r.node_name.unwrap_or_else(hostname);
        if node_name.is_empty()
            || node_name.len() > 128
            || node_name
                .chars()
                .any(|c| c.is_whitespace() || c.is_control())
        {
            p.push(
                "election.node_name",
                format!("{node_name:?} must be 1-128 characters without spaces (default: the host name)"),
            );
        }
        ElectionConfig {
            enabled: r.enabled.unwrap_or(true),
            key_prefix,
            lease_ttl,
            node_name,
        }
    }

    fn continuous_from_raw(r: raw::Continuous, p: &mut Problems) -> ContinuousConfig {
        let segment_interval = p.duration_at_most(
            "continuous.segment_interval",
            r.segment_interval.as_deref(),
            "10s",
            Duration::from_secs(3600),
        );
        let max_segment_bytes = r.max_segment_bytes.unwrap_or(64 << 20);
        if !(1 << 16..=1 << 32).contains(&max_segment_bytes) {
            p.push(
                "continuous.max_segment_bytes",
                format!("{max_segment_bytes} is out of range (65536..=4294967296 bytes; the default is 67108864, 64 MiB)"),
            );
        }
        ContinuousConfig {
            enabled: r.enabled.unwrap_or(false),
            segment_interval,
            max_segment_bytes,
        }
    }

    fn drill_from_raw(r: raw::Drill, tz: Tz, p: &mut Problems) -> DrillConfig {
        let schedule = p.optional_cron("drill.cron", r.cron.as_deref(), tz);
        let etcd_dir = r.etcd_dir.map(PathBuf::from);
        if let Some(d) = &etcd_dir {
            if !d.is_absolute() {
                p.push("drill.etcd_dir", "must be an absolute path");
            }
        }
        DrillConfig {
            cron: r.cron,
            schedule,
            etcd_dir,
            timeout: p.duration("drill.timeout", r.timeout.as_deref(), "5m"),
        }
    }

    fn defrag_from_raw(r: raw::Defrag, tz: Tz, p: &mut Problems) -> DefragConfig {
        let schedule = p.optional_cron("defrag.cron", r.cron.as_deref(), tz);
        let min_free_ratio = r.min_free_ratio.unwrap_or(0.3);
        if !(0.0..1.0).contains(&min_free_ratio) {
            p.push(
                "defrag.min_free_ratio",
                format!("{min_free_ratio} must be at least 0 and below 1 (the share of the database file that must be free; 0.3 suits most clusters)"),
            );
        }
        DefragConfig {
            cron: r.cron,
            schedule,
            min_free_ratio,
            min_free_bytes: r.min_free_bytes.unwrap_or(DEFAULT_DEFRAG_MIN_FREE_BYTES),
            timeout: p.duration("defrag.timeout", r.timeout.as_deref(), "10m"),
        }
    }

    fn metrics_from_raw(r: raw::Metrics, p: &mut Problems) -> MetricsConfig {
        let text = r
            .listen
            .unwrap_or_else(|| DEFAULT_METRICS_LISTEN.to_string());
        let listen = text.parse().unwrap_or_else(|_| {
            p.push(
                "metrics.listen",
                format!("{text:?} is not an address with a port, e.g. \"127.0.0.1:9479\" or \"0.0.0.0:9479\""),
            );
            DEFAULT_METRICS_LISTEN.parse().expect("default address parses")
        });
        MetricsConfig {
            listen,
            refresh_interval: p.duration(
                "metrics.refresh_interval",
                r.refresh_interval.as_deref(),
                "15s",
            ),
            store_refresh_interval: p.duration(
                "metrics.store_refresh_interval",
                r.store_refresh_interval.as_deref(),
                "60s",
            ),
        }
    }

    fn retention_from_raw(r: raw::Retention, p: &mut Problems) -> RetentionConfig {
        let max_age = r
            .max_age
            .as_deref()
            .map(|t| p.duration("retention.max_age", Some(t), "30d"));
        let min_keep = r.min_keep.unwrap_or(3);
        if min_keep == 0 {
            p.push(
                "retention.min_keep",
                "must be at least 1: the newest backup is always kept",
            );
        }
        let max_delete_per_run = r.max_delete_per_run.unwrap_or(100);
        if max_delete_per_run == 0 {
            p.push("retention.max_delete_per_run", "must be at least 1 (to keep everything, set every keep_* to 0 and leave max_age unset)");
        }
        RetentionConfig {
            keep_last: r.keep_last.unwrap_or(10),
            keep_hourly: r.keep_hourly.unwrap_or(0),
            keep_daily: r.keep_daily.unwrap_or(0),
            keep_weekly: r.keep_weekly.unwrap_or(0),
            keep_monthly: r.keep_monthly.unwrap_or(0),
            max_age,
            min_keep,
            max_delete_per_run,
        }
    }

    fn schedule_from_raw(r: raw::Schedule, p: &mut Problems) -> ScheduleConfig {
        let tz_text = r.timezone.unwrap_or_else(|| "UTC".to_string());
        let timezone = tz_text.parse::<Tz>().unwrap_or_else(|_| {
            p.push(
                "schedule.timezone",
                format!(
                    "{tz_text:?} is not an IANA timezone name (e.g. \"UTC\", \"Europe/Berlin\")"
                ),
            );
            Tz::UTC
        });
        let cron = r.cron.unwrap_or_else(|| "0 */6 * * *".to_string());
        let parsed = match Schedule::parse(&cron, timezone) {
            Ok(s) => s,
            Err(e) => {
                p.push("schedule.cron", e);
                Schedule::parse("0 0 * * *", Tz::UTC).expect("built-in schedule parses")
            }
        };
        ScheduleConfig {
            cron,
            timezone,
            parsed,
        }
    }

    /// The effective configuration as TOML, secrets redacted.
    pub fn to_redacted_toml(&self) -> String {
        #[derive(Serialize)]
        struct View<'a> {
            etcd: EtcdView<'a>,
            storage: StorageView<'a>,
            backup: &'a BackupConfig,
            schedule: &'a ScheduleConfig,
            retention: &'a RetentionConfig,
            metrics: &'a MetricsConfig,
            drill: &'a DrillConfig,
            defrag: &'a DefragConfig,
            election: &'a ElectionConfig,
            encryption: &'a EncryptionConfig,
            continuous: &'a ContinuousConfig,
        }
        #[derive(Serialize)]
        struct EtcdView<'a> {
            endpoints: &'a [String],
            #[serde(skip_serializing_if = "Option::is_none")]
            ca_file: Option<&'a Path>,
            #[serde(skip_serializing_if = "Option::is_none")]
            cert_file: Option<&'a Path>,
            #[serde(skip_serializing_if = "Option::is_none")]
            key_file: Option<&'a Path>,
            #[serde(skip_serializing_if = "Option::is_none")]
            username: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            password: Option<&'a Secret>,
            dial_timeout: String,
            request_timeout: String,
        }
        #[derive(Serialize)]
        struct StorageView<'a> {
            url: String,
            #[serde(skip_serializing_if = "Option::is_none")]
            endpoint: Option<&'a str>,
            region: &'a str,
            path_style: bool,
            #[serde(skip_serializing_if = "Option::is_none")]
            access_key_id: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            secret_access_key: Option<&'a Secret>,
            #[serde(skip_serializing_if = "Option::is_none")]
            session_token: Option<&'a Secret>,
            #[serde(skip_serializing_if = "Option::is_none")]
            storage_class: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            sse: Option<&'a Sse>,
            checksum: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            max_upload_rate: Option<u64>,
        }
        let tls = self.etcd.tls.as_ref();
        let view = View {
            etcd: EtcdView {
                endpoints: &self.etcd.endpoints,
                ca_file: tls.map(|t| t.ca_file.as_path()),
                cert_file: tls.and_then(|t| t.cert_file.as_deref()),
                key_file: tls.and_then(|t| t.key_file.as_deref()),
                username: self.etcd.username.as_deref(),
                password: self.etcd.password.as_ref(),
                dial_timeout: humantime::format_duration(self.etcd.dial_timeout).to_string(),
                request_timeout: humantime::format_duration(self.etcd.request_timeout).to_string(),
            },
            storage: StorageView {
                url: self.storage.url.to_string(),
                endpoint: self.storage.endpoint.as_deref(),
                region: &self.storage.region,
                path_style: self.storage.path_style,
                access_key_id: self.storage.access_key_id.as_deref(),
                secret_access_key: self.storage.secret_access_key.as_ref(),
                session_token: self.storage.session_token.as_ref(),
                storage_class: self.storage.storage_class.as_deref(),
                sse: self.storage.sse.as_ref(),
                checksum: if self.storage.checksum_sha256 {
                    "sha256"
                } else {
                    "none"
                },
                max_upload_rate: self.storage.requests.max_upload_rate,
            },
            backup: &self.backup,
            schedule: &self.schedule,
            retention: &self.retention,
            metrics: &self.metrics,
            drill: &self.drill,
            defrag: &self.defrag,
            election: &self.election,
            encryption: &self.encryption,
            continuous: &self.continuous,
        };
        toml::to_string(&view).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }
}

/// Parses an upload rate in bytes per second: `"20MiB"`, `"8MB"`, `"512KiB/s"`, `"1000000"`;
/// `"0"` and `"off"` mean no limit (`Ok(None)`).
///
/// # Errors
/// A message saying what is expected.
pub fn parse_rate(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
    if t.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "MB" => 1000 * 1000,
        "GB" => 1000 * 1000 * 1000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => u64::MAX,
    };
    let bad = || {
        format!("{text:?} is not a rate: use bytes per second with an optional unit (B, KB, MB, GB, KiB, MiB, GiB), e.g. \"20MiB\", or \"off\"")
    };
    let n: u64 = num.parse().map_err(|_| bad())?;
    if mult == u64::MAX {
        return Err(bad());
    }
    let rate = n.checked_mul(mult).ok_or_else(bad)?;
    if rate == 0 {
        return Ok(None);
    }
    if rate < 64 * 1024 {
        return Err(format!(
            "{text:?} is below the smallest upload rate, 64KiB per second: a backup would take days; raise it or remove the key"
        ));
    }
    Ok(Some(rate))
}

/// Parses `s3://BUCKET[/PREFIX]` or `file:///ABSOLUTE/DIR`.
///
/// # Errors
/// A message saying what form is expected.
pub fn parse_storage_url(text: &str) -> Result<StorageUrl, String> {
    let u = url::Url::parse(text).map_err(|e| {
        format!("{text:?} is not a URL ({e}); write \"s3://BUCKET/PREFIX\" or \"file:///DIR\"")
    })?;
    match u.scheme() {
        "s3" => {
            let bucket = u.host_str().unwrap_or_default().to_string();
            if bucket.is_empty() {
                return Err(format!("{text:?} names no bucket; write \"s3://BUCKET/PREFIX\""));
            }
            let prefix = u.path().trim_matches('/').to_string();
            if prefix.split('/').any(|seg| seg == "." || seg == "..") || prefix.contains("//") {
                return Err(format!("{text:?}: the prefix must not contain empty, '.' or '..' segments"));
            }
            Ok(StorageUrl::S3 { bucket, prefix })
        }
        "file" => {
            if u.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(format!(
                    "{text:?} has a host part; a local directory is written with three slashes: \"file:///var/lib/etcd-backup/backups\""
                ));
            }
            let dir = u
                .to_file_path()
                .map_err(|()| format!("{text:?} is not a local directory path"))?;
            Ok(StorageUrl::File { dir })
        }
        other => Err(format!(
            "unsupported scheme {other:?} in {text:?}; use \"s3://BUCKET/PREFIX\" or \"file:///DIR\""
        )),
    }
}

/// The kind of an I/O error, without the OS's message (which is harmless but may vary).
fn io_error_kind(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "permission denied (the daemon's user must be able to read it)".to_string()
        }
        std::io::ErrorKind::InvalidData => "it is not valid UTF-8 text".to_string(),
        _ => e.to_string(),
    }
}

/// Where a TOML syntax error is and what kind it is, never the source text itself: the
/// line may hold a secret (`password = "..."` with a bad escape). Returns the dotted key
/// of the line (when it has one) and the message.
fn syntax_error_report(text: &str, path: &Path, e: &toml::de::Error) -> (String, String) {
    let at = e.span().map_or(0, |s| s.start).min(text.len());
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let key = key_of_line(text, line_start);
    // The parser's description, without its source excerpt; any quoted text in it is
    // dropped too, in case a future parser quotes the value.
    let kind = scrub_quoted(e.message().lines().next().unwrap_or("syntax error").trim());
    let mut message = format!(
        "TOML syntax error at {}:{line}:{column}: {kind}",
        path.display()
    );
    if kind.contains("escape") {
        message.push_str(
            "; a backslash in a \"basic string\" starts an escape: use a 'literal string' in single quotes, or double the backslash",
        );
    }
    (key, message)
}

/// The dotted key assigned on the line starting at `line_start` (with its table header),
/// from the key names only; empty when the line assigns no bare key.
fn key_of_line(text: &str, line_start: usize) -> String {
    let bare = |k: &str| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    };
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map_or("", |(k, _)| k.trim());
    if !bare(key) {
        return String::new();
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim())
        .filter(|t| bare(t));
    match table {
        Some(t) => format!("{t}.{key}"),
        None => key.to_string(),
    }
}

/// `msg` with the contents of every double-quoted string replaced by `...`.
fn scrub_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut inside = false;
    for c in msg.chars() {
        if c == '"' {
            if inside {
                out.push_str("...");
            }
            inside = !inside;
            out.push(c);
        } else if !inside {
            out.push(c);
        }
    }
    out
}

/// Makes the config crate's messages read well: they quote the file path already, and
/// "missing field" cannot happen because every raw field is optional. A value it quotes
/// (`invalid type: string "..."`) is dropped: it may be a secret.
fn clean_config_error(msg: &str, path: &Path) -> String {
    let mut m = msg.to_string();
    if let Some(i) = m.find("string \"") {
        let start = i + "string \"".len();
        if let Some(len) = m[start..].find('"') {
            m.replace_range(start..start + len, "...");
        }
    }
    if !m.contains(&*path.to_string_lossy()) && !m.contains("environment") {
        m = format!("{m} (in {})", path.display());
    }
    if m.contains("unknown field") {
        m.push_str("; check the spelling against config.example.toml");
    }
    m
}

/// This node's host name, the default `[election] node_name`, recorded in manifests.
pub fn hostname() -> String {
    let h = gethostname::gethostname()
        .to_string_lossy()
        .trim()
        .to_string();
    if h.is_empty() {
        "unknown".to_string()
    } else {
        h
    }
}

/// Whether a cluster name can be used as a path segment.
pub fn is_valid_cluster_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names() {
        assert!(is_valid_cluster_name("kubernetes"));
        assert!(is_valid_cluster_name("prod-eu_1.a"));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(64)] {
            assert!(!is_valid_cluster_name(bad), "{bad}");
        }
    }

    use std::collections::HashMap;
    use std::io::Write;

    fn load_str(toml_text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(toml_text.as_bytes()).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        Config::load_with_env(f.path(), Some(env))
    }

    #[test]
    fn absurd_durations_are_rejected_and_none_overflows() {
        for (text, key) in [
            ("[backup]\ntimeout = \"200000y\"\n", "backup.timeout"),
            ("[backup]\ntimeout = \"8d\"\n", "backup.timeout"),
            (
                "[backup]\ntimeout_per_gib = \"30d\"\n",
                "backup.timeout_per_gib",
            ),
            ("[retention]\nmax_age = \"300000y\"\n", "retention.max_age"),
            ("[retention]\nmax_age = \"101y\"\n", "retention.max_age"),
            ("[drill]\ntimeout = \"500000000y\"\n", "drill.timeout"),
        ] {
            let err = load_str(text, &[]).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(key) && msg.contains("longer than the maximum"),
                "{text}: {msg}"
            );
        }
        let c = load_str(
            "[backup]\ntimeout = \"7d\"\ntimeout_per_gib = \"7d\"\n[retention]\nmax_age = \"100y\"\n",
            &[],
        )
        .unwrap();
        assert!(
            c.backup.cycle_timeout(u64::MAX) > c.backup.timeout,
            "no overflow panic"
        );
        assert_eq!(
            c.backup.timeout.saturating_mul(2),
            Duration::from_secs(14 * 86400)
        );
    }

    #[test]
    fn syntax_errors_name_place_and_kind_but_never_the_source_text() {
        let text = "[storage]\nurl = \"file:///var/backups\"\n\n[etcd]\nusername = \"backup\"\npassword = \"s3cr3tPW\\qcd\"\n";
        let err = load_str(text, &[]).unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(!shown.contains("s3cr3tPW"), "{shown}");
        assert!(!shown.contains("qcd"), "{shown}");
        assert_eq!(err.problems.len(), 1, "{shown}");
        let p = &err.problems[0];
        assert_eq!(p.key, "etcd.password", "{shown}");
        assert!(p.message.contains(":6:"), "line 6: {shown}");
        assert!(p.message.contains("escape"), "kind: {shown}");
        // Other syntax errors too: the line is never quoted.
        let err = load_str("[etcd]\npassword = \"hunter2-secret\nx = 1\n", &[]).unwrap_err();
        let shown = format!("{err}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains(":2:"), "{shown}");
    }

    #[test]
    fn quoted_values_are_scrubbed_from_messages() {
        assert_eq!(
            scrub_quoted(r#"invalid "abc" here"#),
            r#"invalid "..." here"#
        );
        let m = clean_config_error(
            r#"invalid type: string "s3cr3t", expected a boolean for key `x`"#,
            Path::new("/c.toml"),
        );
        assert!(!m.contains("s3cr3t"), "{m}");
    }

    #[test]
    fn secrets_come_from_files_without_their_newline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s3-secret");
        std::fs::write(&f, "s3cr3t-value\n").unwrap();
        let c = load_str(
            &format!(
                "[storage]\nurl = \"s3://b\"\naccess_key_id = \"id\"\nsecret_access_key_file = \"{}\"\n",
                f.display()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.storage.secret_access_key.as_ref().map(Secret::expose),
            Some("s3cr3t-value")
        );
        assert!(!c.to_redacted_toml().contains("s3cr3t-value"));
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let err = load_str(
            &format!(
                "[etcd]\nusername = \"u\"\npassword_file = \"{}\"\n",
                empty.display()
            ),
            &[],
        )
        .unwrap_err();
        assert!(err.to_string().contains("etcd.password_file"), "{err}");
    }

    #[test]
    fn config_files_with_secrets_readable_by_others_are_flagged() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        let set = |mode: u32, text: &str| {
            std::fs::write(&f, text).unwrap();
            std::fs::set_permissions(&f, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        let secret = "[storage]\nurl = \"s3://b\"\naccess_key_id = \"i\"\nsecret_access_key = \"zzz-secret\"\n";
        set(0o644, secret);
        let w = permission_warning(&f).unwrap();
        assert!(
            w.contains("storage.secret_access_key") && w.contains("every user"),
            "{w}"
        );
        assert!(!w.contains("zzz-secret"), "{w}");
        set(0o600, secret);
        assert_eq!(permission_warning(&f), None);
        // Group-readable by this process's own group (the packaged root:etcd-backup 0640).
        set(0o640, secret);
        assert_eq!(permission_warning(&f), None);
        set(0o644, "[storage]\nurl = \"s3://b\"\n");
        assert_eq!(permission_warning(&f), None);
    }

    #[test]
    fn defaults_fill_an_empty_file() {
        let c = load_str("", &[]).unwrap();
        assert_eq!(c.etcd.endpoints, vec!["https://127.0.0.1:2379"]);
        let tls = c.etcd.tls.as_ref().unwrap();
        assert_eq!(tls.ca_file, PathBuf::from(KUBEADM_CA));
        assert_eq!(c.backup.cluster_name, "kubernetes");
        assert_eq!(c.backup.compression, Compression::Zstd);
        assert_eq!(c.backup.timeout, Duration::from_secs(1800));
        assert_eq!(
            c.storage.url,
            StorageUrl::File {
                dir: PathBuf::from("/var/lib/etcd-backup/backups")
            }
        );
        assert!(!c.storage.path_style);
        assert_eq!(c.schedule.cron, "0 */6 * * *");
    }

    #[test]
    fn env_overrides_file_including_lists() {
        let c = load_str(
            "[storage]\nurl = \"s3://bucket/a/b\"\nendpoint = \"http://127.0.0.1:3900\"\n",
            &[
                (
                    "ETCD_BACKUP_ETCD__ENDPOINTS",
                    "http://127.0.0.1:1,http://127.0.0.1:2",
                ),
                ("ETCD_BACKUP_STORAGE__SECRET_ACCESS_KEY", "s3cr3t"),
                ("ETCD_BACKUP_STORAGE__ACCESS_KEY_ID", "GK1"),
                ("ETCD_BACKUP_BACKUP__COMPRESSION_LEVEL", "5"),
                ("OTHER_VAR", "ignored"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.etcd.endpoints,
            vec!["http://127.0.0.1:1", "http://127.0.0.1:2"]
        );
        assert!(c.etcd.tls.is_none());
        assert_eq!(
            c.storage.secret_access_key.as_ref().unwrap().expose(),
            "s3cr3t"
        );
        assert_eq!(c.backup.compression_level, Some(5));
        assert!(
            c.storage.path_style,
            "custom endpoints default to path-style"
        );
        assert_eq!(
            c.storage.url,
            StorageUrl::S3 {
                bucket: "bucket".into(),
                prefix: "a/b".into()
            }
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let err = load_str(
            "[etcd]\nendpoints = [\"ftp://x\"]\ndial_timeout = \"soon\"\n[backup]\ncompression = \"lz4\"\ncluster_name = \"a/b\"\n[schedule]\ncron = \"61 * * * *\"\ntimezone = \"Mars/Olympus\"\n[retention]\nmin_keep = 0\n[election]\nlease_ttl = \"1500ms\"\n[encryption]\nrecipients = [\"age1nope\"]\n",
            &[],
        )
        .unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for k in [
            "etcd.endpoints",
            "etcd.dial_timeout",
            "backup.compression",
            "backup.cluster_name",
            "schedule.cron",
            "schedule.timezone",
            "retention.min_keep",
            "election.lease_ttl",
            "encryption.recipients",
        ] {
            assert!(keys.contains(&k), "missing {k} in {keys:?}");
        }
        let text = err.to_string();
        assert!(text.contains("invalid configuration in"), "{text}");
    }

    #[test]
    fn unknown_keys_and_bad_types_name_the_key() {
        let err = load_str("[storage]\nulr = \"s3://b\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("ulr"), "{err}");
        let err = load_str("[backup]\ncompression_level = \"high\"\n", &[]).unwrap_err();
        assert!(err.to_string().contains("compression_level"), "{err}");
        let err = load_str("[storage\n", &[]).unwrap_err();
        assert!(err.to_string().contains("invalid configuration"), "{err}");
    }

    #[test]
    fn missing_file_says_what_to_do() {
        let err = Config::load(Path::new("/nonexistent/etcd-backup.toml")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_in_check_config_output() {
        let c = load_str(
            "[etcd]\nendpoints=[\"http://127.0.0.1:2379\"]\nusername=\"root\"\npassword=\"etcdpass-123\"\n[storage]\nurl=\"s3://b/p\"\naccess_key_id=\"GKabc\"\nsecret_access_key=\"s3-secret-xyz\"\n",
            &[],
        )
        .unwrap();
        let out = c.to_redacted_toml();
        assert!(!out.contains("etcdpass-123"), "{out}");
        assert!(!out.contains("s3-secret-xyz"), "{out}");
        assert!(out.contains(secret::REDACTED), "{out}");
        assert!(
            out.contains("GKabc"),
            "access key ids are not secret: {out}"
        );
        assert!(!format!("{c:?}").contains("s3-secret-xyz"));
    }

    #[test]
    fn storage_urls() {
        assert_eq!(
            parse_storage_url("s3://bkt").unwrap(),
            StorageUrl::S3 {
                bucket: "bkt".into(),
                prefix: String::new()
            }
        );
        assert_eq!(
            parse_storage_url("file:///srv/backups/").unwrap(),
            StorageUrl::File {
                dir: PathBuf::from("/srv/backups/")
            }
        );
        assert!(parse_storage_url("file://host/dir").is_err());
        assert!(parse_storage_url("gs://bkt").is_err());
        assert!(parse_storage_url("s3:///nobucket").is_err());
        assert!(parse_storage_url("s3://b/a//c").is_err());
        // Dot segments are resolved by URL parsing, so they cannot escape the bucket.
        assert_eq!(
            parse_storage_url("s3://b/p/../x").unwrap(),
            StorageUrl::S3 {
                bucket: "b".into(),
                prefix: "x".into()
            }
        );
        assert!(parse_storage_url("relative/dir").is_err());
    }

    #[test]
    fn upload_rates() {
        assert_eq!(parse_rate("20MiB"), Ok(Some(20 << 20)));
        assert_eq!(parse_rate("8MB/s"), Ok(Some(8_000_000)));
        assert_eq!(parse_rate(" 512 KiB "), Ok(Some(512 << 10)));
        assert_eq!(parse_rate("1000000"), Ok(Some(1_000_000)));
        assert_eq!(parse_rate("off"), Ok(None));
        assert_eq!(parse_rate("0"), Ok(None));
        for bad in [
            "",
            "fast",
            "20 furlongs",
            "-1MiB",
            "1.5MiB",
            "99999999999999GiB",
            "1KiB",
        ] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
        let c = load_str(
            "[storage]\nurl = \"file:///b\"\nmax_upload_rate = \"20MiB\"\n",
            &[],
        )
        .unwrap();
        assert_eq!(c.storage.requests.max_upload_rate, Some(20 << 20));
        assert_eq!(
            load_str("[storage]\nurl = \"file:///b\"\n", &[])
                .unwrap()
                .storage
                .requests
                .max_upload_rate,
            None
        );
        let e = load_str(
            "[storage]\nurl = \"file:///b\"\nmax_upload_rate = \"20 mph\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("storage.max_upload_rate") && e.contains("e.g. \"20MiB\""),
            "{e}"
        );
    }

    #[test]
    fn example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.example.toml");
        let c = Config::load_with_env(&path, Some(HashMap::new()))
            .unwrap_or_else(|e| panic!("config.example.toml: {e}"));
        assert_eq!(c.backup.compression, Compression::Zstd);
        assert!(!c.continuous.enabled);
        assert_eq!(c.continuous.segment_interval, Duration::from_secs(10));
        assert_eq!(c.continuous.max_segment_bytes, 64 << 20);
    }

    #[test]
    fn defrag_is_off_by_default_and_its_limits_are_checked() {
        let c = load_str("", &[]).unwrap();
        assert!(c.defrag.cron.is_none() && c.defrag.schedule.is_none());
        assert!((c.defrag.min_free_ratio - 0.3).abs() < f64::EPSILON);
        assert_eq!(c.defrag.min_free_bytes, 64 << 20);
        assert_eq!(c.defrag.timeout, Duration::from_secs(600));
        let c = load_str(
            "[defrag]\ncron = \"0 4 * * 0\"\nmin_free_ratio = 0.5\nmin_free_bytes = 1000\n",
            &[],
        )
        .unwrap();
        assert!(c.defrag.schedule.is_some());
        assert_eq!(c.defrag.min_free_bytes, 1000);
        let err = load_str(
            "[defrag]\ncron = \"every sunday\"\nmin_free_ratio = 1.5\ntimeout = \"0s\"\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        for key in ["defrag.cron", "defrag.min_free_ratio", "defrag.timeout"] {
            assert!(err.contains(key), "{key} missing in {err}");
        }
    }
}
