//! Continuous backup: segments of watch events after a snapshot, so that a restore can
//! reach any revision (or moment) after it, not only the snapshot's own.
//!
//! - [`segment`]: the segment format (revisions `(a, b]`, one record per revision, so one
//!   original transaction stays one unit), streamed both ways.
//! - [`chain`]: segment manifests, the hash chain they form from their base snapshot,
//!   chain verification (broken links, gaps) and the restore plan: which snapshot and
//!   which segments reach a revision or a moment.
//!
//! Everything here is pure (formats and decisions over data); the writer and the replay
//! sit on top of it.

pub mod chain;
pub mod replay;
pub mod segment;
pub mod writer;
