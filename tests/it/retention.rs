//! Pruning against a real S3 server (Garage): hundreds of backups whose manifests carry
//! crafted timestamps spanning months, written through the same store code the daemon
//! uses; exact survivors, `--dry-run`, foreign objects, orphans, dangling manifests and an
//! interrupted prune.

use crate::support::garage::garage;
use bytes::Bytes;
use chrono::{DateTime, Duration, TimeZone, Utc};
use etcd_backup::store::manifest::Manifest;
use etcd_backup::store::naming::BackupId;
use etcd_backup::store::BackupStore;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

struct Env {
    store: BackupStore,
    config: PathBuf,
    bucket: String,
    _dir: tempfile::TempDir,
}

fn setup(name: &str, retention: &str) -> Env {
    let g = garage();
    let bucket = g.create_bucket(name);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nurl = \"s3://{bucket}/etcd\"\nendpoint = \"{}\"\nregion = \"garage\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n[backup]\ncluster_name = \"prod\"\ntimeout = \"10m\"\nspool_dir = \"{}\"\n[retention]\n{retention}\n",
            g.s3_endpoint,
            g.access_key_id,
            g.secret_access_key,
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let cfg =
        etcd_backup::config::Config::load_with_env(&config, Some(Default::default())).unwrap();
    let store = BackupStore::open(&cfg.storage, "prod").unwrap();
    Env {
        store,
        config,
        bucket,
        _dir: dir,
    }
}

/// Writes a committed backup taken at `t` (data object, then manifest), as a cycle would.
async fn write_backup(store: &BackupStore, t: DateTime<Utc>) -> String {
    let id = BackupId::new(t);
    let key = store.layout().data_key(&id, ".zst");
    let mut up = store.begin_upload(&key).await.unwrap();
    up.put(Bytes::from(format!("snapshot taken at {t}")))
        .await
        .unwrap();
    up.finish().await.unwrap();
    let m = manifest(&id, &key, t);
    store.put_manifest(&id, &m).await.unwrap();
    id.to_string()
}

fn manifest(id: &BackupId, key: &str, t: DateTime<Utc>) -> Manifest {
    let json = serde_json::json!({
        "format_version": 1, "id": id.to_string(), "time": t, "revision": 100, "size": 20512,
        "stored_size": 10, "sha256": "00", "compression": "zstd", "etcd_version": "3.5.1",
        "cluster_id": "1", "member": "2", "member_name": "m", "endpoint": "http://x",
        "cluster_name": "prod", "object": key, "stored_sha256": "00", "revision_before": 1,
        "db_size": 1, "db_size_in_use": 1,
        "verification": {"hash": 1, "total_key_entries": 1, "live_keys": 1, "page_size": 4096, "consistent_index": 1},
        "started_at": t, "finished_at": t, "node": "cp1", "tool_version": "test"
    });
    serde_json::from_value(json).unwrap()
}

fn prune_cli(env: &Env, args: &[&str]) -> serde_json::Value {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-backup"));
    // The manifests below are of cluster id "1"; no etcd runs here to say which is local.
    cmd.args([
        "prune",
        "--json",
        "--cluster-id",
        "1",
        "--config",
        env.config.to_str().unwrap(),
    ])
    .args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("ETCD_BACKUP_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "prune failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

async fn committed_times(store: &BackupStore) -> BTreeSet<DateTime<Utc>> {
    store
        .list()
        .await
        .unwrap()
        .backups
        .iter()
        .map(|m| m.time)
        .collect()
}

fn utc(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

/// 240 backups, every 6 h from 2026-01-01 to 2026-03-01 18:00 UTC, written in a shuffled
/// order (order must not matter).
async fn sixty_days(store: &BackupStore) -> Vec<DateTime<Utc>> {
    let mut times: Vec<DateTime<Utc>> = (0..240)
        .map(|i| utc(2026, 1, 1, 0) + Duration::hours(6 * i))
        .collect();
    let mut order: Vec<usize> = (0..240).map(|i| (i * 97) % 240).collect();
    order.dedup();
    let futs = order.iter().map(|&i| write_backup(store, times[i]));
    futures::future::join_all(futs).await;
    times.sort();
    times
}

#[tokio::test(flavor = "multi_thread")]
async fn exact_survivors_dry_run_and_foreign_objects() {
    let env = setup(
        "tiers",
        "keep_last = 3\nkeep_daily = 5\nkeep_monthly = 2\nmin_keep = 3\nmax_delete_per_run = 1000",
    );
    let times = sixty_days(&env.store).await;
    assert_eq!(committed_times(&env.store).await.len(), 240);
    // Objects that are not ours: next to our backups, in another cluster, and an unknown
    // file inside a backup directory.
    let foreign = [
        "etcd/prod/README.txt".to_string(),
        "etcd/staging/20260101T000000Z-abcdef/manifest.json".to_string(),
        "etcd/prod/20260101T000000Z-abcdef/notes.txt".to_string(),
        "other/thing".to_string(),
    ];
    let raw = raw_store(&env);
    for k in &foreign {
        use object_store::ObjectStoreExt;
        raw.put(&object_store::path::Path::from(k.as_str()), "x".into())
            .await
            .unwrap();
    }

    // Dry run: the plan, and nothing deleted.
    let plan = prune_cli(&env, &["--dry-run"]);
    assert_eq!(plan["dry_run"], true);
    let decisions = plan["plan"]["decisions"].as_array().unwrap();
    assert_eq!(decisions.len(), 240);
    let to_delete = decisions
        .iter()
        .filter(|d| d["action"]["action"] == "delete")
        .count();
    assert_eq!(to_delete, 233);
    assert_eq!(
        committed_times(&env.store).await.len(),
        240,
        "dry run deleted something"
    );

    let done = prune_cli(&env, &[]);
    assert_eq!(done["deleted"].as_array().unwrap().len(), 233);
    assert_eq!(done["foreign_objects"], 2, "{done}");
    let expect: BTreeSet<DateTime<Utc>> = [
        utc(2026, 3, 1, 18),  // newest, last 3, day, month 2026-03
        utc(2026, 3, 1, 12),  // last 3
        utc(2026, 3, 1, 6),   // last 3
        utc(2026, 2, 28, 18), // day, month 2026-02
        utc(2026, 2, 27, 18),
        utc(2026, 2, 26, 18),
        utc(2026, 2, 25, 18),
    ]
    .into_iter()
    .collect();
    assert_eq!(committed_times(&env.store).await, expect);
    assert_eq!(*times.last().unwrap(), utc(2026, 3, 1, 18));
    // Every data object of a deleted backup is gone; survivors keep theirs.
    let listing = env.store.list().await.unwrap();
    assert_eq!(listing.data_objects.len(), 7);
    // Foreign objects are untouched.
    for k in &foreign {
        use object_store::ObjectStoreExt;
        raw.head(&object_store::path::Path::from(k.as_str()))
            .await
            .unwrap_or_else(|e| panic!("{k} was touched: {e}"));
    }
    // Pruning again deletes nothing more.
    let again = prune_cli(&env, &[]);
    assert_eq!(again["deleted"].as_array().unwrap().len(), 0);
    garage().wait_incomplete_uploads(&env.bucket, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn max_age_cap_and_failing_backups_freeze() {
    let env = setup(
        "maxage",
        "keep_last = 0\nmax_age = \"7d\"\nmin_keep = 3\nmax_delete_per_run = 50",
    );
    // 100 daily backups ending now: 92 are older than 7 days, 50 go per prune.
    let now = Utc::now();
    for i in 0..100 {
        write_backup(&env.store, now - Duration::days(i) - Duration::minutes(1)).await;
    }
    let first = prune_cli(&env, &[]);
    assert_eq!(
        first["deleted"].as_array().unwrap().len(),
        50,
        "the cap binds"
    );
    let second = prune_cli(&env, &[]);
    assert_eq!(second["deleted"].as_array().unwrap().len(), 43);
    let left = committed_times(&env.store).await;
    assert_eq!(left.len(), 7);
    assert!(left.iter().all(|t| *t > now - Duration::days(7)));

    // Backups that stopped 10 days ago: nothing is deleted, whatever their age.
    let frozen = setup("frozen", "keep_last = 0\nmax_age = \"7d\"\nmin_keep = 1");
    for i in 10..40 {
        write_backup(&frozen.store, now - Duration::days(i)).await;
    }
    let r = prune_cli(&frozen, &[]);
    assert_eq!(r["deleted"].as_array().unwrap().len(), 0);
    assert_eq!(committed_times(&frozen.store).await.len(), 30);
}

#[tokio::test(flavor = "multi_thread")]
async fn orphans_dangling_manifests_and_an_interrupted_prune_are_cleaned() {
    let env = setup("orphans", "keep_last = 2\nmin_keep = 2");
    let now = Utc::now();
    let ids: Vec<String> = futures::future::join_all(
        (0..6).map(|i| write_backup(&env.store, now - Duration::hours(48 + i))),
    )
    .await;
    let raw = raw_store(&env);
    use object_store::ObjectStoreExt;
    // An interrupted prune: the manifest (deleted first) is gone, the data object is left.
    let interrupted: BackupId = ids[5].parse().unwrap();
    raw.delete(&object_store::path::Path::from(
        env.store.layout().manifest_key(&interrupted),
    ))
    .await
    .unwrap();
    // A manifest whose data object is missing (deleted by hand, say).
    let dangling: BackupId = ids[4].parse().unwrap();
    raw.delete(&object_store::path::Path::from(
        env.store.layout().data_key(&dangling, ".zst"),
    ))
    .await
    .unwrap();
    // A fresh upload without a manifest: a cycle may still be writing it; left alone.
    let fresh = BackupId::new(now);
    let fresh_key = env.store.layout().data_key(&fresh, ".zst");
    let mut up = env.store.begin_upload(&fresh_key).await.unwrap();
    up.put(Bytes::from_static(b"in progress")).await.unwrap();
    up.finish().await.unwrap();

    // `list` shows neither the orphan nor the dangling manifest as a backup.
    let listing = env.store.list().await.unwrap();
    let listed: BTreeSet<String> = listing.backups.iter().map(|m| m.id.to_string()).collect();
    assert!(!listed.contains(&ids[5]) && !listed.contains(&ids[4]));
    assert_eq!(listed.len(), 4);

    let r = prune_cli(&env, &[]);
    let removed: Vec<String> = r["orphans_removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(removed.iter().any(|k| k.contains(&ids[5])), "{removed:?}");
    assert!(removed.iter().any(|k| k.contains(&ids[4])), "{removed:?}");
    assert!(
        !removed.iter().any(|k| k.contains(&fresh.to_string())),
        "{removed:?}"
    );
    assert_eq!(r["deleted"].as_array().unwrap().len(), 2);
    let after = env.store.list().await.unwrap();
    assert_eq!(after.backups.len(), 2);
    assert!(after.dangling.is_empty());
    // Only the two survivors' data and the fresh upload remain.
    assert_eq!(after.data_objects.len(), 3);
    assert!(after.data_objects.contains_key(&fresh));
}

/// A raw client for the bucket, to write and inspect objects the tool did not write.
fn raw_store(env: &Env) -> object_store::aws::AmazonS3 {
    let g = garage();
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(&env.bucket)
        .with_endpoint(&g.s3_endpoint)
        .with_region("garage")
        .with_allow_http(true)
        .with_access_key_id(&g.access_key_id)
        .with_secret_access_key(&g.secret_access_key)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_incomplete_uploads_under_our_prefix_are_aborted() {
    use object_store::ObjectStoreExt;
    let env = setup("stale-uploads", "keep_last = 2");
    let raw = raw_store(&env);
    // Two abandoned uploads under our prefix, one elsewhere in the bucket.
    for key in [
        "etcd/prod/20260101T000000Z-000001/snapshot.db.zst",
        "etcd/prod/20260101T000000Z-000002/snapshot.db.zst",
        "other/big.bin",
    ] {
        let mut up = raw
            .put_multipart(&object_store::path::Path::from(key))
            .await
            .unwrap();
        up.put_part(vec![7u8; 5 * 1024 * 1024].into())
            .await
            .unwrap();
        drop(up); // neither completed nor aborted
    }
    let g = garage();
    g.wait_incomplete_uploads(&env.bucket, 3);
    let policy = etcd_backup::retention::RetentionPolicy::default();
    // Young uploads may belong to a running cycle: left alone.
    let now = Utc::now();
    let o = etcd_backup::retention::prune::prune(
        &env.store,
        &policy,
        now,
        std::time::Duration::from_secs(1200),
        "1",
        false,
    )
    .await
    .unwrap();
    assert!(o.cleaned_where(true).is_empty(), "{o:?}");
    g.wait_incomplete_uploads(&env.bucket, 3);
    // Two days later they are stale: ours are aborted, the foreign one stays.
    let later = now + Duration::days(2);
    let dry = etcd_backup::retention::prune::prune(
        &env.store,
        &policy,
        later,
        std::time::Duration::from_secs(1200),
        "1",
        true,
    )
    .await
    .unwrap();
    assert_eq!(dry.cleaned_where(true).len(), 2);
    assert_eq!(
        g.incomplete_multipart_uploads(&env.bucket),
        3,
        "a dry run aborts nothing"
    );
    let o = etcd_backup::retention::prune::prune(
        &env.store,
        &policy,
        later,
        std::time::Duration::from_secs(1200),
        "1",
        false,
    )
    .await
    .unwrap();
    assert_eq!(o.cleaned_where(true).len(), 2, "{o:?}");
    assert!(o.failed().is_empty(), "{o:?}");
    g.wait_incomplete_uploads(&env.bucket, 1);
}
