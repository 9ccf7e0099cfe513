//! Segment manifests, the hash chain they form, and restore plans.
//!
//! A **chain** starts at a committed snapshot (its *base*, at revision S) and is the
//! sequence of segments `(S, r1], (r1, r2], …`: each segment's manifest records the
//! sha256 of the previous stored object (the base snapshot's stored object for the first
//! one), so a segment that was replaced, removed or damaged breaks the chain where it
//! sits. Verification finds the longest path of linked, contiguous segments from the base
//! (two leaders racing at a failover can both commit a segment continuing the same one:
//! both are true records of the same history, and either branch is correct), and reports
//! every segment that does not link (a broken hash link, or a gap: revisions nobody
//! recorded). Keys under a backup's directory:
//!
//! ```text
//! <id>/segments/<after:020>-<last:020>-<token:x>.seg[.zst|.gz][.age]   a segment
//! <id>/segments/<after:020>-<last:020>-<token:x>.json                  its manifest, written last
//! <id>/segments/end-<last:020>.json                                    the chain ended (a gap follows)
//! ```
//!
//! `token` is the writer's fencing token (0 without an election), so two writers never
//! write the same key.

use crate::codec::compress::Compression;
use crate::store::manifest::Encryption;
use crate::store::naming::{BackupId, Layout};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fmt;

/// The segment manifest format this build writes (and the newest it reads).
pub const FORMAT_VERSION: u32 = 1;
pub use crate::store::naming::SEGMENTS_DIR;
use crate::store::naming::{ChainName, ObjectKind, SEGMENT_INFIX};

/// The manifest of one committed segment: the commit marker, written after the segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentManifest {
    /// Manifest format version.
    pub format_version: u32,
    /// The snapshot that starts the chain.
    pub base: BackupId,
    /// That snapshot's revision.
    pub base_revision: i64,
    /// The segment holds revisions `(after_revision, last_revision]`.
    pub after_revision: i64,
    /// Its last revision.
    pub last_revision: i64,
    /// When its first revision was observed (an upper bound of its commit time).
    pub first_time: DateTime<Utc>,
    /// When its last revision was observed.
    pub last_time: DateTime<Utc>,
    /// Number of revisions (always `last_revision - after_revision`).
    pub revisions: u64,
    /// Number of events.
    pub events: u64,
    /// Encoded size in bytes.
    pub size: u64,
    /// sha256 (hex) of the encoded segment.
    pub sha256: String,
    /// Size in bytes of the stored object.
    pub stored_size: u64,
    /// sha256 (hex) of the stored object (compressed, encrypted).
    pub stored_sha256: String,
    /// `stored_sha256` of the previous segment; for the first segment, the base
    /// snapshot's `stored_sha256`.
    pub prev_sha256: String,
    /// Compression of the stored object.
    pub compression: Compression,
    /// Encryption of the stored object, when encrypted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// File name of the stored object inside the chain's `segments/` directory.
    pub object: String,
    /// Node that wrote the segment.
    pub node: String,
    /// The writer's fencing token, when it ran under an election.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fencing_token: Option<i64>,
    /// When the manifest was written.
    pub written_at: DateTime<Utc>,
    /// Version of etcd-backup that wrote it.
    pub tool_version: String,
}

impl SegmentManifest {
    /// Serializes for storage.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("segment manifest serializes");
        v.push(b'\n');
        v
    }

    /// Parses a stored segment manifest.
    ///
    /// # Errors
    /// When the bytes are not a segment manifest this version understands.
    pub fn from_json(bytes: &[u8]) -> Result<SegmentManifest, String> {
        let m: SegmentManifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if m.format_version > FORMAT_VERSION {
            return Err(format!(
                "segment manifest format {} is newer than this etcd-backup understands \
                 ({FORMAT_VERSION}); upgrade etcd-backup",
                m.format_version
            ));
        }
        Ok(m)
    }

    /// The file-name stem shared by the segment and its manifest.
    pub fn stem(&self) -> String {
        stem(
            self.after_revision,
            self.last_revision,
            self.fencing_token.unwrap_or(0),
        )
    }

    /// Why the manifest contradicts itself, if it does.
    pub fn inconsistency(&self) -> Option<String> {
        if self.last_revision <= self.after_revision {
            return Some(format!(
                "it covers ({}, {}]: an empty or reversed range",
                self.after_revision, self.last_revision
            ));
        }
        if self.after_revision < self.base_revision {
            return Some(format!(
                "it starts at revision {} before its base snapshot's revision {}",
                self.after_revision, self.base_revision
            ));
        }
        if self.revisions != (self.last_revision - self.after_revision) as u64 {
            return Some(format!(
                "it counts {} revisions in ({}, {}]",
                self.revisions, self.after_revision, self.last_revision
            ));
        }
        if self.events < self.revisions {
            return Some(format!(
                "it counts fewer events ({}) than revisions ({})",
                self.events, self.revisions
            ));
        }
        if self.last_time < self.first_time {
            return Some("its last revision is dated before its first".into());
        }
        if self.object != object_name(&self.stem(), self.compression, self.encryption.is_some()) {
            return Some(format!(
                "its object {:?} is not named after its range",
                self.object
            ));
        }
        None
    }
}

/// The record that a chain ended because events were lost (the watch was compacted past
/// it, or the writer could not continue it): revisions after `last_revision` are not in
/// this chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainEnd {
    /// Manifest format version.
    pub format_version: u32,
    /// The snapshot that starts the chain.
    pub base: BackupId,
    /// The chain's last committed revision.
    pub last_revision: i64,
    /// Why it ended, for operators.
    pub reason: String,
    /// etcd's compact revision when the watch was compacted past the chain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compact_revision: Option<i64>,
    /// When the end was recorded.
    pub time: DateTime<Utc>,
    /// Node that recorded it.
    pub node: String,
}

impl ChainEnd {
    /// Serializes for storage.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).expect("chain end serializes");
        v.push(b'\n');
        v
    }

    /// Parses a stored chain end.
    ///
    /// # Errors
    /// When the bytes are not a chain end record.
    pub fn from_json(bytes: &[u8]) -> Result<ChainEnd, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

// ---- naming ----

fn stem(after: i64, last: i64, token: i64) -> String {
    format!("{after:020}-{last:020}-{token:x}")
}

/// File name of a segment's stored object.
pub fn object_name(stem: &str, compression: Compression, encrypted: bool) -> String {
    let age = if encrypted {
        crate::codec::crypt::SUFFIX
    } else {
        ""
    };
    format!("{stem}{SEGMENT_INFIX}{}{age}", compression.suffix())
}

/// The directory (with trailing slash) of the chain based on backup `id`.
pub fn segments_dir(layout: &Layout, id: &BackupId) -> String {
    format!("{}/{id}/{SEGMENTS_DIR}/", layout.base())
}

/// Key of a segment manifest.
pub fn manifest_key(layout: &Layout, m: &SegmentManifest) -> String {
    format!("{}{}.json", segments_dir(layout, &m.base), m.stem())
}

/// Key of a segment's stored object.
pub fn object_key(layout: &Layout, m: &SegmentManifest) -> String {
    format!("{}{}", segments_dir(layout, &m.base), m.object)
}

/// Key of a chain-end record.
pub fn end_key(layout: &Layout, id: &BackupId, last_revision: i64) -> String {
    format!("{}end-{last_revision:020}.json", segments_dir(layout, id))
}

/// What an object under a chain's directory is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentKey {
    /// A segment manifest.
    Manifest(BackupId),
    /// A segment's stored object.
    Object(BackupId),
    /// A chain-end record.
    End(BackupId),
}

/// What `key` is, or `None` for anything that is not a chain's object.
pub fn classify(layout: &Layout, key: &str) -> Option<SegmentKey> {
    match layout.classify(key)? {
        ObjectKind::Chain(id, ChainName::Manifest) => Some(SegmentKey::Manifest(id)),
        ObjectKind::Chain(id, ChainName::Object) => Some(SegmentKey::Object(id)),
        ObjectKind::Chain(id, ChainName::End) => Some(SegmentKey::End(id)),
        _ => None,
    }
}

// ---- verification ----

/// What a chain needs to know about its base snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Base {
    /// The backup id.
    pub id: BackupId,
    /// The snapshot's revision.
    pub revision: i64,
    /// A time its revision was committed at or before (the manifest's `finished_at`).
    pub time: DateTime<Utc>,
    /// sha256 (hex) of its stored object: the first segment's `prev_sha256`.
    pub stored_sha256: String,
}

/// A reason a segment is not part of its chain's usable path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainProblem {
    /// The manifest contradicts itself or names another base.
    Invalid {
        /// The segment's stem.
        segment: String,
        /// Why.
        why: String,
    },
    /// The segment starts where another segment (or the base) ends, but its recorded
    /// previous hash is not that one's: something in the chain was replaced or damaged.
    BrokenLink {
        /// The segment's stem.
        segment: String,
        /// The revision where the link breaks.
        at_revision: i64,
    },
    /// Revisions `(from, to]` are in no segment: events were lost there.
    Gap {
        /// Last revision before the gap.
        from: i64,
        /// Last revision of the gap (the next segment continues from here).
        to: i64,
    },
}

impl fmt::Display for ChainProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainProblem::Invalid { segment, why } => {
                write!(f, "segment {segment} is invalid: {why}")
            }
            ChainProblem::BrokenLink {
                segment,
                at_revision,
            } => write!(
                f,
                "hash chain broken at revision {at_revision}: segment {segment} does not continue \
                 the stored segment (or snapshot) that ends there; an object was replaced or damaged"
            ),
            ChainProblem::Gap { from, to } => write!(
                f,
                "gap: revisions {}..={to} are in no segment (events lost)",
                from + 1
            ),
        }
    }
}

/// A verified chain: its base, the longest linked path of segments from it, how far it
/// reaches, and what is wrong with the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainReport {
    /// The base snapshot.
    pub base: Base,
    /// Linked, contiguous segments from the base, oldest first.
    pub path: Vec<SegmentManifest>,
    /// The last revision a restore from this chain can reach.
    pub reach_revision: i64,
    /// When that revision was observed (the base's time when the path is empty).
    pub reach_time: DateTime<Utc>,
    /// Everything that does not link (empty for a healthy chain).
    pub problems: Vec<ChainProblem>,
    /// The recorded end of the chain, when one was written.
    pub ended: Option<ChainEnd>,
}

/// Verifies the chain of `base` from its segment manifests (in any order) and its
/// chain-end records.
pub fn verify_chain(base: &Base, segments: &[SegmentManifest], ends: &[ChainEnd]) -> ChainReport {
    let mut problems = Vec::new();
    let mut valid: Vec<&SegmentManifest> = Vec::new();
    for s in segments {
        let why = if s.base != base.id || s.base_revision != base.revision {
            Some(format!(
                "it names base {} at revision {}, not {} at {}",
                s.base, s.base_revision, base.id, base.revision
            ))
        } else {
            s.inconsistency()
        };
        match why {
            Some(why) => problems.push(ChainProblem::Invalid {
                segment: s.stem(),
                why,
            }),
            None => valid.push(s),
        }
    }
    // Deterministic order: by range, then token.
    valid.sort_by_key(|s| (s.after_revision, s.last_revision, s.fencing_token));
    valid.dedup_by(|a, b| a == b);

    let links = |rev: i64, sha: &str| -> Vec<usize> {
        (0..valid.len())
            .filter(|&j| valid[j].after_revision == rev && valid[j].prev_sha256 == sha)
            .collect()
    };
    // Longest reach from each segment, computed from the newest back (successors always
    // start later, so one pass in reverse order sees them first).
    let mut best: Vec<(i64, Option<usize>)> = vec![(0, None); valid.len()];
    for i in (0..valid.len()).rev() {
        let mut b = (valid[i].last_revision, None);
        for j in links(valid[i].last_revision, &valid[i].stored_sha256) {
            if best[j].0 > b.0 {
                b = (best[j].0, Some(j));
            }
        }
        best[i] = b;
    }
    let mut start = None;
    for j in links(base.revision, &base.stored_sha256) {
        if start.is_none_or(|s: usize| best[j].0 > best[s].0) {
            start = Some(j);
        }
    }
    let mut path = Vec::new();
    let mut next = start;
    while let Some(i) = next {
        path.push(valid[i].clone());
        next = best[i].1;
    }
    let reach_revision = path.last().map_or(base.revision, |s| s.last_revision);
    let reach_time = path.last().map_or(base.time, |s| s.last_time);

    // Everything reachable from the base is a true record of the history, even off the
    // path (a failover fork); the rest is a problem.
    let mut reachable = HashSet::new();
    let mut todo: Vec<usize> = links(base.revision, &base.stored_sha256);
    while let Some(i) = todo.pop() {
        if reachable.insert(i) {
            todo.extend(links(valid[i].last_revision, &valid[i].stored_sha256));
        }
    }
    let mut gap_to: Option<i64> = None;
    for (i, s) in valid.iter().enumerate() {
        if reachable.contains(&i) {
            continue;
        }
        let linked = (base.revision == s.after_revision && base.stored_sha256 == s.prev_sha256)
            || valid
                .iter()
                .any(|p| p.last_revision == s.after_revision && p.stored_sha256 == s.prev_sha256);
        if linked {
            // Continues a segment that is itself cut off: the cut is reported there.
            continue;
        }
        let ends_here = base.revision == s.after_revision
            || valid.iter().any(|p| p.last_revision == s.after_revision);
        if ends_here {
            problems.push(ChainProblem::BrokenLink {
                segment: s.stem(),
                at_revision: s.after_revision,
            });
        } else if s.after_revision > reach_revision {
            gap_to = Some(gap_to.map_or(s.after_revision, |g| g.min(s.after_revision)));
        } else {
            problems.push(ChainProblem::Invalid {
                segment: s.stem(),
                why: format!(
                    "no segment ends at revision {}, where it starts",
                    s.after_revision
                ),
            });
        }
    }
    if let Some(to) = gap_to {
        problems.push(ChainProblem::Gap {
            from: reach_revision,
            to,
        });
    }
    let ended = ends
        .iter()
        .filter(|e| e.base == base.id)
        .min_by_key(|e| e.last_revision)
        .cloned();
    ChainReport {
        base: base.clone(),
        path,
        reach_revision,
        reach_time,
        problems,
        ended,
    }
}

// ---- planning ----

/// Where a restore should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Exactly this revision.
    Revision(i64),
    /// The last revision observed at or before this moment.
    Time(DateTime<Utc>),
    /// The newest committed revision.
    Latest,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Revision(r) => write!(f, "revision {r}"),
            Target::Time(t) => write!(
                f,
                "{}",
                t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
            Target::Latest => f.write_str("the newest committed revision"),
        }
    }
}

/// Where a replay stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// After this revision (which the plan's segments hold, or the base is at).
    AtRevision(i64),
    /// After the last revision observed at or before this moment.
    AtTime(DateTime<Utc>),
}

/// A restore plan: the base snapshot and the segments to replay on it, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The snapshot to start from.
    pub base: Base,
    /// The segments to replay, oldest first (contiguous from the base's revision).
    pub segments: Vec<SegmentManifest>,
    /// Where to stop.
    pub stop: Stop,
}

/// Why no plan reaches a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// Nothing is backed up at all.
    #[error("there is no committed snapshot to restore from")]
    NoSnapshot,
    /// The target is before every snapshot.
    #[error("{target} is older than every snapshot (the oldest is at revision {oldest_revision})")]
    BeforeEverything {
        /// The target.
        target: Target,
        /// The oldest snapshot's revision.
        oldest_revision: i64,
    },
    /// The target is after everything committed.
    #[error(
        "{target} is newer than the newest committed point (revision {newest_revision}, observed \
         {newest_time}); restore to that point with `--to-revision {newest_revision}`, or wait \
         for the next segment"
    )]
    Beyond {
        /// The target.
        target: Target,
        /// The newest revision any chain reaches.
        newest_revision: i64,
        /// When it was observed.
        newest_time: DateTime<Utc>,
    },
    /// The target falls in a gap between chains.
    #[error(
        "{target} is not covered: it falls in a gap of the continuous backup; covered ranges \
         are {covered}"
    )]
    NotCovered {
        /// The target.
        target: Target,
        /// The covered ranges, for the message.
        covered: String,
    },
}

fn covered_ranges(chains: &[ChainReport]) -> String {
    let mut r: Vec<(i64, i64)> = chains
        .iter()
        .map(|c| (c.base.revision, c.reach_revision))
        .collect();
    r.sort_unstable();
    r.iter()
        .map(|(a, b)| format!("{a}..={b}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Picks the snapshot and segments that reach `target`: the newest snapshot at or before
/// the target whose verified chain reaches it.
///
/// # Errors
/// When no chain reaches the target; the error says what is covered.
pub fn plan(chains: &[ChainReport], target: Target) -> Result<Plan, PlanError> {
    if chains.is_empty() {
        return Err(PlanError::NoSnapshot);
    }
    let newest = chains
        .iter()
        .max_by_key(|c| (c.reach_revision, c.base.revision))
        .expect("not empty");
    let mut ordered: Vec<&ChainReport> = chains.iter().collect();
    ordered.sort_by_key(|c| std::cmp::Reverse((c.base.revision, c.base.time)));
    let oldest = chains
        .iter()
        .map(|c| c.base.revision)
        .min()
        .expect("not empty");
    let beyond = || PlanError::Beyond {
        target,
        newest_revision: newest.reach_revision,
        newest_time: newest.reach_time,
    };
    match target {
        Target::Latest => Ok(Plan {
            base: newest.base.clone(),
            segments: newest.path.clone(),
            stop: Stop::AtRevision(newest.reach_revision),
        }),
        Target::Revision(r) => {
            if r < oldest {
                return Err(PlanError::BeforeEverything {
                    target,
                    oldest_revision: oldest,
                });
            }
            if r > newest.reach_revision {
                return Err(beyond());
            }
            let c = ordered
                .iter()
                .find(|c| c.base.revision <= r && c.reach_revision >= r)
                .ok_or_else(|| PlanError::NotCovered {
                    target,
                    covered: covered_ranges(chains),
                })?;
            Ok(Plan {
                base: c.base.clone(),
                segments: c
                    .path
                    .iter()
                    .take_while(|s| s.after_revision < r)
                    .cloned()
                    .collect(),
                stop: Stop::AtRevision(r),
            })
        }
        Target::Time(t) => {
            let candidates: Vec<&&ChainReport> =
                ordered.iter().filter(|c| c.base.time <= t).collect();
            if candidates.is_empty() {
                return Err(PlanError::BeforeEverything {
                    target,
                    oldest_revision: oldest,
                });
            }
            let Some(c) = candidates.iter().find(|c| c.reach_time >= t) else {
                if t <= newest.reach_time {
                    return Err(PlanError::NotCovered {
                        target,
                        covered: covered_ranges(chains),
                    });
                }
                return Err(beyond());
            };
            Ok(Plan {
                base: c.base.clone(),
                segments: c
                    .path
                    .iter()
                    .take_while(|s| s.first_time <= t)
                    .cloned()
                    .collect(),
                stop: Stop::AtTime(t),
            })
        }
    }
}

#[cfg(test)]
mod tests;
