//! Cycle stages and the error a failed cycle reports.
//!
//! The same [`Stage`] names a failure in log lines, in the exit message of the one-shot
//! command and (later) in metrics labels, so an operator can follow one failure everywhere.

use std::fmt;

/// The ordered stages of a backup cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Connecting to the member, reading its status, streaming the snapshot to the spool.
    Snapshot,
    /// The sha256 trailer and the structural check of the snapshot.
    Verify,
    /// Compressing and uploading the data object.
    Upload,
    /// Writing the manifest.
    Commit,
}

impl Stage {
    /// The stage's name as it appears in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Snapshot => "snapshot",
            Stage::Verify => "verify",
            Stage::Upload => "upload",
            Stage::Commit => "commit",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a cycle ended without a backup; decides how the daemon reports and retries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CycleErrorKind {
    /// The backup path failed (etcd, the verifier, the store): counted as a failure and
    /// retried.
    Failed,
    /// This node lost the leadership: not a failure of the backup path, the new leader takes
    /// the backup.
    Fenced,
    /// The daemon is shutting down.
    Cancelled,
    /// The cycle ran past its time limit (`backup.timeout`, `backup.timeout_per_gib`).
    TimedOut,
}

/// A failed cycle: which stage failed, what kind of failure, and why (the message says what
/// to check).
#[derive(Debug, thiserror::Error)]
#[error("backup failed at stage {stage}: {message}")]
pub struct CycleError {
    /// The stage that failed.
    pub stage: Stage,
    /// What kind of failure it is.
    pub kind: CycleErrorKind,
    /// What failed and what to check. Never contains a secret.
    pub message: String,
    /// Key of a multipart upload that could not be aborted (the store was unreachable); the
    /// daemon aborts it later.
    pub unaborted_upload: Option<String>,
}

impl CycleError {
    /// A failure of the backup path at `stage`.
    pub fn new(stage: Stage, message: impl fmt::Display) -> Self {
        Self::of_kind(CycleErrorKind::Failed, stage, message)
    }

    /// The cycle was stopped at `stage` because this node lost the leadership.
    pub fn fenced(stage: Stage, message: impl fmt::Display) -> Self {
        Self::of_kind(CycleErrorKind::Fenced, stage, message)
    }

    /// An error of `kind` at `stage`.
    pub fn of_kind(kind: CycleErrorKind, stage: Stage, message: impl fmt::Display) -> Self {
        Self {
            stage,
            kind,
            message: message.to_string(),
            unaborted_upload: None,
        }
    }

    /// Whether the cycle stopped because this node lost the leadership.
    pub fn is_fenced(&self) -> bool {
        self.kind == CycleErrorKind::Fenced
    }
}

/// An error and its sources on one line, each source once.
pub fn flatten(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !text.contains(&t) {
            text.push_str(": ");
            text.push_str(&t);
        }
        src = s.source();
    }
    text
}
