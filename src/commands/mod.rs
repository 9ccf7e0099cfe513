//! The subcommands: load what they need, call the library, print the result.

pub mod cli;

use crate::backup::spool;
use crate::backup::{self, CycleInput};
use crate::commands::cli::{Command, ConfigArg};
use crate::config::{Config, ConfigError};
use crate::store::manifest::{printable, Manifest};
use crate::store::BackupStore;
use crate::units::human_bytes;
use crate::{daemon, restore as fetch, verify};
use serde::Serialize;
use std::io::Write;
use tokio_util::sync::CancellationToken;

/// How a command failed; decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// Bad configuration or usage: exit code 2.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Anything else: exit code 1.
    #[error("{0}")]
    Failed(String),
}

impl CommandError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CommandError::Config(_) => 2,
            CommandError::Failed(_) => 1,
        }
    }
}

fn failed(e: impl std::fmt::Display) -> CommandError {
    CommandError::Failed(e.to_string())
}

/// Runs a parsed command.
///
/// # Errors
/// [`CommandError`] with a message for the operator.
pub async fn dispatch(cmd: Command) -> Result<(), CommandError> {
    match cmd {
        Command::Run(ConfigArg { config }) => {
            let cfg = Config::load(&config)?;
            daemon::run(cfg).await.map_err(failed)
        }
        Command::Snapshot { config, endpoint } => {
            let cfg = Config::load(&config.config)?;
            snapshot(&cfg, endpoint.as_deref()).await
        }
        Command::Status { config, json } => {
            let cfg = Config::load(&config.config)?;
            status(&cfg, json).await
        }
        Command::List {
            config,
            json,
            cluster_id,
        } => {
            let cfg = Config::load(&config.config)?;
            list(&cfg, json, cluster_id).await
        }
        Command::Verify {
            config,
            backup,
            all,
            file,
            identity,
            json,
            cluster_id,
        } => match file {
            Some(file) => verify_file(&file, json).await,
            None => {
                let cfg = Config::load(&config)?;
                let which = Which {
                    backup: &backup,
                    cluster_id,
                };
                verify_backups(&cfg, &which, all, json, identity.as_deref()).await
            }
        },
        Command::Restore {
            config,
            backup,
            output,
            identity,
            data_dir,
            name,
            peer_url,
            initial_cluster,
            cluster_id,
            no_bump,
            bump_revision,
            to_revision,
            to_time,
        } => {
            let cfg = Config::load(&config.config)?;
            if to_revision.is_some() || to_time.is_some() {
                return restore_point_in_time(
                    &cfg,
                    &backup,
                    cluster_id,
                    (to_revision, to_time.as_deref()),
                    &output,
                    identity.as_deref(),
                )
                .await;
            }
            let member = data_dir.map(|dir| {
                let name = name.unwrap_or_else(crate::config::hostname);
                let peer = peer_url.unwrap_or_default();
                let cluster = initial_cluster.unwrap_or_else(|| format!("{name}={peer}"));
                RestoreMember {
                    dir,
                    name,
                    peer,
                    cluster,
                }
            });
            let bump = match (no_bump, bump_revision) {
                (true, _) => BumpChoice::Off,
                (false, Some(n)) => BumpChoice::Exactly(n),
                (false, None) => BumpChoice::Auto,
            };
            let which = Which {
                backup: &backup,
                cluster_id,
            };
            restore(&cfg, &which, &output, member, identity.as_deref(), bump).await
        }
        Command::Prune {
            config,
            dry_run,
            json,
            cluster_id,
        } => {
            let cfg = Config::load(&config.config)?;
            prune(&cfg, dry_run, json, cluster_id).await
        }
        Command::Keygen { output } => {
            let recipient = crate::codec::crypt::keygen(&output).map_err(failed)?;
            println!("{recipient}");
            eprintln!(
                "wrote the identity (secret key) to {}; put the public key above into [encryption] recipients and keep the file safe: without it encrypted backups cannot be restored",
                output.display()
            );
            Ok(())
        }
        Command::Drill { config, identity } => {
            let cfg = Config::load(&config.config)?;
            let store = open_store(&cfg)?;
            let rep = crate::restore::drill::run(&cfg, &store, identity.as_deref())
                .await
                .map_err(|e| failed(format!("restore drill failed: {e}")))?;
            if let Some(w) = &rep.warning {
                eprintln!("warning: {w}");
            }
            match (&rep.served_keys, &rep.not_restored) {
                (Some(keys), _) => println!(
                    "restore drill passed: backup {} restored into a throwaway etcd serving revision {} and {keys} keys, as its manifest says ({}; {:.1} s)",
                    rep.id,
                    rep.served_revision.unwrap_or(rep.revision),
                    match rep.bump {
                        Some(b) => format!("revision {} bumped by {b} with --bump-revision --mark-compacted, as `restore` does", rep.revision),
                        None => "restored without --bump-revision: the etcdutl found has no such flag".to_string(),
                    },
                    rep.duration.as_secs_f64()
                ),
                (None, Some(why)) => println!(
                    "restore drill passed partly: backup {} downloaded and verified; {why}",
                    rep.id
                ),
                (None, None) => println!("restore drill passed: backup {}", rep.id),
            }
            Ok(())
        }
        Command::GenDocs { out } => gen_docs(&out).map_err(failed),
        Command::CheckConfig(ConfigArg { config }) => {
            let cfg = Config::load(&config)?;
            print!("{}", cfg.to_redacted_toml());
            if let Some(w) = crate::config::permission_warning(&config) {
                eprintln!("warning: {w}");
            }
            eprintln!("{}: configuration is valid", config.display());
            Ok(())
        }
    }
}

/// Opens the configured store.
///
/// # Errors
/// When the store cannot be set up.
pub fn open_store(cfg: &Config) -> Result<BackupStore, CommandError> {
    BackupStore::open(&cfg.storage, &cfg.backup.cluster_name).map_err(failed)
}

async fn snapshot(cfg: &Config, endpoint: Option<&str>) -> Result<(), CommandError> {
    let store = open_store(cfg)?;
    spool::clean_stale(&cfg.backup.spool_dir);
    let endpoint = endpoint.unwrap_or(&cfg.etcd.endpoints[0]).to_string();
    let cancel = CancellationToken::new();
    let ctrl_c = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if daemon::shutdown_signal().await.is_ok() {
                tracing::warn!("interrupted: aborting the backup");
                cancel.cancel();
            }
        })
    };
    let progress = crate::progress::Progress::new("snapshot");
    let r = backup::run(CycleInput {
        config: cfg,
        store: &store,
        source: &crate::backup::source::EtcdSource::new(&cfg.etcd, &endpoint),
        cancel: &cancel,
        heartbeat: None,
        progress: Some(&progress),
        term: None,
        slot: None,
    })
    .await;
    progress.finish();
    ctrl_c.abort();
    let report = r.map_err(failed)?;
    let m = &report.manifest;
    tracing::info!(
        id = %m.id,
        revision = m.revision,
        size = m.size,
        stored_size = m.stored_size,
        "backup committed"
    );
    println!("{}", m.id);
    Ok(())
}

/// The fields `list --json` prints; their names are stable.
#[derive(Serialize)]
struct ListEntry<'a> {
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

/// The leader as seen through the first endpoint that answers.
async fn find_leader(cfg: &Config) -> Result<Option<crate::etcd::election::LeaderView>, String> {
    let name = cfg.election.election_name(&cfg.backup.cluster_name);
    let mut errors = Vec::new();
    for endpoint in &cfg.etcd.endpoints {
        let r = async {
            let m = crate::etcd::Member::connect(&cfg.etcd, endpoint).await?;
            crate::etcd::election::current_leader(&m, &name).await
        }
        .await;
        match r {
            Ok(v) => return Ok(v),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(errors.join("; "))
}

fn ago(t: chrono::DateTime<chrono::Utc>) -> String {
    let secs = (chrono::Utc::now() - t).num_seconds().max(0);
    let secs = u64::try_from(secs).unwrap_or(0);
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

async fn status(cfg: &Config, json: bool) -> Result<(), CommandError> {
    let leader = if cfg.election.enabled {
        Some(find_leader(cfg).await)
    } else {
        None
    };
    let store = open_store(cfg)?;
    let local = crate::etcd::local_cluster_id(&cfg.etcd).await.ok();
    let newest = store
        .newest(chrono::Utc::now(), local.as_deref())
        .await
        .map_err(|e| e.to_string());
    if json {
        let v = serde_json::json!({
            "election": {
                "enabled": cfg.election.enabled,
                "name": cfg.election.election_name(&cfg.backup.cluster_name),
                "leader": match &leader {
                    Some(Ok(Some(l))) => serde_json::json!({
                        "node": l.info.node,
                        "since": l.info.since,
                        "pid": l.info.pid,
                        "fencing_token": l.token,
                    }),
                    _ => serde_json::Value::Null,
                },
                "error": match &leader {
                    Some(Err(e)) => serde_json::Value::String(e.clone()),
                    _ => serde_json::Value::Null,
                },
            },
            "backups": match &newest {
                Ok((count, m)) => serde_json::json!({
                    "count": count,
                    "newest": m.as_ref().map(ListEntry::from),
                }),
                Err(e) => serde_json::json!({ "error": e }),
            },
        });
        println!("{}", serde_json::to_string_pretty(&v).map_err(failed)?);
    } else {
        match &leader {
            None => println!("leader:        none elected ([election] enabled = false: every daemon with this configuration takes backups)"),
            Some(Ok(Some(l))) => match l.info.since {
                Some(since) => println!(
                    "leader:        {} (since {}, {} ago; fencing token {})",
                    l.info.node,
                    since.format("%Y-%m-%d %H:%M:%SZ"),
                    ago(since),
                    l.token
                ),
                None => println!("leader:        {} (fencing token {})", l.info.node, l.token),
            },
            Some(Ok(None)) => println!(
                "leader:        none: no daemon holds the election {:?}; check that etcd-backup runs on the control-plane nodes",
                cfg.election.election_name(&cfg.backup.cluster_name)
            ),
            Some(Err(e)) => println!("leader:        unknown: {e}"),
        }
        match &newest {
            Ok((count, Some(m))) => {
                println!(
                    "newest backup: {} (revision {}, finished {}, {} ago, by {})",
                    m.id,
                    m.revision,
                    m.finished_at.format("%Y-%m-%d %H:%M:%SZ"),
                    ago(m.finished_at),
                    printable(&m.node)
                );
                println!("backups:       {count} in {}", store.url());
            }
            Ok((_, None)) => println!("newest backup: none in {}", store.url()),
            Err(e) => println!("newest backup: unknown: {e}"),
        }
    }
    match (&leader, &newest) {
        (Some(Err(e)), _) => Err(failed(format!("cannot read the election from etcd: {e}"))),
        (_, Err(e)) => Err(failed(format!("cannot list the store: {e}"))),
        _ => Ok(()),
    }
}

/// The cluster whose backups a command acts on: `--cluster-id`, else the local member's.
///
/// # Errors
/// When etcd cannot be reached and no `--cluster-id` was given: the message says so and
/// what to pass.
async fn cluster_for(
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

/// `restore --to-revision/--to-time`: replays the continuous-backup segments after the
/// newest snapshot at or before the target and writes a verified snapshot at it.
async fn restore_point_in_time(
    cfg: &Config,
    backup: &str,
    cluster_id: Option<String>,
    (to_revision, to_time): (Option<i64>, Option<&str>),
    output: &std::path::Path,
    identity: Option<&std::path::Path>,
) -> Result<(), CommandError> {
    use crate::continuous::replay;
    if backup != "latest" {
        return Err(failed(
            "--to-revision and --to-time pick the snapshot themselves: leave out the backup id",
        ));
    }
    let target = replay::target(to_revision, to_time).map_err(failed)?;
    let store = open_store(cfg)?;
    let cluster = cluster_for(cfg, cluster_id, "a point-in-time restore").await?;
    let rep = replay::restore_to(cfg, &store, &cluster, target, output, identity)
        .await
        .map_err(|e| failed(format!("point-in-time restore failed: {e}")))?;
    println!(
        "restored revision {} into {} ({} bytes, {} live keys): snapshot {} at revision {} plus {} revisions from {} segments{}, in {:.1}s",
        rep.revision,
        output.display(),
        rep.size,
        rep.live_keys,
        rep.base,
        rep.base_revision,
        rep.replayed,
        rep.segments,
        rep.observed_at
            .map(|t| format!(" (last observed {})", t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
            .unwrap_or_default(),
        rep.duration.as_secs_f64()
    );
    println!(
        "next: etcdutl snapshot restore {} --bump-revision ... --mark-compacted (see the README's restore runbook)",
        output.display()
    );
    Ok(())
}

/// Which backup a command was asked for.
struct Which<'a> {
    /// An id, or `latest`.
    backup: &'a str,
    /// `--cluster-id`.
    cluster_id: Option<String>,
}

/// Picks the backup `which` names: an explicit id always (any cluster, any date);
/// `latest` only among the selected cluster's backups not dated in the future.
async fn pick<'l>(
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
fn marks(
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

async fn list(cfg: &Config, json: bool, cluster_id: Option<String>) -> Result<(), CommandError> {
    let store = open_store(cfg)?;
    let listing = store.list().await.map_err(failed)?;
    for (key, why) in &listing.unreadable {
        tracing::warn!(key = %printable(key), reason = %printable(why), "ignoring a manifest that cannot be read");
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
    let rows: Vec<[String; 11]> = listing
        .backups
        .iter()
        .map(|m| {
            let p = |s: &str| printable(s).into_owned();
            [
                marks(m, now, local.as_deref()).join(","),
                m.id.to_string(),
                m.time.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                m.revision.to_string(),
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

async fn verify_file(path: &std::path::Path, json: bool) -> Result<(), CommandError> {
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

async fn prune(
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

async fn verify_backups(
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
    for m in chosen {
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

/// A private scratch directory under the spool directory.
fn tempdir_in(spool: &std::path::Path) -> Result<std::path::PathBuf, CommandError> {
    let dir = spool.join(format!("verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        failed(format!(
            "cannot create {}: {e}; check backup.spool_dir",
            dir.display()
        ))
    })?;
    Ok(dir)
}

/// What `restore --data-dir` restores into.
struct RestoreMember {
    dir: std::path::PathBuf,
    name: String,
    peer: String,
    cluster: String,
}

/// `--no-bump`, `--bump-revision N`, or neither.
#[derive(Debug, Clone, Copy)]
enum BumpChoice {
    Off,
    Exactly(u64),
    Auto,
}

async fn restore(
    cfg: &Config,
    which: &Which<'_>,
    output: &std::path::Path,
    member: Option<RestoreMember>,
    identity: Option<&std::path::Path>,
    bump: BumpChoice,
) -> Result<(), CommandError> {
    use crate::restore::etcdutl::{self, RestoreArgs};
    use crate::restore::runbook::{self, BumpPlan, EtcdctlTls, RunbookInput};
    let identities =
        crate::codec::crypt::identities_for(cfg.encryption.identity_file.as_deref(), identity)
            .map_err(failed)?;
    if let Some(RestoreMember { dir: d, .. }) = &member {
        if d.exists() {
            return Err(failed(format!(
                "{}: already exists; restore never overwrites a data directory",
                d.display()
            )));
        }
    }
    // Which etcdutl runs `--data-dir` (and what it supports) decides the printed flags too.
    let tool = match etcdutl::find(None, "etcdutl") {
        Some(p) => match etcdutl::probe(&p).await {
            Ok(t) => Some(t),
            Err(e) if member.is_some() => return Err(failed(e)),
            Err(e) => {
                eprintln!("warning: {e}; the printed commands assume etcdutl 3.5.10 or later");
                None
            }
        },
        None => None,
    };
    if member.is_some() && tool.is_none() {
        return Err(failed(
            "--data-dir needs etcdutl on PATH (it ships with etcd 3.5+; 3.5.10 or later restores with --bump-revision); install it, or leave out --data-dir and follow the printed steps",
        ));
    }
    let store = open_store(cfg)?;
    let listing = store.list().await.map_err(failed)?;
    let m = pick(cfg, &listing, which).await?;
    let progress = crate::progress::Progress::new("download");
    let rep = fetch::fetch_to_file(&store, m, output, Some(&progress), identities.as_ref()).await;
    progress.finish();
    let rep = rep.map_err(failed)?;
    let out = std::path::absolute(output).unwrap_or_else(|_| output.to_path_buf());
    println!(
        "restored backup {} (revision {}, {} live keys, taken {}) to {}; sha256 and snapshot structure verified",
        m.id,
        rep.verify.revision,
        rep.verify.live_keys,
        m.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        out.display()
    );
    let amount = match bump {
        BumpChoice::Off => None,
        BumpChoice::Exactly(n) => Some(n),
        BumpChoice::Auto => Some(etcdutl::choose_bump(
            m,
            &listing.backups,
            chrono::Utc::now(),
        )),
    };
    let plan = match (amount, &tool) {
        (None, _) => BumpPlan::Off,
        (Some(n), Some(t)) if !t.supports_bump => {
            eprintln!("warning: {}", t.upgrade_warning());
            BumpPlan::Commented(n)
        }
        (Some(n), _) => BumpPlan::Use(n),
    };
    let tls = cfg
        .etcd
        .tls
        .as_ref()
        .and_then(|t| {
            Some(EtcdctlTls {
                ca: t.ca_file.display().to_string(),
                cert: t.cert_file.as_ref()?.display().to_string(),
                key: t.key_file.as_ref()?.display().to_string(),
            })
        })
        .unwrap_or_default();
    let snapshot = out.display().to_string();
    println!();
    print!(
        "{}",
        runbook::render(&RunbookInput {
            backup: m,
            snapshot: &snapshot,
            endpoints: &cfg.etcd.endpoints,
            tls,
            bump: plan,
        })
    );
    if let (
        Some(RestoreMember {
            dir: d,
            name,
            peer,
            cluster,
        }),
        Some(tool),
    ) = (&member, &tool)
    {
        let token = etcdutl::cluster_token(&m.id);
        let used = match plan {
            BumpPlan::Use(n) => Some(n),
            _ => None,
        };
        let args = RestoreArgs {
            snapshot: &out,
            data_dir: d,
            name,
            peer_url: peer,
            initial_cluster: cluster,
            cluster_token: &token,
            bump: used,
        };
        println!();
        println!(
            "Running: {} {}{}",
            tool.path.display(),
            args.to_args()
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            match plan {
                BumpPlan::Commented(n) => format!(
                    "  # --bump-revision {n} --mark-compacted (this etcdutl has no such flags)"
                ),
                _ => String::new(),
            }
        );
        etcdutl::run(&tool.path, &args).await.map_err(failed)?;
        println!(
            "etcdutl restored member {name:?} into {}{}",
            d.display(),
            match (used, plan) {
                (Some(n), _) => format!(" with --bump-revision {n} --mark-compacted"),
                (None, BumpPlan::Commented(_)) =>
                    " WITHOUT --bump-revision (etcdutl too old: see the warning)".to_string(),
                (None, _) => " without --bump-revision (--no-bump)".to_string(),
            }
        );
    }
    Ok(())
}

/// Writes `man/etcd-backup.1`, one page per subcommand, and bash/zsh/fish completions.
fn gen_docs(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    let cmd = cli::Cli::command();
    let man = out.join("man");
    let comp = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    clap_mangen::generate_to(cmd.clone(), &man)?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "etcd-backup", &comp)?;
    }
    eprintln!(
        "wrote man pages to {} and completions to {}",
        man.display(),
        comp.display()
    );
    Ok(())
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
