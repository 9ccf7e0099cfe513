//! The backup store: S3-compatible object storage or a local directory, through
//! `object_store`, with this tool's object layout on top.
//!
//! Invariants:
//! - data objects are written as multipart uploads that only become visible when
//!   completed; every failure path aborts the upload ([`Upload::abort`]);
//! - the manifest is written only after the data object is complete, and it is what makes
//!   a backup exist: [`BackupStore::list`] reports only backups with a readable manifest.

pub mod manifest;
pub mod naming;

use crate::config::{StorageConfig, StorageUrl};
use crate::error::flatten;
use crate::store::manifest::Manifest;
use crate::store::naming::{BackupId, Layout, ObjectKind};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjPath;
use object_store::{
    Attribute, Attributes, ClientOptions, ObjectStore, ObjectStoreExt, PutMultipartOptions,
    PutPayload, RetryConfig, WriteMultipart,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Size of one multipart part (the S3 minimum, which keeps memory low; 10,000 parts allow
/// objects up to 48 GiB). Memory held by an upload is about
/// `PART_SIZE * (MAX_PARTS_IN_FLIGHT + 1)`.
pub const PART_SIZE: usize = 5 * 1024 * 1024;
/// Parts uploaded concurrently. Two keep a link busy at the rate a cycle produces
/// compressed data (tens of MB/s); on a slow link each waiting part is 5 MiB of memory.
pub const MAX_PARTS_IN_FLIGHT: usize = 2;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store could not be set up from the configuration.
    #[error("cannot use storage {url}: {detail}")]
    Setup {
        /// The configured URL.
        url: String,
        /// What is wrong.
        detail: String,
    },
    /// A request failed.
    #[error("storage {url}: {op} {key} failed: {detail}; {hint}")]
    Request {
        /// The configured URL.
        url: String,
        /// The operation.
        op: &'static str,
        /// The object key.
        key: String,
        /// What the store said.
        detail: String,
        /// What to check.
        hint: &'static str,
    },
}

/// A data object found in the listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataObject {
    /// Its key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// When the store says it was last written (the store's clock, not ours).
    pub modified: chrono::DateTime<chrono::Utc>,
}

/// Objects found under the cluster's directory.
#[derive(Debug, Default, Clone)]
pub struct Listing {
    /// Committed backups (readable manifests with their data object), newest first: by
    /// etcd revision, then time, then id. Backups of every cluster id and time are here;
    /// [`Listing::latest`] picks the one to restore.
    pub backups: Vec<Manifest>,
    /// Data objects by backup id (committed or not).
    pub data_objects: BTreeMap<BackupId, Vec<DataObject>>,
    /// Objects of the continuous-backup chain based on each backup id (segments, their
    /// manifests, chain-end records), committed or not.
    pub chain_objects: BTreeMap<BackupId, Vec<DataObject>>,
    /// Every backup directory that holds a manifest object, readable or not.
    pub manifest_ids: std::collections::BTreeSet<BackupId>,
    /// Manifests that could not be read or parsed: key and reason.
    pub unreadable: Vec<(String, String)>,
    /// Readable manifests whose data object is not listed (not backups: nothing to
    /// restore), with their keys.
    pub dangling: Vec<(Manifest, String)>,
    /// Objects under the directory that this tool did not write.
    pub foreign: usize,
}

impl Listing {
    /// The newest backup of cluster `cluster_id` that is not dated in the future (more than
    /// [`manifest::FUTURE_TOLERANCE`] after `now`): what `restore latest`, drills, the
    /// age metric and the catch-up decision use.
    pub fn latest(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        cluster_id: &str,
    ) -> Option<&Manifest> {
        self.backups
            .iter()
            .find(|m| m.cluster_id == cluster_id && !m.is_future(now))
    }
}

/// The order of backups, newest first: etcd revision (the cluster's logical clock, immune
/// to wrong wall clocks), then time, then id.
pub fn newest_first(a: &Manifest, b: &Manifest) -> std::cmp::Ordering {
    b.revision
        .cmp(&a.revision)
        .then_with(|| b.time.cmp(&a.time))
        .then_with(|| b.id.cmp(&a.id))
}

/// The configured store and object layout.
#[derive(Clone)]
pub struct BackupStore {
    store: Arc<dyn ObjectStore>,
    layout: Layout,
    url: String,
    storage_class: Option<String>,
    s3: bool,
    /// Root directory of a `file://` store, to remove directories an aborted upload leaves.
    local_root: Option<std::path::PathBuf>,
    /// S3 only: what listing and aborting multipart uploads needs.
    s3_uploads: Option<Arc<S3Uploads>>,
}

/// Lists and aborts incomplete multipart uploads on S3 (object_store has no
/// ListMultipartUploads): the request is signed by object_store's own SigV4 signer
/// (`AwsAuthorizer`) and its XML answer read with quick-xml.
struct S3Uploads {
    s3: Arc<object_store::aws::AmazonS3>,
    client: object_store::client::HttpClient,
    bucket_url: String,
    region: String,
}

/// An incomplete multipart upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingUpload {
    /// The object key being uploaded.
    pub key: String,
    /// The upload id.
    pub upload_id: String,
    /// When it was started.
    pub initiated: chrono::DateTime<chrono::Utc>,
}

impl std::fmt::Debug for BackupStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackupStore({})", self.url)
    }
}

/// Server-side encryption and upload checksums (`storage.sse`, `storage.checksum`).
fn with_server_side_options(
    mut b: AmazonS3Builder,
    cfg: &StorageConfig,
) -> Result<AmazonS3Builder, object_store::Error> {
    use crate::config::Sse;
    let key = |k: &str| k.parse::<object_store::aws::AmazonS3ConfigKey>();
    match &cfg.sse {
        None => {}
        Some(Sse::S3) => b = b.with_config(key("aws_server_side_encryption")?, "AES256"),
        Some(Sse::Kms { key_id } | Sse::DsseKms { key_id }) => {
            let kind = if matches!(cfg.sse, Some(Sse::Kms { .. })) {
                "aws:kms"
            } else {
                "aws:kms:dsse"
            };
            b = b.with_config(key("aws_server_side_encryption")?, kind);
            if let Some(id) = key_id {
                b = b.with_config(key("aws_sse_kms_key_id")?, id);
            }
        }
        Some(Sse::CustomerKey { key }) => b = b.with_ssec_encryption(key.expose()),
    }
    if cfg.checksum_sha256 {
        b = b.with_checksum_algorithm(object_store::aws::Checksum::SHA256);
    }
    Ok(b)
}

impl BackupStore {
    /// A store over any `ObjectStore` (tests use `object_store::memory::InMemory`), with
    /// objects under `PREFIX/cluster/`. `url` names it in messages. Incomplete multipart
    /// uploads are not listed through it (that needs S3 requests object_store lacks).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, cluster: &str, url: &str) -> BackupStore {
        BackupStore {
            store,
            layout: Layout::new(prefix, cluster),
            url: url.to_string(),
            storage_class: None,
            s3: false,
            local_root: None,
            s3_uploads: None,
        }
    }

    /// Builds the store for `cfg`, with objects under `PREFIX/cluster/`.
    ///
    /// # Errors
    /// [`StoreError::Setup`] when the URL or options cannot be used (e.g. the local directory
    /// cannot be created).
    pub fn open(cfg: &StorageConfig, cluster: &str) -> Result<BackupStore, StoreError> {
        let url = cfg.url.to_string();
        let setup = |detail: String| StoreError::Setup {
            url: url.clone(),
            detail,
        };
        let mut s3_uploads = None;
        let local_root = match &cfg.url {
            StorageUrl::File { dir } => Some(dir.clone()),
            StorageUrl::S3 { .. } => None,
        };
        let (store, prefix, s3): (Arc<dyn ObjectStore>, String, bool) = match &cfg.url {
            StorageUrl::File { dir } => {
                std::fs::create_dir_all(dir).map_err(|e| {
                    setup(format!(
                        "cannot create directory {}: {e}; check the path and that this user may write there",
                        dir.display()
                    ))
                })?;
                let fs = LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| setup(e.to_string()))?
                    .with_automatic_cleanup(true);
                (Arc::new(fs), String::new(), false)
            }
            StorageUrl::S3 { bucket, prefix } => {
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(&cfg.region)
                    .with_virtual_hosted_style_request(!cfg.path_style)
                    .with_retry(RetryConfig {
                        max_retries: cfg.requests.max_retries as usize,
                        retry_timeout: cfg.requests.retry_timeout,
                        ..RetryConfig::default()
                    })
                    .with_client_options(
                        ClientOptions::new()
                            .with_connect_timeout(cfg.requests.connect_timeout)
                            .with_timeout(cfg.requests.request_timeout)
                            .with_allow_http(
                                cfg.endpoint
                                    .as_deref()
                                    .is_some_and(|e| e.starts_with("http://")),
                            ),
                    );
                if let Some(ep) = &cfg.endpoint {
                    b = b.with_endpoint(ep);
                }
                if let (Some(id), Some(secret)) = (&cfg.access_key_id, &cfg.secret_access_key) {
                    b = b
                        .with_access_key_id(id)
                        .with_secret_access_key(secret.expose());
                    if let Some(token) = &cfg.session_token {
                        b = b.with_token(token.expose());
                    }
                }
                b = with_server_side_options(b, cfg).map_err(|e| setup(e.to_string()))?;
                let s = Arc::new(b.build().map_err(|e| setup(e.to_string()))?);
                let options = ClientOptions::new()
                    .with_connect_timeout(cfg.requests.connect_timeout)
                    .with_timeout(cfg.requests.request_timeout.min(Duration::from_secs(60)))
                    .with_allow_http(
                        cfg.endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://")),
                    );
                let client = object_store::client::HttpConnector::connect(
                    &object_store::client::ReqwestConnector::default(),
                    &options,
                )
                .map_err(|e| setup(e.to_string()))?;
                let base = cfg
                    .endpoint
                    .clone()
                    .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", cfg.region));
                let base = base.trim_end_matches('/');
                let bucket_url = if cfg.path_style {
                    format!("{base}/{bucket}")
                } else {
                    match base.split_once("://") {
                        Some((scheme, host)) => format!("{scheme}://{bucket}.{host}"),
                        None => format!("https://{bucket}.{base}"),
                    }
                };
                s3_uploads = Some(Arc::new(S3Uploads {
                    s3: s.clone(),
                    client,
                    bucket_url,
                    region: cfg.region.clone(),
                }));
                (s, prefix.clone(), true)
            }
        };
        Ok(BackupStore {
            store,
            layout: Layout::new(&prefix, cluster),
            url,
            storage_class: cfg.storage_class.clone(),
            s3,
            local_root,
            s3_uploads,
        })
    }

    /// The object layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The key of committed backup `m`'s data object (inside its own directory, wherever
    /// it was first written); `None` when its manifest names no snapshot file.
    pub fn data_key(&self, m: &Manifest) -> Option<String> {
        self.layout.data_key_for(&m.id, &m.object)
    }

    /// The configured URL, for messages.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn err(&self, op: &'static str, key: &str, e: &object_store::Error) -> StoreError {
        let hint = match e {
            object_store::Error::NotFound { .. } => {
                "check that the bucket (or directory) exists and storage.url is right"
            }
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => {
                "check the credentials (storage.access_key_id / secret_access_key or AWS_* variables) and the bucket policy"
            }
            _ if self.s3 => {
                "check storage.endpoint, storage.region, that the bucket exists and that the credentials may write to it"
            }
            _ => "check that the directory exists and this user may write there",
        };
        StoreError::Request {
            url: self.url.clone(),
            op,
            key: key.to_string(),
            detail: flatten(e),
            hint,
        }
    }

    /// Starts a multipart upload of `key`.
    ///
    /// # Errors
    /// [`StoreError::Request`] when the store refuses.
    pub async fn begin_upload(&self, key: &str) -> Result<Upload, StoreError> {
        let mut attributes = Attributes::new();
        if self.s3 {
            if let Some(sc) = &self.storage_class {
                attributes.insert(Attribute::StorageClass, sc.clone().into());
            }
        }
        let opts = PutMultipartOptions {
            attributes,
            ..Default::default()
        };
        let path = ObjPath::from(key);
        let up = self
            .store
            .put_multipart_opts(&path, opts)
            .await
            .map_err(|e| self.err("starting the upload of", key, &e))?;
        Ok(Upload {
            writer: Some(WriteMultipart::new_with_chunk_size(up, PART_SIZE)),
            key: key.to_string(),
            store: self.clone(),
        })
    }

    /// Writes a manifest: the commit of a backup.
    ///
    /// # Errors
    /// [`StoreError::Request`] when the store refuses.
    pub async fn put_manifest(&self, id: &BackupId, m: &Manifest) -> Result<(), StoreError> {
        let key = self.layout.manifest_key(id);
        self.store
            .put(&ObjPath::from(key.as_str()), PutPayload::from(m.to_json()))
            .await
            .map_err(|e| self.err("writing", &key, &e))?;
        Ok(())
    }

    /// Writes a small object whole (a segment manifest, a chain-end record).
    ///
    /// # Errors
    /// [`StoreError::Request`] when the store refuses.
    pub async fn put_small(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.store
            .put(&ObjPath::from(key), PutPayload::from(bytes))
            .await
            .map_err(|e| self.err("writing", key, &e))?;
        Ok(())
    }

    /// The keys under `dir` (a directory key ending in `/`), in one paginated listing.
    ///
    /// # Errors
    /// [`StoreError::Request`] when the listing fails.
    pub async fn list_keys(&self, dir: &str) -> Result<Vec<String>, StoreError> {
        let prefix = dir.trim_end_matches('/');
        let objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&ObjPath::from(prefix)))
            .try_collect()
            .await
            .map_err(|e| self.err("listing", dir, &e))?;
        Ok(objects
            .into_iter()
            .map(|o| o.location.to_string())
            .collect())
    }

    /// Deletes one object; a missing object counts as deleted.
    ///
    /// # Errors
    /// [`StoreError::Request`] when the store refuses.
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        match self.store.delete(&ObjPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("deleting", key, &e)),
        }
    }

    /// Reads a whole small object (a manifest).
    ///
    /// # Errors
    /// [`StoreError::Request`] when it cannot be read.
    pub async fn get_bytes(&self, key: &str) -> Result<Bytes, StoreError> {
        let r = self
            .store
            .get(&ObjPath::from(key))
            .await
            .map_err(|e| self.err("reading", key, &e))?;
        r.bytes().await.map_err(|e| self.err("reading", key, &e))
    }

    /// Streams an object.
    ///
    /// # Errors
    /// [`StoreError::Request`] when it cannot be opened.
    pub async fn get_stream(
        &self,
        key: &str,
    ) -> Result<futures::stream::BoxStream<'static, std::io::Result<Bytes>>, StoreError> {
        let r = self
            .store
            .get(&ObjPath::from(key))
            .await
            .map_err(|e| self.err("reading", key, &e))?;
        Ok(r.into_stream().map_err(std::io::Error::other).boxed())
    }

    /// Incomplete multipart uploads under the cluster's directory (S3 only; a local store
    /// has none that outlive a process).
    ///
    /// # Errors
    /// [`StoreError::Request`] when the listing fails.
    pub async fn pending_uploads(&self) -> Result<Vec<PendingUpload>, StoreError> {
        let Some(u) = &self.s3_uploads else {
            return Ok(Vec::new());
        };
        let prefix = format!("{}/", self.layout.base());
        let fail = |detail: String| {
            StoreError::Request {
            url: self.url.clone(),
            op: "listing the multipart uploads under",
            key: prefix.clone(),
            detail,
            hint: "check that the credentials may list multipart uploads (s3:ListBucketMultipartUploads)",
        }
        };
        let credential =
            u.s3.credentials()
                .get_credential()
                .await
                .map_err(|e| fail(flatten(&e)))?;
        let mut out = Vec::new();
        let mut markers: Option<(String, String)> = None;
        for _page in 0..1000 {
            let mut url = url::Url::parse(&u.bucket_url).map_err(|e| fail(e.to_string()))?;
            {
                let mut q = url.query_pairs_mut();
                q.append_pair("uploads", "").append_pair("prefix", &prefix);
                if let Some((k, id)) = &markers {
                    q.append_pair("key-marker", k)
                        .append_pair("upload-id-marker", id);
                }
            }
            let mut req = http::Request::builder()
                .method(http::Method::GET)
                .uri(url.as_str())
                .body(object_store::client::HttpRequestBody::from(Vec::new()))
                .map_err(|e| fail(e.to_string()))?;
            object_store::aws::AwsAuthorizer::new(&credential, "s3", &u.region)
                .try_authorize(&mut req, None)
                .map_err(|e| fail(flatten(&e)))?;
            let resp = u.client.execute(req).await.map_err(|e| fail(flatten(&e)))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .bytes()
                .await
                .map_err(|e| fail(flatten(&e)))?;
            let text = String::from_utf8_lossy(&body);
            if !status.is_success() {
                return Err(fail(format!(
                    "HTTP {status}: {}",
                    text.chars().take(300).collect::<String>()
                )));
            }
            let page = parse_list_uploads(&text).map_err(fail)?;
            out.extend(page.uploads);
            match page.next {
                Some(next) => markers = Some(next),
                None => break,
            }
        }
        Ok(out)
    }

    /// Aborts the incomplete multipart uploads under the prefix that `pick` selects, with
    /// one listing; each selected upload with the outcome of its abort.
    ///
    /// # Errors
    /// [`StoreError`] when the uploads cannot be listed.
    pub async fn abort_pending_where(
        &self,
        pick: impl Fn(&PendingUpload) -> bool,
    ) -> Result<Vec<(PendingUpload, Result<(), StoreError>)>, StoreError> {
        let mut out = Vec::new();
        for up in self.pending_uploads().await? {
            if pick(&up) {
                let r = self.abort_pending(&up).await;
                out.push((up, r));
            }
        }
        Ok(out)
    }

    /// Aborts an incomplete multipart upload found by [`BackupStore::pending_uploads`].
    ///
    /// # Errors
    /// [`StoreError::Request`] when the store refuses.
    pub async fn abort_pending(&self, up: &PendingUpload) -> Result<(), StoreError> {
        let Some(u) = &self.s3_uploads else {
            return Ok(());
        };
        match object_store::multipart::MultipartStore::abort_multipart(
            u.s3.as_ref(),
            &ObjPath::from(up.key.as_str()),
            &up.upload_id,
        )
        .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("aborting the incomplete upload of", &up.key, &e)),
        }
    }

    /// The number of manifests and the newest committed backup of `cluster_id` not dated
    /// in the future, with one listing and as few manifest reads as possible (candidates
    /// are tried newest id first, skipping other clusters' and future ones, and the newest
    /// by revision among the first readable ones wins). For the last-success metrics and
    /// the catch-up decision, refreshed often on every node. `cluster_id` `None` (the
    /// local member unknown) takes any cluster's.
    ///
    /// # Errors
    /// [`StoreError::Request`] when the listing fails.
    pub async fn newest(
        &self,
        now: chrono::DateTime<chrono::Utc>,
        cluster_id: Option<&str>,
    ) -> Result<(usize, Option<Manifest>), StoreError> {
        let base = self.layout.base().to_string();
        let objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&ObjPath::from(base.as_str())))
            .try_collect()
            .await
            .map_err(|e| self.err("listing", &format!("{base}/"), &e))?;
        let mut ids: Vec<(BackupId, String)> = objects
            .into_iter()
            .filter_map(|o| {
                let key = o.location.to_string();
                match self.layout.classify(&key) {
                    Some(ObjectKind::Manifest(id)) => Some((id, key)),
                    _ => None,
                }
            })
            .collect();
        ids.sort_by(|a, b| b.0.cmp(&a.0));
        let count = ids.len();
        let mut best: Option<Manifest> = None;
        let mut readable = 0;
        for (_, key) in ids.iter().take(50) {
            let Ok(m) = self
                .get_manifest(key)
                .await
                .map_err(|e| e.to_string())
                .and_then(|b| Manifest::from_json(&b))
            else {
                continue;
            };
            if m.is_future(now) || cluster_id.is_some_and(|c| c != m.cluster_id) {
                continue;
            }
            readable += 1;
            if best
                .as_ref()
                .is_none_or(|b| newest_first(&m, b) == std::cmp::Ordering::Less)
            {
                best = Some(m);
            }
            if readable >= 5 {
                break;
            }
        }
        Ok((count, best))
    }

    /// Reads a manifest, refusing one larger than [`manifest::MAX_MANIFEST_SIZE`] without
    /// reading it.
    ///
    /// # Errors
    /// [`StoreError::Request`] when it cannot be read or is too large.
    pub async fn get_manifest(&self, key: &str) -> Result<Bytes, StoreError> {
        let r = self
            .store
            .get(&ObjPath::from(key))
            .await
            .map_err(|e| self.err("reading", key, &e))?;
        if r.meta.size > manifest::MAX_MANIFEST_SIZE {
            return Err(StoreError::Request {
                url: self.url.clone(),
                op: "reading",
                key: key.to_string(),
                detail: format!(
                    "it is {} bytes, more than a manifest can be ({} bytes); it was not written by etcd-backup",
                    r.meta.size,
                    manifest::MAX_MANIFEST_SIZE
                ),
                hint: "remove or move it if it is not yours",
            });
        }
        let b = r.bytes().await.map_err(|e| self.err("reading", key, &e))?;
        if b.len() as u64 > manifest::MAX_MANIFEST_SIZE {
            return Err(StoreError::Request {
                url: self.url.clone(),
                op: "reading",
                key: key.to_string(),
                detail: "it grew past the manifest size limit while being read".into(),
                hint: "remove or move it if it is not yours",
            });
        }
        Ok(b)
    }

    /// Whether an object exists: `Ok(false)` only when the store says it is not found.
    ///
    /// # Errors
    /// [`StoreError::Request`] for any other answer (nothing is confirmed).
    pub async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        match self.store.head(&ObjPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("checking", key, &e)),
        }
    }

    /// Lists the cluster's directory with one paginated listing, reads every manifest and
    /// returns the committed backups, newest first. A listing that fails part-way fails
    /// whole: nothing is decided from part of a directory.
    ///
    /// # Errors
    /// [`StoreError::Request`] when the listing fails.
    pub async fn list(&self) -> Result<Listing, StoreError> {
        let base = self.layout.base().to_string();
        let objects: Vec<object_store::ObjectMeta> = self
            .store
            .list(Some(&ObjPath::from(base.as_str())))
            .try_collect()
            .await
            .map_err(|e| self.err("listing", &format!("{base}/"), &e))?;
        let mut listing = Listing::default();
        let mut manifest_keys = Vec::new();
        for o in objects {
            let key = o.location.to_string();
            let (by_id, id) = match self.layout.classify(&key) {
                Some(ObjectKind::Manifest(id)) => {
                    listing.manifest_ids.insert(id.clone());
                    manifest_keys.push((id, key));
                    continue;
                }
                Some(ObjectKind::Data(id)) => (&mut listing.data_objects, id),
                Some(ObjectKind::Chain(id, _)) => (&mut listing.chain_objects, id),
                None => {
                    listing.foreign += 1;
                    continue;
                }
            };
            by_id.entry(id).or_default().push(DataObject {
                key,
                size: o.size,
                modified: o.last_modified,
            });
        }
        let fetched: Vec<_> = futures::stream::iter(manifest_keys)
            .map(|(id, key)| async move {
                let r = self.get_manifest(&key).await;
                (id, key, r)
            })
            .buffer_unordered(8)
            .collect()
            .await;
        for (id, key, r) in fetched {
            match r.map_err(|e| e.to_string()).and_then(|b| {
                let m = Manifest::from_json(&b)?;
                if m.id == id {
                    Ok(m)
                } else {
                    Err(format!(
                        "its id {:?} does not match its key",
                        m.id.to_string()
                    ))
                }
            }) {
                Ok(m) => {
                    let Some(data_key) = self.layout.data_key_for(&id, &m.object) else {
                        listing.unreadable.push((
                            key,
                            format!("its data object {:?} is not a snapshot file name", m.object),
                        ));
                        continue;
                    };
                    let has_data = listing
                        .data_objects
                        .get(&id)
                        .is_some_and(|objs| objs.iter().any(|o| o.key == data_key));
                    if has_data {
                        listing.backups.push(m);
                    } else {
                        listing.dangling.push((m, key));
                    }
                }
                Err(reason) => listing.unreadable.push((key, reason)),
            }
        }
        listing.backups.sort_by(newest_first);
        listing.unreadable.sort();
        listing.dangling.sort_by(|a, b| a.1.cmp(&b.1));
        Ok(listing)
    }
}

/// An upload in progress. It must end in [`Upload::finish`] or [`Upload::abort`]; dropping
/// it leaves an incomplete multipart upload behind (a warning is logged).
pub struct Upload {
    writer: Option<WriteMultipart>,
    key: String,
    store: BackupStore,
}

impl Upload {
    /// The key being written.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Queues `bytes`, waiting while too many parts are in flight.
    ///
    /// # Errors
    /// [`StoreError::Request`] when a part upload failed.
    pub async fn put(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        let w = self.writer.as_mut().expect("upload still open");
        if let Err(e) = w.wait_for_capacity(MAX_PARTS_IN_FLIGHT).await {
            return Err(self.store.err("uploading a part of", &self.key, &e));
        }
        w.put(bytes);
        Ok(())
    }

    /// Uploads the last part and completes the upload: the object becomes visible.
    ///
    /// # Errors
    /// [`StoreError::Request`]; the upload has then been aborted.
    pub async fn finish(mut self) -> Result<(), StoreError> {
        let w = self.writer.take().expect("upload still open");
        w.finish()
            .await
            .map(|_| ())
            .map_err(|e| self.store.err("completing the upload of", &self.key, &e))
    }

    /// Aborts the upload and removes its parts.
    ///
    /// # Errors
    /// [`StoreError::Request`] when the store refused to abort.
    pub async fn abort(mut self) -> Result<(), StoreError> {
        let w = self.writer.take().expect("upload still open");
        let r = w
            .abort()
            .await
            .map_err(|e| self.store.err("aborting the upload of", &self.key, &e));
        // A local store leaves the backup's (now empty) directory behind; remove it, and
        // only if it is empty.
        if let (Some(root), Some((dir, _))) = (&self.store.local_root, self.key.rsplit_once('/')) {
            let _ = std::fs::remove_dir(root.join(dir));
        }
        r
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if self.writer.is_some() {
            tracing::warn!(key = %self.key, "an upload was dropped without being completed or aborted");
        }
    }
}

/// One page of a ListMultipartUploads answer.
#[derive(Debug, Default)]
struct UploadsPage {
    uploads: Vec<PendingUpload>,
    /// Key and upload-id markers of the next page, when truncated.
    next: Option<(String, String)>,
}

/// A ListMultipartUploads answer (the fields this tool reads).
#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListUploadsXml {
    #[serde(default)]
    is_truncated: bool,
    #[serde(default)]
    next_key_marker: Option<String>,
    #[serde(default)]
    next_upload_id_marker: Option<String>,
    #[serde(default, rename = "Upload")]
    uploads: Vec<UploadXml>,
}

#[derive(Debug, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UploadXml {
    key: String,
    upload_id: String,
    #[serde(default)]
    initiated: Option<String>,
}

/// Parses one page of a ListMultipartUploads answer.
///
/// # Errors
/// When the answer is not such a document.
fn parse_list_uploads(xml: &str) -> Result<UploadsPage, String> {
    let doc: ListUploadsXml = quick_xml::de::from_str(xml)
        .map_err(|e| format!("cannot parse the ListMultipartUploads answer: {e}"))?;
    let uploads = doc
        .uploads
        .into_iter()
        .map(|u| PendingUpload {
            key: u.key,
            upload_id: u.upload_id,
            // An upload of unknown age counts as old: S3 always sends the time.
            initiated: u
                .initiated
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(&t).ok())
                .map_or(chrono::DateTime::<chrono::Utc>::MIN_UTC, |t| t.to_utc()),
        })
        .collect();
    let next = match (
        doc.is_truncated,
        doc.next_key_marker,
        doc.next_upload_id_marker,
    ) {
        (true, Some(k), Some(id)) => Some((k, id)),
        _ => None,
    };
    Ok(UploadsPage { uploads, next })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn file_cfg(dir: &std::path::Path) -> StorageConfig {
        StorageConfig {
            url: StorageUrl::File {
                dir: dir.to_path_buf(),
            },
            endpoint: None,
            region: "us-east-1".into(),
            path_style: false,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            storage_class: None,
            sse: None,
            checksum_sha256: false,
            requests: Default::default(),
        }
    }

    #[tokio::test]
    async fn aborted_uploads_leave_nothing_and_listing_trusts_manifests_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = BackupStore::open(&file_cfg(dir.path()), "c1").unwrap();
        let l = store.layout().clone();

        // An aborted upload leaves no object.
        let id_a: BackupId = "20260101T000000Z-00000a".parse().unwrap();
        let mut up = store
            .begin_upload(&l.data_key(&id_a, ".zst"))
            .await
            .unwrap();
        up.put(Bytes::from(vec![1u8; PART_SIZE + 10]))
            .await
            .unwrap();
        up.abort().await.unwrap();

        // A completed upload without a manifest is not a backup.
        let id_b: BackupId = "20260102T000000Z-00000b".parse().unwrap();
        let mut up = store
            .begin_upload(&l.data_key(&id_b, ".zst"))
            .await
            .unwrap();
        up.put(Bytes::from_static(b"data")).await.unwrap();
        up.finish().await.unwrap();

        // A committed backup.
        let id_c: BackupId = "20260103T000000Z-00000c".parse().unwrap();
        let mut up = store
            .begin_upload(&l.data_key(&id_c, ".zst"))
            .await
            .unwrap();
        up.put(Bytes::from_static(b"data")).await.unwrap();
        up.finish().await.unwrap();
        let mut m = manifest::sample(&id_c.to_string(), id_c.time());
        m.object = l.data_key(&id_c, ".zst");
        store.put_manifest(&id_c, &m).await.unwrap();

        // Foreign objects and a broken manifest.
        std::fs::write(dir.path().join("c1/README"), "not ours").unwrap();
        let id_d: BackupId = "20260104T000000Z-00000d".parse().unwrap();
        std::fs::create_dir_all(dir.path().join(format!("c1/{id_d}"))).unwrap();
        std::fs::write(dir.path().join(format!("c1/{id_d}/manifest.json")), "{").unwrap();

        assert!(
            !dir.path().join(format!("c1/{id_a}")).exists(),
            "the aborted backup's directory is removed"
        );
        let listing = store.list().await.unwrap();
        assert_eq!(listing.backups.len(), 1);
        assert_eq!(listing.backups[0].id, id_c);
        assert!(
            !listing.data_objects.contains_key(&id_a),
            "aborted upload must leave nothing"
        );
        assert!(listing.data_objects.contains_key(&id_b));
        assert_eq!(listing.foreign, 1);
        assert_eq!(listing.unreadable.len(), 1);
        // Nothing but our objects: no staging files left from the aborted upload.
        let mut files = Vec::new();
        for e in walk(dir.path()) {
            files.push(e);
        }
        assert!(
            files.iter().all(|f| !f.contains('#')),
            "staging files left behind: {files:?}"
        );
    }

    fn walk(p: &std::path::Path) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(p).unwrap() {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
        out
    }

    #[tokio::test]
    async fn newest_skips_future_and_other_clusters_backups() {
        let (store, _) = testing::memory("p", "c");
        let now = chrono::Utc::now();
        let at = |mins: i64, rev: i64, cluster: &str, n: u32| {
            let t = now - chrono::Duration::minutes(mins);
            let id = format!("{}-{n:06x}", t.format("%Y%m%dT%H%M%SZ"));
            let mut m = crate::store::manifest::sample(&id, t);
            m.revision = rev;
            m.cluster_id = cluster.into();
            m
        };
        let ours = at(60, 10, "aa", 1);
        let skewed = at(600, 20, "aa", 2); // a slow clock, but the highest revision
        let theirs = at(1, 99, "bb", 3);
        let future = at(-60 * 24, 5, "aa", 4);
        for m in [&ours, &skewed, &theirs, &future] {
            testing::put_backup(&store, m, Some(b"d")).await;
        }
        let (count, newest) = store.newest(now, Some("aa")).await.unwrap();
        assert_eq!(count, 4);
        assert_eq!(newest.unwrap().id, skewed.id);
        let (_, newest) = store.newest(now, Some("bb")).await.unwrap();
        assert_eq!(newest.unwrap().id, theirs.id);
        let (_, newest) = store.newest(now, None).await.unwrap();
        assert_eq!(newest.unwrap().id, theirs.id, "never the future one");
        let listing = store.list().await.unwrap();
        assert_eq!(listing.latest(now, "aa").unwrap().id, skewed.id);
        assert!(listing.latest(now, "cc").is_none());
    }

    #[test]
    fn list_uploads_answers_are_parsed() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<ListMultipartUploadsResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>b</Bucket>
<IsTruncated>true</IsTruncated><NextKeyMarker>p/c/x&amp;y</NextKeyMarker><NextUploadIdMarker>id2</NextUploadIdMarker>
<Upload><Key>p/c/20260101T000000Z-000001/snapshot.db.zst</Key><UploadId>id1</UploadId><Initiated>2026-01-01T00:00:00.000Z</Initiated></Upload>
<Upload><Key>p/c/x&amp;y</Key><UploadId>id2</UploadId><Initiated>2026-01-02T00:00:00Z</Initiated></Upload>
</ListMultipartUploadsResult>"#;
        let p = parse_list_uploads(xml).unwrap();
        assert_eq!(p.uploads.len(), 2);
        assert_eq!(p.uploads[0].upload_id, "id1");
        assert_eq!(p.uploads[1].key, "p/c/x&y");
        assert_eq!(
            p.uploads[0].initiated,
            chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
                .unwrap()
                .to_utc()
        );
        assert_eq!(p.next, Some(("p/c/x&y".to_string(), "id2".to_string())));
        let last = parse_list_uploads(
            "<ListMultipartUploadsResult><IsTruncated>false</IsTruncated></ListMultipartUploadsResult>",
        )
        .unwrap();
        assert!(last.uploads.is_empty() && last.next.is_none());
        // Entities, CDATA and unknown elements are XML's business, not ours.
        let odd = parse_list_uploads(
            "<ListMultipartUploadsResult><Upload><Key><![CDATA[a<b]]></Key><Owner><ID>x</ID></Owner><UploadId>u&#49;</UploadId></Upload></ListMultipartUploadsResult>",
        )
        .unwrap();
        assert_eq!(odd.uploads[0].key, "a<b");
        assert_eq!(odd.uploads[0].upload_id, "u1");
        assert!(parse_list_uploads("<html>proxy error</html").is_err());
    }

    #[test]
    fn s3_setup_does_not_leak_secrets_in_debug() {
        let mut cfg = file_cfg(std::path::Path::new("/tmp"));
        cfg.url = StorageUrl::S3 {
            bucket: "b".into(),
            prefix: "p".into(),
        };
        cfg.endpoint = Some("http://127.0.0.1:1".into());
        cfg.access_key_id = Some("GKtest".into());
        cfg.secret_access_key = Some(Secret::new("super-secret-value"));
        let s = BackupStore::open(&cfg, "c").unwrap();
        assert!(!format!("{s:?}").contains("super-secret-value"));
        assert_eq!(s.layout().base(), "p/c");
    }
}

/// Test seams: an in-memory store and a wrapper that fails chosen calls.
#[cfg(test)]
pub(crate) mod testing;
