//! The daemon as systemd runs it: the notify protocol on a real `NOTIFY_SOCKET`, SIGHUP
//! reloads (good and broken files), and SIGTERM in the middle of an upload.

use crate::support;

use crate::support::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
use crate::support::garage::garage;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn spawn_daemon(config: &Path, log: &Path, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-backup"));
    cmd.args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, _) in std::env::vars_os() {
        let name = k.to_string_lossy();
        if name.starts_with("ETCD_BACKUP_") || name.starts_with("AWS_") || name == "NOTIFY_SOCKET" {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill")
        .args(["-s", sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

fn write_config(path: &Path, endpoint: &str, storage: &str, spool: &Path, cron: &str) {
    std::fs::write(
        path,
        format!(
            "[etcd]\nendpoints = [\"{endpoint}\"]\n[storage]\n{storage}\n[backup]\ncluster_name = \"d\"\nspool_dir = \"{}\"\n[schedule]\ncron = \"{cron}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n",
            spool.display(),
            support::free_port()
        ),
    )
    .unwrap();
}

/// Reads notify datagrams until `until` matches one or the timeout passes.
fn read_until(sock: &UnixDatagram, got: &mut Vec<String>, until: &str, timeout: Duration) {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < timeout {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let hit = msg.lines().any(|l| l == until);
            got.push(msg);
            if hit {
                return;
            }
        }
    }
    panic!("no {until:?} within {timeout:?}; received: {got:#?}");
}

#[test]
fn notify_protocol_reload_and_stop() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    cluster.put("/k", "v");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let storage = format!("url = \"file://{}\"", dir.path().join("b").display());
    // Never fires during the test at first.
    write_config(
        &config,
        &cluster.client_url(0),
        &storage,
        &dir.path().join("s"),
        "0 0 1 1 *",
    );
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon(
        &config,
        &log,
        &[
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "3000000".to_string()),
        ],
    );
    let mut got = Vec::new();
    read_until(&sock, &mut got, "READY=1", Duration::from_secs(20));
    assert!(got.last().unwrap().contains("STATUS="), "{got:?}");
    // The watchdog is fed every WATCHDOG_USEC / 2 while the loop is alive.
    read_until(&sock, &mut got, "WATCHDOG=1", Duration::from_secs(5));
    read_until(&sock, &mut got, "WATCHDOG=1", Duration::from_secs(5));

    // SIGHUP with a changed schedule: RELOADING=1 + MONOTONIC_USEC, then READY=1, and the
    // new schedule runs a backup.
    write_config(
        &config,
        &cluster.client_url(0),
        &storage,
        &dir.path().join("s"),
        "*/2 * * * * *",
    );
    // (The first start runs the schedule's last slot at once, as a missed backup: the store
    // is empty.)
    support::wait_until("the catch-up backup", Duration::from_secs(20), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("scheduled backup committed")
    });
    let committed = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("scheduled backup committed")
            .count()
    };
    let before_reload = committed();
    got.clear();
    signal(&child, "HUP");
    read_until(&sock, &mut got, "RELOADING=1", Duration::from_secs(10));
    let reloading = got.last().unwrap().clone();
    assert!(reloading.contains("MONOTONIC_USEC="), "{reloading}");
    read_until(&sock, &mut got, "READY=1", Duration::from_secs(10));
    support::wait_until(
        "a backup on the new schedule",
        Duration::from_secs(20),
        || committed() > before_reload,
    );

    // SIGHUP with a broken file: rejected, the old configuration stays, the daemon works on.
    // First a TOML syntax error on a line holding a secret: the journal line names the
    // place, never the text.
    std::fs::write(
        &config,
        "[etcd]\nusername = \"b\"\npassword = \"s3cr3tPW\\qcd\"\n",
    )
    .unwrap();
    got.clear();
    signal(&child, "HUP");
    read_until(&sock, &mut got, "READY=1", Duration::from_secs(10));
    support::wait_until("the rejected reload", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("etcd.password: TOML syntax error")
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("s3cr3tPW"), "the secret is logged: {text}");
    assert!(text.contains(":3:"), "the line is named: {text}");
    std::fs::write(&config, "[schedule]\ncron = \"not a schedule\"\n").unwrap();
    got.clear();
    signal(&child, "HUP");
    read_until(&sock, &mut got, "READY=1", Duration::from_secs(10));
    let before = std::fs::read_to_string(&log)
        .unwrap()
        .matches("scheduled backup committed")
        .count();
    support::wait_until(
        "backups to go on with the old configuration",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&log)
                .unwrap()
                .matches("scheduled backup committed")
                .count()
                > before
        },
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("configuration reload rejected"), "{text}");
    assert!(
        text.contains("schedule.cron"),
        "the log names the bad key: {text}"
    );

    // SIGTERM: STOPPING=1 and a clean exit.
    got.clear();
    signal(&child, "TERM");
    read_until(&sock, &mut got, "STOPPING=1", Duration::from_secs(10));
    let status = child.wait().unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(&log).unwrap()
    );
}

#[test]
fn check_config_never_echoes_a_secret_on_a_line_with_a_syntax_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        "[storage]\nurl = \"file:///var/b\"\n[etcd]\nusername = \"b\"\npassword = \"s3cr3tPW\\qcd\"\n",
    )
    .unwrap();
    let out = support::etcd_backup(&["check-config", "--config", config.to_str().unwrap()], &[]);
    let text = support::text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains("s3cr3tPW"), "the secret is printed: {text}");
    assert!(
        text.contains("etcd.password") && text.contains(":5:") && text.contains("escape"),
        "file, line, column, key and kind: {text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_upload_leaves_no_manifest_and_no_incomplete_upload() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    support::load_values(&cluster.client_url(0), 150, false).await;
    let g = garage();
    let bucket = g.create_bucket("sigterm");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let storage = format!(
        "url = \"s3://{bucket}/p\"\nendpoint = \"{}\"\nregion = \"garage\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"",
        g.s3_endpoint, g.access_key_id, g.secret_access_key
    );
    let spool: PathBuf = dir.path().join("s");
    write_config(
        &config,
        &cluster.client_url(0),
        &storage,
        &spool,
        "*/2 * * * * *",
    );
    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon(&config, &log, &[("RUST_LOG", "debug".into())]);
    // Wait until the snapshot stream is flowing, then stop the daemon.
    support::wait_until("a cycle to start", Duration::from_secs(30), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("connected to etcd")
    });
    std::thread::sleep(Duration::from_millis(300));
    signal(&child, "TERM");
    let started = Instant::now();
    let status = child.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "shutdown took too long"
    );
    assert!(
        text.contains("backup aborted by shutdown")
            && text.contains("aborted the incomplete upload"),
        "the cycle was not interrupted mid-upload (it may have finished first): {text}"
    );
    let cfg =
        etcd_backup::config::Config::load_with_env(&config, Some(Default::default())).unwrap();
    let store = etcd_backup::store::BackupStore::open(&cfg.storage, "d").unwrap();
    let listing = store.list().await.unwrap();
    assert!(
        listing.backups.is_empty() && listing.data_objects.is_empty(),
        "{listing:?}"
    );
    g.wait_incomplete_uploads(&bucket, 0);
    let left: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "spool files left: {left:?}");
}

/// A slow store (the fault proxy throttling S3) makes prune take longer than the systemd
/// watchdog interval: prune feeds the heartbeat while it runs, so the watchdog is never
/// withheld.
#[test]
fn a_slow_prune_keeps_the_watchdog_fed() {
    use crate::support::proxy::{Fault, Proxy};
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    cluster.put("/k", "v");
    let g = garage();
    let bucket = g.create_bucket("watchdog");
    let s3 = Proxy::for_url(&g.s3_endpoint);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[etcd]\nendpoints = [\"{}\"]\n\
             [storage]\nurl = \"s3://{bucket}/p\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
             request_timeout = \"30s\"\n\
             [backup]\ncluster_name = \"w\"\nspool_dir = \"{}\"\ntimeout = \"120s\"\n\
             [schedule]\ncron = \"*/3 * * * * *\"\n[retention]\nkeep_last = 1\n\
             [metrics]\nlisten = \"127.0.0.1:{}\"\n[election]\nenabled = false\n",
            cluster.client_url(0),
            s3.url(),
            g.region,
            g.access_key_id,
            g.secret_access_key,
            dir.path().join("s").display(),
            support::free_port()
        ),
    )
    .unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = dir.path().join("daemon.log");
    let mut child = spawn_daemon(
        &config,
        &log,
        &[
            ("NOTIFY_SOCKET", sock_path.display().to_string()),
            ("WATCHDOG_USEC", "2000000".to_string()),
        ],
    );
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut got = Vec::new();
    read_until(&sock, &mut got, "READY=1", Duration::from_secs(20));
    support::wait_until("two backups and a prune", Duration::from_secs(40), || {
        text().matches("prune finished").count() >= 2
    });
    // Slow the store: each request now takes seconds.
    s3.set(Fault::Throttle(1500));
    let prunes = text().matches("prune finished").count();
    let drain = |got: &mut Vec<String>| {
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            got.push(String::from_utf8_lossy(&buf[..n]).to_string());
        }
    };
    let start = Instant::now();
    while text().matches("prune finished").count() <= prunes {
        drain(&mut got);
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "no prune against the slow store: {}",
            text()
        );
    }
    s3.set(Fault::Pass);
    let _ = child.kill();
    let _ = child.wait();
    let text = text();
    let last = text
        .lines()
        .rfind(|l| l.contains("prune finished"))
        .unwrap()
        .to_string();
    let ms: u64 = last
        .split("duration_ms=")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {last}"));
    eprintln!("prune against the slow store took {ms} ms (watchdog interval 2000 ms)");
    assert!(
        ms > 2000,
        "the store was not slow enough to test anything: {last}"
    );
    assert!(
        !text.contains("withholding the watchdog ping"),
        "the watchdog was withheld during prune:\n{text}"
    );
    assert!(got.iter().any(|m| m.contains("WATCHDOG=1")));
}
