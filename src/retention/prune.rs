//! Prune as plan-then-execute. [`plan`] is a pure function from (listing, incomplete
//! uploads, now, policy, cluster id) to every action with its reason; `prune --dry-run`
//! prints exactly that plan, and [`execute`] carries it out.
//!
//! # Rules the planner holds (whatever the policy and the listing say)
//! - Only this cluster's committed backups that are not dated in the future go to the
//!   policy (`retention::plan`); foreign backups (another cluster id) and future ones
//!   (more than 5 minutes ahead) are kept and reported.
//! - A data object in a backup directory that holds a manifest, readable or not, is never
//!   an orphan (a readable manifest only ever names data in its own directory). Orphans
//!   are removed only when their id's time is older than the orphan age (twice the cycle
//!   timeout), so no running cycle can still be committing them.
//! - A backup's continuous-backup chain (`<id>/segments/`) is deleted with it and only
//!   with it: every chain belongs to one base snapshot, so no kept snapshot needs another
//!   one's segments. Chain objects in a directory whose manifest is gone (a prune
//!   interrupted after the manifest) are removed like orphans, when old enough.
//! - A dangling manifest (its data object not listed) is removed only when old enough and
//!   when, at execution, the store confirms its data object is absent.
//! - Every deletion (a backup, an orphan, a dangling manifest, an aborted upload) counts
//!   toward `max_delete_per_run`; what exceeds it is deferred to the next prune.
//! - Only keys under `PREFIX/CLUSTER_NAME/` that this tool writes are ever deleted.
//!
//! The executor deletes a backup's manifest (the commit marker) first, then its chain
//! (segment manifests before their segments), then its data, the
//! reverse of how a backup is made: an interrupted prune never leaves a manifest pointing
//! at nothing, at worst an orphan a later prune removes. A failed deletion is reported and
//! retried at the next prune, never in a loop. A listing that fails part-way fails the
//! prune: nothing is decided from part of a directory.

use crate::retention::RetentionPolicy;
use crate::retention::{
    self, Action, BackupSummary, Decision, DeleteReason, KeepReason, PrunePlan,
};
use crate::store::manifest::printable;
use crate::store::naming::{BackupId, Layout};
use crate::store::{BackupStore, Listing, PendingUpload, StoreError};
use chrono::{DateTime, Utc};
use serde::Serialize;
use std::fmt::Write as _;
use std::time::Duration;

/// An incomplete multipart upload under our prefix older than this is aborted: no cycle
/// runs that long, so it can only be left over from a crash.
pub const STALE_UPLOAD_AGE: chrono::Duration = chrono::Duration::hours(24);

/// Everything the planner decides from.
#[derive(Debug, Clone)]
pub struct PlanInput<'a> {
    /// One complete listing of the cluster's directory.
    pub listing: &'a Listing,
    /// The incomplete multipart uploads under it, or why they could not be listed.
    pub uploads: Result<&'a [PendingUpload], String>,
    /// The object layout (for keys).
    pub layout: &'a Layout,
    /// Now.
    pub now: DateTime<Utc>,
    /// The retention policy.
    pub policy: &'a RetentionPolicy,
    /// The cluster whose backups the policy applies to: the local member's cluster id, or
    /// one chosen with `--cluster-id`.
    pub cluster_id: &'a str,
    /// A data object without a manifest is an orphan only when older than this (twice the
    /// cycle timeout).
    pub orphan_age: Duration,
}

/// One deletion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Delete a committed backup: its manifest, then its chain, then its data objects.
    DeleteBackup {
        /// The backup.
        id: BackupId,
        /// Its time.
        time: DateTime<Utc>,
        /// Why.
        reason: DeleteReason,
        /// Its manifest.
        manifest_key: String,
        /// The objects of the continuous-backup chain based on it, segment manifests
        /// first (empty without continuous backup).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        chain_keys: Vec<String>,
        /// Its data objects.
        data_keys: Vec<String>,
    },
    /// Remove a data object no manifest commits (its cycle never finished).
    RemoveOrphan {
        /// The object.
        key: String,
    },
    /// Remove an object of a continuous-backup chain whose base backup is gone (its
    /// manifest was deleted by a prune that did not finish): nothing can restore from it.
    RemoveOrphanChain {
        /// The object.
        key: String,
    },
    /// Remove a manifest whose data object is missing (once the store confirms it).
    RemoveDangling {
        /// The manifest.
        key: String,
        /// The data object it names, checked for absence first.
        data_key: String,
    },
    /// Abort an incomplete multipart upload left by a crash.
    AbortUpload {
        /// The key being uploaded.
        key: String,
        /// The upload id.
        upload_id: String,
        /// When it was started.
        initiated: DateTime<Utc>,
    },
}

impl Step {
    /// Every key this step deletes, in order.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Step::DeleteBackup {
                manifest_key,
                chain_keys,
                data_keys,
                ..
            } => std::iter::once(manifest_key.as_str())
                .chain(chain_keys.iter().map(String::as_str))
                .chain(data_keys.iter().map(String::as_str))
                .collect(),
            Step::RemoveOrphan { key }
            | Step::RemoveOrphanChain { key }
            | Step::RemoveDangling { key, .. }
            | Step::AbortUpload { key, .. } => vec![key.as_str()],
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::DeleteBackup {
                id,
                reason,
                chain_keys,
                ..
            } if !chain_keys.is_empty() => write!(
                f,
                "delete backup {id} with its continuous-backup chain ({} objects): {reason}",
                chain_keys.len()
            ),
            Step::DeleteBackup { id, reason, .. } => write!(f, "delete backup {id}: {reason}"),
            Step::RemoveOrphanChain { key } => write!(
                f,
                "remove continuous-backup object {} (its base backup is gone)",
                printable(key)
            ),
            Step::RemoveOrphan { key } => write!(
                f,
                "remove orphaned data object {} (no manifest: its cycle never committed)",
                printable(key)
            ),
            Step::RemoveDangling { key, .. } => write!(
                f,
                "remove manifest {} (its data object is missing; checked again before removing)",
                printable(key)
            ),
            Step::AbortUpload { key, initiated, .. } => write!(
                f,
                "abort incomplete upload of {} (started {})",
                printable(key),
                initiated.format("%Y-%m-%d %H:%M:%SZ")
            ),
        }
    }
}

/// Something the prune does not touch, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeftAlone {
    /// The key.
    pub key: String,
    /// Why it stays.
    pub reason: String,
}

/// The whole plan of one prune.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Every committed backup (this cluster's, foreign and future ones) with its decision,
    /// newest first.
    pub decisions: Vec<Decision>,
    /// The deletions, in the order they run, within `max_delete_per_run`.
    pub steps: Vec<Step>,
    /// Deletions deferred to the next prune by `max_delete_per_run`.
    pub deferred: Vec<Step>,
    /// What is not touched and why (unreadable manifests, young orphans …).
    pub left_alone: Vec<LeftAlone>,
    /// Problems that limit the plan (e.g. incomplete uploads could not be listed).
    pub warnings: Vec<String>,
    /// Backups of other clusters (another cluster id).
    pub foreign_backups: usize,
    /// Backups dated more than 5 minutes in the future.
    pub future_backups: usize,
    /// Objects under the directory that etcd-backup did not write.
    pub foreign_objects: usize,
}

impl Plan {
    /// The plan as text, exactly as `prune` and `prune --dry-run` print it.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for d in &self.decisions {
            let _ = writeln!(
                out,
                "{}  {}  {}",
                d.id,
                d.time.format("%Y-%m-%d %H:%M:%SZ"),
                d.action
            );
        }
        for s in &self.steps {
            let _ = writeln!(out, "{s}");
        }
        for s in &self.deferred {
            let _ = writeln!(out, "deferred (max_delete_per_run reached): {s}");
        }
        for l in &self.left_alone {
            let _ = writeln!(
                out,
                "left alone: {}: {}",
                printable(&l.key),
                printable(&l.reason)
            );
        }
        for w in &self.warnings {
            let _ = writeln!(out, "warning: {}", printable(w));
        }
        out
    }
}

/// Decides every action of a prune, and why. Pure.
pub fn plan(input: &PlanInput<'_>) -> Plan {
    let listing = input.listing;
    let scope = Scope::of(input);
    let policy_plan = retention::plan(&scope.in_scope, input.now, input.policy);
    let mut steps = backup_steps(input, &policy_plan);
    let mut left_alone = Vec::new();
    let mut others = leftover_steps(input, &mut left_alone);
    let mut warnings = Vec::new();
    match &input.uploads {
        Ok(uploads) => others.extend(upload_steps(uploads, input.now)),
        Err(e) => warnings.push(format!(
            "cannot list incomplete multipart uploads ({e}); retried at the next prune"
        )),
    }
    // Every deletion counts toward the limit: backups first, then what is left over.
    let budget = (input.policy.max_delete_per_run as usize).saturating_sub(steps.len());
    let deferred = if others.len() > budget {
        others.split_off(budget)
    } else {
        Vec::new()
    };
    steps.extend(others);

    let mut decisions = policy_plan.decisions;
    decisions.extend(scope.set_aside);
    let order: std::collections::HashMap<String, usize> = listing
        .backups
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id.to_string(), i))
        .collect();
    decisions.sort_by_key(|d| order.get(&d.id).copied().unwrap_or(usize::MAX));
    Plan {
        decisions,
        steps,
        deferred,
        left_alone,
        warnings,
        foreign_backups: scope.foreign,
        future_backups: scope.future,
        foreign_objects: listing.foreign,
    }
}

/// The committed backups the policy decides on (this cluster's, not dated in the future),
/// and the others, kept with their reason.
struct Scope {
    in_scope: Vec<BackupSummary>,
    set_aside: Vec<Decision>,
    foreign: usize,
    future: usize,
}

impl Scope {
    fn of(input: &PlanInput<'_>) -> Scope {
        let mut scope = Scope {
            in_scope: Vec::new(),
            set_aside: Vec::new(),
            foreign: 0,
            future: 0,
        };
        for m in &input.listing.backups {
            let keep = |reason| Decision {
                id: m.id.to_string(),
                time: m.time,
                action: Action::Keep(vec![reason]),
            };
            if m.cluster_id != input.cluster_id {
                scope.foreign += 1;
                scope.set_aside.push(keep(KeepReason::Foreign {
                    cluster_id: m.cluster_id.clone(),
                }));
            } else if m.is_future(input.now) {
                scope.future += 1;
                scope.set_aside.push(keep(KeepReason::Future));
            } else {
                scope.in_scope.push(BackupSummary {
                    id: m.id.to_string(),
                    time: m.time,
                    revision: m.revision,
                    chain_reach: chain_reach(input.listing, input.layout, &m.id),
                });
            }
        }
        scope
    }
}

/// The backups the policy deletes, oldest first (its decisions are newest first): the
/// manifest, then the data.
fn backup_steps(input: &PlanInput<'_>, policy_plan: &PrunePlan) -> Vec<Step> {
    let mut steps = Vec::new();
    for d in policy_plan.decisions.iter().rev() {
        let Action::Delete(reason) = &d.action else {
            continue;
        };
        let Ok(id) = d.id.parse::<BackupId>() else {
            continue;
        };
        let data_keys = input
            .listing
            .data_objects
            .get(&id)
            .map(|v| v.iter().map(|o| o.key.clone()).collect())
            .unwrap_or_default();
        steps.push(Step::DeleteBackup {
            manifest_key: input.layout.manifest_key(&id),
            chain_keys: chain_keys(input.listing, &id),
            id,
            time: d.time,
            reason: reason.clone(),
            data_keys,
        });
    }
    steps
}

/// The highest revision a segment manifest of the chain based on `id` names (its key holds
/// its range), or `None` without one.
fn chain_reach(listing: &Listing, layout: &Layout, id: &BackupId) -> Option<i64> {
    use crate::store::naming::{segment_last_revision, ChainName, ObjectKind};
    listing
        .chain_objects
        .get(id)?
        .iter()
        .filter(|o| {
            matches!(
                layout.classify(&o.key),
                Some(ObjectKind::Chain(_, ChainName::Manifest))
            )
        })
        .filter_map(|o| segment_last_revision(o.key.rsplit('/').next()?))
        .max()
}

/// The keys of the chain based on `id`: segment manifests and chain-end records (the
/// commit markers) before the segments, each group in key order.
fn chain_keys(listing: &Listing, id: &BackupId) -> Vec<String> {
    let mut keys: Vec<&str> = listing
        .chain_objects
        .get(id)
        .map(|v| v.iter().map(|o| o.key.as_str()).collect())
        .unwrap_or_default();
    keys.sort_by_key(|k| (!k.ends_with(".json"), *k));
    keys.into_iter().map(str::to_string).collect()
}

/// Orphaned data objects and manifests without data old enough to be removed; what is
/// not is recorded in `left_alone` with why.
fn leftover_steps(input: &PlanInput<'_>, left_alone: &mut Vec<LeftAlone>) -> Vec<Step> {
    let (listing, now) = (input.listing, input.now);
    let cutoff = chrono::Duration::from_std(input.orphan_age)
        .ok()
        .and_then(|a| now.checked_sub_signed(a));
    let old_enough = |t: DateTime<Utc>| cutoff.is_some_and(|c| t < c);
    let mut steps = Vec::new();
    for (key, reason) in &listing.unreadable {
        left_alone.push(LeftAlone {
            key: key.clone(),
            reason: format!("unreadable manifest ({reason}); its backup directory is kept"),
        });
    }
    for (id, objects) in &listing.data_objects {
        if listing.manifest_ids.contains(id) {
            continue;
        }
        for o in objects {
            if old_enough(id.time()) {
                steps.push(Step::RemoveOrphan { key: o.key.clone() });
            } else {
                left_alone.push(LeftAlone {
                    key: o.key.clone(),
                    reason: "data object without a manifest, too young to be an orphan (a cycle may still be committing it)".into(),
                });
            }
        }
    }
    for (id, objects) in &listing.chain_objects {
        if listing.manifest_ids.contains(id) {
            continue;
        }
        if old_enough(id.time()) {
            steps.extend(
                chain_keys(listing, id)
                    .into_iter()
                    .map(|key| Step::RemoveOrphanChain { key }),
            );
        } else {
            left_alone.extend(objects.iter().map(|o| LeftAlone {
                key: o.key.clone(),
                reason:
                    "continuous-backup object without a base manifest, too young to remove".into(),
            }));
        }
    }
    for (m, key) in &listing.dangling {
        let why = if m.cluster_id != input.cluster_id {
            Some("manifest without data of another cluster")
        } else if !old_enough(m.id.time()) {
            Some("manifest without data, too young to remove")
        } else {
            None
        };
        match (why, input.layout.data_key_for(&m.id, &m.object)) {
            (None, Some(data_key)) => steps.push(Step::RemoveDangling {
                key: key.clone(),
                data_key,
            }),
            (why, _) => left_alone.push(LeftAlone {
                key: key.clone(),
                reason: why.unwrap_or("manifest names no data object").into(),
            }),
        }
    }
    steps
}

/// Incomplete multipart uploads older than [`STALE_UPLOAD_AGE`]: left over from a crash.
fn upload_steps(uploads: &[PendingUpload], now: DateTime<Utc>) -> Vec<Step> {
    uploads
        .iter()
        .filter(|up| {
            now.checked_sub_signed(STALE_UPLOAD_AGE)
                .is_some_and(|c| up.initiated < c)
        })
        .map(|up| Step::AbortUpload {
            key: up.key.clone(),
            upload_id: up.upload_id.clone(),
            initiated: up.initiated,
        })
        .collect()
}

/// What running a plan did.
#[derive(Debug, Default)]
pub struct Executed {
    /// Steps done in full.
    pub done: Vec<Step>,
    /// Steps skipped because the store's state differs from the listing (e.g. a dangling
    /// manifest's data object is there after all), with why.
    pub skipped: Vec<(Step, String)>,
    /// Deletions that failed: key and error. They are retried at the next prune.
    pub failed: Vec<(String, String)>,
}

/// Carries out `plan`'s steps, in order.
pub async fn execute(store: &BackupStore, plan: &Plan) -> Executed {
    let mut ex = Executed::default();
    for step in &plan.steps {
        let r: Result<(), (String, StoreError)> = match step {
            Step::DeleteBackup {
                manifest_key,
                chain_keys,
                data_keys,
                id,
                time,
                reason,
            } => {
                // The commit marker first; the data stays while it could not be removed.
                let mut r = store
                    .delete(manifest_key)
                    .await
                    .map_err(|e| (manifest_key.clone(), e));
                if r.is_ok() {
                    for k in chain_keys.iter().chain(data_keys) {
                        if let Err(e) = store.delete(k).await {
                            r = Err((k.clone(), e));
                            break;
                        }
                    }
                }
                if r.is_ok() {
                    tracing::info!(id = %id, time = %time, reason = %reason, "deleted backup");
                }
                r
            }
            Step::RemoveOrphan { key } => {
                let r = store.delete(key).await.map_err(|e| (key.clone(), e));
                if r.is_ok() {
                    tracing::info!(key = %printable(key), "removed an orphaned data object (no manifest: its cycle never committed)");
                }
                r
            }
            Step::RemoveOrphanChain { key } => {
                let r = store.delete(key).await.map_err(|e| (key.clone(), e));
                if r.is_ok() {
                    tracing::info!(key = %printable(key), "removed a continuous-backup object whose base backup is gone");
                }
                r
            }
            Step::RemoveDangling { key, data_key } => match store.exists(data_key).await {
                Ok(false) => {
                    let r = store.delete(key).await.map_err(|e| (key.clone(), e));
                    if r.is_ok() {
                        tracing::info!(key = %printable(key), "removed a manifest whose data object is missing");
                    }
                    r
                }
                Ok(true) => {
                    ex.skipped.push((
                        step.clone(),
                        "its data object exists (the listing lagged): kept".into(),
                    ));
                    continue;
                }
                Err(e) => Err((data_key.clone(), e)),
            },
            Step::AbortUpload {
                key,
                upload_id,
                initiated,
            } => {
                let up = PendingUpload {
                    key: key.clone(),
                    upload_id: upload_id.clone(),
                    initiated: *initiated,
                };
                let r = store.abort_pending(&up).await.map_err(|e| (key.clone(), e));
                if r.is_ok() {
                    tracing::info!(key = %printable(key), initiated = %initiated, "aborted a stale incomplete multipart upload");
                }
                r
            }
        };
        match r {
            Ok(()) => ex.done.push(step.clone()),
            Err((key, e)) => {
                tracing::warn!(key = %printable(&key), error = %e, "deletion failed; it is retried at the next prune");
                ex.failed.push((key, e.to_string()));
            }
        }
    }
    ex
}

/// What a prune did (or, with `dry_run`, would do).
#[derive(Debug)]
pub struct PruneOutcome {
    /// The plan.
    pub plan: Plan,
    /// What running it did (`None` for a dry run).
    pub executed: Option<Executed>,
}

impl PruneOutcome {
    /// Backups deleted (ids); for a dry run, those the plan deletes.
    pub fn deleted(&self) -> Vec<String> {
        self.done_where(|s| match s {
            Step::DeleteBackup { id, .. } => Some(id.to_string()),
            _ => None,
        })
    }

    /// Orphans and dangling manifests removed, and uploads aborted (keys).
    pub fn cleaned(&self) -> Vec<String> {
        self.done_where(|s| match s {
            Step::DeleteBackup { .. } => None,
            other => Some(other.keys()[0].to_string()),
        })
    }

    /// Keys of uploads aborted (`uploads`), or of orphans and dangling manifests removed.
    pub fn cleaned_where(&self, uploads: bool) -> Vec<String> {
        self.done_where(|s| match s {
            Step::AbortUpload { key, .. } if uploads => Some(key.clone()),
            Step::RemoveOrphan { key }
            | Step::RemoveOrphanChain { key }
            | Step::RemoveDangling { key, .. }
                if !uploads =>
            {
                Some(key.clone())
            }
            _ => None,
        })
    }

    /// Failed deletions: key and error.
    pub fn failed(&self) -> &[(String, String)] {
        self.executed.as_ref().map_or(&[], |e| &e.failed)
    }

    /// What was done, or for a dry run what the plan would do.
    fn done_where(&self, f: impl Fn(&Step) -> Option<String>) -> Vec<String> {
        match &self.executed {
            Some(e) => e.done.iter().filter_map(&f).collect(),
            None => self.plan.steps.iter().filter_map(&f).collect(),
        }
    }
}

/// Lists, plans and (unless `dry_run`) executes. `cluster_id`: see [`PlanInput`].
///
/// # Errors
/// [`StoreError`] when the listing fails; failed deletions are reported in the outcome.
pub async fn prune(
    store: &BackupStore,
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
    orphan_age: Duration,
    cluster_id: &str,
    dry_run: bool,
) -> Result<PruneOutcome, StoreError> {
    let listing = store.list().await?;
    let uploads = store.pending_uploads().await;
    let plan = plan(&PlanInput {
        listing: &listing,
        uploads: uploads.as_deref().map_err(ToString::to_string),
        layout: store.layout(),
        now,
        policy,
        cluster_id,
        orphan_age,
    });
    if plan.foreign_objects > 0 {
        tracing::info!(
            count = plan.foreign_objects,
            "objects not written by etcd-backup were left alone"
        );
    }
    let executed = if dry_run {
        None
    } else {
        Some(execute(store, &plan).await)
    };
    Ok(PruneOutcome { plan, executed })
}

#[cfg(test)]
mod tests;
