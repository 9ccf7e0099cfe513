//! `snapshot` and `status`: one backup now, and who takes them.

use super::backups::ListEntry;
use super::{failed, open_store, CommandError};
use crate::backup::spool;
use crate::backup::{self, CycleInput};
use crate::config::Config;
use crate::daemon;
use crate::store::manifest::printable;
use tokio_util::sync::CancellationToken;

pub(super) async fn snapshot(cfg: &Config, endpoint: Option<&str>) -> Result<(), CommandError> {
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
    // Never while this host's daemon defragments the member (waits for it).
    let member_gate = crate::defrag::gate::MemberGate::in_spool_dir(&cfg.backup.spool_dir)
        .for_snapshot(&cancel, || {})
        .await;
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

/// The leader as seen through the first endpoint that answers.
pub(super) async fn find_leader(
    cfg: &Config,
) -> Result<Option<crate::etcd::election::LeaderView>, String> {
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

pub(super) fn ago(t: chrono::DateTime<chrono::Utc>) -> String {
    let secs = (chrono::Utc::now() - t).num_seconds().max(0);
    let secs = u64::try_from(secs).unwrap_or(0);
    humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
}

pub(super) async fn status(cfg: &Config, json: bool) -> Result<(), CommandError> {
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
