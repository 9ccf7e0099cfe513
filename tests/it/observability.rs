//! Metrics, health endpoints and the shipped alert rules, against a real etcd and the real
//! daemon binary; `promtool` (from Debian's prometheus package) checks the exposition and
//! unit-tests the rules.

use crate::support;

use crate::support::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn promtool() -> PathBuf {
    let p = std::env::var_os("EB_PROMTOOL").map_or_else(
        || support::deps_dir().join("prometheus/usr/bin/promtool"),
        PathBuf::from,
    );
    assert!(
        p.exists(),
        "promtool not found at {}: run scripts/install-deps.sh (or set EB_PROMTOOL)",
        p.display()
    );
    p
}

fn rules_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus")
}

#[test]
fn alert_rules_are_valid_and_their_unit_tests_pass() {
    let check = Command::new(promtool())
        .args(["check", "rules"])
        .arg(rules_dir().join("etcd-backup.rules.yml"))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let test = Command::new(promtool())
        .current_dir(rules_dir())
        .args(["test", "rules", "etcd-backup.rules.test.yml"])
        .output()
        .unwrap();
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}

struct Daemon {
    child: Child,
    port: u16,
}

impl Daemon {
    fn start(config: &Path, port: u16) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_etcd-backup"))
            .args(["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon { child, port };
        support::wait_until("the metrics endpoint", Duration::from_secs(20), || {
            d.get("/healthz").is_some()
        });
        d
    }

    /// GET a path; `None` when nothing answers. Returns (status, body).
    fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut resp = String::new();
        s.read_to_string(&mut resp).ok()?;
        let status = resp.split_whitespace().nth(1)?.parse().ok()?;
        let body = resp.split_once("\r\n\r\n")?.1.to_string();
        // The server uses chunked encoding for streamed bodies; our bodies are sent whole.
        Some((status, body))
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics")?;
        body.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path, name: &str, endpoint: &str, port: u16, cron: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            "[etcd]\nendpoints = [\"{endpoint}\"]\n[storage]\nurl = \"file://{}\"\n[backup]\ncluster_name = \"obs\"\nspool_dir = \"{}\"\n[schedule]\ncron = \"{cron}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nrefresh_interval = \"1s\"\nstore_refresh_interval = \"1s\"\n",
            dir.join("backups").display(),
            dir.join(format!("spool-{name}")).display()
        ),
    )
    .unwrap();
    path
}

#[test]
fn a_live_scrape_is_clean_and_reports_the_cluster_on_every_node() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    for i in 0..100 {
        cluster.put(&format!("/registry/k{i}"), &"v".repeat(200));
    }
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = (support::free_port(), support::free_port());
    // Node 1 starts first, leads the election and backs up every 2 seconds; node 2 follows
    // (and its schedule would not fire anyway): it must still report node 1's backups, read
    // from the store.
    let c1 = write_config(
        dir.path(),
        "n1.toml",
        &cluster.client_url(0),
        p1,
        "*/2 * * * * *",
    );
    let c2 = write_config(
        dir.path(),
        "n2.toml",
        &cluster.client_url(0),
        p2,
        "0 0 1 1 *",
    );
    let d1 = Daemon::start(&c1, p1);
    support::wait_until("a committed backup", Duration::from_secs(30), || {
        d1.metric("etcd_backup_cycles_total{result=\"success\"}")
            .unwrap_or(0.0)
            >= 1.0
    });
    let d2 = Daemon::start(&c2, p2);
    support::wait_until("node 2 to see the backup", Duration::from_secs(15), || {
        d2.metric("etcd_backup_last_success_timestamp_seconds")
            .unwrap_or(0.0)
            > 0.0
    });

    // Values match reality: the manifest's sizes, etcd's own DB size.
    let list = || -> Vec<serde_json::Value> {
        let listed = Command::new(env!("CARGO_BIN_EXE_etcd-backup"))
            .args(["list", "--json", "--config", c1.to_str().unwrap()])
            .output()
            .unwrap();
        serde_json::from_slice(&listed.stdout).unwrap()
    };
    assert!(!list().is_empty());
    let status = cluster.etcdctl(0, &["endpoint", "status", "-w", "json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let etcd_db_size = status[0]["Status"]["dbSize"].as_f64().unwrap();
    support::wait_until("the DB size metric", Duration::from_secs(10), || {
        d1.metric("etcd_backup_db_size_bytes") == Some(etcd_db_size)
    });
    // (Each backup differs a little: the election's lease renewals change the database; the
    // metrics are read first, then the store, so the backup they describe is listed.)
    support::wait_until(
        "the size metrics to describe a listed backup",
        Duration::from_secs(10),
        || {
            let snap = d1.metric("etcd_backup_snapshot_size_bytes");
            let stored = d1.metric("etcd_backup_stored_size_bytes");
            list()
                .iter()
                .any(|b| b["size"].as_f64() == snap && b["stored_size"].as_f64() == stored)
        },
    );
    assert_eq!(d1.metric("etcd_backup_etcd_up"), Some(1.0));
    assert_eq!(d1.metric("etcd_backup_is_leader"), Some(1.0));
    assert_eq!(d2.metric("etcd_backup_is_leader"), Some(0.0));
    assert!(d1.metric("etcd_backup_schedule_interval_seconds") == Some(2.0));

    // The age is small and grows between scrapes when nothing new is committed (node 2).
    let a1 = d2.metric("etcd_backup_last_success_age_seconds").unwrap();
    assert!((0.0..30.0).contains(&a1), "age {a1}");
    // Both nodes agree on the cluster's last success once node 2 has refreshed.
    std::thread::sleep(Duration::from_millis(1500));
    let t1 = d1
        .metric("etcd_backup_last_success_timestamp_seconds")
        .unwrap();
    let t2 = d2
        .metric("etcd_backup_last_success_timestamp_seconds")
        .unwrap();
    assert!((t1 - t2).abs() <= 3.0, "node 1 says {t1}, node 2 says {t2}");
    assert!(d2.metric("etcd_backup_backups_in_store").unwrap() >= 1.0);

    // promtool finds nothing to complain about in a live scrape.
    let (code, body) = d1.get("/metrics").unwrap();
    assert_eq!(code, 200);
    let mut check = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        check
            .stdin
            .take()
            .unwrap()
            .write_all(body.as_bytes())
            .unwrap();
    }
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Health: alive; ready with etcd and the store reachable.
    assert_eq!(d1.get("/healthz").unwrap().0, 200);
    let (code, body) = d1.get("/readyz").unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], true);
}

#[test]
fn readyz_says_why_when_etcd_is_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let port = support::free_port();
    let dead = format!("http://127.0.0.1:{}", support::free_port());
    let c = write_config(dir.path(), "n.toml", &dead, port, "0 0 1 1 *");
    let d = Daemon::start(&c, port);
    // etcd and the store are checked one after the other: wait for both answers.
    support::wait_until(
        "readyz to report etcd down and the store checked",
        Duration::from_secs(20),
        || {
            d.get("/readyz").is_some_and(|(code, body)| {
                code == 503 && body.contains("cannot reach etcd") && !body.contains("not checked")
            })
        },
    );
    let (_, body) = d.get("/readyz").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["ready"], false);
    assert_eq!(v["store"], "ok");
    assert_eq!(d.metric("etcd_backup_etcd_up"), Some(0.0));
    assert_eq!(d.get("/healthz").unwrap().0, 200, "alive even without etcd");
}
