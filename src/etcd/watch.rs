//! The whole-keyspace watch of continuous backup, and the one-transaction-per-revision
//! replay of a point-in-time restore.

use super::{describe, unix_client, EtcdError, Member};
use etcd_client::{
    Client, EventType, LeaseClient, PutOptions, Txn, TxnOp, WatchOptions, WatchStream,
};

/// One event of the watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEvent {
    /// A delete (otherwise a put).
    pub delete: bool,
    /// The key.
    pub key: Vec<u8>,
    /// The value (empty for a delete).
    pub value: Vec<u8>,
    /// Create revision of the key (0 for a delete).
    pub create_revision: i64,
    /// Revision of the event.
    pub mod_revision: i64,
    /// Version of the key (0 for a delete).
    pub version: i64,
    /// Lease id (0 for none).
    pub lease: i64,
}

/// What one watch response says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchItem {
    /// Events (possibly none: a progress notification), and the member's revision.
    Events {
        /// The events, in revision order; never a revision split across two items.
        events: Vec<KvEvent>,
        /// The header revision: every revision up to it has been delivered.
        header_revision: i64,
    },
    /// The start revision was compacted away: the history before `compact_revision` is gone.
    Compacted {
        /// etcd's compact revision.
        compact_revision: i64,
    },
    /// etcd cancelled the watch for another reason.
    Canceled {
        /// etcd's reason.
        reason: String,
    },
}

/// A watch of the whole keyspace.
pub struct KeyspaceWatch {
    stream: WatchStream,
    endpoint: String,
}

impl Member {
    /// Watches every key from revision `from` on (prev_kv off, progress notifications on).
    ///
    /// # Errors
    /// [`EtcdError`] when the watch cannot be created.
    pub async fn watch_keyspace(&self, from: i64) -> Result<KeyspaceWatch, EtcdError> {
        let opts = WatchOptions::new()
            .with_all_keys()
            .with_start_revision(from)
            .with_progress_notify();
        let mut w = self.client().watch_client();
        let stream = self
            .timed("creating a watch", w.watch("", Some(opts)))
            .await?;
        Ok(KeyspaceWatch {
            stream,
            endpoint: self.endpoint().to_string(),
        })
    }
}

impl KeyspaceWatch {
    /// Asks etcd for a progress notification (its current revision) as soon as possible.
    ///
    /// # Errors
    /// When the request cannot be sent.
    pub async fn request_progress(&mut self) -> Result<(), EtcdError> {
        self.stream
            .request_progress()
            .await
            .map_err(|e| EtcdError::Unreachable {
                endpoint: self.endpoint.clone(),
                detail: describe(&e),
                tls_hint: "",
            })
    }

    /// The next response; `None` when the stream ended.
    ///
    /// # Errors
    /// When the stream fails.
    pub async fn next(&mut self) -> Result<Option<WatchItem>, EtcdError> {
        let Some(resp) = self
            .stream
            .message()
            .await
            .map_err(|e| EtcdError::Unreachable {
                endpoint: self.endpoint.clone(),
                detail: describe(&e),
                tls_hint: "",
            })?
        else {
            return Ok(None);
        };
        if resp.compact_revision() > 0 {
            return Ok(Some(WatchItem::Compacted {
                compact_revision: resp.compact_revision(),
            }));
        }
        if resp.canceled() {
            return Ok(Some(WatchItem::Canceled {
                reason: resp.cancel_reason().to_string(),
            }));
        }
        let header_revision = resp
            .header()
            .map_or(0, etcd_client::ResponseHeader::revision);
        let events = resp
            .events()
            .iter()
            .filter_map(|e| {
                let kv = e.kv()?;
                let delete = e.event_type() == EventType::Delete;
                Some(KvEvent {
                    delete,
                    key: kv.key().to_vec(),
                    value: if delete {
                        Vec::new()
                    } else {
                        kv.value().to_vec()
                    },
                    create_revision: kv.create_revision(),
                    mod_revision: kv.mod_revision(),
                    version: kv.version(),
                    lease: kv.lease(),
                })
            })
            .collect();
        Ok(Some(WatchItem::Events {
            events,
            header_revision,
        }))
    }
}

/// One operation of a replayed revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayOp {
    /// Put `key` = `value` (without a lease).
    Put(Vec<u8>, Vec<u8>),
    /// Delete exactly `key`.
    Delete(Vec<u8>),
}

/// A client of a throwaway etcd on a unix socket, for replaying revisions.
pub struct Replayer {
    client: Client,
    shown: String,
}

impl Replayer {
    /// Connects to the etcd listening on unix socket `path`.
    ///
    /// # Errors
    /// When it does not answer.
    pub async fn connect(path: &std::path::Path) -> Result<Replayer, String> {
        Ok(Replayer {
            client: unix_client(path).await?,
            shown: path.display().to_string(),
        })
    }

    /// The member's current revision.
    ///
    /// # Errors
    /// When it does not answer.
    pub async fn revision(&mut self) -> Result<i64, String> {
        let opts = etcd_client::GetOptions::new().with_count_only();
        let r = self
            .client
            .get("\0", Some(opts))
            .await
            .map_err(|e| format!("{}: {}", self.shown, describe(&e)))?;
        Ok(r.header().map_or(0, etcd_client::ResponseHeader::revision))
    }

    /// Applies `ops` as one transaction; returns the revision etcd gave it.
    ///
    /// # Errors
    /// When etcd refuses the transaction.
    pub async fn apply(&mut self, ops: &[ReplayOp]) -> Result<i64, String> {
        let ops: Vec<TxnOp> = ops
            .iter()
            .map(|o| match o {
                ReplayOp::Put(k, v) => TxnOp::put(k.clone(), v.clone(), None::<PutOptions>),
                ReplayOp::Delete(k) => TxnOp::delete(k.clone(), None),
            })
            .collect();
        let r = self
            .client
            .txn(Txn::new().and_then(ops))
            .await
            .map_err(|e| format!("{}: {}", self.shown, describe(&e)))?;
        Ok(r.header().map_or(0, etcd_client::ResponseHeader::revision))
    }

    /// The ids of every lease the member holds.
    ///
    /// # Errors
    /// When it does not answer.
    pub async fn leases(&mut self) -> Result<Vec<i64>, String> {
        let r = self
            .client
            .leases()
            .await
            .map_err(|e| format!("{}: {}", self.shown, describe(&e)))?;
        Ok(r.leases()
            .iter()
            .map(etcd_client::LeaseStatus::id)
            .collect())
    }

    /// Streams a snapshot of the member (sha256 trailer included) into `out`; returns the
    /// bytes written.
    ///
    /// # Errors
    /// When the stream or the write fails.
    pub async fn snapshot_to(&mut self, out: &mut tokio::fs::File) -> Result<u64, String> {
        use tokio::io::AsyncWriteExt;
        let mut m = self.client.maintenance_client();
        let mut stream = m
            .snapshot()
            .await
            .map_err(|e| format!("{}: {}", self.shown, describe(&e)))?;
        let mut n = 0u64;
        while let Some(msg) = stream
            .message()
            .await
            .map_err(|e| format!("{}: snapshot stream: {}", self.shown, describe(&e)))?
        {
            out.write_all(msg.blob())
                .await
                .map_err(|e| format!("cannot write the snapshot: {e}"))?;
            n += msg.blob().len() as u64;
        }
        out.flush()
            .await
            .map_err(|e| format!("cannot write the snapshot: {e}"))?;
        Ok(n)
    }

    /// A lease client, to keep the base snapshot's leases alive during the replay.
    pub fn lease_client(&self) -> LeaseClient {
        self.client.lease_client()
    }
}
