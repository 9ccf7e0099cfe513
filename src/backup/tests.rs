//! The cycle against an in-memory store and snapshot sources made from real etcd snapshot
//! files (`tests/fixtures/snapshots`): what is committed on success, and that every way a
//! cycle fails leaves nothing in the store or the spool, with the stage and kind it reports.

use super::source::{SnapshotChunks, SnapshotSource};
use super::*;
use crate::etcd::EtcdError;
use futures::future::BoxFuture;
use object_store::memory::InMemory;
use object_store::ObjectStore;
use std::sync::Arc;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/snapshots/etcd-3.5.1-history.db"
);
/// The fixture's revision (its `.status.json`).
const FIXTURE_REVISION: i64 = 1514;

/// How the fake member's stream behaves.
#[derive(Clone, Copy)]
enum Behaviour {
    /// The whole file, in 64 KiB chunks.
    Whole,
    /// Fails after this many bytes.
    BreakAfter(usize),
    /// Sends one chunk, then nothing ever again.
    Stall,
}

struct FileSource {
    bytes: Arc<Vec<u8>>,
    revision: i64,
    behaviour: Behaviour,
}

impl FileSource {
    fn new(bytes: Vec<u8>, behaviour: Behaviour) -> Self {
        Self {
            bytes: Arc::new(bytes),
            revision: FIXTURE_REVISION,
            behaviour,
        }
    }
}

struct Chunks {
    bytes: Arc<Vec<u8>>,
    at: usize,
    behaviour: Behaviour,
}

impl SnapshotChunks for Chunks {
    fn next_chunk(&mut self) -> BoxFuture<'_, Result<Option<bytes::Bytes>, EtcdError>> {
        Box::pin(async move {
            match self.behaviour {
                Behaviour::BreakAfter(n) if self.at >= n => {
                    return Err(EtcdError::Stream {
                        endpoint: "fake://member".into(),
                        received: self.at as u64,
                        detail: "connection reset".into(),
                    })
                }
                Behaviour::Stall if self.at > 0 => std::future::pending::<()>().await,
                _ => {}
            }
            if self.at >= self.bytes.len() {
                return Ok(None);
            }
            let end = (self.at + 64 * 1024).min(self.bytes.len());
            let chunk = bytes::Bytes::copy_from_slice(&self.bytes[self.at..end]);
            self.at = end;
            Ok(Some(chunk))
        })
    }
}

impl SnapshotSource for FileSource {
    fn endpoint(&self) -> &str {
        "fake://member"
    }

    fn status(&self) -> BoxFuture<'_, Result<MemberStatus, EtcdError>> {
        let size = self.bytes.len() as i64 - 32;
        Box::pin(async move {
            Ok(MemberStatus {
                version: "3.5.1".into(),
                db_size: size,
                db_size_in_use: size,
                db_quota: None,
                revision: self.revision,
                member_id: 0x1234,
                cluster_id: 0xabcd,
                member_name: "m1".into(),
                errors: Vec::new(),
                members: Vec::new(),
            })
        })
    }

    fn snapshot(&self) -> BoxFuture<'_, Result<Box<dyn SnapshotChunks>, EtcdError>> {
        Box::pin(async move {
            Ok(Box::new(Chunks {
                bytes: self.bytes.clone(),
                at: 0,
                behaviour: self.behaviour,
            }) as Box<dyn SnapshotChunks>)
        })
    }
}

struct Rig {
    dir: tempfile::TempDir,
    spool: std::path::PathBuf,
    config: Config,
    objects: Arc<InMemory>,
    store: BackupStore,
}

fn rig(extra: &str) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let file = dir.path().join("config.toml");
    std::fs::write(
        &file,
        format!(
            "[storage]\nurl = \"file://{}/store\"\n[backup]\nspool_dir = \"{}\"\n{extra}",
            dir.path().display(),
            spool.display()
        ),
    )
    .unwrap();
    let config = Config::load_with_env(&file, Some(Default::default())).unwrap();
    let objects = Arc::new(InMemory::new());
    let store = BackupStore::new(objects.clone(), "", "kubernetes", "memory://");
    Rig {
        dir,
        spool,
        config,
        objects,
        store,
    }
}

impl Rig {
    async fn run(
        &self,
        source: &dyn SnapshotSource,
        cancel: &CancellationToken,
    ) -> Result<CycleReport, CycleError> {
        run(CycleInput {
            config: &self.config,
            store: &self.store,
            source,
            cancel,
            heartbeat: None,
            progress: None,
            term: None,
            slot: None,
        })
        .await
    }

    async fn keys(&self) -> Vec<String> {
        use futures::TryStreamExt;
        let mut keys: Vec<String> = self
            .objects
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap();
        keys.sort();
        keys
    }

    fn spool_files(&self) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(&self.spool)
            .map(|d| d.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    }

    /// Nothing in the store, nothing in the spool.
    async fn assert_nothing_left(&self) {
        assert_eq!(
            self.keys().await,
            Vec::<String>::new(),
            "objects left in the store"
        );
        assert_eq!(
            self.spool_files(),
            Vec::<std::path::PathBuf>::new(),
            "spool files left"
        );
        assert!(self.store.list().await.unwrap().backups.is_empty());
    }
}

fn fixture() -> Vec<u8> {
    std::fs::read(FIXTURE).unwrap()
}

#[tokio::test]
async fn a_good_snapshot_is_committed_with_its_manifest_last() {
    let rig = rig("");
    let bytes = fixture();
    let report = rig
        .run(
            &FileSource::new(bytes.clone(), Behaviour::Whole),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    let m = &report.manifest;
    assert_eq!(m.revision, FIXTURE_REVISION);
    assert_eq!(m.size, bytes.len() as u64);
    assert_eq!(m.cluster_id, "000000000000abcd");
    assert_eq!(m.endpoint, "fake://member");
    let listed = rig.store.list().await.unwrap();
    assert_eq!(listed.backups.len(), 1);
    assert_eq!(listed.backups[0].id, m.id);
    // The stored object is the snapshot, compressed: it decompresses to the same bytes.
    let keys = rig.keys().await;
    assert_eq!(keys.len(), 2, "{keys:?}");
    let data = keys.iter().find(|k| !k.ends_with("manifest.json")).unwrap();
    let stored = rig.store.get_bytes(data).await.unwrap();
    assert_eq!(stored.len() as u64, m.stored_size);
    assert_eq!(zstd::decode_all(&stored[..]).unwrap(), bytes);
    assert!(rig.spool_files().is_empty(), "the spool file is removed");
    // etcd's hold is part of the snapshot stage, and is recorded in the manifest.
    let t = &report.times;
    assert!(t.stream <= t.snapshot, "{t:?}");
    assert_eq!(m.stream_seconds, Some(t.stream.as_secs_f64()));
}

/// A file shaped like a snapshot (pages, then a matching sha256 trailer) but holding no
/// database: its stream completes, and the verifier then refuses it.
fn not_a_database(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut b: Vec<u8> = (0..len)
        .map(|_| {
            // xorshift: incompressible, so every byte has to cross the uploader.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let sum = ring::digest::digest(&ring::digest::SHA256, &b);
    b.extend_from_slice(sum.as_ref());
    b
}

#[tokio::test]
async fn a_slow_upload_does_not_hold_the_stream() {
    // 24 MiB through an uploader paced at 64 KiB/s: it would take over six minutes to
    // upload, and the cycle's limit (2 minutes) is far below that. A stream coupled to the upload
    // (bounded queues of a few MiB) would stall and time the cycle out; spooled first, the
    // stream ends, the verifier runs on the spool while the upload crawls on, and its
    // verdict ends the cycle.
    let rig = rig("compression = \"none\"\ntimeout = \"2m\"\ntimeout_per_gib = \"1s\"\n");
    let mut config = rig.config.clone();
    config.storage.requests.max_upload_rate = Some(64 * 1024);
    let rig = Rig { config, ..rig };
    let e = rig
        .run(
            &FileSource::new(not_a_database(24 << 20), Behaviour::Whole),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.stage, e.kind),
        (Stage::Verify, CycleErrorKind::Failed),
        "the stream must end, and the verifier judge the spool, while the upload is still going: {e}"
    );
    assert!(!e.message.contains("trailer"), "{e}");
    rig.assert_nothing_left().await;
}

#[tokio::test]
async fn a_stream_that_breaks_fails_the_snapshot_stage_and_leaves_nothing() {
    let rig = rig("");
    let e = rig
        .run(
            &FileSource::new(fixture(), Behaviour::BreakAfter(300 * 1024)),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.stage, e.kind),
        (Stage::Snapshot, CycleErrorKind::Failed),
        "{e}"
    );
    assert!(e.message.contains("connection reset"), "{e}");
    assert_eq!(e.unaborted_upload, None);
    rig.assert_nothing_left().await;
}

#[tokio::test]
async fn a_wrong_trailer_fails_verification_and_leaves_nothing() {
    let rig = rig("");
    let mut bytes = fixture();
    *bytes.last_mut().unwrap() ^= 0xff;
    let e = rig
        .run(
            &FileSource::new(bytes, Behaviour::Whole),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.stage, e.kind),
        (Stage::Verify, CycleErrorKind::Failed),
        "{e}"
    );
    rig.assert_nothing_left().await;
}

#[tokio::test]
async fn a_snapshot_that_fails_the_verifier_is_not_committed() {
    let rig = rig("");
    let mut bytes = fixture();
    // Break a page in the middle of the file, then give it a matching trailer: only the
    // verifier can tell.
    let body = bytes.len() - 32;
    for b in &mut bytes[4096 * 3..4096 * 3 + 64] {
        *b = 0xee;
    }
    let sum = ring::digest::digest(&ring::digest::SHA256, &bytes[..body]);
    bytes[body..].copy_from_slice(sum.as_ref());
    let e = rig
        .run(
            &FileSource::new(bytes, Behaviour::Whole),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(
        (e.stage, e.kind),
        (Stage::Verify, CycleErrorKind::Failed),
        "{e}"
    );
    rig.assert_nothing_left().await;
}

#[tokio::test]
async fn a_snapshot_older_than_the_member_is_refused() {
    let rig = rig("");
    let mut source = FileSource::new(fixture(), Behaviour::Whole);
    source.revision = FIXTURE_REVISION + 100;
    let e = rig
        .run(&source, &CancellationToken::new())
        .await
        .unwrap_err();
    assert_eq!(e.stage, Stage::Verify, "{e}");
    assert!(
        e.message.contains("lower than the member's revision"),
        "{e}"
    );
    rig.assert_nothing_left().await;
}

#[tokio::test]
async fn shutdown_mid_stream_cancels_and_leaves_nothing() {
    let rig = rig("");
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c.cancel();
    });
    let e = rig
        .run(&FileSource::new(fixture(), Behaviour::Stall), &cancel)
        .await
        .unwrap_err();
    assert_eq!(e.kind, CycleErrorKind::Cancelled, "{e}");
    rig.assert_nothing_left().await;
}

#[tokio::test]
async fn a_stalled_member_times_the_cycle_out_and_leaves_nothing() {
    let rig = rig("timeout = \"2s\"\n");
    let e = rig
        .run(
            &FileSource::new(fixture(), Behaviour::Stall),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.kind, CycleErrorKind::TimedOut, "{e}");
    assert!(e.message.contains("did not finish within 2s"), "{e}");
    rig.assert_nothing_left().await;
}

#[tokio::test]
async fn a_committed_backup_restores_byte_for_byte_and_a_tampered_one_is_refused() {
    use crate::restore::{fetch_to_file, RestoreError};
    use object_store::ObjectStoreExt as _;
    let rig = rig("");
    let bytes = fixture();
    let report = rig
        .run(
            &FileSource::new(bytes.clone(), Behaviour::Whole),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
    let m = &report.manifest;
    let out = rig.dir.path().join("restored.db");
    let fetched = fetch_to_file(&rig.store, m, &out, None, None)
        .await
        .unwrap();
    assert_eq!(fetched.verify.revision, FIXTURE_REVISION);
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    // Never over an existing file.
    let e = fetch_to_file(&rig.store, m, &out, None, None)
        .await
        .unwrap_err();
    assert!(matches!(e, RestoreError::File { .. }), "{e}");

    // The stored object replaced by another valid compression of other bytes: refused
    // on its stored sha256, and nothing is written.
    let key = rig.store.data_key(m).unwrap();
    let other = zstd::encode_all(&bytes[..bytes.len() / 2], 1).unwrap();
    rig.objects
        .put(&object_store::path::Path::from(key), other.into())
        .await
        .unwrap();
    let out2 = rig.dir.path().join("tampered.db");
    let e = fetch_to_file(&rig.store, m, &out2, None, None)
        .await
        .unwrap_err();
    assert!(matches!(e, RestoreError::Corrupt { .. }), "{e}");
    assert!(
        !out2.exists(),
        "nothing is left where the restore was to go"
    );
    let leftovers: Vec<_> = std::fs::read_dir(rig.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}
