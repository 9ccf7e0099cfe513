//! Command-line interface (clap types only; the work is in `commands`).

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

/// Default location of the configuration file.
pub const DEFAULT_CONFIG: &str = "/etc/etcd-backup/config.toml";

/// Verified, compressed backups of etcd to S3-compatible storage or a local directory.
#[derive(Debug, Parser)]
#[command(name = "etcd-backup", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format: `text` (default; no timestamps under systemd, the journal adds them) or `json`.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info`, `debug`, `etcd_backup=debug` (overrides RUST_LOG).
    #[arg(long, global = true)]
    pub log_level: Option<String>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The configuration file argument shared by every command.
#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file (TOML). `ETCD_BACKUP_<SECTION>__<KEY>` variables override it.
    #[arg(long, short = 'c', default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon: take backups on the configured cron schedule.
    Run(ConfigArg),
    /// Take one backup now (e.g. before an upgrade) and print its id.
    Snapshot {
        #[command(flatten)]
        config: ConfigArg,
        /// Snapshot this member instead of the first of etcd.endpoints.
        #[arg(long)]
        endpoint: Option<String>,
    },
    /// Show who takes the backups (the elected leader, since when) and the newest backup.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List committed backups, newest first.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
        /// The etcd cluster id whose backups count as this cluster's (default: the local
        /// member's); others are marked foreign.
        #[arg(long, value_name = "ID")]
        cluster_id: Option<String>,
    },
    /// Verify backups end to end (download, decompress, sha256 against the manifest, the
    /// built-in snapshot verifier), with the continuous-backup chain based on each (hash
    /// chain, every segment downloaded and read through), or a local snapshot file with
    /// `--file`.
    Verify {
        /// Configuration file (for backups in the store).
        #[arg(long, short = 'c', default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// The backup: an id from `list`, or `latest`.
        #[arg(default_value = "latest", conflicts_with_all = ["all", "file"])]
        backup: String,
        /// Verify every committed backup.
        #[arg(long)]
        all: bool,
        /// Verify this local snapshot file instead (as written by `etcdctl snapshot save`
        /// or `etcd-backup restore`).
        #[arg(long)]
        file: Option<PathBuf>,
        /// age identity file to decrypt encrypted backups (default: [encryption]
        /// identity_file).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// The etcd cluster id whose backups to use (16 hex digits, the CLUSTER ID column of
        /// `list`), instead of the local member's: after a disaster (the new cluster has a
        /// new id) or to act on an old cluster's backups on purpose.
        #[arg(long, value_name = "ID")]
        cluster_id: Option<String>,
    },
    /// Write a verified snapshot file ready for `etcdutl snapshot restore`.
    Restore {
        #[command(flatten)]
        config: ConfigArg,
        /// The backup: an id from `list`, or `latest`.
        #[arg(default_value = "latest")]
        backup: String,
        /// Where to write the snapshot file (must not exist).
        #[arg(long, short = 'o')]
        output: PathBuf,
        /// age identity file to decrypt an encrypted backup (default: [encryption]
        /// identity_file).
        #[arg(long)]
        identity: Option<PathBuf>,
        /// Also run `etcdutl snapshot restore` into this new data directory (must not exist).
        #[arg(long, requires = "peer_url")]
        data_dir: Option<PathBuf>,
        /// Member name for `--data-dir` (default: this host's name).
        #[arg(long)]
        name: Option<String>,
        /// This member's peer URL for `--data-dir`, e.g. `https://10.0.1.10:2380`.
        #[arg(long)]
        peer_url: Option<String>,
        /// The whole new cluster for `--data-dir`, `NAME=PEER_URL,...` (default: this
        /// member alone).
        #[arg(long)]
        initial_cluster: Option<String>,
        /// The etcd cluster id whose backups to use (16 hex digits, the CLUSTER ID column of
        /// `list`), instead of the local member's: after a disaster (the new cluster has a
        /// new id) or to act on an old cluster's backups on purpose.
        #[arg(long, value_name = "ID")]
        cluster_id: Option<String>,
        /// Restore without `--bump-revision`/`--mark-compacted` (for etcd clusters that no
        /// Kubernetes and no other watching client uses).
        #[arg(long, conflicts_with = "bump_revision")]
        no_bump: bool,
        /// How far to move the restored revision forward (default: 1,000,000,000, or more
        /// when the backups show a cluster that writes faster).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        bump_revision: Option<u64>,
        /// Point-in-time restore (`[continuous]`): replay the segments after the newest
        /// snapshot at or before revision REV, so the snapshot written is exactly at REV.
        /// Needs etcd and etcdutl (PATH or [drill] etcd_dir).
        #[arg(long, value_name = "REV", conflicts_with_all = ["to_time", "data_dir"], value_parser = clap::value_parser!(i64).range(1..))]
        to_revision: Option<i64>,
        /// Point-in-time restore to the last revision observed at or before this moment
        /// (RFC 3339, e.g. 2026-12-01T10:15:00Z).
        #[arg(long, value_name = "RFC3339", conflicts_with = "data_dir")]
        to_time: Option<String>,
        /// With continuous backup, `latest` is the newest committed revision (the newest
        /// snapshot plus the segments after it, replayed: needs etcd and etcdutl). This
        /// restores the newest snapshot alone.
        #[arg(long, conflicts_with_all = ["to_revision", "to_time"])]
        snapshot_only: bool,
    },
    /// Delete expired backups by the `[retention]` policy (and orphaned uploads).
    Prune {
        #[command(flatten)]
        config: ConfigArg,
        /// Print every backup with keep/delete and the rule that decided; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
        /// The etcd cluster id whose backups to use (16 hex digits, the CLUSTER ID column of
        /// `list`), instead of the local member's: after a disaster (the new cluster has a
        /// new id) or to act on an old cluster's backups on purpose.
        #[arg(long, value_name = "ID")]
        cluster_id: Option<String>,
    },
    /// Run a restore drill now: download the newest backup, verify it, restore it into a
    /// throwaway etcd (when etcd and etcdutl are available) and check what it serves.
    Drill {
        #[command(flatten)]
        config: ConfigArg,
        /// age identity file to decrypt an encrypted backup (default: [encryption]
        /// identity_file).
        #[arg(long)]
        identity: Option<PathBuf>,
    },
    /// Create an age identity for `[encryption]`: writes the secret key to FILE (mode 0600,
    /// never overwriting) and prints its public key (the recipient) on stdout.
    Keygen {
        /// Where to write the identity.
        #[arg(long, short = 'o')]
        output: PathBuf,
    },
    /// Defragment the local etcd member now if it is worth it and safe (the same rules as
    /// `[defrag] cron`: one member of the cluster at a time, never during a snapshot taken
    /// by this host, a raft leader hands its leadership to another member first, without
    /// waiting for the others' turns); prints sizes before and after.
    Defrag {
        #[command(flatten)]
        config: ConfigArg,
        /// Print what would be done; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate the configuration and print it with secrets redacted.
    CheckConfig(ConfigArg),
    /// Write the man pages and shell completions (used when packaging).
    #[command(hide = true)]
    GenDocs {
        /// Output directory (created).
        #[arg(long)]
        out: PathBuf,
    },
}
