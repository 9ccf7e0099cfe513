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
//! # Modules
//! Pure (decisions and formats, no I/O): [`config`] validation, [`naming`], [`manifest`],
//! [`schedule`], [`verify`] (over a file, read-only), [`compress`].
//! At the I/O edges: [`etcd`] (the only user of etcd-client), [`store`] (the only user of
//! object_store), [`spool`], [`pipeline`]; orchestration: [`cycle`], [`daemon`],
//! [`commands`].

pub mod cli;
pub mod commands;
pub mod compress;
pub mod config;
pub mod crypt;
pub mod cycle;
pub mod daemon;
pub mod digest;
pub mod drill;
pub mod election;
pub mod error;
pub mod etcd;
pub mod http;
pub mod manifest;
pub mod metrics;
pub mod naming;
pub mod pipeline;
pub mod progress;
pub mod prune;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod spool;
pub mod store;
pub mod systemd;
pub mod verify;
