//! Scheduled defragmentation: on `[defrag] cron`, on every node, each daemon tries its own
//! member (see `crate::defrag`: the cluster-wide lock makes the members take turns, and the
//! member gate keeps it apart from this host's snapshots). Runs whether or not this node
//! takes the backups.

use crate::config::Config;
use crate::daemon::metrics::{DefragLabels, DefragResult, Metrics};
use crate::defrag::{self, gate::MemberGate, DefragInput, Outcome};
use crate::units::human_bytes;
use chrono::Utc;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Runs scheduled defragmentations until `cancel`, with the configuration `state` holds
/// (a reload takes effect from the next slot).
pub async fn run_defrag<S>(
    mut state: watch::Receiver<Arc<S>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) where
    S: AsRef<Config> + Send + Sync + 'static,
{
    while let Some(s) = super::background::next_slot(&mut state, &cancel, |s: &S| {
        s.as_ref().defrag.schedule.as_ref()
    })
    .await
    {
        let config: &Config = (*s).as_ref();
        attempt(config, &metrics, &cancel).await;
    }
}

/// One scheduled attempt, logged and counted.
async fn attempt(config: &Config, metrics: &Metrics, cancel: &CancellationToken) {
    let gate = MemberGate::in_spool_dir(&config.backup.spool_dir);
    let endpoint = config.etcd.endpoints[0].clone();
    let r = defrag::run(DefragInput {
        config,
        endpoint: &endpoint,
        dry_run: false,
        gate: &gate,
        leader_waits: true,
        cancel,
    })
    .await;
    let count = |result| {
        metrics
            .defrags
            .get_or_create(&DefragLabels { result })
            .inc()
    };
    match r {
        Ok(rep) => match &rep.outcome {
            Outcome::Defragmented {
                after,
                handed_over_to,
                took,
            } => {
                count(DefragResult::Success);
                metrics
                    .defrag_last_timestamp
                    .set(Utc::now().timestamp_millis() as f64 / 1000.0);
                metrics
                    .defrag_reclaimed
                    .set(i64::try_from(rep.reclaimed()).unwrap_or(i64::MAX));
                metrics.db_size.set(after.db_size);
                metrics.db_size_in_use.set(after.db_size_in_use);
                tracing::info!(
                    member = %rep.member,
                    db_size_before = rep.before.db_size,
                    db_size_after = after.db_size,
                    reclaimed = %human_bytes(rep.reclaimed()),
                    took_ms = took.as_millis() as u64,
                    handed_leadership_to = handed_over_to.as_deref().unwrap_or("-"),
                    "defragmented the local member"
                );
            }
            Outcome::Skipped(why) => {
                count(DefragResult::Skipped);
                tracing::info!(member = %rep.member, reason = %why, "defragmentation skipped");
            }
            Outcome::WouldDefragment { .. } => {}
        },
        Err(defrag::DefragError::Cancelled) => {}
        Err(e) => {
            count(DefragResult::Failure);
            tracing::error!(error = %e, "defragmentation of the local member failed");
        }
    }
}
