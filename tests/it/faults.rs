//! Faults real clusters have, against real etcd and Garage with a fault proxy in between:
//! S3 down at start, S3 cutting uploads, S3 stalling, a slow link, the etcd member killed
//! mid-snapshot, a truncated snapshot stream, and a spool filesystem that is too small or
//! fills up during the snapshot.
//!
//! After each fault is lifted: the daemon still runs and is healthy, the next cycle succeeds,
//! the failure was counted by stage, no incomplete multipart upload remains, no manifest
//! lacks its object, and every committed backup verifies.

use crate::support;

use crate::support::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
use crate::support::garage::{garage, Garage};
use crate::support::proxy::{Fault, Proxy};
use crate::support::text;
use crate::support::{metric, ChildProc};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Two cores: one scenario at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn etcd_backup(args: &[&str]) -> Output {
    support::etcd_backup(args, &[])
}

struct Rig {
    cluster: EtcdCluster,
    g: &'static Garage,
    bucket: String,
    s3: Proxy,
    dir: tempfile::TempDir,
    config: PathBuf,
    port: u16,
    daemon: Option<ChildProc>,
    log: PathBuf,
    /// `[schedule] cron` and `[backup] retry_after` of the next `write_config`.
    cron: String,
    retry_after: String,
}

impl Rig {
    /// One etcd member with `mb` MiB of data, Garage behind a proxy.
    fn new(mb: u32) -> Rig {
        let bins = EtcdBins::get(EtcdVersion::V3_5_1);
        let cluster = EtcdCluster::start(&bins, 1);
        if mb > 0 {
            tokio::runtime::Runtime::new()
                .unwrap()
                .block_on(support::load_values(&cluster.client_url(0), mb, true));
        }
        let g = garage();
        let bucket = g.create_bucket("faults");
        let s3 = Proxy::for_url(&g.s3_endpoint);
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        let log = dir.path().join("daemon.log");
        let port = support::free_port();
        let rig = Rig {
            cluster,
            g,
            bucket,
            s3,
            dir,
            config,
            port,
            daemon: None,
            log,
            cron: "*/4 * * * * *".into(),
            retry_after: "off".into(),
        };
        rig.write_config(
            &rig.cluster.client_url(0),
            &rig.dir.path().join("spool"),
            "",
        );
        rig
    }

    fn write_config(&self, etcd: &str, spool: &Path, extra_storage: &str) {
        std::fs::write(
            &self.config,
            format!(
                "[etcd]\nendpoints = [\"{etcd}\"]\ndial_timeout = \"2s\"\nrequest_timeout = \"5s\"\n\
                 [storage]\nurl = \"s3://{}/p\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
                 connect_timeout = \"2s\"\nrequest_timeout = \"4s\"\nmax_retries = 2\nretry_timeout = \"10s\"\n{extra_storage}\n\
                 [backup]\ncluster_name = \"f\"\nspool_dir = \"{}\"\ntimeout = \"90s\"\nretry_after = \"{}\"\n\
                 [schedule]\ncron = \"{}\"\n\
                 [retention]\nkeep_last = 1000\n\
                 [metrics]\nlisten = \"127.0.0.1:{}\"\nrefresh_interval = \"1s\"\n\
                 [election]\nenabled = false\n",
                self.bucket,
                self.s3.url(),
                self.g.region,
                self.g.access_key_id,
                self.g.secret_access_key,
                spool.display(),
                self.retry_after,
                self.cron,
                self.port,
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &self.config,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
    }

    fn start_daemon(&mut self) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-backup"));
        cmd.args(["run", "--config", self.config.to_str().unwrap()])
            .env("RUST_LOG", "etcd_backup=debug");
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD_BACKUP_") || k.starts_with("AWS_") || k == "NOTIFY_SOCKET" {
                cmd.env_remove(k);
            }
        }
        self.daemon = Some(ChildProc::spawn("etcd-backup", cmd, &self.log));
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn count(&self, what: &str) -> usize {
        self.log_text().matches(what).count()
    }

    fn tail(&self) -> String {
        self.daemon
            .as_ref()
            .map_or_else(String::new, |d| d.log_tail(40))
    }

    fn wait_log(&self, what: &str, more_than: usize, timeout: Duration) {
        support::wait_until(
            &format!("{what:?} in the daemon log\n{}", self.tail()),
            timeout,
            || self.count(what) > more_than,
        );
    }

    fn failures(&self, stage: &str) -> f64 {
        let body =
            support::http_get(self.port, "/metrics", Duration::from_secs(2)).unwrap_or_default();
        metric(
            &body,
            &format!("etcd_backup_failures_total{{stage=\"{stage}\"}}"),
        )
        .unwrap_or(0.0)
    }

    /// Everything that must hold once the fault is lifted.
    fn assert_recovered(&mut self, stage: &str) {
        assert!(
            self.failures(stage) >= 1.0,
            "the failure was not counted under stage {stage}\n{}",
            self.tail()
        );
        let before = self.count("scheduled backup committed");
        self.wait_log(
            "scheduled backup committed",
            before,
            Duration::from_secs(60),
        );
        assert!(
            self.daemon.as_mut().unwrap().is_running(),
            "{}",
            self.tail()
        );
        assert!(
            support::http_get(self.port, "/healthz", Duration::from_secs(2)).is_some(),
            "/healthz is not OK\n{}",
            self.tail()
        );
        support::wait_until(
            &format!("no incomplete multipart uploads\n{}", self.tail()),
            Duration::from_secs(30),
            || self.g.incomplete_multipart_uploads(&self.bucket) == 0,
        );
        self.assert_store_consistent();
    }

    /// No manifest without a valid object: every committed backup verifies; no data object
    /// is left without a manifest once prune has run.
    fn assert_store_consistent(&self) {
        let o = etcd_backup(&[
            "verify",
            "--all",
            "--config",
            self.config.to_str().unwrap(),
            "--json",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let cfg =
            etcd_backup::config::Config::load_with_env(&self.config, Some(Default::default()))
                .unwrap();
        let store = etcd_backup::store::BackupStore::open(&cfg.storage, "f").unwrap();
        let listing = rt.block_on(store.list()).unwrap();
        assert!(!listing.backups.is_empty());
        assert!(
            listing.dangling.is_empty(),
            "manifests without objects: {:?}",
            listing.dangling
        );
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(d) = &mut self.daemon {
            d.kill();
        }
    }
}

#[test]
fn s3_unreachable_at_start_then_back() {
    let _g = serial();
    let mut rig = Rig::new(2);
    rig.s3.set(Fault::Refuse);
    rig.start_daemon();
    rig.wait_log("scheduled backup failed", 0, Duration::from_secs(60));
    assert!(rig.log_text().contains("stage=upload"), "{}", rig.tail());
    rig.s3.set(Fault::Pass);
    rig.assert_recovered("upload");
}

#[test]
fn s3_cutting_uploads_mid_stream() {
    let _g = serial();
    let mut rig = Rig::new(30);
    rig.s3.set(Fault::CutAfter(3 << 20));
    rig.start_daemon();
    rig.wait_log("scheduled backup failed", 0, Duration::from_secs(90));
    assert!(rig.log_text().contains("stage=upload"), "{}", rig.tail());
    rig.s3.set(Fault::Pass);
    rig.assert_recovered("upload");
}

#[test]
fn s3_stalling_past_the_timeout_fails_in_bounded_time_and_cleans_up_after() {
    let _g = serial();
    let mut rig = Rig::new(40);
    rig.start_daemon();
    rig.wait_log("scheduled backup committed", 0, Duration::from_secs(60));
    // Slow the next upload down, then stall it while its parts are in flight: the parts and
    // the abort time out, and the daemon cleans up the upload once S3 answers again.
    rig.s3.set(Fault::Throttle(2_000_000));
    let cycles = rig.count("connected to etcd");
    rig.wait_log("connected to etcd", cycles, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    rig.s3.set(Fault::Stall);
    let stalled = Instant::now();
    let failed = rig.count("scheduled backup failed");
    rig.wait_log("scheduled backup failed", failed, Duration::from_secs(90));
    // Bounded by request_timeout (4 s) x (1 + max_retries 2) plus backoff, not backup.timeout.
    assert!(
        stalled.elapsed() < Duration::from_secs(75),
        "the stalled cycle took {:?} to fail",
        stalled.elapsed()
    );
    support::wait_until("the abort to give up", Duration::from_secs(60), || {
        rig.log_text()
            .contains("could not abort the incomplete upload")
    });
    support::wait_until(
        "the unaborted upload to show in the bucket",
        Duration::from_secs(20),
        || rig.g.incomplete_multipart_uploads(&rig.bucket) >= 1,
    );
    rig.s3.set(Fault::Pass);
    rig.assert_recovered("upload");
    assert!(
        rig.log_text()
            .contains("cleaned up the incomplete upload of an earlier failed cycle"),
        "{}",
        rig.tail()
    );
}

#[test]
fn a_slow_link_completes_a_large_snapshot_without_holding_etcd() {
    let _g = serial();
    let rig = Rig::new(120);
    // 8 MB/s for an incompressible ~120 MiB snapshot: ~16 s; each 5 MiB part < 1 s.
    let rate = 8_000_000u64;
    rig.s3.set(Fault::Throttle(rate));
    rig.write_config(
        &rig.cluster.client_url(0),
        &rig.dir.path().join("spool"),
        "",
    );
    let out = rig.dir.path().join("snapshot.out");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-backup"));
    cmd.args(["snapshot", "--config", rig.config.to_str().unwrap()]);
    for (k, _) in std::env::vars() {
        if k.starts_with("ETCD_BACKUP_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    let started = Instant::now();
    let mut child = ChildProc::spawn("etcd-backup snapshot", cmd, &out);
    // etcd's own word on when it let go of the snapshot (and its read transaction).
    const SENT: &str = "successfully sent database snapshot to client";
    support::wait_until(
        &format!(
            "etcd to log {SENT:?}\n{}\n{}",
            rig.cluster.log_tail(),
            child.log_tail(40)
        ),
        Duration::from_secs(120),
        || rig.cluster.log(0).contains(SENT),
    );
    let uploaded_at_release = rig.s3.bytes();
    let running_at_release = child.is_running();
    support::wait_until(
        &format!("etcd-backup snapshot to finish\n{}", child.log_tail(40)),
        Duration::from_secs(180),
        || !child.is_running(),
    );
    let took = started.elapsed();
    let log = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(
        log.contains("backup committed"),
        "the snapshot failed\n{}",
        child.log_tail(40)
    );
    let uploaded = rig.s3.bytes();
    assert!(
        uploaded > 100 << 20,
        "only {uploaded} bytes went through the proxy"
    );
    assert!(
        took.as_secs_f64() >= uploaded as f64 / rate as f64 * 0.8,
        "{took:?} for {uploaded} bytes: the throttle did not apply"
    );
    // The stream ended at disk speed, long before the throttled upload did: the upload
    // had not carried half of its bytes when etcd logged the end of the stream.
    assert!(
        running_at_release && uploaded_at_release < uploaded / 2,
        "etcd released the snapshot after {uploaded_at_release} of {uploaded} uploaded bytes (etcd-backup still running: {running_at_release}): the upload held etcd's stream\n{}",
        child.log_tail(40)
    );
    rig.s3.set(Fault::Pass);
    rig.assert_store_consistent();
    // The manifest records how long etcd was held: a small part of the cycle here.
    let cfg =
        etcd_backup::config::Config::load_with_env(&rig.config, Some(Default::default())).unwrap();
    let store = etcd_backup::store::BackupStore::open(&cfg.storage, "f").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listing = rt.block_on(store.list()).unwrap();
    let m = &listing.backups[0];
    let cycle = (m.finished_at - m.started_at)
        .to_std()
        .unwrap()
        .as_secs_f64();
    let stream = m
        .stream_seconds
        .expect("the manifest records the stream time");
    assert!(
        stream > 0.0 && stream < cycle / 2.0,
        "stream {stream} s of a {cycle} s cycle"
    );
}

#[test]
fn etcd_member_killed_mid_snapshot() {
    let _g = serial();
    let mut rig = Rig::new(120);
    // Slow the stream itself (a slow upload no longer holds it) so that it is still running
    // when the member dies.
    let etcd = Proxy::for_url(&rig.cluster.client_url(0));
    etcd.set(Fault::Throttle(6_000_000));
    rig.write_config(&etcd.url(), &rig.dir.path().join("spool"), "");
    rig.start_daemon();
    let started = rig.count("connected to etcd");
    rig.wait_log("connected to etcd", started, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));
    rig.cluster.kill(0);
    rig.wait_log("scheduled backup failed", 0, Duration::from_secs(60));
    assert!(rig.log_text().contains("stage=snapshot"), "{}", rig.tail());
    rig.cluster.restart(0);
    etcd.set(Fault::Pass);
    rig.assert_recovered("snapshot");
}

#[test]
fn a_truncated_snapshot_stream_is_rejected() {
    let _g = serial();
    let mut rig = Rig::new(20);
    let etcd = Proxy::for_url(&rig.cluster.client_url(0));
    rig.write_config(&etcd.url(), &rig.dir.path().join("spool"), "");
    // Status and the start of the stream pass; the stream is cut after ~5 MB.
    etcd.set(Fault::CutAfter(5 << 20));
    rig.start_daemon();
    rig.wait_log("scheduled backup failed", 0, Duration::from_secs(60));
    let log = rig.log_text();
    assert!(
        log.contains("stage=snapshot") || log.contains("stage=verify"),
        "{}",
        rig.tail()
    );
    etcd.set(Fault::Pass);
    let before = rig.count("scheduled backup committed");
    rig.wait_log(
        "scheduled backup committed",
        before,
        Duration::from_secs(60),
    );
    let stage = if rig.failures("snapshot") >= 1.0 {
        "snapshot"
    } else {
        "verify"
    };
    rig.assert_recovered(stage);
}

/// Mounts a tmpfs of `mb` MiB at `dir` (root only); unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: PathBuf, mb: u32) -> Tmpfs {
        std::fs::create_dir_all(&dir).unwrap();
        let o = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(&dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "this test mounts a {mb} MiB tmpfs as the spool directory and needs root with CAP_SYS_ADMIN: {}",
            text(&o)
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_spool_filesystem_too_small_fails_cleanly_before_the_snapshot() {
    let _g = serial();
    let mut rig = Rig::new(24);
    let small = Tmpfs::mount(rig.dir.path().join("small"), 8);
    rig.write_config(&rig.cluster.client_url(0), &small.0.join("spool"), "");
    rig.start_daemon();
    rig.wait_log("scheduled backup failed", 0, Duration::from_secs(60));
    let log = rig.log_text();
    assert!(
        log.contains("free, but the snapshot needs about"),
        "{}",
        rig.tail()
    );
    let left: Vec<_> = std::fs::read_dir(small.0.join("spool"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "spool files left: {left:?}");
    rig.g.wait_incomplete_uploads(&rig.bucket, 0);
    // A reload pointing the spool at a larger filesystem: the next cycle succeeds.
    rig.write_config(
        &rig.cluster.client_url(0),
        &rig.dir.path().join("spool"),
        "",
    );
    rig.daemon.as_ref().unwrap().signal("HUP");
    rig.assert_recovered("snapshot");
}

#[test]
fn a_spool_filesystem_filling_up_mid_snapshot_fails_cleanly() {
    let _g = serial();
    let mut rig = Rig::new(24);
    // Room for the snapshot when the cycle starts (the free-space check passes) ...
    let fs = Tmpfs::mount(rig.dir.path().join("fills"), 80);
    let spool = fs.0.join("spool");
    // ... and a slow stream, so that something else can fill the disk during it.
    let etcd = Proxy::for_url(&rig.cluster.client_url(0));
    etcd.set(Fault::Throttle(3_000_000));
    rig.write_config(&etcd.url(), &spool, "");
    rig.start_daemon();
    rig.wait_log("connected to etcd", 0, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(1500));
    // Another process fills the filesystem.
    let filler = fs.0.join("filler");
    {
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 1 << 20];
        while std::io::Write::write_all(&mut f, &block).is_ok() {}
    }
    rig.wait_log("scheduled backup failed", 0, Duration::from_secs(60));
    let log = rig.log_text();
    assert!(
        log.contains("writing the spool file") && log.contains("check free space"),
        "the failure does not name the spool write and what to do\n{}",
        rig.tail()
    );
    assert!(
        rig.failures("snapshot") >= 1.0,
        "the failure was not counted under stage snapshot\n{}",
        rig.tail()
    );
    let left: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "spool files left: {left:?}");
    support::wait_until(
        "the failed cycle's upload is aborted",
        Duration::from_secs(30),
        || rig.g.incomplete_multipart_uploads(&rig.bucket) == 0,
    );
    // The space comes back: the next cycle succeeds, on the same filesystem.
    std::fs::remove_file(&filler).unwrap();
    etcd.set(Fault::Pass);
    rig.assert_recovered("snapshot");
}

#[test]
fn a_failed_backup_is_retried_once_before_the_next_slot() {
    let _g = serial();
    let mut rig = Rig::new(2);
    // A slot every 30 s; the retry comes 3 s after a failure, long before the next slot.
    rig.cron = "*/30 * * * * *".into();
    rig.retry_after = "3s".into();
    rig.write_config(
        &rig.cluster.client_url(0),
        &rig.dir.path().join("spool"),
        "",
    );
    rig.s3.set(Fault::Refuse);
    rig.start_daemon();
    rig.wait_log("scheduled backup failed", 0, Duration::from_secs(45));
    let failed_at = Instant::now();
    assert!(
        rig.log_text()
            .contains("is retried once before the next slot"),
        "{}",
        rig.tail()
    );
    rig.s3.set(Fault::Pass);
    rig.wait_log("retrying the failed backup", 0, Duration::from_secs(20));
    rig.wait_log("scheduled backup committed", 0, Duration::from_secs(30));
    assert!(
        failed_at.elapsed() < Duration::from_secs(25),
        "the retry did not come before the next slot"
    );
    assert_eq!(rig.count("retrying the failed backup"), 1, "{}", rig.tail());
    rig.assert_store_consistent();
}
