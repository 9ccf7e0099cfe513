//! The etcd side of defragmentation: the cluster as each member reports it, the
//! defragment and move-leader requests to the local member, and a cluster-wide lock on a
//! lease this module keeps alive. The decisions are made in `defrag`.

use super::{describe, EtcdError, Member};
use crate::config::EtcdConfig;
use etcd_client::{Client, GetOptions, LockOptions};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What one member reports about itself (its Status answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberHealth {
    /// Database file size.
    pub db_size: i64,
    /// Bytes of the database in use; the rest is free pages that defragmentation returns.
    pub db_size_in_use: i64,
    /// The raft leader this member follows (0: none).
    pub leader: u64,
    /// Raft log index the member has.
    pub raft_index: u64,
    /// Raft log index the member has applied.
    pub raft_applied_index: u64,
    /// The alarms the member reports (`memberID:… alarm:NOSPACE`).
    pub errors: Vec<String>,
}

/// One member of the member list and, when it answered, its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberReport {
    /// Member id.
    pub id: u64,
    /// Member name (empty while the member has not started).
    pub name: String,
    /// A learner does not vote.
    pub is_learner: bool,
    /// Its status, or why it could not be read.
    pub status: Result<MemberHealth, String>,
}

/// The cluster as seen from the local member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterReport {
    /// The local member's id.
    pub local_id: u64,
    /// Every member of the member list.
    pub members: Vec<MemberReport>,
}

impl ClusterReport {
    /// The local member's report.
    pub fn local(&self) -> Option<&MemberReport> {
        self.members.iter().find(|m| m.id == self.local_id)
    }
}

fn health(st: &etcd_client::StatusResponse) -> MemberHealth {
    MemberHealth {
        db_size: st.db_size(),
        db_size_in_use: st.raft_used_db_size(),
        leader: st.leader(),
        raft_index: st.raft_index(),
        raft_applied_index: st.raft_applied_index(),
        errors: st.errors().to_vec(),
    }
}

impl Member {
    /// Every member's status: the local member's through this connection, the others'
    /// through their advertised client URLs (with `cfg`'s TLS files and credentials), each
    /// within the request timeout.
    ///
    /// # Errors
    /// [`EtcdError`] when the local member does not answer; another member that does not
    /// answer is reported in its [`MemberReport::status`].
    pub async fn cluster_report(&self, cfg: &EtcdConfig) -> Result<ClusterReport, EtcdError> {
        let mut m = self.client.maintenance_client();
        let st = self.timed("a status request", m.status()).await?;
        let local_id = st
            .header()
            .map_or(0, etcd_client::ResponseHeader::member_id);
        let mut c = self.client.cluster_client();
        let list = self.timed("a member list request", c.member_list()).await?;
        let reports = list.members().iter().map(|mem| {
            let local = (mem.id() == local_id).then(|| health(&st));
            let urls = mem.client_urls().to_vec();
            async move {
                let status = match (local, urls.first()) {
                    (Some(h), _) => Ok(h),
                    (None, None) => Err("the member has not started (no client URL)".to_string()),
                    (None, Some(url)) => match Member::connect(cfg, url).await {
                        Ok(other) => {
                            let mut mc = other.client.maintenance_client();
                            other
                                .timed("a status request", mc.status())
                                .await
                                .map(|s| health(&s))
                                .map_err(|e| e.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    },
                };
                MemberReport {
                    id: mem.id(),
                    name: mem.name().to_string(),
                    is_learner: mem.is_learner(),
                    status,
                }
            }
        });
        let members = futures::future::join_all(reports).await;
        Ok(ClusterReport { local_id, members })
    }

    /// This member's id and status.
    ///
    /// # Errors
    /// [`EtcdError`] when the member does not answer.
    pub async fn health(&self) -> Result<(u64, MemberHealth), EtcdError> {
        let mut m = self.client.maintenance_client();
        let st = self.timed("a status request", m.status()).await?;
        Ok((
            st.header()
                .map_or(0, etcd_client::ResponseHeader::member_id),
            health(&st),
        ))
    }

    /// Defragments this member, waiting up to `timeout` for it to finish. The member
    /// serves nothing meanwhile. etcd does not stop a defragmentation whose client went
    /// away: after a timeout it may still be running (see [`Member::serves_reads`]).
    ///
    /// # Errors
    /// [`EtcdError`] when the member refuses, fails or does not finish in time.
    pub async fn defragment(&self, timeout: Duration) -> Result<(), EtcdError> {
        let mut m = self.client.maintenance_client();
        tokio::time::timeout(timeout, m.defragment())
            .await
            .map_err(|_| EtcdError::Timeout {
                endpoint: self.endpoint.clone(),
                what: "the defragmentation",
                timeout,
            })?
            .map_err(|e| self.unreachable(&e))?;
        Ok(())
    }

    /// Asks this member, the raft leader, to hand leadership to member `target`.
    ///
    /// # Errors
    /// [`EtcdError`] when the member is not the leader, or the transfer fails or times out.
    pub async fn move_leader(&self, target: u64) -> Result<(), EtcdError> {
        let mut m = self.client.maintenance_client();
        self.timed("a move-leader request", m.move_leader(target))
            .await?;
        Ok(())
    }

    /// Whether the member answers a serializable read within the request timeout; a member
    /// that is still defragmenting does not.
    pub async fn serves_reads(&self) -> bool {
        let mut kv = self.client.kv_client();
        let opts = GetOptions::new().with_serializable().with_count_only();
        self.timed("a read", kv.get("/", Some(opts))).await.is_ok()
    }
}

/// Why the cluster-wide lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another holder kept it for longer than we were willing to wait.
    #[error("the lock {name} stayed taken for {waited:?} (another member's defragmentation)")]
    Busy {
        /// The lock's name.
        name: String,
        /// How long we waited.
        waited: Duration,
    },
    /// etcd refused or did not answer.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// A held cluster-wide lock (etcd's lock API on a lease of our own, kept alive by a task
/// until [`ClusterLock::release`]; a process that dies loses it when the lease expires).
pub struct ClusterLock {
    client: Client,
    lease: i64,
    valid_until: Arc<Mutex<Instant>>,
    stop: CancellationToken,
    endpoint: String,
}

impl std::fmt::Debug for ClusterLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLock")
            .field("lease", &format_args!("{:x}", self.lease))
            .finish_non_exhaustive()
    }
}

impl ClusterLock {
    /// Takes lock `name` through `member` on a lease of `ttl`, waiting up to `wait` for the
    /// current holder.
    ///
    /// # Errors
    /// [`LockError::Busy`] after `wait`; [`LockError::Etcd`] when etcd refuses.
    pub async fn acquire(
        member: &Member,
        name: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<ClusterLock, LockError> {
        let client = member.client.clone();
        let mut leases = client.lease_client();
        let sent = Instant::now();
        let grant = member
            .timed(
                "a lease grant",
                leases.grant(i64::try_from(ttl.as_secs().max(2)).unwrap_or(15), None),
            )
            .await?;
        let lease = grant.id();
        let valid_until = Arc::new(Mutex::new(
            sent + Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0)),
        ));
        let stop = CancellationToken::new();
        tokio::spawn(keep_alive(
            client.clone(),
            lease,
            ttl,
            valid_until.clone(),
            stop.clone(),
        ));
        let held = ClusterLock {
            client: client.clone(),
            lease,
            valid_until,
            stop,
            endpoint: member.endpoint.clone(),
        };
        let mut locks = client.lock_client();
        let r = tokio::time::timeout(
            wait,
            locks.lock(name, Some(LockOptions::new().with_lease(lease))),
        )
        .await;
        match r {
            Ok(Ok(_)) => Ok(held),
            Ok(Err(e)) => {
                let e = member.unreachable(&e);
                held.release().await;
                Err(e.into())
            }
            Err(_) => {
                held.release().await;
                Err(LockError::Busy {
                    name: name.to_string(),
                    waited: wait,
                })
            }
        }
    }

    /// Time until the lease may expire, by a conservative local deadline (the send time of
    /// the last acknowledged keep-alive plus the TTL).
    pub fn remaining(&self) -> Duration {
        let until = *self
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        until.saturating_duration_since(Instant::now())
    }

    /// Releases the lock: stops the keep-alives and revokes the lease (which deletes the
    /// lock key). Failures are logged; the lease then expires by itself.
    pub async fn release(self) {
        self.stop.cancel();
        let mut leases = self.client.lease_client();
        match tokio::time::timeout(Duration::from_secs(3), leases.revoke(self.lease)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(endpoint = %self.endpoint, error = %describe(&e), "cannot revoke the defragmentation lock's lease; it expires by itself");
            }
            Err(_) => {
                tracing::warn!(endpoint = %self.endpoint, "revoking the defragmentation lock's lease timed out; it expires by itself");
            }
        }
    }
}

impl Drop for ClusterLock {
    /// A lock dropped without [`ClusterLock::release`] (a panic, a cancelled task) stops
    /// its keep-alives: the lease, and with it the lock, expires within its TTL.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Keeps `lease` alive every third of `ttl` until `stop`, extending `valid_until` by each
/// acknowledged keep-alive; stops at the first failure (the deadline then runs out).
async fn keep_alive(
    client: Client,
    lease: i64,
    ttl: Duration,
    valid_until: Arc<Mutex<Instant>>,
    stop: CancellationToken,
) {
    let mut leases = client.lease_client();
    let Ok((mut keeper, mut replies)) = leases.keep_alive(lease).await else {
        return;
    };
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(500)));
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sent = Instant::now();
        if keeper.keep_alive().await.is_err() {
            return;
        }
        let reply = tokio::select! {
            () = stop.cancelled() => return,
            r = tokio::time::timeout(ttl / 3, replies.message()) => r,
        };
        match reply {
            Ok(Ok(Some(r))) if r.ttl() > 0 => {
                let until = sent + Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0));
                let mut v = valid_until
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if until > *v {
                    *v = until;
                }
            }
            _ => return,
        }
    }
}
