//! One snapshotter per cluster: the daemons elect a leader through etcd's election API, on a
//! lease that this module keeps alive itself, and the leader proves it still leads (fencing)
//! before each step that could leave something behind.
//!
//! The election runs as a supervised task ([`run`]): connect to the local member, grant a
//! lease, keep it alive (etcd-client sends one keep-alive per call and never reconnects, so
//! the ticker and the reconnects are ours), campaign, and on any failure start over with
//! backoff. The task publishes this node's [`Role`] on a watch channel.
//!
//! While leading, the node holds a [`Term`]: the election key, its creation revision (the
//! fencing token) and a local deadline, `time the last acknowledged keep-alive was sent +
//! TTL`, which is never later than etcd's own expiry of the lease. [`Term::check`] passes
//! only while that deadline is more than a third of the TTL away *and* a transaction
//! confirms that the election key still exists with the token's revision. A process that was
//! paused (SIGSTOP, a VM freeze) fails the local half at once on resuming, before any
//! request, because the monotonic clock kept running.

use crate::config::{ElectionConfig, EtcdConfig};
use crate::etcd::{EtcdError, Member};
use chrono::{DateTime, Utc};
use etcd_client::{Compare, CompareOp, LeaderKey, ProclaimOptions, ResignOptions, Txn};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// First wait after a failed session; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between attempts to reach etcd. Short: the member is local, one attempt is
/// cheap, and after an etcd stall some node must lead again within seconds.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Bound on resigning and revoking the lease at shutdown.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(3);

/// The value of the election key: who leads and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// `[election] node_name` of the leader.
    pub node: String,
    /// When it became leader (unset while it is only campaigning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// Its process id.
    #[serde(default)]
    pub pid: u32,
}

impl LeaderInfo {
    fn parse(value: &[u8]) -> LeaderInfo {
        serde_json::from_slice(value).unwrap_or_else(|_| LeaderInfo {
            node: String::from_utf8_lossy(value).into_owned(),
            since: None,
            pid: 0,
        })
    }
}

/// The current leader as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaderView {
    /// What the leader wrote into its key.
    pub info: LeaderInfo,
    /// The key's creation revision: the leader's fencing token.
    pub token: i64,
}

/// This node's place in the election.
#[derive(Clone, Debug)]
pub enum Role {
    /// Not taking part: connecting, or etcd is unreachable (the error says why).
    Disconnected(Option<String>),
    /// Campaigning; another node leads (when known).
    Follower(Option<LeaderView>),
    /// This node leads.
    Leader(Arc<Term>),
}

impl Role {
    /// The term, while this node leads.
    pub fn term(&self) -> Option<&Arc<Term>> {
        match self {
            Role::Leader(t) => Some(t),
            _ => None,
        }
    }
}

/// Why a fencing check failed: this node must not commit anything.
#[derive(Debug, thiserror::Error)]
#[error("this node ({node}) is no longer the leader {before}: {why}; another node takes over the backups")]
pub struct Fenced {
    node: String,
    before: String,
    why: String,
}

/// One period of leadership.
pub struct Term {
    node: String,
    key: Vec<u8>,
    token: i64,
    lease: i64,
    since: DateTime<Utc>,
    ttl: Duration,
    valid_until: Mutex<Instant>,
    lost: CancellationToken,
    member: Arc<Member>,
}

impl std::fmt::Debug for Term {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Term")
            .field("node", &self.node)
            .field("token", &self.token)
            .field("lease", &format_args!("{:x}", self.lease))
            .field("since", &self.since)
            .finish_non_exhaustive()
    }
}

impl Term {
    /// The fencing token: the election key's creation revision.
    pub fn token(&self) -> i64 {
        self.token
    }

    /// When this node became leader.
    pub fn since(&self) -> DateTime<Utc> {
        self.since
    }

    /// Cancelled when the term ends (lease lost, etcd unreachable, shutdown).
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Whether the term is over: marked lost, or past its local deadline (the lease may have
    /// expired in etcd, whether or not the keep-alive loop has noticed yet).
    pub fn has_ended(&self) -> bool {
        self.lost.is_cancelled() || self.remaining().is_zero()
    }

    /// Time left until the lease may expire, by the local conservative deadline.
    pub fn remaining(&self) -> Duration {
        let until = *self
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        until.saturating_duration_since(Instant::now())
    }

    fn extend(&self, until: Instant) {
        let mut v = self
            .valid_until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if until > *v {
            *v = until;
        }
    }

    fn margin(&self) -> Duration {
        self.ttl / 3
    }

    fn fenced(&self, before: &str, why: impl Into<String>) -> Fenced {
        self.lost.cancel();
        Fenced {
            node: self.node.clone(),
            before: before.to_string(),
            why: why.into(),
        }
    }

    fn check_local(&self, before: &str) -> Result<(), Fenced> {
        if self.lost.is_cancelled() {
            return Err(Fenced {
                node: self.node.clone(),
                before: before.to_string(),
                why: "the leadership term has ended".to_string(),
            });
        }
        let left = self.remaining();
        if left < self.margin() {
            return Err(self.fenced(
                before,
                format!(
                    "the lease was not renewed in time ({}ms left of a {}s TTL)",
                    left.as_millis(),
                    self.ttl.as_secs()
                ),
            ));
        }
        Ok(())
    }

    /// Passes only while this node still leads: the lease has more than a third of its TTL
    /// left and etcd confirms the election key still carries this term's fencing token.
    ///
    /// # Errors
    /// [`Fenced`] otherwise; the term is then marked lost.
    pub async fn check(&self, before: &str) -> Result<(), Fenced> {
        let limit = self.remaining().saturating_sub(self.margin());
        self.check_within(before, limit).await
    }

    /// [`Term::check`] with the time etcd has to confirm the key given explicitly: the seam
    /// through which tests make a check uncertain (a zero limit cannot be met).
    ///
    /// # Errors
    /// See [`Term::check`].
    #[doc(hidden)]
    pub async fn check_within(&self, before: &str, limit: Duration) -> Result<(), Fenced> {
        self.check_local(before)?;
        let txn = Txn::new().when([Compare::create_revision(
            self.key.clone(),
            CompareOp::Equal,
            self.token,
        )]);
        let mut kv = self.member.client().kv_client();
        // No time left to confirm is as uncertain as a timeout.
        let r = if limit.is_zero() {
            None
        } else {
            tokio::time::timeout(limit, kv.txn(txn)).await.ok()
        };
        match r {
            None => Err(self.fenced(
                before,
                "etcd did not confirm the election key before the lease could expire",
            )),
            Some(Err(e)) => Err(self.fenced(
                before,
                format!(
                    "cannot confirm the election key: {}",
                    self.member.unreachable(&e)
                ),
            )),
            Some(Ok(resp)) if !resp.succeeded() => Err(self.fenced(
                before,
                format!(
                    "the election key no longer has fencing token {} (the lease expired or was revoked)",
                    self.token
                ),
            )),
            Some(Ok(_)) => self.check_local(before),
        }
    }
}

/// What the election task needs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `[election]`.
    pub election: ElectionConfig,
    /// `[etcd]`: TLS, credentials, timeouts.
    pub etcd: EtcdConfig,
    /// The local member's client URL.
    pub endpoint: String,
    /// The election's name (`KEY_PREFIX/CLUSTER_NAME`).
    pub name: String,
}

impl Settings {
    /// The settings of `config`.
    pub fn from_config(config: &crate::config::Config) -> Settings {
        Settings {
            election: config.election.clone(),
            etcd: config.etcd.clone(),
            endpoint: config.etcd.endpoints[0].clone(),
            name: config.election.election_name(&config.backup.cluster_name),
        }
    }
}

/// The current leader of election `name`, `None` when nobody leads.
///
/// # Errors
/// [`EtcdError`] when the member does not answer.
pub async fn current_leader(member: &Member, name: &str) -> Result<Option<LeaderView>, EtcdError> {
    let mut e = member.client().election_client();
    match tokio::time::timeout(member.request_timeout(), e.leader(name)).await {
        Err(_) => Err(EtcdError::Timeout {
            endpoint: member.endpoint().to_string(),
            what: "a leader request",
            timeout: member.request_timeout(),
        }),
        Ok(Ok(r)) => Ok(r.kv().map(|kv| LeaderView {
            info: LeaderInfo::parse(kv.value()),
            token: kv.create_revision(),
        })),
        // etcd answers "election: no leader" when no key exists under the name.
        Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.message().contains("no leader") => Ok(None),
        Ok(Err(e)) => Err(member.unreachable(&e)),
    }
}

/// Runs the election until `cancel`: publishes this node's role on `role`, and on shutdown
/// resigns (so another node takes over at once) and revokes the lease.
pub async fn run(settings: Settings, role: watch::Sender<Role>, cancel: CancellationToken) {
    let mut backoff = MIN_BACKOFF;
    tracing::info!(
        node = %settings.election.node_name,
        election = %settings.name,
        endpoint = %settings.endpoint,
        lease_ttl_s = settings.election.lease_ttl.as_secs(),
        "joining the snapshotter election"
    );
    // The lease of an earlier session whose revoke failed: it may still hold the election
    // key (or be renewed by a keep-alive that sat in a socket during a stall), so it is
    // revoked before this node campaigns again.
    let mut stale: Option<i64> = None;
    loop {
        let mut joined = false;
        let r = session(&settings, &role, &cancel, &mut joined, &mut stale).await;
        if cancel.is_cancelled() {
            role.send_replace(Role::Disconnected(None));
            return;
        }
        if joined {
            backoff = MIN_BACKOFF;
        }
        // A stale lease blocks every node: try again at once, not after a long backoff.
        let wait = if stale.is_some() {
            MIN_BACKOFF
        } else {
            backoff
        };
        let why = r.err().unwrap_or_else(|| "the session ended".to_string());
        tracing::warn!(
            error = %why,
            retry_in_s = wait.as_secs(),
            stale_lease = ?stale.map(|l| format!("{l:x}")),
            "not taking part in the election (no backups from this node until it rejoins); retrying"
        );
        role.send_replace(Role::Disconnected(Some(why)));
        tokio::select! {
            () = cancel.cancelled() => {
                role.send_replace(Role::Disconnected(None));
                return;
            }
            () = tokio::time::sleep(wait) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Grants a lease of `ttl` and opens its keep-alive stream. Returns the lease, its local
/// deadline and the stream. A lease granted whose stream cannot be opened is left in `stale`.
async fn open_lease(
    member: &Member,
    ttl: Duration,
    stale: &mut Option<i64>,
) -> Result<
    (
        i64,
        Instant,
        etcd_client::LeaseKeeper,
        etcd_client::LeaseKeepAliveStream,
    ),
    String,
> {
    let mut leases = member.client().lease_client();
    let sent = Instant::now();
    let grant = member
        .timed(
            "a lease grant",
            leases.grant(i64::try_from(ttl.as_secs()).unwrap_or(15), None),
        )
        .await
        .map_err(|e| e.to_string())?;
    let lease = grant.id();
    let valid_until = sent + Duration::from_secs(u64::try_from(grant.ttl()).unwrap_or(0));
    match member
        .timed("a lease keep-alive", leases.keep_alive(lease))
        .await
    {
        Ok((keeper, replies)) => Ok((lease, valid_until, keeper, replies)),
        Err(e) => {
            *stale = Some(lease);
            Err(e.to_string())
        }
    }
}

/// Revokes `lease`; a lease etcd no longer knows counts as revoked.
async fn revoke(member: &Member, lease: i64) -> Result<(), String> {
    let mut leases = member.client().lease_client();
    match member.timed("a lease revoke", leases.revoke(lease)).await {
        Ok(_) => Ok(()),
        Err(EtcdError::Unreachable { detail, .. }) if detail.contains("lease not found") => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}

/// Resolves when `term` ends (never while there is none).
async fn term_lost(term: Option<&Arc<Term>>) {
    match term {
        Some(t) => t.lost.cancelled().await,
        None => std::future::pending().await,
    }
}

/// One session: one connection, one lease, at most one term. Returns `Ok` only on
/// shutdown. Ends when the term ends for any reason (a failed or uncertain fencing check
/// included), so the term and the session never disagree: a new term needs a new session.
async fn session(
    s: &Settings,
    role: &watch::Sender<Role>,
    cancel: &CancellationToken,
    joined: &mut bool,
    stale: &mut Option<i64>,
) -> Result<(), String> {
    let member = Arc::new(
        Member::connect(&s.etcd, &s.endpoint)
            .await
            .map_err(|e| e.to_string())?,
    );
    if let Some(old) = *stale {
        revoke(&member, old).await.map_err(|e| {
            format!("cannot revoke the lease {old:x} of the previous session (it may still hold the election key): {e}")
        })?;
        tracing::info!(lease = %format_args!("{old:x}"), "revoked the lease of the previous session");
        *stale = None;
    }
    let ttl = s.election.lease_ttl;
    let (lease, mut valid_until, mut keeper, mut replies) = open_lease(&member, ttl, stale).await?;
    *joined = true;
    tracing::debug!(lease = %format_args!("{lease:x}"), "lease granted; campaigning");
    let follower = current_leader(&member, &s.name).await.ok().flatten();
    role.send_replace(Role::Follower(follower));

    let node = s.election.node_name.clone();
    let pid = std::process::id();
    let campaign_value = serde_json::to_vec(&LeaderInfo {
        node: node.clone(),
        since: None,
        pid,
    })
    .unwrap_or_default();
    let mut election = member.client().election_client();
    let campaign = election.campaign(s.name.clone(), campaign_value, lease);
    tokio::pin!(campaign);
    let mut campaigning = true;
    let mut term: Option<Arc<Term>> = None;
    let mut pending: VecDeque<Instant> = VecDeque::new();
    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let result: Result<(), String> = loop {
        let expiry = tokio::time::sleep_until(tokio::time::Instant::from_std(valid_until));
        tokio::select! {
            () = cancel.cancelled() => break Ok(()),
            () = term_lost(term.as_ref()) => break Err(
                "the leadership term ended (a fencing check failed or could not be confirmed); starting a new session".to_string()
            ),
            () = expiry => break Err(format!(
                "the lease was not renewed within its {}s TTL (etcd did not acknowledge the keep-alives)",
                ttl.as_secs()
            )),
            r = &mut campaign, if campaigning => {
                campaigning = false;
                let won = r.map_err(|e| format!("campaign failed: {}", member.unreachable(&e)));
                match won.and_then(|resp| {
                    resp.leader()
                        .cloned()
                        .ok_or_else(|| "etcd answered the campaign without a leader key".to_string())
                }) {
                    Ok(key) => {
                        let t = Arc::new(Term {
                            node: node.clone(),
                            key: key.key().to_vec(),
                            token: key.rev(),
                            lease,
                            since: Utc::now(),
                            ttl,
                            valid_until: Mutex::new(valid_until),
                            lost: CancellationToken::new(),
                            member: member.clone(),
                        });
                        proclaim(&member, &key, &t).await;
                        tracing::info!(node = %node, fencing_token = t.token, "this node is now the leader: it takes the scheduled backups");
                        role.send_replace(Role::Leader(t.clone()));
                        term = Some(t);
                    }
                    Err(e) => break Err(e),
                }
            }
            _ = tick.tick() => {
                pending.push_back(Instant::now());
                if let Err(e) = keeper.keep_alive().await {
                    break Err(format!("cannot send a lease keep-alive: {}", member.unreachable(&e)));
                }
                if term.is_none() {
                    follow(&member, &s.name, ttl / 3, role).await;
                }
            }
            m = replies.message() => match m {
                Ok(Some(r)) if r.ttl() > 0 => {
                    if let Some(at) = pending.pop_front() {
                        valid_until = valid_until.max(at + Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0)));
                        if let Some(t) = &term {
                            t.extend(valid_until);
                        }
                    }
                }
                Ok(Some(_)) => break Err("the lease expired (etcd reports TTL 0)".to_string()),
                Ok(None) => break Err("etcd closed the lease keep-alive stream".to_string()),
                Err(e) => break Err(format!("the lease keep-alive stream failed: {}", member.unreachable(&e))),
            },
        }
    };
    if let Some(t) = &term {
        t.lost.cancel();
        if result.is_err() {
            tracing::warn!(node = %node, fencing_token = t.token, "leadership lost; a running backup is aborted and nothing more is committed");
        }
    }
    let revoked = goodbye(s, &member, term.as_deref(), lease).await;
    if !revoked && result.is_err() {
        // Never campaign again while this lease may still hold the key.
        *stale = Some(lease);
    }
    result
}

/// Hands over at once: resigns (when leading) and revokes the lease, which also withdraws
/// a pending campaign. After an error the lease may still be alive; revoking it spares the
/// other nodes the wait for its TTL. Returns whether the lease is known to be gone.
async fn goodbye(s: &Settings, member: &Member, term: Option<&Term>, lease: i64) -> bool {
    let bye = async {
        if let Some(t) = term {
            let key = LeaderKey::new()
                .with_name(s.name.clone())
                .with_key(t.key.clone())
                .with_rev(t.token)
                .with_lease(lease);
            let mut e = member.client().election_client();
            match e.resign(Some(ResignOptions::new().with_leader(key))).await {
                Ok(_) => tracing::info!(node = %t.node, "resigned the leadership"),
                Err(e) => tracing::debug!(error = %member.unreachable(&e), "cannot resign"),
            }
        }
        revoke(member, lease).await
    };
    match tokio::time::timeout(GOODBYE_TIMEOUT, bye).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(lease = %format_args!("{lease:x}"), error = %e, "cannot revoke the lease; it is revoked before this node campaigns again");
            false
        }
        Err(_) => {
            tracing::warn!(lease = %format_args!("{lease:x}"), "etcd did not answer the lease revoke; it is revoked before this node campaigns again");
            false
        }
    }
}

/// Publishes who leads while this node campaigns (bounded by `limit`; errors are left to
/// the keep-alives to notice).
async fn follow(member: &Member, name: &str, limit: Duration, role: &watch::Sender<Role>) {
    let look = tokio::time::timeout(limit, current_leader(member, name));
    if let Ok(Ok(leader)) = look.await {
        role.send_if_modified(|r| match r {
            Role::Follower(old) if *old != leader => {
                if let Some(l) = &leader {
                    tracing::info!(leader = %l.info.node, fencing_token = l.token, "following");
                }
                *old = leader;
                true
            }
            _ => false,
        });
    }
}

/// Records when this node became leader in the election key, for `etcd-backup status`.
async fn proclaim(member: &Member, key: &LeaderKey, t: &Term) {
    let value = serde_json::to_vec(&LeaderInfo {
        node: t.node.clone(),
        since: Some(t.since),
        pid: std::process::id(),
    })
    .unwrap_or_default();
    let mut e = member.client().election_client();
    let opts = ProclaimOptions::new().with_leader(key.clone());
    if let Err(e) = member
        .timed("a proclaim request", e.proclaim(value, Some(opts)))
        .await
    {
        tracing::warn!(error = %e, "cannot record the leadership start time in the election key");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_values_of_other_tools_are_shown_as_text() {
        let v = LeaderInfo::parse(b"cp-9");
        assert_eq!(v.node, "cp-9");
        assert_eq!(v.since, None);
        let ours = LeaderInfo {
            node: "cp-1".into(),
            since: Some(Utc::now()),
            pid: 42,
        };
        let bytes = serde_json::to_vec(&ours).unwrap();
        assert_eq!(LeaderInfo::parse(&bytes), ours);
    }
}
