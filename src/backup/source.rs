//! Where a cycle's snapshot comes from: the seam between the cycle and etcd.
//!
//! The cycle is handed a [`SnapshotSource`] instead of connecting itself: the daemon and the
//! `snapshot` command give it the local member ([`EtcdSource`]); unit tests give it a
//! snapshot file, or one that breaks where they want it to.

use crate::config::EtcdConfig;
use crate::etcd::{EtcdError, Member, MemberStatus, SnapshotStream};
use bytes::Bytes;
use futures::future::BoxFuture;

/// The chunks of one snapshot, as the member sends them: the database, then the 32-byte
/// sha256 trailer.
pub trait SnapshotChunks: Send {
    /// The next chunk, or `None` at the end. Cancel-safe: a future dropped before it is
    /// ready loses nothing (the cycle polls it once to take chunks that already arrived).
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, EtcdError>>;
}

/// A member a cycle can snapshot.
pub trait SnapshotSource: Send + Sync {
    /// The member's client URL, for logs and the manifest.
    fn endpoint(&self) -> &str;
    /// The member's status (revision, sizes, ids) just before the snapshot.
    fn status(&self) -> BoxFuture<'_, Result<MemberStatus, EtcdError>>;
    /// Opens the snapshot stream.
    fn snapshot(&self) -> BoxFuture<'_, Result<Box<dyn SnapshotChunks>, EtcdError>>;
}

impl SnapshotChunks for SnapshotStream {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<Bytes>, EtcdError>> {
        Box::pin(SnapshotStream::next_chunk(self))
    }
}

/// One etcd member, connected on first use with the TLS material and credentials of
/// `[etcd]`.
pub struct EtcdSource<'a> {
    config: &'a EtcdConfig,
    endpoint: String,
    member: tokio::sync::OnceCell<Member>,
}

impl<'a> EtcdSource<'a> {
    /// The member at `endpoint`; nothing is connected until the cycle asks.
    pub fn new(config: &'a EtcdConfig, endpoint: &str) -> Self {
        Self {
            config,
            endpoint: endpoint.to_string(),
            member: tokio::sync::OnceCell::new(),
        }
    }

    async fn member(&self) -> Result<&Member, EtcdError> {
        self.member
            .get_or_try_init(|| Member::connect(self.config, &self.endpoint))
            .await
    }
}

impl SnapshotSource for EtcdSource<'_> {
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn status(&self) -> BoxFuture<'_, Result<MemberStatus, EtcdError>> {
        Box::pin(async move { self.member().await?.status().await })
    }

    fn snapshot(&self) -> BoxFuture<'_, Result<Box<dyn SnapshotChunks>, EtcdError>> {
        Box::pin(async move {
            let stream = self.member().await?.snapshot().await?;
            Ok(Box::new(stream) as Box<dyn SnapshotChunks>)
        })
    }
}
