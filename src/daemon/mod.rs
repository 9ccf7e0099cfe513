//! The daemon: cycles on the cron schedule, one at a time, until SIGTERM/SIGINT; SIGHUP
//! reloads the configuration for the next cycle.
//!
//! - [`scheduler`]: the pure decision of when to back up (slots, retries, catch-up).
//! - [`supervisor`]: every background task (signals, watchdog, HTTP server, drills, metrics
//!   refresh, election session) runs under it; one that panics or ends makes the daemon
//!   exit non-zero.
//! - [`reload`]: SIGHUP. A reload applies from the next cycle on (a running cycle finishes
//!   with the configuration it started with); one that changes the election's identity
//!   restarts the election session on the new key.
//! - The systemd watchdog is fed only while the work loop beats; long operations (a cycle,
//!   prune, the abort of earlier uploads, the catch-up listing) beat while they run, within
//!   their own time bound.

mod background;
pub mod continuous;
pub mod defrag;
pub mod http;
pub mod metrics;
mod reload;
pub mod scheduler;
mod supervisor;

use crate::backup::source::EtcdSource;
use crate::backup::spool;
use crate::backup::{self, CycleInput};
use crate::config::Config;
use crate::daemon::metrics::{Metrics, StageLabels, StageValue};
use crate::etcd::election::{self, Role, Term};
use crate::schedule::Schedule;
use crate::store::BackupStore;
use crate::systemd::{self, Heartbeat};
use chrono::{DateTime, Utc};
use http::{HttpState, Readiness};
use reload::State;
use scheduler::{Action, Newest, Outcome as CycleOutcome, Reason, Scheduler, MAX_SLEEP};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use supervisor::Supervisor;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Time allowed for the tasks to finish after shutdown was requested.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(20);
/// How long a stopping daemon tries once more to abort the uploads of its failed cycles.
const LEFTOVER_DEADLINE: Duration = Duration::from_secs(10);

/// How often a long operation beats the heartbeat while it runs.
const BEAT_EVERY: Duration = Duration::from_secs(1);

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

/// Runs `op`, beating `heartbeat` every second while it runs, but for no longer than
/// `bound`: an operation that outlives its own time limit is stuck, and the watchdog must
/// see it.
pub async fn beating<F: Future>(heartbeat: &Heartbeat, bound: Duration, op: F) -> F::Output {
    let started = tokio::time::Instant::now();
    tokio::pin!(op);
    let mut tick = tokio::time::interval(BEAT_EVERY);
    loop {
        tokio::select! {
            out = &mut op => {
                heartbeat.beat();
                return out;
            }
            _ = tick.tick() => {
                if started.elapsed() <= bound {
                    heartbeat.beat();
                }
            }
        }
    }
}

/// The running HTTP server: its address and how to stop it.
struct Server {
    addr: std::net::SocketAddr,
    cancel: CancellationToken,
    task: tokio::task::Id,
}

impl Server {
    async fn start(
        addr: std::net::SocketAddr,
        state: HttpState,
        parent: &CancellationToken,
        tasks: &mut Supervisor,
    ) -> Result<Server, String> {
        let listener = http::bind(addr).await?;
        let cancel = parent.child_token();
        let task = tasks.spawn("HTTP server", http::serve(listener, state, cancel.clone()));
        tracing::info!(listen = %addr, "serving /metrics, /healthz and /readyz");
        Ok(Server { addr, cancel, task })
    }
}

/// The election session this node takes part in.
struct Election {
    roles: watch::Receiver<Role>,
    cancel: CancellationToken,
    task: tokio::task::Id,
    name: String,
}

impl Election {
    fn start(config: &Config, parent: &CancellationToken, tasks: &mut Supervisor) -> Election {
        let (tx, rx) = watch::channel(Role::Disconnected(None));
        let cancel = parent.child_token();
        let settings = election::Settings::from_config(config);
        let name = settings.name.clone();
        let task = tasks.spawn("election", election::run(settings, tx, cancel.clone()));
        Election {
            roles: rx,
            cancel,
            task,
            name,
        }
    }

    /// Ends the session (resign, revoke) and waits for it, bounded.
    async fn stop(mut self, tasks: &mut Supervisor) {
        tasks.retire(self.task);
        self.cancel.cancel();
        let ended = async {
            while !matches!(*self.roles.borrow_and_update(), Role::Disconnected(None)) {
                if self.roles.changed().await.is_err() {
                    return;
                }
            }
        };
        if tokio::time::timeout(SHUTDOWN_DEADLINE, ended)
            .await
            .is_err()
        {
            tracing::warn!(election = %self.name, "the old election session did not end in time");
        }
    }
}

/// Runs the daemon until SIGTERM/SIGINT.
///
/// # Errors
/// When the store, the metrics listener or the signal handlers cannot be set up, or a
/// background task panics or ends unexpectedly (systemd then restarts the daemon).
pub async fn run(config: Config) -> Result<(), String> {
    let mut d = Daemon::start(config).await?;
    let r = d.work().await;
    if let Err(e) = &r {
        tracing::error!(error = %e, "the daemon cannot go on safely; exiting so that it is restarted");
    }
    d.stop().await;
    r
}

/// Everything the work loop owns.
struct Daemon {
    state: Arc<State>,
    state_tx: watch::Sender<Arc<State>>,
    cancel: CancellationToken,
    hup: Signal,
    metrics: Arc<Metrics>,
    heartbeat: Heartbeat,
    http_state: HttpState,
    server: Server,
    election: Option<Election>,
    tasks: Supervisor,
    sched: Scheduler,
    max_sleep: Duration,
    last_result: String,
    /// The term last seen (a new one aborts earlier leaders' uploads).
    seen_term: Option<Arc<Term>>,
    /// The store's answer for the scheduler's catch-up check.
    newest: Option<Newest>,
    /// Uploads of failed cycles that could not be aborted (the store was unreachable).
    leftovers: Vec<String>,
    /// Each committed snapshot, for the continuous-backup task.
    committed: watch::Sender<Option<crate::store::manifest::Manifest>>,
    /// The continuous-backup task while `[continuous] enabled`: its cancel token and id.
    continuous: Option<(CancellationToken, tokio::task::Id)>,
}

impl Daemon {
    async fn start(config: Config) -> Result<Daemon, String> {
        let state = Arc::new(State::new(config)?);
        let (state_tx, state_rx) = watch::channel(state.clone());
        let cancel = CancellationToken::new();
        let hup = signal(SignalKind::hangup()).map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
        let mut tasks = Supervisor::default();
        {
            let cancel = cancel.clone();
            tasks.spawn("signal handler", async move {
                match shutdown_signal().await {
                    Ok(()) => tracing::info!("shutdown requested"),
                    Err(e) => tracing::error!(error = %e, "cannot handle SIGTERM/SIGINT"),
                }
                systemd::stopping();
                cancel.cancel();
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
            let (hb, c) = (heartbeat.clone(), cancel.clone());
            tasks.spawn("watchdog", systemd::run_watchdog(interval, hb, c));
            tracing::info!(interval = ?interval, "systemd watchdog enabled");
        }
        let http_state = HttpState {
            metrics: metrics.clone(),
            heartbeat: heartbeat.clone(),
            readiness: readiness.clone(),
            stall_after: max_sleep * 3 + state.config.backup.timeout,
        };
        let server = Server::start(
            state.config.metrics.listen,
            http_state.clone(),
            &cancel,
            &mut tasks,
        )
        .await?;
        let (rx, m, c) = (state_rx.clone(), metrics.clone(), cancel.clone());
        tasks.spawn("restore drill", background::run_drills(rx, m, c));
        let (rx, m, c) = (state_rx.clone(), metrics.clone(), cancel.clone());
        tasks.spawn("defragmentation", defrag::run_defrag(rx, m, c));
        let (m, r, c) = (metrics.clone(), readiness.clone(), cancel.clone());
        tasks.spawn(
            "metrics refresh",
            background::run_refresh(state_rx, m, r, c),
        );
        // The election: only the leader runs scheduled cycles. Without it this node always
        // runs them.
        let election = if state.config.election.enabled {
            Some(Election::start(&state.config, &cancel, &mut tasks))
        } else {
            metrics.is_leader.set(1);
            metrics.election_up.set(1);
            None
        };
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
        set_schedule_metric(&metrics, &state.config.schedule.parsed);
        let sched = Scheduler::new(
            state.config.schedule.parsed.clone(),
            state.config.backup.retry_after,
            Utc::now(),
        );
        log_next(sched.next_slot());
        Ok(Daemon {
            state,
            state_tx,
            cancel,
            hup,
            metrics,
            heartbeat,
            http_state,
            server,
            election,
            tasks,
            sched,
            max_sleep,
            last_result: "no backup yet".to_string(),
            seen_term: None,
            newest: None,
            leftovers: Vec::new(),
            committed: watch::channel(None).0,
            continuous: None,
        })
        .map(|mut d| {
            d.start_continuous();
            d
        })
    }

    /// Starts continuous backup when `[continuous] enabled`, following the current election.
    fn start_continuous(&mut self) {
        if !self.state.config.continuous.enabled {
            return;
        }
        let cancel = self.cancel.child_token();
        let task = continuous::run(
            self.state.config.clone(),
            self.state.store.clone(),
            self.election.as_ref().map(|e| e.roles.clone()),
            self.committed.subscribe(),
            self.metrics.clone(),
            cancel.clone(),
        );
        let id = self.tasks.spawn("continuous backup", task);
        self.continuous = Some((cancel, id));
    }

    /// Stops the continuous-backup task on purpose (before a reload restarts it).
    fn stop_continuous(&mut self) {
        if let Some((cancel, id)) = self.continuous.take() {
            self.tasks.retire(id);
            cancel.cancel();
        }
    }

    /// The work loop: until shutdown, or until a background task fails.
    async fn work(&mut self) -> Result<(), String> {
        systemd::ready(&status_line(&self.last_result, self.sched.next_slot()));
        while !self.cancel.is_cancelled() {
            self.heartbeat.beat();
            let (role, term) = self.observe_role().await;
            let newest = self.newest.take();
            match self.sched.next(Utc::now(), role, newest) {
                Action::Wait(d) => {
                    // Uploads of failed cycles whose abort failed are retried while
                    // waiting, leader or not: they are this node's own.
                    self.clean_leftovers().await;
                    self.wait(d.min(self.max_sleep)).await?;
                }
                Action::CheckStore => self.check_store().await,
                Action::Run { slot, reason } => self.cycle(slot, reason, term).await?,
            }
        }
        Ok(())
    }

    /// This node's role for the scheduler, and its term while it leads. A new term aborts
    /// the incomplete uploads of earlier leaders.
    async fn observe_role(&mut self) -> (scheduler::Role, Option<Arc<Term>>) {
        let Some(e) = &self.election else {
            return (scheduler::Role::Solo, None);
        };
        let role = e.roles.borrow().clone();
        let term = role.term().filter(|t| !t.has_ended()).cloned();
        let changed = match (&term, &self.seen_term) {
            (Some(t), Some(s)) => !Arc::ptr_eq(t, s),
            (None, None) => false,
            _ => true,
        };
        observe_role(&self.metrics, &role, changed);
        if let (true, Some(t)) = (changed, &term) {
            let bound = self.state.config.backup.timeout;
            let store = &self.state.store;
            beating(
                &self.heartbeat,
                bound,
                abort_uploads_before(store, t.since()),
            )
            .await;
        }
        self.seen_term.clone_from(&term);
        match &term {
            Some(t) => (scheduler::Role::Leader(t.token()), term),
            None => (scheduler::Role::Follower, None),
        }
    }

    /// Waits up to `d`, for a role change, a reload, shutdown or a failed task.
    async fn wait(&mut self, d: Duration) -> Result<(), String> {
        let roles = self.election.as_mut().map(|e| &mut e.roles);
        tokio::select! {
            () = self.cancel.cancelled() => {},
            () = tokio::time::sleep(d) => {},
            () = role_changed(roles) => {},
            _ = self.hup.recv() => self.reload().await,
            msg = self.tasks.failure() => {
                if !self.cancel.is_cancelled() {
                    return Err(msg);
                }
            }
        }
        Ok(())
    }

    /// The catch-up check: the newest committed backup in the store.
    async fn check_store(&mut self) {
        let bound = self.state.config.backup.timeout;
        let store = &self.state.store;
        // This cluster's backups only: another cluster's under the same name must not stand
        // in for ours (unknown while etcd is unreachable; the cycle would fail then anyway).
        let local = crate::etcd::local_cluster_id(&self.state.config.etcd)
            .await
            .ok();
        let newest = store.newest(Utc::now(), local.as_deref());
        match beating(&self.heartbeat, bound, newest).await {
            Ok((_, m)) => self.newest = Some(Newest(m.map(|m| m.slot.unwrap_or(m.time)))),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the store to check for a missed backup; checking again shortly");
                self.sched.store_unavailable(Utc::now());
            }
        }
    }

    /// SIGHUP: a valid file takes effect for the next cycle; the metrics listener and the
    /// election session move when their settings changed.
    async fn reload(&mut self) {
        let Some(new) = reload::load(&self.state, &self.metrics) else {
            systemd::ready(&status_line(&self.last_result, self.sched.next_slot()));
            return;
        };
        if new.config.metrics.listen != self.server.addr {
            match Server::start(
                new.config.metrics.listen,
                self.http_state.clone(),
                &self.cancel,
                &mut self.tasks,
            )
            .await
            {
                Ok(started) => {
                    self.tasks.retire(self.server.task);
                    self.server.cancel.cancel();
                    self.server = started;
                }
                Err(e) => {
                    tracing::error!(error = %e, "configuration reload rejected; the previous configuration stays in force");
                    systemd::ready(&status_line(&self.last_result, self.sched.next_slot()));
                    return;
                }
            }
        }
        // Continuous backup follows the new configuration and election: stopped here, before
        // the election it watches may end, and started again below.
        self.stop_continuous();
        if !reload::same_election(&self.state.config, &new.config) {
            if let Some(old) = self.election.take() {
                tracing::info!(election = %old.name, "the election's identity changed: leaving the old election");
                old.stop(&mut self.tasks).await;
            }
            self.seen_term = None;
            if new.config.election.enabled {
                let e = Election::start(&new.config, &self.cancel, &mut self.tasks);
                tracing::info!(election = %e.name, "joining the election of the reloaded configuration");
                self.election = Some(e);
            } else {
                self.metrics.is_leader.set(1);
                self.metrics.election_up.set(1);
            }
        }
        self.state = new;
        self.start_continuous();
        set_schedule_metric(&self.metrics, &self.state.config.schedule.parsed);
        let _ = self.state_tx.send(self.state.clone());
        self.sched.set_schedule(
            self.state.config.schedule.parsed.clone(),
            self.state.config.backup.retry_after,
            Utc::now(),
        );
        tracing::info!("configuration reloaded; it applies from the next cycle on");
        log_next(self.sched.next_slot());
        systemd::ready(&status_line(&self.last_result, self.sched.next_slot()));
    }

    /// Runs one cycle for `slot`, then prunes; a background task failing meanwhile aborts
    /// the cycle cleanly and ends the daemon.
    async fn cycle(
        &mut self,
        slot: DateTime<Utc>,
        reason: Reason,
        term: Option<Arc<Term>>,
    ) -> Result<(), String> {
        match reason {
            Reason::Scheduled => tracing::info!(slot = %slot, "starting scheduled backup"),
            Reason::Retry => {
                tracing::info!(slot = %slot, "retrying the failed backup (backup.retry_after)");
            }
            Reason::CatchUp => {
                tracing::info!(slot = %slot, "the last scheduled backup was missed (no committed backup since that slot); running it now, once");
            }
        }
        systemd::status(&format!(
            "backing up (slot {slot}); last: {}",
            self.last_result
        ));
        self.metrics
            .last_attempt_timestamp
            .set(Utc::now().timestamp_millis() as f64 / 1000.0);
        // The cycle keeps the configuration it started with, whatever a reload does.
        let st = self.state.clone();
        let source = EtcdSource::new(&st.config.etcd, &st.config.etcd.endpoints[0]);
        let (cancel, heartbeat) = (self.cancel.clone(), self.heartbeat.clone());
        let mut failed_task = None;
        // Never while this member is being defragmented (waits for it to finish).
        let member_gate =
            crate::defrag::gate::MemberGate::in_spool_dir(&st.config.backup.spool_dir)
                .for_snapshot(&cancel, || heartbeat.beat())
                .await;
        let r = {
            let cycle = backup::run(CycleInput {
                config: &st.config,
                store: &st.store,
                source: &source,
                cancel: &cancel,
                heartbeat: Some(&heartbeat),
                progress: None,
                term: term.as_deref(),
                slot: Some(slot),
            });
            tokio::pin!(cycle);
            loop {
                tokio::select! {
                    r = &mut cycle => break r,
                    msg = self.tasks.failure(), if failed_task.is_none() => {
                        // Tasks end on shutdown too (the signal handler first): no failure.
                        if !cancel.is_cancelled() {
                            tracing::error!(error = %msg, "aborting the running backup");
                            failed_task = Some(msg);
                            cancel.cancel();
                        }
                    }
                }
            }
        };
        drop(member_gate);
        let outcome = self.report(&st, slot, &r, term.as_deref()).await;
        self.sched.finished(slot, outcome, Utc::now());
        if let Some((when, _)) = self.sched.planned_retry() {
            tracing::info!(at = %when, "the failed backup is retried once before the next slot (backup.retry_after)");
        }
        self.clean_leftovers().await;
        let missed = scheduler::slots_between(&st.config.schedule.parsed, slot, Utc::now());
        if missed > 0 && reason == Reason::Scheduled {
            tracing::warn!(
                missed,
                "the cycle overran later scheduled runs; they are skipped, not run back to back"
            );
        }
        log_next(self.sched.next_slot());
        systemd::status(&status_line(&self.last_result, self.sched.next_slot()));
        failed_task.map_or(Ok(()), Err)
    }

    /// Logs and counts a cycle's result, prunes after a commit; the outcome for the
    /// scheduler.
    async fn report(
        &mut self,
        st: &State,
        slot: DateTime<Utc>,
        r: &Result<backup::CycleReport, crate::error::CycleError>,
        term: Option<&Term>,
    ) -> CycleOutcome {
        let fenced = matches!(r, Err(e) if e.is_fenced());
        if let Err(e) = r {
            if let Some(k) = &e.unaborted_upload {
                self.leftovers.push(k.clone());
            }
        }
        if !self.cancel.is_cancelled() && !fenced {
            self.metrics.observe_cycle(r);
        }
        match r {
            Ok(rep) => {
                tracing::info!(id = %rep.manifest.id, revision = rep.manifest.revision, size = rep.manifest.size, stored_size = rep.manifest.stored_size, "scheduled backup committed");
                self.committed.send_replace(Some(rep.manifest.clone()));
                self.last_result = format!(
                    "backup {} ok at {}",
                    rep.manifest.id,
                    rep.manifest.finished_at.format("%Y-%m-%d %H:%M:%SZ")
                );
                let bound = st.config.backup.timeout.saturating_mul(2);
                beating(
                    &self.heartbeat,
                    bound,
                    prune_after_cycle(st, &self.metrics, term, &rep.manifest.cluster_id),
                )
                .await;
                CycleOutcome::Committed
            }
            Err(e) if self.cancel.is_cancelled() => {
                tracing::warn!(error = %e, "backup aborted by shutdown");
                CycleOutcome::Aborted
            }
            Err(e) if e.is_fenced() => {
                tracing::warn!(stage = %e.stage, error = %e.message, "backup aborted: leadership lost; nothing was committed");
                CycleOutcome::Aborted
            }
            Err(e) => {
                tracing::error!(stage = %e.stage, error = %e.message, slot = %slot, "scheduled backup failed");
                self.last_result = format!(
                    "backup FAILED at stage {} at {}",
                    e.stage,
                    Utc::now().format("%Y-%m-%d %H:%M:%SZ")
                );
                CycleOutcome::Failed
            }
        }
    }

    /// Retries the aborts of failed cycles' uploads, while the store answers (bounded by
    /// the cycle timeout, feeding the watchdog).
    async fn clean_leftovers(&mut self) {
        if self.leftovers.is_empty() || self.cancel.is_cancelled() {
            return;
        }
        let store = self.state.store.clone();
        let bound = self.state.config.backup.timeout;
        beating(
            &self.heartbeat,
            bound,
            clean_leftovers(&store, &mut self.leftovers),
        )
        .await;
    }

    /// Stops every task (the election resigns and revokes its lease), bounded.
    async fn stop(&mut self) {
        systemd::stopping();
        self.cancel.cancel();
        if tokio::time::timeout(SHUTDOWN_DEADLINE, self.tasks.join_all())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop in time");
            self.tasks.abort_all();
        }
        // A last try at this node's own failed uploads (bounded), so that none is left
        // for the next leader or for prune to find.
        if !self.leftovers.is_empty() {
            let store = self.state.store.clone();
            let clean = clean_leftovers(&store, &mut self.leftovers);
            if tokio::time::timeout(LEFTOVER_DEADLINE, clean)
                .await
                .is_err()
            {
                tracing::warn!("the incomplete uploads of failed cycles could not be aborted before exiting; the next leader aborts them");
            }
        }
        tracing::info!("etcd-backup daemon stopped");
    }
}

/// Resolves when this node's role changes; never without an election (or once the
/// election task has ended).
async fn role_changed(roles: Option<&mut watch::Receiver<Role>>) {
    match roles {
        Some(rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

fn log_next(next: Option<DateTime<Utc>>) {
    match next {
        Some(n) => tracing::info!(next = %n, "next scheduled backup"),
        None => tracing::error!(
            "the schedule has no future run; waiting for a reload (SIGHUP) with a new schedule"
        ),
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
                duration_ms = started.elapsed().as_millis() as u64,
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
