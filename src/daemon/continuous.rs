//! The continuous-backup task: while this node leads, it writes the segment chain of the
//! newest committed snapshot (see `crate::continuous::writer`).

use crate::config::Config;
use crate::continuous::chain::SegmentManifest;
use crate::continuous::writer::{self, Observer, Outcome, Settings};
use crate::daemon::metrics::Metrics;
use crate::etcd::election::{Role, Term};
use crate::etcd::Member;
use crate::store::manifest::{Encryption, Manifest};
use crate::store::BackupStore;
use chrono::Utc;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Pause after a failed chain run before the next.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The writer's reports, turned into metrics. The lag keeps growing while no writer
/// reports it (between chains, after a gap, while etcd or the store fails): the data-loss
/// window grows then too.
struct Tracker {
    metrics: Arc<Metrics>,
    /// When the lag was last reported, and the value reported.
    last: std::sync::Mutex<Option<(std::time::Instant, f64)>>,
}

impl Tracker {
    fn refresh(&self) {
        let last = *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, lag)) = last {
            let since = at.elapsed();
            if since > Duration::from_secs(2) {
                self.metrics.continuous.lag.set(lag + since.as_secs_f64());
            }
        }
    }

    /// Not leading: not this node's data-loss window.
    fn idle(&self) {
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.metrics.continuous.lag.set(0.0);
    }
}

impl Observer for Tracker {
    fn committed(&self, m: &SegmentManifest) {
        self.metrics.continuous.segments.inc();
        self.metrics.continuous.last_revision.set(m.last_revision);
    }
    fn failed(&self) {
        self.metrics.continuous.segment_failures.inc();
    }
    fn gap(&self) {
        self.metrics.continuous.gaps.inc();
    }
    fn lag(&self, seconds: f64) {
        *self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((std::time::Instant::now(), seconds));
        self.metrics.continuous.lag.set(seconds);
    }
}

fn settings(config: &Config) -> Result<Settings, String> {
    let recipients = config.encryption.recipients.keys().to_vec();
    Ok(Settings {
        interval: config.continuous.segment_interval,
        max_bytes: config.continuous.max_segment_bytes,
        compression: config.backup.compression,
        level: config.backup.compression_level,
        encryption: config.encryption.enabled().then(|| Encryption {
            method: crate::store::manifest::EncryptionMethod::Age,
            recipients: config.encryption.recipients.texts().to_vec(),
        }),
        recipients,
        spool_dir: config.backup.spool_dir.clone(),
        node: config.election.node_name.clone(),
    })
}

/// The current term, waiting until this node leads; `None` on shutdown. Without an
/// election (`roles` is `None`) this node always leads, with no term.
async fn leading(
    roles: &mut Option<watch::Receiver<Role>>,
    cancel: &CancellationToken,
) -> Option<Option<Arc<Term>>> {
    let Some(rx) = roles else {
        return (!cancel.is_cancelled()).then_some(None);
    };
    loop {
        if let Some(t) = rx.borrow_and_update().term().cloned() {
            if !t.has_ended() {
                return Some(Some(t));
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return None,
            r = rx.changed() => if r.is_err() { return None },
        }
    }
}

/// Takes a snapshot now (a normal, fenced cycle) to start a new chain after a gap.
async fn fresh_snapshot(
    config: &Config,
    store: &BackupStore,
    term: Option<&Term>,
    cancel: &CancellationToken,
) -> Option<Manifest> {
    tracing::info!("continuous backup: taking a snapshot now to start a new chain after the gap");
    let source = crate::backup::source::EtcdSource::new(&config.etcd, &config.etcd.endpoints[0]);
    let r = crate::backup::run(crate::backup::CycleInput {
        config,
        store,
        source: &source,
        cancel,
        heartbeat: None,
        progress: None,
        term,
        slot: None,
    })
    .await;
    match r {
        Ok(rep) => {
            tracing::info!(id = %rep.manifest.id, revision = rep.manifest.revision, "snapshot for a new continuous chain committed");
            Some(rep.manifest)
        }
        Err(e) => {
            tracing::warn!(stage = %e.stage, error = %e.message, "the snapshot for a new chain failed; the chain restarts at the next scheduled snapshot");
            None
        }
    }
}

/// What one chain run needs.
struct Chain<'a> {
    config: &'a Config,
    store: &'a BackupStore,
    settings: &'a Settings,
    term: Option<&'a Term>,
    committed: &'a mut watch::Receiver<Option<Manifest>>,
    cancel: &'a CancellationToken,
    tracker: &'a Tracker,
    /// A snapshot this task took itself after a gap.
    fresh: Option<&'a Manifest>,
    /// The base revision whose chain ended with a gap.
    ended_at: Option<i64>,
}

/// Continues (or starts) the chain of the newest snapshot this cluster committed — the
/// store's, or one the daemon just reported — and runs it until it stops. `None`: no
/// snapshot to continue from yet.
async fn one_chain(c: Chain<'_>) -> Result<Option<(Outcome, i64)>, String> {
    let config = c.config;
    let member = Member::connect(&config.etcd, &config.etcd.endpoints[0])
        .await
        .map_err(|e| e.to_string())?;
    let cluster_id = format!(
        "{:016x}",
        member.status().await.map_err(|e| e.to_string())?.cluster_id
    );
    let listed = c.store.list().await.map_err(|e| e.to_string())?;
    let mut base = listed.latest(Utc::now(), &cluster_id).cloned();
    let notified = c.committed.borrow_and_update().clone();
    for n in notified.into_iter().chain(c.fresh.cloned()) {
        if base.as_ref().is_none_or(|b| n.revision > b.revision) {
            base = Some(n);
        }
    }
    let Some(base) = base.filter(|b| c.ended_at.is_none_or(|e| b.revision > e)) else {
        return Ok(None);
    };
    writer::run_chain(writer::Input {
        member: &member,
        store: c.store,
        settings: c.settings,
        base: &base,
        term: c.term,
        newer: c.committed,
        cancel: c.cancel,
        observer: c.tracker,
    })
    .await
    .map(|o| Some((o, base.revision)))
}

/// Runs continuous backup until shutdown (returns at once when `[continuous]` is off).
/// `committed` carries each snapshot the daemon commits.
pub async fn run(
    config: Config,
    store: BackupStore,
    mut roles: Option<watch::Receiver<Role>>,
    mut committed: watch::Receiver<Option<Manifest>>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    if !config.continuous.enabled {
        return;
    }
    let settings = match settings(&config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "continuous backup cannot start");
            return;
        }
    };
    let tracker = Arc::new(Tracker {
        metrics: metrics.clone(),
        last: std::sync::Mutex::new(None),
    });
    {
        let (tracker, cancel) = (tracker.clone(), cancel.clone());
        tokio::spawn(async move {
            while !cancel.is_cancelled() {
                tokio::time::sleep(Duration::from_secs(1)).await;
                tracker.refresh();
            }
        });
    }
    // The base that ended with a gap: wait for a newer snapshot than this.
    let mut ended_at: Option<i64> = None;
    // A snapshot this task took itself to start a new chain after a gap.
    let mut fresh: Option<Manifest> = None;
    while !cancel.is_cancelled() {
        let leads_now = roles.as_ref().is_none_or(|rx| rx.borrow().term().is_some());
        if !leads_now {
            tracker.idle();
        }
        let Some(term) = leading(&mut roles, &cancel).await else {
            return;
        };
        if tracker
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_none()
        {
            tracker.lag(0.0);
        }
        let r = one_chain(Chain {
            config: &config,
            store: &store,
            settings: &settings,
            term: term.as_deref(),
            committed: &mut committed,
            cancel: &cancel,
            tracker: &tracker,
            fresh: fresh.as_ref(),
            ended_at,
        })
        .await;
        match r {
            Ok(Some((Outcome::Superseded, _))) => continue,
            Ok(Some((Outcome::Stopped, _))) => {
                // Shutdown, or the term ended: wait to lead again.
                tracker.idle();
                if let Some(t) = &term {
                    tokio::select! {
                        () = cancel.cancelled() => return,
                        () = t.lost().cancelled() => {},
                    }
                }
            }
            Ok(Some((Outcome::Ended, rev))) => {
                ended_at = Some(rev);
                // A gap: start a new chain at once from a fresh snapshot rather than at
                // the next scheduled one.
                fresh = fresh_snapshot(&config, &store, term.as_deref(), &cancel).await;
            }
            Ok(None) => {
                // No snapshot to continue from yet: wait for the next one.
                tokio::select! {
                    () = cancel.cancelled() => return,
                    r = committed.changed() => if r.is_err() { return },
                }
            }
            Err(e) => {
                metrics.continuous.segment_failures.inc();
                tracing::warn!(error = %e, retry_in = ?RETRY_AFTER, "continuous backup interrupted; it continues from the last committed segment");
                tokio::select! {
                    () = cancel.cancelled() => return,
                    () = tokio::time::sleep(RETRY_AFTER) => {},
                }
            }
        }
        let fresh_is_newer = fresh
            .as_ref()
            .is_some_and(|f| ended_at.is_none_or(|e| f.revision > e));
        if ended_at.is_some() && !fresh_is_newer {
            // A new chain needs a newer snapshot than the one whose chain ended.
            let wait = async {
                loop {
                    let newest = committed.borrow_and_update().as_ref().map(|m| m.revision);
                    if newest.is_some_and(|n| ended_at.is_some_and(|e| n > e)) {
                        return true;
                    }
                    if committed.changed().await.is_err() {
                        return false;
                    }
                }
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                ok = wait => if !ok { return },
            }
        }
    }
}
