//! `defrag`: the local member, now, if it is worth it and safe.

use super::{failed, CommandError};
use crate::config::Config;
use crate::units::human_bytes;
use tokio_util::sync::CancellationToken;

/// `defrag`: one attempt on the local member, sizes before and after.
pub(super) async fn defrag(cfg: &Config, dry_run: bool) -> Result<(), CommandError> {
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
                println!("dry run: would hand the raft leadership to {to}, then defragment");
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
