//! Executes retention: lists the store once, asks the pure policy (`retention::plan`) what
//! to keep, then deletes what it says — the manifest (the commit marker) first, then the
//! data object, the reverse of how a backup is made, so an interrupted prune never leaves a
//! manifest pointing at nothing: at worst a data object without a manifest, an orphan that
//! a later prune removes. Orphaned data objects (uploads completed but never committed, or
//! left by an interrupted prune) are removed once old enough that no cycle can still be
//! writing them; so are manifests whose data object is gone.
//!
//! Only objects this tool wrote, under `PREFIX/CLUSTER_NAME/`, are ever deleted; anything
//! else is counted and left alone. A deletion that fails is logged and retried at the next
//! prune, never in a loop.

use crate::retention::{self, Action, BackupSummary, PrunePlan, RetentionPolicy};
use crate::store::naming::BackupId;
use crate::store::{BackupStore, StoreError};
use chrono::{DateTime, Utc};
use std::time::Duration;

/// An incomplete multipart upload under our prefix older than this is aborted: no cycle
/// runs that long, so it can only be left over from a crash.
pub const STALE_UPLOAD_AGE: chrono::Duration = chrono::Duration::hours(24);

/// What a prune did (or, with `dry_run`, would do).
#[derive(Debug)]
pub struct PruneOutcome {
    /// The policy's decision for every committed backup, newest first.
    pub plan: PrunePlan,
    /// Backups deleted (ids).
    pub deleted: Vec<String>,
    /// Orphaned data objects removed (keys).
    pub orphans_removed: Vec<String>,
    /// Incomplete multipart uploads older than [`STALE_UPLOAD_AGE`] that were aborted (keys).
    pub uploads_aborted: Vec<String>,
    /// Deletions that failed: key and error. They are retried at the next prune.
    pub failed: Vec<(String, String)>,
    /// Objects under our directory that this tool did not write (left alone).
    pub foreign: usize,
    /// Manifests that could not be read (left alone, with their data).
    pub unreadable: usize,
}

/// Lists, plans and (unless `dry_run`) deletes.
///
/// `orphan_age`: a data object without a manifest is removed only when its backup id is
/// older than this (use twice the cycle timeout).
///
/// # Errors
/// [`StoreError`] when the listing fails; failed deletions are reported in the outcome.
pub async fn prune(
    store: &BackupStore,
    policy: &RetentionPolicy,
    now: DateTime<Utc>,
    orphan_age: Duration,
    dry_run: bool,
) -> Result<PruneOutcome, StoreError> {
    let listing = store.list().await?;
    let summaries: Vec<BackupSummary> = listing
        .backups
        .iter()
        .map(|m| BackupSummary {
            id: m.id.to_string(),
            time: m.time,
        })
        .collect();
    let plan = retention::plan(&summaries, now, policy);
    let mut outcome = PruneOutcome {
        plan,
        deleted: Vec::new(),
        orphans_removed: Vec::new(),
        uploads_aborted: Vec::new(),
        failed: Vec::new(),
        foreign: listing.foreign,
        unreadable: listing.unreadable.len(),
    };

    for d in &outcome.plan.decisions {
        let Action::Delete(reason) = &d.action else {
            continue;
        };
        let Ok(id) = d.id.parse::<BackupId>() else {
            continue;
        };
        if dry_run {
            continue;
        }
        let data_keys: Vec<String> = listing
            .data_objects
            .get(&id)
            .map(|v| v.iter().map(|(k, _)| k.clone()).collect())
            .unwrap_or_default();
        let mut ok = true;
        for key in std::iter::once(&store.layout().manifest_key(&id)).chain(data_keys.iter()) {
            if let Err(e) = store.delete(key).await {
                tracing::warn!(key = %key, error = %e, "deletion failed; it is retried at the next prune");
                outcome.failed.push((key.clone(), e.to_string()));
                ok = false;
                // Keep the data while its manifest could not be removed.
                break;
            }
        }
        if ok {
            tracing::info!(id = %d.id, time = %d.time, reason = %reason, "deleted backup");
            outcome.deleted.push(d.id.clone());
        }
    }

    let committed: std::collections::HashSet<String> =
        listing.backups.iter().map(|m| m.id.to_string()).collect();
    let unreadable_ids: std::collections::HashSet<String> = listing
        .unreadable
        .iter()
        .filter_map(|(k, _)| store.layout().classify(k))
        .map(|k| match k {
            crate::store::naming::ObjectKind::Manifest(id)
            | crate::store::naming::ObjectKind::Data(id) => id.to_string(),
        })
        .collect();
    let cutoff = now - chrono::Duration::from_std(orphan_age).unwrap_or(chrono::Duration::days(1));
    for (id, key) in &listing.dangling {
        if id.time() >= cutoff {
            continue;
        }
        if dry_run {
            outcome.orphans_removed.push(key.clone());
            continue;
        }
        match store.delete(key).await {
            Ok(()) => {
                tracing::info!(key = %key, "removed a manifest whose data object is missing");
                outcome.orphans_removed.push(key.clone());
            }
            Err(e) => outcome.failed.push((key.clone(), e.to_string())),
        }
    }
    for (id, objects) in &listing.data_objects {
        let ids = id.to_string();
        if committed.contains(&ids) || unreadable_ids.contains(&ids) || id.time() >= cutoff {
            continue;
        }
        for (key, _) in objects {
            if dry_run {
                outcome.orphans_removed.push(key.clone());
                continue;
            }
            match store.delete(key).await {
                Ok(()) => {
                    tracing::info!(key = %key, "removed an orphaned data object (no manifest: its cycle never committed)");
                    outcome.orphans_removed.push(key.clone());
                }
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "removing an orphan failed; retried at the next prune");
                    outcome.failed.push((key.clone(), e.to_string()));
                }
            }
        }
    }
    match store.pending_uploads().await {
        Ok(uploads) => {
            for up in uploads
                .iter()
                .filter(|u| u.initiated < now - STALE_UPLOAD_AGE)
            {
                if dry_run {
                    outcome.uploads_aborted.push(up.key.clone());
                    continue;
                }
                match store.abort_pending(up).await {
                    Ok(()) => {
                        tracing::info!(key = %up.key, initiated = %up.initiated, "aborted a stale incomplete multipart upload");
                        outcome.uploads_aborted.push(up.key.clone());
                    }
                    Err(e) => outcome.failed.push((up.key.clone(), e.to_string())),
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list incomplete multipart uploads; retried at the next prune");
            outcome
                .failed
                .push((store.layout().base().to_string(), e.to_string()));
        }
    }
    if outcome.foreign > 0 {
        tracing::info!(
            count = outcome.foreign,
            "objects not written by etcd-backup were left alone"
        );
    }
    Ok(outcome)
}
