//! The daemon: cycles on the cron schedule, one at a time, until SIGTERM/SIGINT; SIGHUP
//! reloads the configuration for the next cycle.
//!
//! Tasks, all under one cancellation token:
//! - the work loop (this function): waits for the next slot, runs the cycle, prunes;
//! - the HTTP server (`/metrics`, `/healthz`, `/readyz`);
//! - the refresh loop: the local member's status and the store's newest backup, on every
//!   node, so the metrics are right wherever the backups are taken;
//! - the systemd watchdog, fed only while the work loop beats.
//!
//! Waiting is interruptible (shutdown, reload); a running cycle is not interrupted by a
//! reload (it finishes with the configuration it started with) but is aborted cleanly on
//! shutdown.

pub mod continuous;
pub mod http;
pub mod metrics;

use crate::backup::source::EtcdSource;
use crate::backup::spool;
use crate::backup::{self, CycleInput};
use crate::config::Config;
use crate::daemon::metrics::{Metrics, Outcome, ResultLabels, StageLabels, StageValue};
use crate::etcd::election::{self, Role, Term};
use crate::etcd::Member;
use crate::schedule::Schedule;
use crate::store::BackupStore;
use crate::systemd::{self, Heartbeat};
use chrono::{DateTime, Utc};
use http::{HttpState, Readiness};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The longest single sleep; the next slot is recomputed from the wall clock after each, so
/// clock steps and suspends do not make a run fire late.
const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A slot whose time passed by more than this (a suspend, a cycle that overran) is skipped.
const LATE_TOLERANCE: chrono::Duration = chrono::Duration::seconds(60);

/// How often a catch-up check that could not list the store is tried again.
const CATCH_UP_RECHECK: Duration = Duration::from_secs(10);

/// Time allowed for the tasks to finish after shutdown was requested.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);

/// Resolves on SIGTERM or SIGINT.
///
/// # Errors
/// When the signal handlers cannot be installed.
pub async fn shutdown_signal() -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    Ok(())
}

/// What the loop should do at `now`, given the slot it was waiting for.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotDecision {
    /// Not yet time: wait this long (capped) and look again.
    Wait(Duration),
    /// Run the cycle for this slot.
    Run,
    /// The slot was missed by more than the tolerance: skip it.
    Skip,
}

/// Pure decision for the slot `slot` at `now`.
pub fn decide(slot: DateTime<Utc>, now: DateTime<Utc>) -> SlotDecision {
    if now < slot {
        let wait = (slot - now).to_std().unwrap_or_default();
        SlotDecision::Wait(wait.min(MAX_SLEEP))
    } else if now - slot > LATE_TOLERANCE {
        SlotDecision::Skip
    } else {
        SlotDecision::Run
    }
}

/// Counts the slots strictly between `after` and `until` (the runs a long cycle missed).
pub fn slots_between(s: &Schedule, after: DateTime<Utc>, until: DateTime<Utc>) -> usize {
    let mut n = 0;
    let mut t = after;
    while let Some(next) = s.next_after(t) {
        if next >= until || n > 10_000 {
            break;
        }
        n += 1;
        t = next;
    }
    n
}

/// The configuration in force and what is built from it.
struct State {
    config: Config,
    store: BackupStore,
}

impl State {
    fn new(config: Config) -> Result<State, String> {
        let store = BackupStore::open(&config.storage, &config.backup.cluster_name)
            .map_err(|e| e.to_string())?;
        Ok(State { config, store })
    }
}

/// The running HTTP server: its address and how to stop it.
struct Server {
    addr: std::net::SocketAddr,
    cancel: CancellationToken,
}

impl Server {
    async fn start(
        addr: std::net::SocketAddr,
        state: HttpState,
        parent: &CancellationToken,
    ) -> Result<Server, String> {
        let listener = http::bind(addr).await?;
        let cancel = parent.child_token();
        tokio::spawn(http::serve(listener, state, cancel.clone()));
        tracing::info!(listen = %addr, "serving /metrics, /healthz and /readyz");
        Ok(Server { addr, cancel })
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
///
/// # Errors
/// When the store, the metrics listener or the signal handlers cannot be set up.
pub async fn run(config: Config) -> Result<(), String> {
    let state = Arc::new(State::new(config)?);
    let (state_tx, state_rx) = watch::channel(state.clone());
    let cancel = CancellationToken::new();
    let mut hup = signal(SignalKind::hangup()).map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
    {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if shutdown_signal().await.is_ok() {
                tracing::info!("shutdown requested");
                systemd::stopping();
                cancel.cancel();
            }
        });
    }

    let metrics = Arc::new(Metrics::new());
    let heartbeat = Heartbeat::new();
    heartbeat.beat();
    let readiness = Arc::new(Mutex::new(Readiness::default()));
    // The loop wakes at least this often, so a healthy loop always beats in time.
    let mut max_sleep = MAX_SLEEP;
    if let Some(interval) = systemd::watchdog_interval() {
        max_sleep = max_sleep.min(interval / 3);
        tokio::spawn(systemd::run_watchdog(
            interval,
            heartbeat.clone(),
            cancel.clone(),
        ));
        tracing::info!(interval = ?interval, "systemd watchdog enabled");
    }
    let http_state = HttpState {
        metrics: metrics.clone(),
        heartbeat: heartbeat.clone(),
        readiness: readiness.clone(),
        stall_after: max_sleep * 3 + state.config.backup.timeout,
    };
    let mut server =
        Server::start(state.config.metrics.listen, http_state.clone(), &cancel).await?;
    let driller = tokio::spawn(run_drills(
        state_rx.clone(),
        metrics.clone(),
        cancel.clone(),
    ));
    let refresher = tokio::spawn(run_refresh(
        state_rx,
        metrics.clone(),
        readiness.clone(),
        cancel.clone(),
    ));

    // The election: only the leader runs scheduled cycles. Without it this node always runs
    // them.
    let (mut roles, elector) = if state.config.election.enabled {
        let (tx, rx) = watch::channel(Role::Disconnected(None));
        let task = tokio::spawn(election::run(
            election::Settings::from_config(&state.config),
            tx,
            cancel.clone(),
        ));
        (Some(rx), Some(task))
    } else {
        metrics.is_leader.set(1);
        metrics.election_up.set(1);
        (None, None)
    };
    let (committed_tx, committed_rx) = watch::channel(None);
    let continuous = tokio::spawn(continuous::run(
        state.config.clone(),
        state.store.clone(),
        roles.clone(),
        committed_rx,
        metrics.clone(),
        cancel.clone(),
    ));
    if let Some(w) = crate::config::permission_warning(&state.config.source) {
        tracing::warn!("{w}");
    }
    let removed = spool::clean_stale(&state.config.backup.spool_dir);
    tracing::info!(
        schedule = %state.config.schedule.parsed.as_str(),
        timezone = %state.config.schedule.timezone.name(),
        storage = %state.store.url(),
        cluster = %state.config.backup.cluster_name,
        node = %state.config.election.node_name,
        election = state.config.election.enabled,
        stale_spool_files_removed = removed,
        "etcd-backup daemon started"
    );

    let mut state = state;
    set_schedule_metric(&metrics, &state.config.schedule.parsed);
    let mut slot = next_slot(&state.config.schedule.parsed, Utc::now());
    let mut last_result = "no backup yet".to_string();
    // The term catch-up was last checked for; a new term (or, without an election, the
    // start) checks whether the last scheduled slot was missed.
    let mut seen_term: Option<Arc<Term>> = None;
    let mut catch_up = roles.is_none();
    let mut catch_up_checked: Option<std::time::Instant> = None;
    // A failed slot is tried once more after `[backup] retry_after`: (when, slot).
    let mut retry: Option<(DateTime<Utc>, DateTime<Utc>)> = None;
    let mut retried: Option<DateTime<Utc>> = None;
    // Uploads of failed cycles that could not be aborted (the store was unreachable).
    let mut leftovers: Vec<String> = Vec::new();
    systemd::ready(&status_line(&last_result, slot));
    while !cancel.is_cancelled() {
        heartbeat.beat();
        let term = match &roles {
            None => None,
            Some(rx) => {
                let role = rx.borrow().clone();
                let term = role.term().cloned();
                let changed = match (&term, &seen_term) {
                    (Some(t), Some(s)) => !Arc::ptr_eq(t, s),
                    (None, None) => false,
                    _ => true,
                };
                observe_role(&metrics, &role, changed);
                if let (true, Some(t)) = (changed, &term) {
                    // A new term: check for a missed slot, clean up after earlier leaders.
                    catch_up = true;
                    abort_uploads_before(&state.store, t.since()).await;
                }
                seen_term.clone_from(&term);
                term
            }
        };
        let may_run = roles.is_none() || term.is_some();
        if !may_run {
            retry = None;
        }
        let mut run_for = None;
        if let Some((when, failed_slot)) = retry {
            if Utc::now() >= when {
                retry = None;
                retried = Some(failed_slot);
                tracing::info!(slot = %failed_slot, "retrying the failed backup (backup.retry_after)");
                run_for = Some(failed_slot);
            }
        }
        let recheck_due = catch_up_checked.is_none_or(|t| t.elapsed() >= CATCH_UP_RECHECK);
        if run_for.is_none() && may_run && catch_up && recheck_due {
            catch_up_checked = Some(std::time::Instant::now());
            match missed_slot(&state, Utc::now()).await {
                Ok(missed) => {
                    catch_up = false;
                    catch_up_checked = None;
                    run_for = missed;
                    if let Some(missed) = run_for {
                        tracing::info!(slot = %missed, "the last scheduled backup was missed (no committed backup since that slot); running it now, once");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot list the store to check for a missed backup; checking again shortly");
                }
            }
        }
        if run_for.is_none() {
            let mut wait = match slot {
                None => {
                    tracing::error!(schedule = %state.config.schedule.cron, "the schedule has no future run; waiting for a reload (SIGHUP) with a new schedule");
                    Some(max_sleep)
                }
                Some(at) => match decide(at, Utc::now()) {
                    SlotDecision::Wait(d) => Some(d.min(max_sleep)),
                    SlotDecision::Skip => {
                        tracing::warn!(slot = %at, "skipping a scheduled run whose time passed (the host was suspended or the clock jumped)");
                        slot = next_slot(&state.config.schedule.parsed, Utc::now());
                        continue;
                    }
                    SlotDecision::Run if !may_run => {
                        tracing::debug!(slot = %at, "not the leader: another node takes this backup");
                        slot = next_slot(&state.config.schedule.parsed, Utc::now());
                        continue;
                    }
                    SlotDecision::Run => None,
                },
            };
            if let (Some(w), Some((when, _))) = (wait, retry) {
                let until = (when - Utc::now()).to_std().unwrap_or_default();
                wait = Some(w.min(until));
            }
            if catch_up && may_run {
                wait = wait.map(|w| w.min(CATCH_UP_RECHECK));
            }
            if let Some(d) = wait {
                tokio::select! {
                    () = cancel.cancelled() => break,
                    () = tokio::time::sleep(d) => {},
                    () = role_changed(&mut roles) => {},
                    _ = hup.recv() => {
                        if let Some(new) = reload(&state, &mut server, &http_state, &cancel, &metrics).await {
                            state = new;
                            set_schedule_metric(&metrics, &state.config.schedule.parsed);
                            let _ = state_tx.send(state.clone());
                            slot = next_slot(&state.config.schedule.parsed, Utc::now());
                        }
                        systemd::ready(&status_line(&last_result, slot));
                    }
                }
                continue;
            }
            run_for = slot;
        }

        let Some(at) = run_for else { continue };
        // A scheduled (or retried) cycle makes a pending catch-up moot.
        catch_up = false;
        catch_up_checked = None;
        tracing::info!(slot = %at, "starting scheduled backup");
        systemd::status(&format!("backing up (slot {at}); last: {last_result}"));
        metrics
            .last_attempt_timestamp
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
        // The cycle keeps the configuration it started with, whatever a reload does.
        let cycle_state = state.clone();
        let source = EtcdSource::new(
            &cycle_state.config.etcd,
            &cycle_state.config.etcd.endpoints[0],
        );
        let r = backup::run(CycleInput {
            config: &cycle_state.config,
            store: &cycle_state.store,
            source: &source,
            cancel: &cancel,
            heartbeat: Some(&heartbeat),
            progress: None,
            term: term.as_deref(),
            slot: Some(at),
        })
        .await;
        let fenced = matches!(&r, Err(e) if e.is_fenced());
        if let Err(e) = &r {
            if let Some(k) = &e.unaborted_upload {
                leftovers.push(k.clone());
            }
        }
        if !cancel.is_cancelled() && !fenced {
            metrics.observe_cycle(&r);
        }
        match &r {
            Ok(rep) => {
                tracing::info!(id = %rep.manifest.id, revision = rep.manifest.revision, size = rep.manifest.size, stored_size = rep.manifest.stored_size, "scheduled backup committed");
                committed_tx.send_replace(Some(rep.manifest.clone()));
                last_result = format!(
                    "backup {} ok at {}",
                    rep.manifest.id,
                    rep.manifest.finished_at.format("%Y-%m-%d %H:%M:%SZ")
                );
                prune_after_cycle(
                    &cycle_state,
                    &metrics,
                    term.as_deref(),
                    &rep.manifest.cluster_id,
                )
                .await;
            }
            Err(e) if cancel.is_cancelled() => {
                tracing::warn!(error = %e, "backup aborted by shutdown");
            }
            Err(e) if e.is_fenced() => {
                tracing::warn!(stage = %e.stage, error = %e.message, "backup aborted: leadership lost; nothing was committed");
            }
            Err(e) => {
                tracing::error!(stage = %e.stage, error = %e.message, "scheduled backup failed");
                last_result = format!(
                    "backup FAILED at stage {} at {}",
                    e.stage,
                    Utc::now().format("%Y-%m-%d %H:%M:%SZ")
                );
                retry = plan_retry(&state.config, at, retried, Utc::now());
                if let Some((when, _)) = retry {
                    tracing::info!(at = %when, "the failed backup is retried once before the next slot (backup.retry_after)");
                }
            }
        }
        if r.is_ok() {
            retry = None;
        }
        if !leftovers.is_empty() && !cancel.is_cancelled() {
            clean_leftovers(&cycle_state.store, &mut leftovers).await;
        }
        let now = Utc::now();
        let missed = slots_between(&state.config.schedule.parsed, at, now);
        if missed > 0 {
            tracing::warn!(
                missed,
                "the cycle overran later scheduled runs; they are skipped, not run back to back"
            );
        }
        slot = next_slot(&state.config.schedule.parsed, now);
        systemd::status(&status_line(&last_result, slot));
    }
    systemd::stopping();
    cancel.cancel();
    let tasks = async {
        if let Some(e) = elector {
            let _ = e.await;
        }
        let _ = refresher.await;
        let _ = driller.await;
        let _ = continuous.await;
    };
    if tokio::time::timeout(SHUTDOWN_DEADLINE, tasks)
        .await
        .is_err()
    {
        tracing::warn!("background tasks did not stop in time");
    }
    tracing::info!("etcd-backup daemon stopped");
    Ok(())
}

/// Runs restore drills on the `[drill] cron` schedule (none when it is unset).
async fn run_drills(
    mut state: watch::Receiver<Arc<State>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    'outer: loop {
        let s = state.borrow_and_update().clone();
        metrics
            .restore_drill_enabled
            .set(i64::from(s.config.drill.schedule.is_some()));
        let next = s
            .config
            .drill
            .schedule
            .as_ref()
            .and_then(|sched| sched.next_after(Utc::now()));
        let Some(at) = next else {
            tokio::select! {
                () = cancel.cancelled() => return,
                r = state.changed() => if r.is_err() { return } else { continue },
            }
        };
        loop {
            let now = Utc::now();
            if now >= at {
                break;
            }
            let wait = (at - now).to_std().unwrap_or_default().min(MAX_SLEEP);
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(wait) => {},
                r = state.changed() => if r.is_err() { return } else { continue 'outer },
            }
        }
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
async fn run_refresh(
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

fn set_schedule_metric(metrics: &Metrics, s: &Schedule) {
    let gap = s
        .max_interval(Utc::now(), 50)
        .map_or(0.0, |g| g.num_milliseconds() as f64 / 1000.0);
    metrics.schedule_interval.set(gap);
}

fn status_line(last: &str, next: Option<DateTime<Utc>>) -> String {
    match next {
        Some(n) => format!("{last}; next backup {}", n.format("%Y-%m-%d %H:%M:%SZ")),
        None => format!("{last}; no future run in the schedule"),
    }
}

/// When to retry a failed cycle for `slot`: once, `[backup] retry_after` later, if that is
/// before the next slot.
fn plan_retry(
    config: &Config,
    slot: DateTime<Utc>,
    retried: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
    let after = config.backup.retry_after?;
    if retried == Some(slot) {
        return None;
    }
    let when = now + chrono::Duration::from_std(after).ok()?;
    match config.schedule.parsed.next_after(now) {
        Some(next) if when >= next => None,
        _ => Some((when, slot)),
    }
}

/// A new leader aborts the incomplete uploads started before its term: they belong to
/// earlier leaders, which can no longer commit them (a killed process cannot abort its own).
async fn abort_uploads_before(store: &BackupStore, since: DateTime<Utc>) {
    match store.abort_pending_where(|u| u.initiated < since).await {
        Ok(aborts) => {
            for (up, r) in aborts {
                match r {
                    Ok(()) => {
                        tracing::info!(key = %up.key, initiated = %up.initiated, "aborted an incomplete upload of an earlier leader");
                    }
                    Err(e) => {
                        tracing::warn!(key = %up.key, error = %e, "cannot abort an incomplete upload of an earlier leader; prune retries");
                    }
                }
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot list incomplete uploads of earlier leaders; prune retries");
        }
    }
}

/// Aborts the multipart uploads failed cycles could not abort; keeps the keys whose uploads
/// cannot be listed or aborted yet.
async fn clean_leftovers(store: &BackupStore, leftovers: &mut Vec<String>) {
    let aborts = match store
        .abort_pending_where(|u| leftovers.contains(&u.key))
        .await
    {
        Ok(aborts) => aborts,
        Err(e) => {
            tracing::debug!(error = %e, "the incomplete uploads of earlier failed cycles cannot be listed yet");
            return;
        }
    };
    let mut still = Vec::new();
    for (up, r) in aborts {
        match r {
            Ok(()) => {
                tracing::info!(key = %up.key, "cleaned up the incomplete upload of an earlier failed cycle");
            }
            Err(e) => {
                tracing::debug!(key = %up.key, error = %e, "the incomplete upload cannot be aborted yet");
                still.push(up.key);
            }
        }
    }
    still.dedup();
    *leftovers = still;
}

/// Updates the leadership metrics for `role`; `changed`: the term differs from the one seen
/// before (gained, lost or replaced).
fn observe_role(metrics: &Metrics, role: &Role, changed: bool) {
    if changed {
        metrics.leader_changes.inc();
    }
    metrics.is_leader.set(i64::from(role.term().is_some()));
    metrics
        .election_up
        .set(i64::from(!matches!(role, Role::Disconnected(_))));
}

/// Resolves when this node's role changes; never without an election (or once the
/// election task has ended).
async fn role_changed(roles: &mut Option<watch::Receiver<Role>>) {
    match roles {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// The last scheduled slot at or before `now` when no committed backup was taken for it or
/// after it: a new leader (or a restarted daemon) runs that slot once.
///
/// # Errors
/// When the store cannot be listed: whether the slot was missed is unknown, and the caller
/// checks again (running it anyway could back up a slot twice).
async fn missed_slot(
    state: &State,
    now: DateTime<Utc>,
) -> Result<Option<DateTime<Utc>>, crate::store::StoreError> {
    let Some(prev) = state.config.schedule.parsed.previous_at_or_before(now) else {
        return Ok(None);
    };
    // This cluster's backups only: another cluster's under the same name must not stand in
    // for ours (unknown while etcd is unreachable; the cycle would fail then anyway).
    let local = crate::etcd::local_cluster_id(&state.config.etcd).await.ok();
    Ok(match state.store.newest(now, local.as_deref()).await? {
        (_, Some(m)) if m.slot.unwrap_or(m.time) >= prev => None,
        _ => Some(prev),
    })
}

/// Applies retention after a successful backup. Failures are logged and counted; they
/// never fail the backup that was just committed. Under an election, only while this node
/// still leads.
async fn prune_after_cycle(
    state: &State,
    metrics: &Metrics,
    term: Option<&Term>,
    cluster_id: &str,
) {
    if let Some(t) = term {
        if let Err(e) = t.check("before pruning").await {
            tracing::warn!(error = %e, "prune skipped");
            return;
        }
    }
    let policy = crate::retention::RetentionPolicy::from_config(
        &state.config.retention,
        state.config.schedule.timezone,
    );
    let started = std::time::Instant::now();
    match crate::retention::prune::prune(
        &state.store,
        &policy,
        Utc::now(),
        state.config.backup.timeout.saturating_mul(2),
        cluster_id,
        false,
    )
    .await
    {
        Ok(o) => {
            metrics.pruned.inc_by(o.deleted().len() as u64);
            metrics.foreign_backups.set(o.plan.foreign_backups as i64);
            metrics.future_backups.set(o.plan.future_backups as i64);
            if o.plan.foreign_backups > 0 {
                tracing::warn!(
                    count = o.plan.foreign_backups,
                    cluster_id,
                    "the store holds backups of another etcd cluster (another cluster id) under this cluster_name; they are never pruned, restored as latest or counted here: give each cluster its own backup.cluster_name"
                );
            }
            if o.plan.future_backups > 0 {
                tracing::warn!(
                    count = o.plan.future_backups,
                    "the store holds backups dated more than 5 minutes in the future (a wrong clock?); they are never latest and never aged out"
                );
            }
            metrics
                .stage_duration
                .get_or_create(&StageLabels {
                    stage: StageValue::Prune,
                })
                .observe(started.elapsed().as_secs_f64());
            if !o.failed().is_empty() {
                metrics
                    .failures
                    .get_or_create(&StageLabels {
                        stage: StageValue::Prune,
                    })
                    .inc();
            }
            tracing::info!(
                stage = "prune",
                deleted = o.deleted().len(),
                orphans_removed = o.cleaned().len(),
                failed = o.failed().len(),
                kept = o.plan.decisions.len() - o.deleted().len(),
                "prune finished"
            );
        }
        Err(e) => {
            metrics
                .failures
                .get_or_create(&StageLabels {
                    stage: StageValue::Prune,
                })
                .inc();
            tracing::warn!(stage = "prune", error = %e, "prune failed; it is retried after the next backup");
        }
    }
}

fn next_slot(s: &Schedule, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let next = s.next_after(now);
    if let Some(n) = next {
        tracing::info!(next = %n, "next scheduled backup");
    }
    next
}

/// Re-reads and validates the configuration file. Returns the new state when it took
/// effect; an invalid file (or a metrics address that cannot be bound) leaves the old
/// configuration in force.
async fn reload(
    old: &Arc<State>,
    server: &mut Server,
    http_state: &HttpState,
    cancel: &CancellationToken,
    metrics: &Metrics,
) -> Option<Arc<State>> {
    let path = old.config.source.clone();
    tracing::info!(file = %path.display(), "SIGHUP: reloading configuration");
    systemd::reloading();
    let outcome = async {
        let new = Config::load(&path)
            .map_err(|e| e.to_string())
            .and_then(State::new)?;
        if new.config.metrics.listen != server.addr {
            let started =
                Server::start(new.config.metrics.listen, http_state.clone(), cancel).await?;
            server.cancel.cancel();
            *server = started;
        }
        Ok::<State, String>(new)
    }
    .await;
    match outcome {
        Ok(new) => {
            metrics
                .config_reloads
                .get_or_create(&ResultLabels {
                    result: Outcome::Success,
                })
                .inc();
            tracing::info!("configuration reloaded; it applies from the next cycle on");
            Some(Arc::new(new))
        }
        Err(e) => {
            metrics
                .config_reloads
                .get_or_create(&ResultLabels {
                    result: Outcome::Failure,
                })
                .inc();
            tracing::error!(error = %e, "configuration reload rejected; the previous configuration stays in force");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use chrono_tz::Tz;

    fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, h, m, s).unwrap()
    }

    #[test]
    fn decisions() {
        assert_eq!(
            decide(t(6, 0, 0), t(5, 59, 30)),
            SlotDecision::Wait(Duration::from_secs(30))
        );
        assert_eq!(
            decide(t(6, 0, 0), t(4, 0, 0)),
            SlotDecision::Wait(MAX_SLEEP)
        );
        assert_eq!(decide(t(6, 0, 0), t(6, 0, 0)), SlotDecision::Run);
        assert_eq!(decide(t(6, 0, 0), t(6, 0, 59)), SlotDecision::Run);
        assert_eq!(decide(t(6, 0, 0), t(6, 1, 1)), SlotDecision::Skip);
    }

    #[test]
    fn overrun_slots_are_counted() {
        let s = Schedule::parse("*/10 * * * *", Tz::UTC).unwrap();
        assert_eq!(slots_between(&s, t(6, 0, 0), t(6, 5, 0)), 0);
        assert_eq!(slots_between(&s, t(6, 0, 0), t(6, 35, 0)), 3);
    }
}
