//! The daemon's background loops: restore drills on their schedule, and the refresh of the
//! etcd and store metrics (and `/readyz`) on every node.

use super::http::Readiness;
use super::metrics::{Metrics, Outcome, ResultLabels};
use super::reload::State;
use super::scheduler::MAX_SLEEP;
use crate::etcd::Member;
use chrono::Utc;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Runs restore drills on the `[drill] cron` schedule (none when it is unset).
pub(super) async fn run_drills(
    mut state: watch::Receiver<Arc<State>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    // The gauge follows every reload, also while waiting.
    while let Some(s) = next_slot(&mut state, &cancel, |s: &State| {
        metrics
            .restore_drill_enabled
            .set(i64::from(s.config.drill.schedule.is_some()));
        s.config.drill.schedule.as_ref()
    })
    .await
    {
        tracing::info!("starting restore drill");
        let r = tokio::select! {
            () = cancel.cancelled() => return,
            r = crate::restore::drill::run(&s.config, &s.store, None) => r,
        };
        match r {
            Ok(rep) => {
                metrics
                    .restore_drills
                    .get_or_create(&ResultLabels {
                        result: Outcome::Success,
                    })
                    .inc();
                metrics
                    .restore_drill_last_success_timestamp
                    .set(Utc::now().timestamp_millis() as f64 / 1000.0);
                tracing::info!(
                    id = %rep.id,
                    revision = rep.revision,
                    served_keys = rep.served_keys,
                    restored_into_etcd = rep.not_restored.is_none(),
                    duration_ms = rep.duration.as_millis() as u64,
                    "restore drill passed"
                );
            }
            Err(e) => {
                metrics
                    .restore_drills
                    .get_or_create(&ResultLabels {
                        result: Outcome::Failure,
                    })
                    .inc();
                tracing::error!(error = %e, "RESTORE DRILL FAILED: the newest backup could not be restored");
            }
        }
    }
}

/// Keeps the DB-size and last-success metrics (and `/readyz`) current on every node.
pub(super) async fn run_refresh(
    mut state: watch::Receiver<Arc<State>>,
    metrics: Arc<Metrics>,
    readiness: Arc<Mutex<Readiness>>,
    cancel: CancellationToken,
) {
    let mut member: Option<(String, Member)> = None;
    let mut local_cluster: Option<String> = None;
    let mut last_store_refresh: Option<tokio::time::Instant> = None;
    loop {
        let s = state.borrow_and_update().clone();
        let endpoint = s.config.etcd.endpoints[0].clone();
        // etcd: reuse the connection while the endpoint is unchanged.
        if member.as_ref().is_none_or(|(e, _)| *e != endpoint) {
            member = match Member::connect(&s.config.etcd, &endpoint).await {
                Ok(m) => Some((endpoint.clone(), m)),
                Err(e) => {
                    set_etcd(&readiness, &metrics, Some(e.to_string()));
                    None
                }
            };
        }
        if let Some((_, m)) = &member {
            match m.status().await {
                Ok(st) => {
                    local_cluster = Some(format!("{:016x}", st.cluster_id));
                    metrics.db_size.set(st.db_size);
                    metrics.db_size_in_use.set(st.db_size_in_use);
                    metrics.db_quota.set(st.db_quota.unwrap_or(0));
                    set_etcd(&readiness, &metrics, None);
                }
                Err(e) => {
                    set_etcd(&readiness, &metrics, Some(e.to_string()));
                    member = None;
                }
            }
        }
        let due = last_store_refresh
            .is_none_or(|t| t.elapsed() >= s.config.metrics.store_refresh_interval);
        if due {
            last_store_refresh = Some(tokio::time::Instant::now());
            match s.store.newest(Utc::now(), local_cluster.as_deref()).await {
                Ok((count, newest)) => {
                    metrics.backups_in_store.set(count as i64);
                    if let Some(m) = newest {
                        let ts = m.finished_at.timestamp_millis() as f64 / 1000.0;
                        if ts > metrics.last_success_timestamp.get() {
                            metrics.last_success_timestamp.set(ts);
                        }
                    }
                    if let Ok(mut r) = readiness.lock() {
                        r.store = None;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the store for the last-success metrics");
                    if let Ok(mut r) = readiness.lock() {
                        r.store = Some(e.to_string());
                    }
                }
            }
        }
        if let Ok(mut r) = readiness.lock() {
            r.checked = true;
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(s.config.metrics.refresh_interval) => {},
            r = state.changed() => {
                if r.is_err() {
                    return;
                }
                last_store_refresh = None;
            }
        }
    }
}

fn set_etcd(readiness: &Mutex<Readiness>, metrics: &Metrics, problem: Option<String>) {
    metrics.etcd_up.set(i64::from(problem.is_none()));
    if let Some(p) = &problem {
        tracing::warn!(error = %p, "the local etcd member is not reachable");
    }
    if let Ok(mut r) = readiness.lock() {
        r.etcd = problem;
    }
}

/// Waits for the next slot of the schedule `schedule` picks from the configuration in
/// force; a reload starts over with the new configuration. The configuration at the slot,
/// or `None` once `cancel` fires or the configuration channel closes.
pub(super) async fn next_slot<S>(
    state: &mut watch::Receiver<Arc<S>>,
    cancel: &CancellationToken,
    schedule: impl Fn(&S) -> Option<&crate::schedule::Schedule>,
) -> Option<Arc<S>> {
    'outer: loop {
        let s = state.borrow_and_update().clone();
        let Some(at) = schedule(&s).and_then(|sched| sched.next_after(Utc::now())) else {
            tokio::select! {
                () = cancel.cancelled() => return None,
                r = state.changed() => if r.is_err() { return None } else { continue },
            }
        };
        loop {
            let now = Utc::now();
            if now >= at {
                return Some(s);
            }
            let wait = (at - now).to_std().unwrap_or_default().min(MAX_SLEEP);
            tokio::select! {
                () = cancel.cancelled() => return None,
                () = tokio::time::sleep(wait) => {},
                r = state.changed() => if r.is_err() { return None } else { continue 'outer },
            }
        }
    }
}
