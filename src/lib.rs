//! etcd-backup: verified, compressed backups of etcd to S3-compatible storage or a local
//! directory.
//!
//! # Data flow of a cycle
//!
//! ```text
//! etcd member ──snapshot stream──▶ pipeline thread ──▶ uploader ──▶ store (data object)
//!                                   │  trailer check, sha256, spool copy, compression
//!                                   ▼
//!                                 spool file ──▶ verifier ──▶ complete upload ──▶ manifest (commit)
//! ```
//!
//! # Layers
//! Imports run one way, from the top of this list to the bottom; `scripts/check-layers.py`
//! checks it in CI.
//!
//! | layer | modules | what they hold |
//! |---|---|---|
//! | entry | [`commands`] (with [`commands::cli`]) | the subcommands: load, call, print |
//! | service | [`daemon`] (scheduler loop, [`daemon::http`], [`daemon::metrics`]) | the long-running process |
//! | paths | [`backup`] (the write path), [`restore`] (the read path, drills), [`retention`] (policy and prune), [`defrag`] (defragmenting the local member), [`continuous`] (segments after a snapshot, point-in-time plans) | one operation each |
//! | edges | [`store`] (object_store, key naming, manifests), [`etcd`] (etcd-client, election) | all network I/O |
//! | core | [`config`], [`codec`], [`verify`] | configuration, byte transforms, the bbolt verifier |
//! | base | [`error`], [`units`], [`schedule`], [`progress`], [`systemd`] | small shared pieces |
//!
//! Pure (decisions and formats, no I/O): [`config`] validation, [`store::naming`],
//! [`store::manifest`], [`continuous::segment`], [`continuous::chain`], [`schedule`], [`retention`]'s plan, [`defrag::decide`], [`verify`] (over a file,
//! read-only), [`codec`]. Only [`etcd`] uses etcd-client and only [`store`] uses
//! object_store.

pub mod backup;
pub mod codec;
pub mod commands;
pub mod config;
pub mod continuous;
pub mod daemon;
pub mod defrag;
pub mod error;
pub mod etcd;
pub mod progress;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod store;
pub mod systemd;
pub mod units;
pub mod verify;
