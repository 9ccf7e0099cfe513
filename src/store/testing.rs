//! Test seams for the store: backups written straight into an `InMemory` object store, and
//! [`Faulty`], which fails chosen calls of the store it wraps.

use super::BackupStore;
use crate::store::manifest::Manifest;
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};

/// Which calls fail.
#[derive(Debug, Default)]
pub struct Faults {
    /// Deleting these keys fails.
    pub delete: HashSet<String>,
    /// HEAD of these keys fails.
    pub head: HashSet<String>,
    /// GET of these keys fails.
    pub get: HashSet<String>,
    /// A listing fails after this many objects.
    pub list_after: Option<usize>,
}

/// Wraps a store and fails the calls [`Faults`] names.
#[derive(Debug)]
pub struct Faulty {
    inner: Arc<dyn ObjectStore>,
    /// The faults, changeable while the store is in use.
    pub faults: Mutex<Faults>,
}

impl std::fmt::Display for Faulty {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Faulty({})", self.inner)
    }
}

fn injected(path: &Path) -> object_store::Error {
    object_store::Error::Generic {
        store: "faulty",
        source: format!("injected failure on {path}").into(),
    }
}

impl Faulty {
    /// Wraps `inner` with no faults yet.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Arc<Faulty> {
        Arc::new(Faulty {
            inner,
            faults: Mutex::new(Faults::default()),
        })
    }
}

#[async_trait]
impl ObjectStore for Faulty {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        {
            let f = self.faults.lock().unwrap();
            let set = if options.head { &f.head } else { &f.get };
            if set.contains(location.as_ref()) {
                return Err(injected(location));
            }
        }
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        let failing = self.faults.lock().unwrap().delete.clone();
        let inner = self.inner.clone();
        locations
            .then(move |p| {
                let inner = inner.clone();
                let failing = failing.clone();
                async move {
                    let p = p?;
                    if failing.contains(p.as_ref()) {
                        return Err(injected(&p));
                    }
                    inner.delete(&p).await.map(|()| p)
                }
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let after = self.faults.lock().unwrap().list_after;
        let s = self.inner.list(prefix);
        match after {
            None => s,
            Some(n) => s
                .enumerate()
                .map(move |(i, r)| {
                    if i >= n {
                        Err(injected(&Path::from("listing")))
                    } else {
                        r
                    }
                })
                .boxed(),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// An in-memory backup store under `PREFIX/cluster`, with its raw object store.
pub fn memory(prefix: &str, cluster: &str) -> (BackupStore, Arc<InMemory>) {
    let raw = Arc::new(InMemory::new());
    (
        BackupStore::new(raw.clone(), prefix, cluster, "memory://"),
        raw,
    )
}

/// A faulty in-memory backup store.
pub fn faulty(prefix: &str, cluster: &str) -> (BackupStore, Arc<Faulty>) {
    let f = Faulty::new(Arc::new(InMemory::new()));
    (BackupStore::new(f.clone(), prefix, cluster, "memory://"), f)
}

/// Writes a backup directly: its data object (unless `data` is `None`) and its manifest.
pub async fn put_backup(store: &BackupStore, m: &Manifest, data: Option<&[u8]>) {
    if let Some(d) = data {
        let key = store.data_key(m).expect("a data name");
        store
            .store
            .put(&Path::from(key.as_str()), PutPayload::from(d.to_vec()))
            .await
            .unwrap();
    }
    store.put_manifest(&m.id, m).await.unwrap();
}

/// Every key in the store, sorted.
pub async fn keys(store: &dyn ObjectStore) -> Vec<String> {
    use futures::TryStreamExt;
    let mut v: Vec<String> = store
        .list(None)
        .map_ok(|o| o.location.to_string())
        .try_collect()
        .await
        .unwrap();
    v.sort();
    v
}
