//! The subcommands: load what they need, call the library, print the result.

pub mod cli;

use crate::backup::spool;
use crate::backup::{self, CycleInput};
use crate::commands::cli::{Command, ConfigArg};
use crate::config::{Config, ConfigError};
use crate::store::manifest::Manifest;
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
        Command::List { config, json } => {
            let cfg = Config::load(&config.config)?;
            list(&cfg, json).await
        }
        Command::Verify {
            config,
            backup,
            all,
            file,
            identity,
            json,
        } => match file {
            Some(file) => verify_file(&file, json).await,
            None => {
                let cfg = Config::load(&config)?;
                verify_backups(&cfg, &backup, all, json, identity.as_deref()).await
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
        } => {
            let cfg = Config::load(&config.config)?;
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
            restore(&cfg, &backup, &output, member, identity.as_deref()).await
        }
        Command::Prune {
            config,
            dry_run,
            json,
        } => {
            let cfg = Config::load(&config.config)?;
            prune(&cfg, dry_run, json).await
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
            match (&rep.served_keys, &rep.not_restored) {
                (Some(keys), _) => println!(
                    "restore drill passed: backup {} restored into a throwaway etcd serving revision {} and {keys} keys, as its manifest says ({:.1} s)",
                    rep.id,
                    rep.revision,
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
        Command::Defrag { config, dry_run } => {
            let cfg = Config::load(&config.config)?;
            defrag(&cfg, dry_run).await
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
            if crate::daemon::shutdown_signal().await.is_ok() {
                tracing::warn!("interrupted: aborting the backup");
                cancel.cancel();
            }
        })
    };
    // Never while this host's daemon defragments the member (waits for it).
    let member_gate = crate::defrag::gate::MemberGate::in_spool_dir(&cfg.backup.spool_dir)
        .for_snapshot(&cancel, || {})
        .await;
    let progress = crate::progress::Progress::new("snapshot");
    let r = backup::run(CycleInput {
        config: cfg,
        store: &store,
        endpoint: &endpoint,
        cancel: &cancel,
        heartbeat: None,
        progress: Some(&progress),
        term: None,
        slot: None,
    })
    .await;
    drop(member_gate);
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

/// `defrag`: one attempt on the local member, sizes before and after.
async fn defrag(cfg: &Config, dry_run: bool) -> Result<(), CommandError> {
    use crate::defrag::{free_space, Outcome};
    let gate = crate::defrag::gate::MemberGate::in_spool_dir(&cfg.backup.spool_dir);
    let cancel = CancellationToken::new();
    let ctrl_c = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if crate::daemon::shutdown_signal().await.is_ok() {
                cancel.cancel();
            }
        })
    };
    let r = crate::defrag::run(crate::defrag::DefragInput {
        config: cfg,
        endpoint: &cfg.etcd.endpoints[0],
        dry_run,
        gate: &gate,
        leader_waits: false,
        cancel: &cancel,
    })
    .await;
    ctrl_c.abort();
    let rep = r.map_err(|e| failed(format!("defragmentation failed: {e}")))?;
    let sizes = |h: &crate::etcd::defrag::MemberHealth| {
        let (free, ratio) = free_space(h);
        format!(
            "db_size {} ({} in use, {} free, {:.0} %)",
            human_bytes(u64::try_from(h.db_size).unwrap_or(0)),
            human_bytes(u64::try_from(h.db_size_in_use).unwrap_or(0)),
            human_bytes(free),
            ratio * 100.0
        )
    };
    println!("member {}: before: {}", rep.member, sizes(&rep.before));
    match &rep.outcome {
        Outcome::Skipped(why) => println!("not defragmented: {why}"),
        Outcome::WouldDefragment { hand_over_to } => match hand_over_to {
            Some(to) => {
                println!("dry run: would hand the raft leadership to {to}, then defragment")
            }
            None => println!("dry run: would defragment"),
        },
        Outcome::Defragmented {
            after,
            handed_over_to,
            took,
        } => {
            if let Some(to) = handed_over_to {
                println!("handed the raft leadership to {to} first");
            }
            println!(
                "defragmented in {:.1} s: after: {}; {} reclaimed",
                took.as_secs_f64(),
                sizes(after),
                human_bytes(rep.reclaimed())
            );
        }
    }
    Ok(())
}

/// The fields `list --json` prints; their names are stable.
#[derive(Serialize)]
struct ListEntry<'a> {
    id: &'a str,
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
    let newest = store.newest().await.map_err(|e| e.to_string());
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
                    m.node
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

async fn list(cfg: &Config, json: bool) -> Result<(), CommandError> {
    let store = open_store(cfg)?;
    let listing = store.list().await.map_err(failed)?;
    for (key, why) in &listing.unreadable {
        tracing::warn!(key = %key, reason = %why, "ignoring a manifest that cannot be read");
    }
    let mut out = std::io::stdout().lock();
    if json {
        let entries: Vec<ListEntry> = listing.backups.iter().map(ListEntry::from).collect();
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
    let rows: Vec<[String; 10]> = listing
        .backups
        .iter()
        .map(|m| {
            [
                m.id.clone(),
                m.time.format("%Y-%m-%d %H:%M:%SZ").to_string(),
                m.revision.to_string(),
                human_bytes(m.size),
                human_bytes(m.stored_size),
                m.compression.to_string(),
                m.etcd_version.clone(),
                m.cluster_id.clone(),
                if m.member_name.is_empty() {
                    m.member.clone()
                } else {
                    format!("{} ({})", m.member_name, m.member)
                },
                m.sha256.clone(),
            ]
        })
        .collect();
    let header = [
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

async fn prune(cfg: &Config, dry_run: bool, json: bool) -> Result<(), CommandError> {
    let store = open_store(cfg)?;
    let policy =
        crate::retention::RetentionPolicy::from_config(&cfg.retention, cfg.schedule.timezone);
    let outcome = crate::retention::prune::prune(
        &store,
        &policy,
        chrono::Utc::now(),
        cfg.backup.timeout * 2,
        dry_run,
    )
    .await
    .map_err(failed)?;
    if json {
        let v = serde_json::json!({
            "dry_run": dry_run,
            "plan": outcome.plan,
            "deleted": outcome.deleted,
            "orphans_removed": outcome.orphans_removed,
            "uploads_aborted": outcome.uploads_aborted,
            "failed": outcome.failed,
            "foreign_objects": outcome.foreign,
            "unreadable_manifests": outcome.unreadable,
        });
        println!("{}", serde_json::to_string_pretty(&v).map_err(failed)?);
    } else {
        for d in &outcome.plan.decisions {
            println!(
                "{}  {}  {}",
                d.id,
                d.time.format("%Y-%m-%d %H:%M:%SZ"),
                d.action
            );
        }
        let verb = if dry_run { "would delete" } else { "deleted" };
        let n_delete = outcome.plan.to_delete().count();
        println!(
            "{} backups: {verb} {}, kept {}; orphaned data objects {}: {}; stale incomplete uploads aborted: {}; objects not ours (left alone): {}",
            outcome.plan.decisions.len(),
            if dry_run { n_delete } else { outcome.deleted.len() },
            outcome.plan.decisions.len() - n_delete,
            if dry_run { "to remove" } else { "removed" },
            outcome.orphans_removed.len(),
            outcome.uploads_aborted.len(),
            outcome.foreign
        );
    }
    if !outcome.failed.is_empty() {
        return Err(failed(format!(
            "{} deletions failed (they are retried at the next prune); first: {}: {}",
            outcome.failed.len(),
            outcome.failed[0].0,
            outcome.failed[0].1
        )));
    }
    Ok(())
}

async fn verify_backups(
    cfg: &Config,
    which: &str,
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
        vec![fetch::select(&listing, which).map_err(failed)?]
    };
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

async fn restore(
    cfg: &Config,
    which: &str,
    output: &std::path::Path,
    member: Option<RestoreMember>,
    identity: Option<&std::path::Path>,
) -> Result<(), CommandError> {
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
    let store = open_store(cfg)?;
    let listing = store.list().await.map_err(failed)?;
    let m = fetch::select(&listing, which).map_err(failed)?;
    let progress = crate::progress::Progress::new("download");
    let rep = fetch::fetch_to_file(&store, m, output, Some(&progress), identities.as_ref()).await;
    progress.finish();
    let rep = rep.map_err(failed)?;
    let out = output.display();
    println!(
        "restored backup {} (revision {}, {} live keys, taken {}) to {out}; sha256 and snapshot structure verified",
        m.id,
        rep.verify.revision,
        rep.verify.live_keys,
        m.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    println!();
    println!("To restore a single-member cluster (on the node, with etcd stopped):");
    println!("  etcdutl snapshot restore {out} \\\n    --name NODE --data-dir /var/lib/etcd-restored \\\n    --initial-cluster NODE=https://NODE_IP:2380 \\\n    --initial-advertise-peer-urls https://NODE_IP:2380");
    println!();
    println!("To restore a 3-member cluster, run on each member i (1..3) with the same file:");
    println!("  etcdutl snapshot restore {out} \\\n    --name NODE_i --data-dir /var/lib/etcd-restored \\\n    --initial-cluster NODE_1=https://IP_1:2380,NODE_2=https://IP_2:2380,NODE_3=https://IP_3:2380 \\\n    --initial-cluster-token etcd-cluster-restored \\\n    --initial-advertise-peer-urls https://IP_i:2380");
    if let Some(RestoreMember {
        dir: d,
        name,
        peer,
        cluster,
    }) = &member
    {
        let status = tokio::process::Command::new("etcdutl")
            .arg("snapshot")
            .arg("restore")
            .arg(output)
            .arg("--data-dir")
            .arg(d)
            .args(["--name", name])
            .args(["--initial-cluster", cluster])
            .args(["--initial-advertise-peer-urls", peer])
            .status()
            .await
            .map_err(|e| {
                failed(format!(
                    "cannot run etcdutl: {e}; install etcdutl (it ships with etcd 3.5+) or restore by hand with the commands above"
                ))
            })?;
        if !status.success() {
            return Err(failed(format!(
                "etcdutl snapshot restore failed ({status})"
            )));
        }
        println!();
        println!("etcdutl restored member {name:?} into {}", d.display());
    }
    Ok(())
}

/// Writes `man/etcd-backup.1`, one page per subcommand, and bash/zsh/fish completions.
fn gen_docs(out: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    let cmd = crate::commands::cli::Cli::command();
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
