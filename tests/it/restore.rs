//! Getting backups back: `restore` and `verify` from the store, the restore drill (one-shot
//! and scheduled in the daemon), against real etcd; a corrupted stored object is caught.

use crate::support;

use crate::support::etcd::{restore_and_start, EtcdBins, EtcdCluster, EtcdVersion};
use crate::support::text;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

fn etcd_backup(args: &[&str], path_prefix: Option<&Path>) -> Output {
    let path = path_prefix.map(|p| {
        format!(
            "{}:{}",
            p.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    });
    let env: Vec<(&str, &str)> = path.iter().map(|p| ("PATH", p.as_str())).collect();
    support::etcd_backup(args, &env)
}

struct Fixture {
    bins: EtcdBins,
    cluster: EtcdCluster,
    dir: tempfile::TempDir,
    config: PathBuf,
    id: String,
}

fn etcd_dir(bins: &EtcdBins) -> PathBuf {
    bins.etcd.parent().unwrap().to_path_buf()
}

/// A cluster with keys and history, one backup of it in a local directory.
fn fixture(extra: &str) -> Fixture {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    for i in 0..60 {
        cluster.put(
            &format!("/registry/pods/ns{}/p{i}", i % 3),
            &format!("{{\"i\":{i}}}"),
        );
    }
    cluster.put("/registry/pods/ns0/p0", "overwritten");
    let o = cluster.etcdctl(0, &["del", "/registry/pods/ns1/p1"]);
    assert!(o.status.success());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[etcd]\nendpoints = [\"{}\"]\n[storage]\nurl = \"file://{}\"\n[backup]\ncluster_name = \"r\"\nspool_dir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{}\"\n[drill]\netcd_dir = \"{}\"\n{extra}\n",
            cluster.client_url(0),
            dir.path().join("backups").display(),
            dir.path().join("spool").display(),
            support::free_port(),
            etcd_dir(&bins).display()
        ),
    )
    .unwrap();
    let o = etcd_backup(&["snapshot", "--config", config.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", text(&o));
    let id = String::from_utf8_lossy(&o.stdout).trim().to_string();
    Fixture {
        bins,
        cluster,
        dir,
        config,
        id,
    }
}

fn corrupt_stored_object(f: &Fixture) {
    let obj = f
        .dir
        .path()
        .join(format!("backups/r/{}/snapshot.db.zst", f.id));
    let mut bytes = std::fs::read(&obj).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&obj, bytes).unwrap();
}

#[test]
fn restore_writes_a_snapshot_that_etcdutl_restores_with_every_key() {
    let f = fixture("");
    let cfg = f.config.to_str().unwrap();
    let out = f.dir.path().join("restored.db");
    let o = etcd_backup(
        &[
            "restore",
            "--config",
            cfg,
            "latest",
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("etcdutl snapshot restore") && stdout.contains("--initial-cluster"),
        "{stdout}"
    );
    let restored = restore_and_start(&f.bins, &out);
    assert_eq!(
        restored.dump(),
        f.cluster.dump(),
        "restored keys differ from the source"
    );

    // Never overwrite: the same output again is refused, and the file is unchanged.
    let before = std::fs::read(&out).unwrap();
    let o = etcd_backup(
        &[
            "restore",
            "--config",
            cfg,
            &f.id,
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("never overwrites"), "{}", text(&o));
    assert_eq!(std::fs::read(&out).unwrap(), before);

    // --data-dir runs etcdutl (found on PATH) into a new directory.
    let data = f.dir.path().join("data");
    let out2 = f.dir.path().join("restored2.db");
    let o = etcd_backup(
        &[
            "restore",
            "--config",
            cfg,
            "--output",
            out2.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--name",
            "cp1",
            "--peer-url",
            "http://127.0.0.1:2380",
        ],
        Some(&etcd_dir(&f.bins)),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(data.join("member/snap/db").is_file(), "{}", text(&o));
    let o = etcd_backup(
        &[
            "restore",
            "--config",
            cfg,
            "--output",
            f.dir.path().join("x.db").to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--peer-url",
            "http://127.0.0.1:2380",
        ],
        Some(&etcd_dir(&f.bins)),
    );
    assert_eq!(
        o.status.code(),
        Some(1),
        "an existing data dir must be refused: {}",
        text(&o)
    );

    // An unknown id names what exists.
    let o = etcd_backup(
        &[
            "restore",
            "--config",
            cfg,
            "20200101T000000Z-000000",
            "--output",
            "/tmp/never",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains(&f.id), "{}", text(&o));
}

#[test]
fn verify_and_the_drill_pass_on_a_good_backup_and_fail_loudly_on_a_corrupted_one() {
    let f = fixture("");
    let cfg = f.config.to_str().unwrap();
    let o = etcd_backup(&["verify", "--config", cfg, "--all"], None);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(&format!("{}: OK", f.id)));

    let o = etcd_backup(&["drill", "--config", cfg], None);
    assert!(o.status.success(), "{}", text(&o));
    let keys = f.cluster.dump().len();
    assert!(
        text(&o).contains("serving revision") && text(&o).contains(&format!("and {keys} keys")),
        "{}",
        text(&o)
    );

    corrupt_stored_object(&f);
    let o = etcd_backup(&["verify", "--config", cfg, &f.id], None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("FAILED") && text(&o).contains("modified or damaged"),
        "{}",
        text(&o)
    );
    let o = etcd_backup(&["drill", "--config", cfg], None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("restore drill failed") && text(&o).contains("modified or damaged"),
        "{}",
        text(&o)
    );
    // Nothing is left behind in the spool directory.
    let spool = f.dir.path().join("spool");
    let left: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn the_daemon_runs_scheduled_drills_and_reports_failures() {
    let f = fixture("cron = \"*/2 * * * * *\"");
    // Backups never run during the test; only drills.
    let mut c = std::fs::read_to_string(&f.config).unwrap();
    c.push_str("[schedule]\ncron = \"0 0 1 1 *\"\n");
    std::fs::write(&f.config, c).unwrap();
    let log = f.dir.path().join("daemon.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_etcd-backup"))
        .args(["run", "--config", f.config.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    support::wait_until("a passing drill", Duration::from_secs(40), || {
        read().contains("restore drill passed")
    });
    assert!(read().contains("restored_into_etcd=true"), "{}", read());
    corrupt_stored_object(&f);
    support::wait_until("a failing drill", Duration::from_secs(40), || {
        read().contains("RESTORE DRILL FAILED")
    });
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(status.success(), "{}", read());
}
