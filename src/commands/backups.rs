//! `list`, `verify` and `prune`: the backups in the store.

use super::{failed, open_store, CommandError};
use crate::config::Config;
use crate::continuous::chain::ChainReport;
use crate::store::manifest::{printable, Manifest};
use crate::units::human_bytes;
use crate::{restore as fetch, verify};
use serde::Serialize;
use std::io::Write;

/// The fields `list --json` prints; their names are stable.
#[derive(Serialize)]
pub(super) struct ListEntry<'a> {
    id: &'a crate::store::naming::BackupId,
    time: String,
    revision: i64,
    size: u64,
    stored_size: u64,
    sha256: &'a str,
    compression: String,
    etcd_version: &'a str,
    cluster_id: &'a str,
    member: &'a str,
    member_name: &'a str,
    node: &'a str,
}

impl<'a> From<&'a Manifest> for ListEntry<'a> {
    fn from(m: &'a Manifest) -> Self {
        ListEntry {
            id: &m.id,
            time: m.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            revision: m.revision,
            size: m.size,
            stored_size: m.stored_size,
            sha256: &m.sha256,
            compression: m.compression.to_string(),
            etcd_version: &m.etcd_version,
            cluster_id: &m.cluster_id,
            member: &m.member,
            member_name: &m.member_name,
            node: &m.node,
        }
    }
}

/// The cluster whose backups a command acts on: `--cluster-id`, else the local member's.
///
/// # Errors
/// When etcd cannot be reached and no `--cluster-id` was given: the message says so and
/// what to pass.
pub(super) async fn cluster_for(
    cfg: &Config,
    flag: Option<String>,
    what: &str,
) -> Result<String, CommandError> {
    if let Some(id) = flag {
        return Ok(id.trim().to_ascii_lowercase());
    }
    crate::etcd::local_cluster_id(&cfg.etcd).await.map_err(|e| {
        failed(format!(
            "{what} needs this cluster's id and etcd cannot be reached to learn it ({e}); pass --cluster-id ID (the CLUSTER ID column of `etcd-backup list`) to choose the cluster's backups explicitly"
        ))
    })
}

/// Which backup a command was asked for.
pub(super) struct Which<'a> {
    /// An id, or `latest`.
    pub(super) backup: &'a str,
    /// `--cluster-id`.
    pub(super) cluster_id: Option<String>,
}

/// Picks the backup `which` names: an explicit id always (any cluster, any date);
/// `latest` only among the selected cluster's backups not dated in the future.
pub(super) async fn pick<'l>(
    cfg: &Config,
    listing: &'l crate::store::Listing,
    which: &Which<'_>,
) -> Result<&'l Manifest, CommandError> {
    let cluster = if which.backup == "latest" {
        Some(cluster_for(cfg, which.cluster_id.clone(), "`latest`").await?)
    } else {
        which.cluster_id.clone()
    };
    fetch::select(
        listing,
        which.backup,
        chrono::Utc::now(),
        cluster.as_deref(),
    )
    .map_err(failed)
}

/// What a backup is, seen from this cluster.
pub(super) fn marks(
    m: &Manifest,
    now: chrono::DateTime<chrono::Utc>,
    local: Option<&str>,
) -> Vec<&'static str> {
    let mut out = Vec::new();
    if local.is_some_and(|c| c != m.cluster_id) {
        out.push("foreign");
    }
    if m.is_future(now) {
        out.push("future");
    }
    out
}

/// The continuous-backup chain of every backup that has one, verified from its segment
/// manifests (not from the segments: `verify` reads those).
pub(super) async fn chains(
    store: &crate::store::BackupStore,
    listing: &crate::store::Listing,
) -> std::collections::BTreeMap<crate::store::naming::BackupId, Result<ChainReport, String>> {
    use futures::StreamExt;
    futures::stream::iter(
        listing
            .backups
            .iter()
            .filter(|m| listing.chain_objects.contains_key(&m.id)),
    )
    .map(|m| async move {
        (
            m.id.clone(),
            crate::continuous::writer::load_chain(store, m).await,
        )
    })
    .buffered(4)
    .collect()
    .await
}

/// How far a backup's chain reaches, for `list`: the revision and when it was observed
/// (`None` without a chain, or when its chain could not be read).
fn covered_to(
    chains: &std::collections::BTreeMap<
        crate::store::naming::BackupId,
        Result<ChainReport, String>,
    >,
    m: &Manifest,
) -> Option<(i64, chrono::DateTime<chrono::Utc>)> {
    match chains.get(&m.id) {
        Some(Ok(c)) if !c.path.is_empty() => Some((c.reach_revision, c.reach_time)),
        _ => None,
    }
}

pub(super) async fn list(
    cfg: &Config,
    json: bool,
    cluster_id: Option<String>,
) -> Result<(), CommandError> {
    let store = open_store(cfg)?;
    let listing = store.list().await.map_err(failed)?;
    for (key, why) in &listing.unreadable {
        tracing::warn!(key = %printable(key), reason = %printable(why), "ignoring a manifest that cannot be read");
    }
    let chains = chains(&store, &listing).await;
    for (id, c) in &chains {
        match c {
            Err(e) => {
                tracing::warn!(id = %id, error = %printable(e), "the continuous-backup chain of this backup cannot be read");
            }
            Ok(c) if !c.problems.is_empty() => {
                tracing::warn!(id = %id, problems = c.problems.len(), "the continuous-backup chain of this backup has problems: run `etcd-backup verify` on it");
            }
            Ok(_) => {}
        }
    }
    let local = match cluster_for(cfg, cluster_id, "marking other clusters' backups").await {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("note: backups of other clusters are not marked: {e}");
            None
        }
    };
    let now = chrono::Utc::now();
    let mut out = std::io::stdout().lock();
    if json {
        let entries: Vec<serde_json::Value> = listing
            .backups
            .iter()
            .map(|m| {
                let mut v = serde_json::to_value(ListEntry::from(m)).unwrap_or_default();
                let mk = marks(m, now, local.as_deref());
                v["foreign"] = mk.contains(&"foreign").into();
                v["future"] = mk.contains(&"future").into();
                let covered = covered_to(&chains, m);
                v["covered_to_revision"] = covered.map(|c| c.0).into();
                v["covered_to_time"] = covered
                    .map(|c| c.1.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    .into();
                v
            })
            .collect();
        serde_json::to_writer_pretty(&mut out, &entries).map_err(failed)?;
        writeln!(out).map_err(failed)?;
        return Ok(());
    }
    if listing.backups.is_empty() {
        eprintln!(
            "no backups of cluster {:?} in {}",
            cfg.backup.cluster_name,
            store.url()
        );
        return Ok(());
    }
    let rows: Vec<[String; 12]> = listing
        .backups
        .iter()
        .map(|m| {
            let p = |s: &str| printable(s).into_owned();
            [
                marks(m, now, local.as_deref()).join(","),
                m.id.to_string(),
                m.time.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                m.revision.to_string(),
                covered_to(&chains, m).map_or_else(
                    || "-".to_string(),
                    |(r, t)| format!("{r} ({})", t.format("%Y-%m-%d %H:%M:%SZ")),
                ),
                human_bytes(m.size),
                human_bytes(m.stored_size),
                m.compression.to_string(),
                p(&m.etcd_version),
                p(&m.cluster_id),
                if m.member_name.is_empty() {
                    p(&m.member)
                } else {
                    format!("{} ({})", p(&m.member_name), p(&m.member))
                },
                p(&m.sha256),
            ]
        })
        .collect();
    let header = [
        "MARK",
        "ID",
        "TIME (UTC)",
        "REVISION",
        "CONTINUOUS TO",
        "SIZE",
        "STORED",
        "COMPRESSION",
        "ETCD",
        "CLUSTER ID",
        "MEMBER",
        "SHA256",
    ];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    writeln!(out, "{}", line(header.to_vec())).map_err(failed)?;
    for r in &rows {
        writeln!(out, "{}", line(r.iter().map(String::as_str).collect())).map_err(failed)?;
    }
    let count = |mark| {
        listing
            .backups
            .iter()
            .filter(|m| marks(m, now, local.as_deref()).contains(&mark))
            .count()
    };
    if count("foreign") > 0 {
        eprintln!(
            "foreign: made by another etcd cluster than {} (another cluster id under the same cluster_name): never pruned or restored as latest from here; --cluster-id selects them",
            local.as_deref().unwrap_or("?")
        );
    }
    if count("future") > 0 {
        eprintln!(
            "future: dated more than 5 minutes after now (a wrong clock, or not written by etcd-backup): never latest and never aged out; check the clocks of the nodes"
        );
    }
    Ok(())
}

pub(super) async fn verify_file(path: &std::path::Path, json: bool) -> Result<(), CommandError> {
    let p = path.to_path_buf();
    let report = tokio::task::spawn_blocking(move || {
        verify::verify_file(
            &p,
            &verify::VerifyOptions {
                check_trailer: true,
            },
        )
    })
    .await
    .map_err(failed)?
    .map_err(|e| failed(format!("{}: {e}", path.display())))?;
    if json {
        let v = serde_json::json!({
            "file": path.display().to_string(),
            "ok": true,
            "revision": report.revision,
            "hash": report.hash,
            "total_key_entries": report.total_key_entries,
            "live_keys": report.live_keys,
            "total_size": report.page_count * u64::from(report.page_size),
            "file_size": report.file_size,
            "page_size": report.page_size,
            "has_trailer": report.has_trailer,
            "consistent_index": report.consistent_index,
            "term": report.term,
            "storage_version": report.storage_version,
            "buckets": report.buckets,
        });
        println!("{}", serde_json::to_string_pretty(&v).map_err(failed)?);
    } else {
        println!("{}: OK", path.display());
        println!("  revision:           {}", report.revision);
        println!("  hash (crc32c):      {}", report.hash);
        println!("  live keys:          {}", report.live_keys);
        println!("  key entries:        {}", report.total_key_entries);
        println!(
            "  size:               {} ({} pages of {} bytes{})",
            human_bytes(report.file_size),
            report.page_count,
            report.page_size,
            if report.has_trailer {
                ", sha256 trailer verified"
            } else {
                ", no sha256 trailer"
            }
        );
        if let Some(ci) = report.consistent_index {
            println!("  consistent index:   {ci}");
        }
    }
    Ok(())
}

pub(super) async fn prune(
    cfg: &Config,
    dry_run: bool,
    json: bool,
    cluster_id: Option<String>,
) -> Result<(), CommandError> {
    let cluster = cluster_for(cfg, cluster_id, "prune").await?;
    let store = open_store(cfg)?;
    let policy =
        crate::retention::RetentionPolicy::from_config(&cfg.retention, cfg.schedule.timezone);
    let outcome = crate::retention::prune::prune(
        &store,
        &policy,
        chrono::Utc::now(),
        cfg.backup.timeout.saturating_mul(2),
        &cluster,
        dry_run,
    )
    .await
    .map_err(failed)?;
    let plan = &outcome.plan;
    if json {
        let v = serde_json::json!({
            "dry_run": dry_run,
            "cluster_id": cluster,
            "plan": plan,
            "deleted": outcome.deleted(),
            "orphans_removed": outcome.cleaned_where(false),
            "uploads_aborted": outcome.cleaned_where(true),
            "skipped": outcome.executed.as_ref().map(|e| e.skipped.iter().map(|(s, why)| serde_json::json!({"step": s, "why": why})).collect::<Vec<_>>()),
            "failed": outcome.failed(),
            "foreign_objects": plan.foreign_objects,
            "foreign_backups": plan.foreign_backups,
            "future_backups": plan.future_backups,
            "unreadable_manifests": plan.left_alone.iter().filter(|l| l.reason.starts_with("unreadable")).count(),
        });
        println!("{}", serde_json::to_string_pretty(&v).map_err(failed)?);
    } else {
        print!("{}", plan.render());
        let n_delete = plan
            .steps
            .iter()
            .filter(|s| matches!(s, crate::retention::prune::Step::DeleteBackup { .. }))
            .count();
        let verb = if dry_run { "would delete" } else { "deleted" };
        let n_done = if dry_run {
            n_delete
        } else {
            outcome.deleted().len()
        };
        println!(
            "{} backups: {verb} {n_done}, kept {}; other deletions {}: {}; deferred: {}; objects not ours (left alone): {}",
            plan.decisions.len(),
            plan.decisions.len() - n_delete,
            if dry_run { "planned" } else { "done" },
            if dry_run {
                plan.steps.len() - n_delete
            } else {
                outcome.cleaned().len()
            },
            plan.deferred.len(),
            plan.foreign_objects
        );
        if let Some(ex) = &outcome.executed {
            for (s, why) in &ex.skipped {
                println!("skipped: {s}: {why}");
            }
        }
    }
    let failed_list = outcome.failed();
    if !failed_list.is_empty() {
        return Err(failed(format!(
            "{} deletions failed (they are retried at the next prune); first: {}: {}",
            failed_list.len(),
            printable(&failed_list[0].0),
            failed_list[0].1
        )));
    }
    Ok(())
}

pub(super) async fn verify_backups(
    cfg: &Config,
    which: &Which<'_>,
    all: bool,
    json: bool,
    identity: Option<&std::path::Path>,
) -> Result<(), CommandError> {
    let identities =
        crate::codec::crypt::identities_for(cfg.encryption.identity_file.as_deref(), identity)
            .map_err(failed)?;
    let store = open_store(cfg)?;
    let listing = store.list().await.map_err(failed)?;
    let chosen: Vec<&Manifest> = if all {
        listing.backups.iter().collect()
    } else {
        vec![pick(cfg, &listing, which).await?]
    };
    crate::restore::drill::clean_stale(&cfg.backup.spool_dir);
    let tmp = tempdir_in(&cfg.backup.spool_dir)?;
    let mut results = Vec::new();
    let mut bad = 0;
    for &m in &chosen {
        let dest = tmp.join(format!("{}.db", m.id));
        let r = fetch::fetch_to_file(&store, m, &dest, None, identities.as_ref()).await;
        let _ = std::fs::remove_file(&dest);
        match r {
            Ok(rep) => {
                if !json {
                    println!(
                        "{}: OK (revision {}, {} live keys, hash {}, {})",
                        m.id,
                        rep.verify.revision,
                        rep.verify.live_keys,
                        rep.verify.hash,
                        human_bytes(m.size)
                    );
                }
                results.push(serde_json::json!({"id": m.id, "ok": true, "revision": rep.verify.revision, "hash": rep.verify.hash, "live_keys": rep.verify.live_keys}));
            }
            Err(e) => {
                bad += 1;
                if !json {
                    println!("{}: FAILED: {e}", m.id);
                }
                results.push(serde_json::json!({"id": m.id, "ok": false, "error": e.to_string()}));
            }
        }
    }
    let identities = identities.map(std::sync::Arc::new);
    for m in chosen
        .into_iter()
        .filter(|m| listing.chain_objects.contains_key(&m.id))
    {
        let r = verify_chain(&store, m, &tmp, identities.clone()).await;
        match r {
            Ok(c) => {
                if !json {
                    println!(
                        "{}: continuous backup OK: {} segments verified, revisions {}..={} (to {})",
                        m.id,
                        c.segments,
                        m.revision + 1,
                        c.reach_revision,
                        c.reach_time
                            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                    );
                }
                results.push(serde_json::json!({"id": m.id, "chain": true, "ok": true, "segments": c.segments, "covered_to_revision": c.reach_revision, "covered_to_time": c.reach_time}));
            }
            Err(e) => {
                bad += 1;
                if !json {
                    println!("{}: continuous backup FAILED: {e}", m.id);
                }
                results
                    .push(serde_json::json!({"id": m.id, "chain": true, "ok": false, "error": e}));
            }
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&results).map_err(failed)?
        );
    }
    if bad > 0 {
        return Err(failed(format!(
            "{bad} of {} backups failed verification",
            results.len()
        )));
    }
    Ok(())
}

/// What a verified chain covers.
struct VerifiedChain {
    segments: usize,
    reach_revision: i64,
    reach_time: chrono::DateTime<chrono::Utc>,
}

/// Verifies the continuous-backup chain based on `m`: the hash chain of its segment
/// manifests, then every segment on it, downloaded and read through.
async fn verify_chain(
    store: &crate::store::BackupStore,
    m: &Manifest,
    scratch: &std::path::Path,
    identities: Option<std::sync::Arc<crate::codec::crypt::Identities>>,
) -> Result<VerifiedChain, String> {
    let c = crate::continuous::writer::load_chain(store, m).await?;
    if let Some(p) = c.problems.first() {
        return Err(format!(
            "{p}{}",
            if c.problems.len() > 1 {
                format!(" (and {} more problems)", c.problems.len() - 1)
            } else {
                String::new()
            }
        ));
    }
    for s in &c.path {
        crate::continuous::replay::check_segment(store, s, scratch, identities.clone()).await?;
    }
    Ok(VerifiedChain {
        segments: c.path.len(),
        reach_revision: c.reach_revision,
        reach_time: c.reach_time,
    })
}

/// A private scratch directory under the spool directory.
pub(super) fn tempdir_in(spool: &std::path::Path) -> Result<std::path::PathBuf, CommandError> {
    let dir = spool.join(format!("verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        failed(format!(
            "cannot create {}: {e}; check backup.spool_dir",
            dir.display()
        ))
    })?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_json_uses_the_stable_field_names() {
        let m = crate::store::manifest::sample("20260102T030405Z-0a1b2c", chrono::Utc::now());
        let v = serde_json::to_value(ListEntry::from(&m)).unwrap();
        for k in [
            "id",
            "time",
            "revision",
            "size",
            "stored_size",
            "sha256",
            "compression",
            "etcd_version",
            "cluster_id",
            "member",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
        assert_eq!(v["compression"], "zstd");
        assert_eq!(v["revision"], 42);
    }
}
