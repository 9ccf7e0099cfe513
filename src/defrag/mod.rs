//! Defragmentation of the local etcd member: whether it is worth it and whether this member
//! may go now ([`decide`], pure), then one attempt ([`run`]).
//!
//! Compaction frees pages inside etcd's database file but never shrinks the file;
//! defragmentation rewrites it. The member serves nothing while it defragments, so:
//!
//! - each daemon defragments only its **local** member, and only one member of the cluster
//!   defragments at a time: the attempt holds a cluster-wide lock in etcd (etcd's lock API
//!   on `KEY_PREFIX/CLUSTER_NAME:defrag`, bound to a lease of `[election] lease_ttl` that
//!   the attempt keeps alive), and decides again once it holds it;
//! - never while any member is down, no member leads, the members disagree on the leader
//!   or an alarm other than NOSPACE is raised (NOSPACE is what defragmentation after a
//!   compaction cures);
//! - the raft leader goes last: while other members still need it, the leader's daemon
//!   lets them take the lock first (for up to half of `[defrag] timeout`, in case their
//!   daemons do not defragment). Then it hands leadership to another voting member
//!   (`move-leader`), the one with the least free space (defragmented already), and
//!   defragments as a follower. So no member defragments while it leads — a leader that
//!   stops applying stalls lease renewals and the writes of the whole cluster, a follower
//!   only its own clients — and the leadership moves once per round. A cluster of one
//!   member has nobody to hand over to and defragments its leader;
//! - never while this host's etcd-backup takes a snapshot of the member (see [`gate`]).

pub mod gate;

use crate::config::Config;
use crate::etcd::defrag::{ClusterLock, ClusterReport, LockError, MemberHealth};
use crate::etcd::{EtcdError, Member};
use gate::MemberGate;
use std::fmt;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// When a member is worth defragmenting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// The share of the database file that must be free.
    pub min_free_ratio: f64,
    /// The bytes that must be free.
    pub min_free_bytes: u64,
}

impl Thresholds {
    /// `[defrag]`'s thresholds.
    pub fn from_config(c: &crate::config::DefragConfig) -> Thresholds {
        Thresholds {
            min_free_ratio: c.min_free_ratio,
            min_free_bytes: c.min_free_bytes,
        }
    }
}

/// Free bytes and the free share of a member's database file.
pub fn free_space(h: &MemberHealth) -> (u64, f64) {
    let size = u64::try_from(h.db_size).unwrap_or(0);
    let used = u64::try_from(h.db_size_in_use).unwrap_or(0);
    let free = size.saturating_sub(used);
    let ratio = if size == 0 {
        0.0
    } else {
        free as f64 / size as f64
    };
    (free, ratio)
}

/// Why the local member is not defragmented now.
#[derive(Debug, Clone, PartialEq)]
pub enum Skip {
    /// Too little free space.
    NotWorthIt {
        /// Free bytes.
        free: u64,
        /// The file's size.
        db_size: u64,
    },
    /// The local member is not in the member list.
    NotAMember,
    /// A member does not answer or has not started.
    MemberDown {
        /// Its name (or id).
        name: String,
        /// What happened.
        why: String,
    },
    /// A member has no leader.
    NoLeader {
        /// Its name.
        name: String,
    },
    /// The members name different leaders (an election is under way).
    LeaderUnsettled,
    /// An alarm other than NOSPACE is raised.
    Alarm {
        /// The alarm as etcd reports it.
        alarm: String,
    },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::NotWorthIt { free, db_size } => write!(
                f,
                "not worth it: {} of {} free",
                crate::units::human_bytes(*free),
                crate::units::human_bytes(*db_size)
            ),
            Skip::NotAMember => write!(f, "the local member is not in the cluster's member list"),
            Skip::MemberDown { name, why } => write!(
                f,
                "member {name} is down or unreachable ({why}); never while the cluster has lost a member"
            ),
            Skip::NoLeader { name } => write!(f, "member {name} has no raft leader"),
            Skip::LeaderUnsettled => write!(f, "the members name different raft leaders (an election is under way)"),
            Skip::Alarm { alarm } => write!(f, "etcd reports the alarm {alarm}; resolve it first"),
        }
    }
}

/// What to do with the local member.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Leave it.
    Skip(Skip),
    /// Defragment it.
    Defragment {
        /// Free bytes before.
        free: u64,
        /// The file's size before.
        db_size: u64,
        /// The local member leads: hand leadership to this member first.
        hand_over_to: Option<u64>,
    },
    /// The local member leads and these members still need defragmenting: they go first,
    /// so that the leadership moves once, to a member that is done.
    LeaderWaits {
        /// The members that go first.
        pending: Vec<u64>,
    },
}

/// Whether `h` is worth defragmenting under `t`.
fn worth_it(h: &MemberHealth, t: Thresholds) -> bool {
    let (free, ratio) = free_space(h);
    free > 0 && free >= t.min_free_bytes && ratio >= t.min_free_ratio
}

/// Whether the local member of `report` should be defragmented now, under `t`.
/// `leader_may_wait`: a leading local member lets the other members that need it go first
/// ([`Decision::LeaderWaits`]); without it (it has waited long enough) it goes now.
pub fn decide(report: &ClusterReport, t: Thresholds, leader_may_wait: bool) -> Decision {
    let Some(local) = report.local() else {
        return Decision::Skip(Skip::NotAMember);
    };
    let label = |id: u64, name: &str| {
        if name.is_empty() {
            format!("{id:x}")
        } else {
            name.to_string()
        }
    };
    let mut healths = Vec::new();
    for m in &report.members {
        match &m.status {
            Ok(h) => healths.push((m, h)),
            Err(why) => {
                return Decision::Skip(Skip::MemberDown {
                    name: label(m.id, &m.name),
                    why: why.clone(),
                })
            }
        }
    }
    for (_, h) in &healths {
        if let Some(a) = h.errors.iter().find(|e| !e.contains("NOSPACE")) {
            return Decision::Skip(Skip::Alarm { alarm: a.clone() });
        }
    }
    let mut leader = None;
    for (m, h) in &healths {
        if h.leader == 0 {
            return Decision::Skip(Skip::NoLeader {
                name: label(m.id, &m.name),
            });
        }
        match leader {
            None => leader = Some(h.leader),
            Some(l) if l != h.leader => return Decision::Skip(Skip::LeaderUnsettled),
            Some(_) => {}
        }
    }
    let Ok(lh) = &local.status else {
        return Decision::Skip(Skip::NotAMember);
    };
    let (free, _) = free_space(lh);
    let db_size = u64::try_from(lh.db_size).unwrap_or(0);
    if !worth_it(lh, t) {
        return Decision::Skip(Skip::NotWorthIt { free, db_size });
    }
    if leader == Some(local.id) && leader_may_wait {
        let pending: Vec<u64> = healths
            .iter()
            .filter(|(m, h)| m.id != local.id && worth_it(h, t))
            .map(|(m, _)| m.id)
            .collect();
        if !pending.is_empty() {
            return Decision::LeaderWaits { pending };
        }
    }
    let hand_over_to = if leader == Some(local.id) {
        healths
            .iter()
            .filter(|(m, _)| m.id != local.id && !m.is_learner)
            .min_by_key(|(m, h)| {
                (
                    free_space(h).0,
                    std::cmp::Reverse(h.raft_applied_index),
                    m.id,
                )
            })
            .map(|(m, _)| m.id)
    } else {
        None
    };
    Decision::Defragment {
        free,
        db_size,
        hand_over_to,
    }
}

/// How often a leader that lets the others go first looks again.
const LEADER_RECHECK: Duration = Duration::from_secs(1);

/// Why an attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum DefragError {
    /// etcd refused or did not answer.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The cluster-wide lock.
    #[error("cannot take the defragmentation lock: {0}; trying again at the next scheduled time")]
    Lock(#[from] LockError),
    /// The member lock file.
    #[error("cannot open the member lock file {path}: {source}; check that the directory holding [backup] spool_dir is writable by this user")]
    Gate {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The attempt ran out of time.
    #[error("{0} within [defrag] timeout; trying again at the next scheduled time")]
    Timeout(String),
    /// The leader could not hand over.
    #[error("the local member leads and could not hand leadership to member {target:x}: {why}; not defragmenting a leader of a cluster that has other members")]
    HandOver {
        /// The intended new leader.
        target: u64,
        /// What happened.
        why: String,
    },
    /// The lock's lease ran out before the defragmentation started.
    #[error("the defragmentation lock's lease is about to expire (etcd did not acknowledge its keep-alives); not starting")]
    LeaseLost,
    /// Shutdown.
    #[error("cancelled: shutting down")]
    Cancelled,
}

/// What an attempt did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Left alone.
    Skipped(Skip),
    /// `--dry-run`: it would be defragmented.
    WouldDefragment {
        /// The member that would lead instead first.
        hand_over_to: Option<String>,
    },
    /// Defragmented.
    Defragmented {
        /// The status after.
        after: MemberHealth,
        /// The member that took over the leadership first.
        handed_over_to: Option<String>,
        /// How long the member was defragmenting.
        took: Duration,
    },
}

/// The result of an attempt.
#[derive(Debug, Clone)]
pub struct DefragReport {
    /// The local member's name.
    pub member: String,
    /// Its status before.
    pub before: MemberHealth,
    /// What happened.
    pub outcome: Outcome,
}

impl DefragReport {
    /// Bytes the file shrank by (0 unless defragmented).
    pub fn reclaimed(&self) -> u64 {
        match &self.outcome {
            Outcome::Defragmented { after, .. } => {
                u64::try_from(self.before.db_size.saturating_sub(after.db_size)).unwrap_or(0)
            }
            _ => 0,
        }
    }
}

/// One attempt.
pub struct DefragInput<'a> {
    /// The configuration in force.
    pub config: &'a Config,
    /// The local member's client URL.
    pub endpoint: &'a str,
    /// Decide and report only.
    pub dry_run: bool,
    /// Excludes snapshots of the member on this host.
    pub gate: &'a MemberGate,
    /// A leading member lets the other members that need it go first (the schedule, where
    /// they all fire at once); `false`: it hands over and goes now (a command run by hand).
    pub leader_waits: bool,
    /// Shutdown.
    pub cancel: &'a CancellationToken,
}

/// The name of the cluster-wide lock: next to the election, never under its prefix (a
/// `:` cannot appear in a cluster name).
pub fn lock_name(config: &Config) -> String {
    format!(
        "{}:defrag",
        config.election.election_name(&config.backup.cluster_name)
    )
}

/// Decides, and when the local member should go: takes the cluster-wide lock, decides
/// again under it, takes the member gate (a running snapshot makes it release the lock,
/// wait and start over), hands leadership over when the member leads, and defragments.
///
/// # Errors
/// [`DefragError`]; the lock and the gate are released on every way out, except that
/// after a failed or timed-out defragmentation they are kept until the member serves
/// reads again (etcd does not stop a defragmentation whose client went away).
pub async fn run(input: DefragInput<'_>) -> Result<DefragReport, DefragError> {
    let cfg = input.config;
    let t = Thresholds::from_config(&cfg.defrag);
    let deadline = Instant::now() + cfg.defrag.timeout;
    let member = Member::connect(&cfg.etcd, input.endpoint).await?;
    // Only the local member is read before the lock: another member may be
    // defragmenting right now, and a member that defragments does not answer its status
    // until it is done (its state is read under the lock, when it is its turn).
    let (_, before) = member.health().await?;
    let local_name = member.status().await?.member_name;
    let done = |before: MemberHealth, outcome| DefragReport {
        member: local_name.clone(),
        before,
        outcome,
    };
    if !worth_it(&before, t) {
        let (free, _) = free_space(&before);
        let db_size = u64::try_from(before.db_size).unwrap_or(0);
        return Ok(done(
            before,
            Outcome::Skipped(Skip::NotWorthIt { free, db_size }),
        ));
    }
    if input.dry_run {
        let outcome = dry_run(&member, cfg, t).await?;
        return Ok(done(before, outcome));
    }
    // A leader lets the others go first for up to half the time it has.
    let wait_for_others_until = if input.leader_waits {
        Instant::now() + cfg.defrag.timeout / 2
    } else {
        Instant::now()
    };
    let mut told = false;
    let lock_name = lock_name(cfg);
    let ttl = cfg.election.lease_ttl;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(DefragError::Timeout(
                "the member could not be defragmented (other members' turns or snapshots took the time)".to_string(),
            ));
        }
        let lock = tokio::select! {
            () = input.cancel.cancelled() => return Err(DefragError::Cancelled),
            r = ClusterLock::acquire(&member, &lock_name, ttl, left) => r?,
        };
        // Under the lock: the other members' turns may have changed everything.
        let report = match member.cluster_report(&cfg.etcd).await {
            Ok(r) => r,
            Err(e) => {
                lock.release().await;
                return Err(e.into());
            }
        };
        let before = report
            .local()
            .and_then(|m| m.status.clone().ok())
            .unwrap_or(before.clone());
        let may_wait = Instant::now() < wait_for_others_until;
        let hand_over_to = match decide(&report, t, may_wait) {
            Decision::Skip(s) => {
                lock.release().await;
                return Ok(done(before, Outcome::Skipped(s)));
            }
            Decision::Defragment { hand_over_to, .. } => hand_over_to,
            Decision::LeaderWaits { pending } => {
                lock.release().await;
                if !told {
                    told = true;
                    let names: Vec<String> =
                        pending.iter().map(|id| name_of(&report, *id)).collect();
                    tracing::info!(first = ?names, "the local member is the raft leader: the other members that need it are defragmented first");
                }
                tokio::select! {
                    () = input.cancel.cancelled() => return Err(DefragError::Cancelled),
                    () = tokio::time::sleep(LEADER_RECHECK) => {}
                }
                continue;
            }
        };
        let guard = match input.gate.try_lock() {
            Ok(g) => g,
            Err(source) => {
                lock.release().await;
                return Err(DefragError::Gate {
                    path: input.gate.path().display().to_string(),
                    source,
                });
            }
        };
        let Some(guard) = guard else {
            // A snapshot of this member runs: let the other members go meanwhile.
            lock.release().await;
            wait_for_snapshot(&input, deadline).await?;
            continue;
        };
        let handed_over_to = match hand_over_to {
            None => None,
            Some(target) => match hand_over(&member, report.local_id, target).await {
                Ok(()) => {
                    let name = name_of(&report, target);
                    tracing::info!(new_leader = %name, "the local member handed the raft leadership over before defragmenting");
                    Some(name)
                }
                Err(why) => {
                    drop(guard);
                    lock.release().await;
                    return Err(DefragError::HandOver { target, why });
                }
            },
        };
        if lock.remaining() < ttl / 3 {
            drop(guard);
            lock.release().await;
            return Err(DefragError::LeaseLost);
        }
        let r = defragment_now(&member, cfg, &local_name, &before).await;
        drop(guard);
        lock.release().await;
        return Ok(done(
            before,
            Outcome::Defragmented {
                after: r.after?,
                handed_over_to,
                took: r.took,
            },
        ));
    }
}

/// Waits (bounded by `deadline`) until the snapshot of the local member that holds the
/// member gate ends.
async fn wait_for_snapshot(input: &DefragInput<'_>, deadline: Instant) -> Result<(), DefragError> {
    tracing::info!("a snapshot of the local member is running; the defragmentation waits for it");
    let until = tokio::time::sleep_until(tokio::time::Instant::from_std(deadline));
    let waited = tokio::select! {
        () = input.cancel.cancelled() => return Err(DefragError::Cancelled),
        r = input.gate.lock_until(until) => r,
    };
    match waited {
        Ok(Some(g)) => {
            drop(g);
            Ok(())
        }
        Ok(None) => Err(DefragError::Timeout(
            "the snapshot of the local member did not end".to_string(),
        )),
        Err(source) => Err(DefragError::Gate {
            path: input.gate.path().display().to_string(),
            source,
        }),
    }
}

/// The name of member `id` in `r`, or its id in hex.
fn name_of(r: &ClusterReport, id: u64) -> String {
    r.members
        .iter()
        .find(|m| m.id == id)
        .map_or_else(|| format!("{id:x}"), |m| m.name.clone())
}

/// `--dry-run`: what a defragmentation would do now, read without the lock.
async fn dry_run(member: &Member, cfg: &Config, t: Thresholds) -> Result<Outcome, DefragError> {
    let report = member.cluster_report(&cfg.etcd).await?;
    Ok(match decide(&report, t, false) {
        Decision::Skip(s) => Outcome::Skipped(s),
        Decision::Defragment { hand_over_to, .. } => Outcome::WouldDefragment {
            hand_over_to: hand_over_to.map(|id| name_of(&report, id)),
        },
        Decision::LeaderWaits { .. } => Outcome::WouldDefragment { hand_over_to: None },
    })
}

/// What one defragmentation took and left.
struct Defragmented {
    took: Duration,
    after: Result<MemberHealth, DefragError>,
}

/// Defragments the local member (the caller holds the cluster lock and the member gate).
/// When the request fails the member may still be defragmenting: this waits until it
/// serves reads again (bounded) before returning, so that nothing else starts meanwhile.
async fn defragment_now(
    member: &Member,
    cfg: &Config,
    local_name: &str,
    before: &MemberHealth,
) -> Defragmented {
    let (free, _) = free_space(before);
    tracing::info!(
        member = %local_name,
        db_size = before.db_size,
        db_size_in_use = before.db_size_in_use,
        free,
        "defragmenting the local member"
    );
    let started = Instant::now();
    // The waiting before had its own bound; the defragmentation gets the whole timeout.
    let r = member.defragment(cfg.defrag.timeout).await;
    let took = started.elapsed();
    if let Err(e) = r {
        let until = Instant::now() + cfg.defrag.timeout;
        while Instant::now() < until && !member.serves_reads().await {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        return Defragmented {
            took,
            after: Err(e.into()),
        };
    }
    Defragmented {
        took,
        after: member.health().await.map(|(_, h)| h).map_err(Into::into),
    }
}

/// Moves the leadership from the local member (`local`) to `target` and waits until the
/// local member no longer leads.
async fn hand_over(member: &Member, local: u64, target: u64) -> Result<(), String> {
    member
        .move_leader(target)
        .await
        .map_err(|e| e.to_string())?;
    let until = Instant::now() + member.request_timeout() * 2;
    loop {
        if let Ok((_, h)) = member.health().await {
            if h.leader != local && h.leader != 0 {
                return Ok(());
            }
        }
        if Instant::now() > until {
            return Err("the local member still leads after the transfer".to_string());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests;
