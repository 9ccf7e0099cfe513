//! `restore` and `drill`: getting a backup back.

use super::backups::{pick, Which};
use super::{failed, open_store, CommandError};
use crate::config::Config;
use crate::restore as fetch;
use crate::store::manifest::Manifest;

/// What `restore --data-dir` restores into.
pub(super) struct RestoreMember {
    dir: std::path::PathBuf,
    name: String,
    peer: String,
    cluster: String,
}

impl RestoreMember {
    /// From `--data-dir`, `--name` (default: the host name), `--peer-url` and
    /// `--initial-cluster` (default: this member alone).
    pub(super) fn new(
        dir: std::path::PathBuf,
        name: Option<String>,
        peer_url: Option<String>,
        initial_cluster: Option<String>,
    ) -> RestoreMember {
        let name = name.unwrap_or_else(crate::config::hostname);
        let peer = peer_url.unwrap_or_default();
        let cluster = initial_cluster.unwrap_or_else(|| format!("{name}={peer}"));
        RestoreMember {
            dir,
            name,
            peer,
            cluster,
        }
    }
}

/// `--no-bump`, `--bump-revision N`, or neither.
#[derive(Debug, Clone, Copy)]
pub(super) enum BumpChoice {
    Off,
    Exactly(u64),
    Auto,
}

impl BumpChoice {
    /// From `--no-bump` and `--bump-revision N`.
    pub(super) fn from_flags(no_bump: bool, bump_revision: Option<u64>) -> BumpChoice {
        match (no_bump, bump_revision) {
            (true, _) => BumpChoice::Off,
            (false, Some(n)) => BumpChoice::Exactly(n),
            (false, None) => BumpChoice::Auto,
        }
    }
}

pub(super) async fn restore(
    cfg: &Config,
    which: &Which<'_>,
    output: &std::path::Path,
    member: Option<RestoreMember>,
    identity: Option<&std::path::Path>,
    bump: BumpChoice,
    snapshot_only: bool,
) -> Result<(), CommandError> {
    use crate::restore::runbook::{self, RunbookInput};
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
    let tool = find_etcdutl(member.is_some()).await?;
    let store = open_store(cfg)?;
    let listing = store.list().await.map_err(failed)?;
    // `latest` is the newest committed revision: with continuous backup, past the newest
    // snapshot. The cluster is learned once, for both.
    let cluster = if which.backup == "latest" {
        Some(super::backups::cluster_for(cfg, which.cluster_id.clone(), "`latest`").await?)
    } else {
        None
    };
    let which = Which {
        backup: which.backup,
        cluster_id: cluster.clone().or_else(|| which.cluster_id.clone()),
    };
    let m = pick(cfg, &listing, &which).await?;
    let out = std::path::absolute(output).unwrap_or_else(|_| output.to_path_buf());
    let chained = cluster.as_deref().filter(|c| {
        !snapshot_only
            && listing
                .backups
                .iter()
                .any(|b| b.cluster_id == *c && listing.chain_objects.contains_key(&b.id))
    });
    let replayed = match chained {
        Some(c) => latest_point(cfg, &store, &listing, c, m, output, identity).await?,
        None => None,
    };
    let m = if let Some(m) = &replayed {
        m
    } else {
        let progress = crate::progress::Progress::new("download");
        let rep =
            fetch::fetch_to_file(&store, m, output, Some(&progress), identities.as_ref()).await;
        progress.finish();
        let rep = rep.map_err(failed)?;
        println!(
            "restored backup {} (revision {}, {} live keys, taken {}) to {}; sha256 and snapshot structure verified",
            m.id,
            rep.verify.revision,
            rep.verify.live_keys,
            m.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            out.display()
        );
        m
    };
    let plan = bump_plan(bump, m, &listing.backups, tool.as_ref());
    let snapshot = out.display().to_string();
    println!();
    print!(
        "{}",
        runbook::render(&RunbookInput {
            backup: m,
            snapshot: &snapshot,
            endpoints: &cfg.etcd.endpoints,
            tls: etcdctl_tls(cfg),
            bump: plan,
        })
    );
    if let (Some(member), Some(tool)) = (&member, &tool) {
        run_etcdutl(tool, member, m, &out, plan).await?;
    }
    Ok(())
}

/// `restore latest` with continuous backup: when a chain reaches past the newest snapshot
/// `newest`, replays it to its newest committed revision into `output` and returns the
/// base snapshot's manifest at that revision (for the runbook); `None` when no segment
/// reaches past the snapshot.
async fn latest_point(
    cfg: &Config,
    store: &crate::store::BackupStore,
    listing: &crate::store::Listing,
    cluster: &str,
    newest: &Manifest,
    output: &std::path::Path,
    identity: Option<&std::path::Path>,
) -> Result<Option<Manifest>, CommandError> {
    use crate::continuous::chain::{Stop, Target};
    use crate::continuous::replay;
    let plan = replay::plan(store, listing, cluster, Target::Latest)
        .await
        .map_err(|e| failed(format!("reading the continuous-backup chains failed: {e}; `restore latest --snapshot-only` restores snapshot {} alone (revision {})", newest.id, newest.revision)))?;
    let reach = match plan.stop {
        Stop::AtRevision(r) => r,
        Stop::AtTime(_) => plan.segments.last().map_or(0, |s| s.last_revision),
    };
    if plan.segments.is_empty() || reach <= newest.revision {
        return Ok(None);
    }
    let rep = replay::restore_plan(cfg, store, listing, &plan, output, identity)
        .await
        .map_err(|e| {
            failed(format!(
                "restoring the newest committed revision {reach} (a snapshot plus continuous-backup segments) failed: {e}; `restore latest --snapshot-only` restores snapshot {} alone (revision {})",
                newest.id, newest.revision
            ))
        })?;
    let out = std::path::absolute(output).unwrap_or_else(|_| output.to_path_buf());
    println!(
        "restored the newest committed revision {} (last observed {}) to {}: snapshot {} at revision {} plus {} revisions from {} continuous-backup segments, in {:.1}s; sha256, hash chain and snapshot structure verified",
        rep.revision,
        rep.observed_at.map_or_else(|| "-".into(), |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        out.display(),
        rep.base,
        rep.base_revision,
        rep.replayed,
        rep.segments,
        rep.duration.as_secs_f64()
    );
    println!(
        "(`--snapshot-only` restores snapshot {} alone, at revision {})",
        newest.id, newest.revision
    );
    let mut base = listing
        .backups
        .iter()
        .find(|b| b.id.to_string() == rep.base)
        .unwrap_or(newest)
        .clone();
    base.revision = rep.revision;
    Ok(Some(base))
}

/// The etcdutl on `PATH` and what it supports: it runs `--data-dir` and decides the
/// printed flags. Required with `--data-dir`.
async fn find_etcdutl(
    required: bool,
) -> Result<Option<crate::restore::etcdutl::Etcdutl>, CommandError> {
    use crate::restore::etcdutl;
    let tool = match etcdutl::find(None, "etcdutl") {
        Some(p) => match etcdutl::probe(&p).await {
            Ok(t) => Some(t),
            Err(e) if required => return Err(failed(e)),
            Err(e) => {
                eprintln!("warning: {e}; the printed commands assume etcdutl 3.5.10 or later");
                None
            }
        },
        None => None,
    };
    if required && tool.is_none() {
        return Err(failed(
            "--data-dir needs etcdutl on PATH (it ships with etcd 3.5+; 3.5.10 or later restores with --bump-revision); install it, or leave out --data-dir and follow the printed steps",
        ));
    }
    Ok(tool)
}

/// How the restore commands move the revision forward: not at all, as flags, or as flags
/// commented out (with a warning) when the etcdutl found is too old.
fn bump_plan(
    bump: BumpChoice,
    m: &Manifest,
    all: &[Manifest],
    tool: Option<&crate::restore::etcdutl::Etcdutl>,
) -> crate::restore::runbook::BumpPlan {
    use crate::restore::etcdutl;
    use crate::restore::runbook::BumpPlan;
    let amount = match bump {
        BumpChoice::Off => None,
        BumpChoice::Exactly(n) => Some(n),
        BumpChoice::Auto => Some(etcdutl::choose_bump(m, all, chrono::Utc::now())),
    };
    match (amount, tool) {
        (None, _) => BumpPlan::Off,
        (Some(n), Some(t)) if !t.supports_bump => {
            eprintln!("warning: {}", t.upgrade_warning());
            BumpPlan::Commented(n)
        }
        (Some(n), _) => BumpPlan::Use(n),
    }
}

/// The TLS files of `[etcd]`, for the printed `etcdctl` check.
fn etcdctl_tls(cfg: &Config) -> crate::restore::runbook::EtcdctlTls {
    use crate::restore::runbook::EtcdctlTls;
    cfg.etcd
        .tls
        .as_ref()
        .and_then(|t| {
            Some(EtcdctlTls {
                ca: t.ca_file.display().to_string(),
                cert: t.cert_file.as_ref()?.display().to_string(),
                key: t.key_file.as_ref()?.display().to_string(),
            })
        })
        .unwrap_or_default()
}

/// `--data-dir`: runs etcdutl for this member and says what it did.
async fn run_etcdutl(
    tool: &crate::restore::etcdutl::Etcdutl,
    member: &RestoreMember,
    m: &Manifest,
    out: &std::path::Path,
    plan: crate::restore::runbook::BumpPlan,
) -> Result<(), CommandError> {
    use crate::restore::etcdutl::{self, RestoreArgs};
    use crate::restore::runbook::BumpPlan;
    let RestoreMember {
        dir: d,
        name,
        peer,
        cluster,
    } = member;
    let token = etcdutl::cluster_token(&m.id);
    let used = match plan {
        BumpPlan::Use(n) => Some(n),
        _ => None,
    };
    let args = RestoreArgs {
        snapshot: out,
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
            BumpPlan::Commented(n) =>
                format!("  # --bump-revision {n} --mark-compacted (this etcdutl has no such flags)"),
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
    Ok(())
}

/// `restore --to-revision/--to-time`: replays the continuous-backup segments after the
/// newest snapshot at or before the target and writes a verified snapshot at it.
pub(super) async fn restore_point_in_time(
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
    let cluster = super::backups::cluster_for(cfg, cluster_id, "a point-in-time restore").await?;
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

/// A restore drill now: newest backup, verified, restored into a throwaway etcd.
pub(super) async fn drill(
    cfg: &Config,
    identity: Option<&std::path::Path>,
) -> Result<(), CommandError> {
    let store = open_store(cfg)?;
    let rep = crate::restore::drill::run(cfg, &store, identity)
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
