//! Talking to etcd: connecting (TLS, timeouts), member status, and the snapshot stream of
//! one member. The election (`election`) uses the same connections.
//!
//! A snapshot is always taken from a client connected to exactly one endpoint: the local
//! member. Status is read through the same client, so the revision and sizes recorded in the
//! manifest describe the member that served the snapshot.

pub mod defrag;
pub mod election;
pub mod watch;

use crate::config::EtcdConfig;
use bytes::Bytes;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use std::time::Duration;

/// Why talking to etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A TLS file could not be read.
    #[error("cannot read {what} {path}: {source}; check [etcd] {key} and that this user may read the file")]
    TlsFile {
        /// Which file.
        what: &'static str,
        /// The config key naming it.
        key: &'static str,
        /// Its path.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The endpoint could not be reached or refused us.
    #[error("cannot reach etcd at {endpoint}: {detail}; check that the member is running and listening there{tls_hint}")]
    Unreachable {
        /// The client URL.
        endpoint: String,
        /// What the client said.
        detail: String,
        /// Extra advice for TLS setups.
        tls_hint: &'static str,
    },
    /// A request did not complete in time.
    #[error("etcd at {endpoint} did not answer {what} within {timeout:?}; check the member's health (etcdctl endpoint status) and [etcd] request_timeout")]
    Timeout {
        /// The client URL.
        endpoint: String,
        /// The request.
        what: &'static str,
        /// The limit.
        timeout: Duration,
    },
    /// The snapshot stream broke off.
    #[error("the snapshot stream from {endpoint} failed after {received} bytes: {detail}")]
    Stream {
        /// The client URL.
        endpoint: String,
        /// Bytes received before the failure.
        received: u64,
        /// What the client said.
        detail: String,
    },
}

/// Status of the member a client is connected to.
#[derive(Debug, Clone)]
pub struct MemberStatus {
    /// etcd server version.
    pub version: String,
    /// Database file size in bytes.
    pub db_size: i64,
    /// Bytes of the database in use (the rest is free pages).
    pub db_size_in_use: i64,
    /// Backend quota in bytes, when the server reports it (3.6+).
    pub db_quota: Option<i64>,
    /// Current revision seen by the member.
    pub revision: i64,
    /// This member's id.
    pub member_id: u64,
    /// The cluster id.
    pub cluster_id: u64,
    /// This member's name from the member list (empty if not found).
    pub member_name: String,
    /// Errors the member reports (alarms such as NOSPACE).
    pub errors: Vec<String>,
    /// The cluster's member list as this member sees it.
    pub members: Vec<ClusterMember>,
}

/// The revision and the number of keys an etcd without TLS or auth serves at `endpoint`
/// (a throwaway member, such as a restore drill's). `endpoint` is a client URL, or
/// `unix:///path/to/socket` for a member listening on a unix socket only.
///
/// # Errors
/// The client's message when the member cannot be reached or read.
pub async fn revision_and_key_count(endpoint: &str) -> Result<(i64, u64), String> {
    let mut c = match endpoint.strip_prefix("unix://") {
        Some(path) => unix_client(std::path::Path::new(path)).await?,
        None => Client::connect([endpoint], None)
            .await
            .map_err(|e| describe(&e))?,
    };
    let opts = etcd_client::GetOptions::new()
        .with_all_keys()
        .with_count_only();
    let resp = c.get("", Some(opts)).await.map_err(|e| describe(&e))?;
    let revision = resp
        .header()
        .map_or(0, etcd_client::ResponseHeader::revision);
    Ok((revision, resp.count() as u64))
}

/// The cluster id (16 hex digits, as manifests store it) of the first of `cfg.endpoints`
/// that answers: which backups in the store are this cluster's.
///
/// # Errors
/// A message naming the endpoints tried and why each failed.
pub async fn local_cluster_id(cfg: &EtcdConfig) -> Result<String, String> {
    let mut errors = Vec::new();
    for ep in &cfg.endpoints {
        match Member::connect(cfg, ep).await {
            Ok(m) => match m.status().await {
                Ok(st) => return Ok(format!("{:016x}", st.cluster_id)),
                Err(e) => errors.push(format!("{ep}: {e}")),
            },
            Err(e) => errors.push(format!("{ep}: {e}")),
        }
    }
    Err(errors.join("; "))
}

/// A client for a member that listens on the unix socket `path` (no TLS, no auth).
///
/// etcd-client dials only `http(s)://` URLs itself; a tonic channel with a connector that
/// opens the socket carries the same gRPC. The URI is a placeholder: the connector ignores it.
async fn unix_client(path: &std::path::Path) -> Result<Client, String> {
    let path = path.to_path_buf();
    let shown = path.display().to_string();
    let channel = tonic::transport::Endpoint::from_static("http://localhost")
        .connect_timeout(Duration::from_secs(5))
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .map_err(|e| format!("cannot connect to {shown}: {}", crate::error::flatten(&e)))?;
    Client::from_channel(etcd_client::Channel::Tonic(channel), None)
        .await
        .map_err(|e| describe(&e))
}

/// One member of the cluster as the member list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMember {
    /// Member id.
    pub id: u64,
    /// Member name (empty for a member that was added but has not started).
    pub name: String,
    /// Its peer URLs.
    pub peer_urls: Vec<String>,
    /// Its client URLs.
    pub client_urls: Vec<String>,
    /// Whether it is a learner.
    pub is_learner: bool,
}

/// A connection to one etcd member.
pub struct Member {
    client: Client,
    endpoint: String,
    request_timeout: Duration,
    tls: bool,
}

impl Member {
    /// Connects to `endpoint` with the TLS material and credentials of `cfg`.
    ///
    /// # Errors
    /// [`EtcdError::TlsFile`] when a certificate cannot be read, [`EtcdError::Unreachable`]
    /// when the member cannot be reached.
    pub async fn connect(cfg: &EtcdConfig, endpoint: &str) -> Result<Member, EtcdError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(cfg.dial_timeout)
            .with_keep_alive(Duration::from_secs(10), cfg.dial_timeout)
            .with_tcp_keepalive(Duration::from_secs(30));
        let tls = endpoint.starts_with("https://");
        if tls {
            if let Some(files) = &cfg.tls {
                let read = |what: &'static str, key: &'static str, path: &std::path::Path| {
                    std::fs::read(path).map_err(|source| EtcdError::TlsFile {
                        what,
                        key,
                        path: path.display().to_string(),
                        source,
                    })
                };
                let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(
                    "CA certificate",
                    "ca_file",
                    &files.ca_file,
                )?));
                if let (Some(cert), Some(key)) = (&files.cert_file, &files.key_file) {
                    let cert = read("client certificate", "cert_file", cert)?;
                    let key = read("client key", "key_file", key)?;
                    t = t.identity(Identity::from_pem(cert, key));
                }
                opts = opts.with_tls(t);
            }
        }
        if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
            opts = opts.with_user(user.clone(), pass.expose().to_string());
        }
        let unreachable = |e: etcd_client::Error| EtcdError::Unreachable {
            endpoint: endpoint.to_string(),
            detail: describe(&e),
            tls_hint: if tls {
                " and that [etcd] ca_file, cert_file and key_file are the cluster's CA and a client certificate it accepts"
            } else {
                ""
            },
        };
        let client = tokio::time::timeout(
            cfg.dial_timeout + cfg.request_timeout,
            Client::connect([endpoint], Some(opts)),
        )
        .await
        .map_err(|_| EtcdError::Timeout {
            endpoint: endpoint.to_string(),
            what: "the connection",
            timeout: cfg.dial_timeout + cfg.request_timeout,
        })?
        .map_err(unreachable)?;
        Ok(Member {
            client,
            endpoint: endpoint.to_string(),
            request_timeout: cfg.request_timeout,
            tls,
        })
    }

    /// The client URL of this member.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The underlying client (for the election and fencing requests).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The timeout of one unary request.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    pub(crate) fn unreachable(&self, e: &etcd_client::Error) -> EtcdError {
        EtcdError::Unreachable {
            endpoint: self.endpoint.clone(),
            detail: describe(e),
            tls_hint: if self.tls {
                " and that [etcd] ca_file, cert_file and key_file are the cluster's CA and a client certificate it accepts"
            } else {
                ""
            },
        }
    }

    pub(crate) async fn timed<T>(
        &self,
        what: &'static str,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, EtcdError> {
        tokio::time::timeout(self.request_timeout, f)
            .await
            .map_err(|_| EtcdError::Timeout {
                endpoint: self.endpoint.clone(),
                what,
                timeout: self.request_timeout,
            })?
            .map_err(|e| self.unreachable(&e))
    }

    /// Reads the member's status and its name from the member list.
    ///
    /// # Errors
    /// [`EtcdError`] when the member does not answer.
    pub async fn status(&self) -> Result<MemberStatus, EtcdError> {
        let mut m = self.client.maintenance_client();
        let st = self.timed("a status request", m.status()).await?;
        let header = st.header();
        let member_id = header.map_or(0, etcd_client::ResponseHeader::member_id);
        let mut c = self.client.cluster_client();
        let members = self.timed("a member list request", c.member_list()).await?;
        let member_name = members
            .members()
            .iter()
            .find(|m| m.id() == member_id)
            .map(|m| m.name().to_string())
            .unwrap_or_default();
        let quota = st.db_size_quota();
        Ok(MemberStatus {
            version: st.version().to_string(),
            db_size: st.db_size(),
            db_size_in_use: st.raft_used_db_size(),
            db_quota: (quota > 0).then_some(quota),
            revision: header.map_or(0, etcd_client::ResponseHeader::revision),
            member_id,
            cluster_id: header.map_or(0, etcd_client::ResponseHeader::cluster_id),
            member_name,
            errors: st.errors().to_vec(),
            members: members
                .members()
                .iter()
                .map(|m| ClusterMember {
                    id: m.id(),
                    name: m.name().to_string(),
                    peer_urls: m.peer_urls().to_vec(),
                    client_urls: m.client_urls().to_vec(),
                    is_learner: m.is_learner(),
                })
                .collect(),
        })
    }

    /// Opens the snapshot stream.
    ///
    /// # Errors
    /// [`EtcdError`] when the member refuses or does not answer.
    pub async fn snapshot(&self) -> Result<SnapshotStream, EtcdError> {
        let mut m = self.client.maintenance_client();
        let inner = self.timed("the snapshot request", m.snapshot()).await?;
        Ok(SnapshotStream {
            inner,
            endpoint: self.endpoint.clone(),
            received: 0,
            idle_timeout: self.request_timeout,
        })
    }
}

/// The chunks of a snapshot as the member sends them: the database bytes, then one last
/// chunk holding the 32-byte sha256 of everything before it.
pub struct SnapshotStream {
    inner: etcd_client::SnapshotStreaming,
    endpoint: String,
    received: u64,
    idle_timeout: Duration,
}

impl SnapshotStream {
    /// The next chunk, or `None` at the end of the stream.
    ///
    /// # Errors
    /// [`EtcdError::Stream`] when the stream fails or stalls for longer than the request
    /// timeout.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, EtcdError> {
        let msg = tokio::time::timeout(self.idle_timeout, self.inner.message())
            .await
            .map_err(|_| EtcdError::Stream {
                endpoint: self.endpoint.clone(),
                received: self.received,
                detail: format!("no data for {:?}", self.idle_timeout),
            })?
            .map_err(|e| EtcdError::Stream {
                endpoint: self.endpoint.clone(),
                received: self.received,
                detail: describe(&e),
            })?;
        Ok(msg.map(|m| {
            self.received += m.blob().len() as u64;
            Bytes::from_owner(Blob(m))
        }))
    }
}

/// A snapshot message, owned as the bytes of its blob (no copy).
struct Blob(etcd_client::SnapshotResponse);

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        self.0.blob()
    }
}

/// A one-line description of a client error, without the request's metadata (which may
/// carry an auth token).
fn describe(e: &etcd_client::Error) -> String {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            format!("{:?}: {}", s.code(), s.message())
        }
        other => crate::error::flatten(other),
    }
}
