//! Defragmentation on a real 3-member etcd cluster with three daemons, one per member.
//!
//! The ground truth is etcd's own log: every member logs `starting defragment` and
//! `finished defragment` around a defragmentation, and `sending database snapshot to
//! client` and `successfully sent database snapshot to client` around a snapshot, with
//! millisecond timestamps on one clock. The test asserts on those intervals, not on what
//! the daemons say about themselves.

use crate::support::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
use crate::support::proxy::{Fault, Proxy};
use crate::support::{self, etcd_backup, text, wait_until, ChildProc};
use chrono::{DateTime, Duration as Span, Timelike, Utc};
use etcd_client::{Client, CompactionOptions, DeleteOptions, StatusResponse};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Bytes written and then deleted: the free space the round must reclaim.
const CHURN_MIB: usize = 100;
/// Live data kept, so that a defragmentation takes measurable time.
const LIVE_MIB: usize = 8;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Writes `mib` MiB under `prefix` in values of 1 MiB, four writers at a time.
async fn write(endpoint: &str, prefix: &str, mib: usize) {
    let c = Client::connect([endpoint], None).await.expect("connect");
    let mut tasks = Vec::new();
    for w in 0..4 {
        let mut kv = c.kv_client();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            for i in (w..mib).step_by(4) {
                let v: Vec<u8> = (0..1usize << 20)
                    .map(|k| b'a' + ((k * 7 + i * 13) % 26) as u8)
                    .collect();
                kv.put(format!("{prefix}{i:04}"), v, None)
                    .await
                    .expect("put");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

async fn status(endpoint: &str) -> StatusResponse {
    let mut c = Client::connect([endpoint], None).await.expect("connect");
    c.status().await.expect("status")
}

/// One interval from etcd's log.
#[derive(Debug, Clone, Copy)]
struct Span2 {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
}

impl Span2 {
    fn overlaps(&self, o: &Span2) -> bool {
        self.from < o.to && o.from < self.to
    }
}

/// The intervals between lines with message `start` and `end` in an etcd JSON log.
fn intervals(log: &str, start: &str, end: &str) -> Vec<Span2> {
    let mut out = Vec::new();
    let mut open: Option<DateTime<Utc>> = None;
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(msg), Some(ts)) = (v["msg"].as_str(), v["ts"].as_str()) else {
            continue;
        };
        let Ok(ts) = DateTime::parse_from_rfc3339(ts) else {
            continue;
        };
        let ts = ts.with_timezone(&Utc);
        if msg == start {
            assert!(open.is_none(), "two {start:?} without {end:?} in\n{log}");
            open = Some(ts);
        } else if msg == end {
            let from = open
                .take()
                .unwrap_or_else(|| panic!("{end:?} without {start:?}"));
            out.push(Span2 { from, to: ts });
        }
    }
    assert!(open.is_none(), "{start:?} never ended");
    out
}

/// Whether the member whose raft log is `log` was the leader at `at`.
fn leading_at(log: &str, at: DateTime<Utc>) -> bool {
    let mut leading = false;
    for line in log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(msg), Some(ts)) = (v["msg"].as_str(), v["ts"].as_str()) else {
            continue;
        };
        let Ok(ts) = DateTime::parse_from_rfc3339(ts) else {
            continue;
        };
        if ts.with_timezone(&Utc) > at {
            break;
        }
        if msg.contains(" became leader at term ") {
            leading = true;
        } else if msg.contains(" became follower at term ")
            || msg.contains(" became candidate at term ")
            || msg.contains(" became pre-candidate at term ")
        {
            leading = false;
        }
    }
    leading
}

struct Node {
    config: PathBuf,
    log: PathBuf,
    port: u16,
    proc: ChildProc,
}

fn write_config(dir: &std::path::Path, i: usize, endpoint: &str, port: u16, cron: &str) -> PathBuf {
    let config = dir.join(format!("node-{i}.toml"));
    let defrag = if cron.is_empty() {
        String::new()
    } else {
        format!("[defrag]\ncron = \"{cron}\"\ntimeout = \"60s\"\n")
    };
    let schedule = if cron.is_empty() { "0 0 1 1 *" } else { cron };
    std::fs::write(
        &config,
        format!(
            "[etcd]\nendpoints = [\"{endpoint}\"]\ndial_timeout = \"2s\"\nrequest_timeout = \"10s\"\n\
             [storage]\nurl = \"file://{}\"\n\
             [backup]\ncluster_name = \"d\"\nspool_dir = \"{}\"\ntimeout = \"60s\"\n\
             [schedule]\ncron = \"{schedule}\"\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\nrefresh_interval = \"1s\"\n\
             [election]\nlease_ttl = \"6s\"\nnode_name = \"node-{i}\"\n{defrag}",
            dir.join("store").display(),
            dir.join(format!("spool-{i}")).display(),
        ),
    )
    .unwrap();
    config
}

#[test]
fn a_round_shrinks_every_member_one_at_a_time_and_never_during_a_snapshot() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 3);
    let urls = cluster.client_urls();
    let rt = rt();

    // History to reclaim: write ~100 MiB, delete it, compact; keep some live data.
    rt.block_on(async {
        write(&urls[0], "/live/", LIVE_MIB).await;
        write(&urls[0], "/churn/", CHURN_MIB).await;
        let mut c = Client::connect([urls[0].as_str()], None).await.unwrap();
        let del = c
            .delete("/churn/", Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap();
        assert_eq!(del.deleted(), CHURN_MIB as i64);
        let rev = del.header().unwrap().revision();
        c.compact(rev, Some(CompactionOptions::new().with_physical()))
            .await
            .unwrap();
    });
    // Every member has compacted (its free space shows) before the round. bbolt counts
    // freed pages as free once a later transaction commits: keep writing a little.
    let mut before = [0i64; 3];
    for (i, url) in urls.iter().enumerate() {
        wait_until(
            &format!("member {i} to finish the compaction"),
            Duration::from_secs(60),
            || {
                cluster.put("/tick", "t");
                let st = rt.block_on(status(url));
                before[i] = st.db_size();
                st.raft_used_db_size() < st.db_size() / 2
            },
        );
        assert!(
            before[i] > (CHURN_MIB as i64) << 20,
            "member {i}: db_size {} after writing {CHURN_MIB} MiB",
            before[i]
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<Node> = (0..3)
        .map(|i| {
            let port = support::free_port();
            let config = write_config(dir.path(), i, &urls[i], port, "");
            let log = dir.path().join(format!("node-{i}.log"));
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-backup"));
            cmd.args(["run", "--config", config.to_str().unwrap()])
                .env("RUST_LOG", "etcd_backup=debug");
            for (k, _) in std::env::vars() {
                if k.starts_with("ETCD_BACKUP_") || k == "NOTIFY_SOCKET" {
                    cmd.env_remove(k);
                }
            }
            let proc = ChildProc::spawn(&format!("node-{i}"), cmd, &log);
            Node {
                config,
                log,
                port,
                proc,
            }
        })
        .collect();
    let logs = |nodes: &[Node]| {
        nodes
            .iter()
            .map(|n| n.proc.log_tail(40))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let gauge = |n: &Node, name: &str| {
        support::http_get(n.port, "/metrics", Duration::from_secs(1))
            .and_then(|b| support::metric(&b, name))
    };

    // `defrag --dry-run` decides, prints the sizes and changes nothing.
    let o = etcd_backup(
        &[
            "defrag",
            "--dry-run",
            "--config",
            nodes[1].config.to_str().unwrap(),
        ],
        &[],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        out.contains("before: db_size") && out.contains("dry run: would"),
        "{}",
        text(&o)
    );
    assert_eq!(rt.block_on(status(&urls[1])).db_size(), before[1]);

    // Up, elected, and the first leader's catch-up backup taken.
    wait_until(
        &format!("three daemons up and a leader\n{}", logs(&nodes)),
        Duration::from_secs(60),
        || {
            nodes
                .iter()
                .all(|n| gauge(n, "etcd_backup_election_up") == Some(1.0))
                && nodes
                    .iter()
                    .filter(|n| gauge(n, "etcd_backup_is_leader") == Some(1.0))
                    .count()
                    == 1
        },
    );

    // The node taking the backups (E) gets the raft leadership too: its member is the
    // one where snapshots and the defragmentation meet, and its defragmentation goes last.
    let e = (0..3)
        .find(|&i| gauge(&nodes[i], "etcd_backup_is_leader") == Some(1.0))
        .unwrap();
    let e_id = rt.block_on(status(&urls[e])).header().unwrap().member_id();
    rt.block_on(async {
        let raft_leader = status(&urls[e]).await.leader();
        if raft_leader != e_id {
            for url in &urls {
                if status(url).await.header().unwrap().member_id() == raft_leader {
                    let mut c = Client::connect([url.as_str()], None).await.unwrap();
                    c.move_leader(e_id)
                        .await
                        .expect("move the raft leadership to E");
                }
            }
        }
    });
    wait_until("E's member to lead", Duration::from_secs(20), || {
        rt.block_on(status(&urls[e])).leader() == e_id
    });
    // E reaches its member through a throttled link, so that each snapshot of it streams
    // for a second or more: a defragmentation of that member that did not wait for them
    // would overlap them in etcd's log.
    let proxy = Proxy::for_url(&urls[e]);
    proxy.set(Fault::Throttle(32_000_000));

    // One slot a few seconds ahead for the defragmentation AND the backups; reload. The
    // two followers' daemons fire at the same instant: only the lock keeps them apart.
    let slot = (Utc::now() + Span::seconds(8)).with_nanosecond(0).unwrap();
    let cron = format!("{} * * * * *", slot.second());
    for (i, n) in nodes.iter().enumerate() {
        let endpoint = if i == e { proxy.url() } else { urls[i].clone() };
        write_config(dir.path(), i, &endpoint, n.port, &cron);
        n.proc.signal("HUP");
    }
    wait_until(
        &format!("the daemons to reload\n{}", logs(&nodes)),
        Duration::from_secs(10),
        || {
            nodes.iter().all(|n| {
                std::fs::read_to_string(&n.log)
                    .unwrap_or_default()
                    .contains("configuration reloaded")
            })
        },
    );
    assert!(Utc::now() < slot, "the reload took past the slot");
    // At the slot: E's scheduled backup (in the daemon) and a one-shot snapshot of E's
    // member from another process, both through the throttled link.
    let wait = (slot - Utc::now()).to_std().unwrap_or_default();
    std::thread::sleep(wait);
    let started = std::time::Instant::now();
    let o = etcd_backup(
        &["snapshot", "--config", nodes[e].config.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "one-shot snapshot: {}", text(&o));
    eprintln!(
        "one-shot snapshot of node-{e}'s member: {:?}",
        started.elapsed()
    );
    wait_until(
        &format!("every daemon to defragment its member\n{}", logs(&nodes)),
        Duration::from_secs(60),
        || {
            nodes
                .iter()
                .all(|n| gauge(n, "etcd_backup_defrag_total{result=\"success\"}") == Some(1.0))
                && nodes
                    .iter()
                    .filter_map(|n| gauge(n, "etcd_backup_cycles_total{result=\"success\"}"))
                    .sum::<f64>()
                    >= 2.0
        },
    );

    // Every member shrank.
    for (i, url) in urls.iter().enumerate() {
        let after = rt.block_on(status(url)).db_size();
        eprintln!(
            "member {i}: db_size {} -> {} bytes ({:.1} MiB -> {:.1} MiB)",
            before[i],
            after,
            before[i] as f64 / 1048576.0,
            after as f64 / 1048576.0
        );
        assert!(
            after < before[i] / 4,
            "member {i}: db_size {} -> {after}",
            before[i]
        );
        let reclaimed = gauge(&nodes[i], "etcd_backup_defrag_reclaimed_bytes").unwrap();
        // The daemon read its "before" under the lock, a few small writes later.
        let shrank = (before[i] - after) as f64;
        assert!(
            reclaimed > shrank * 0.9 && reclaimed < shrank + 1048576.0,
            "member {i}: reclaimed {reclaimed}, shrank by {shrank}"
        );
        assert!(gauge(&nodes[i], "etcd_backup_defrag_last_timestamp_seconds").unwrap() > 0.0);
    }

    // etcd's logs: one defragmentation per member, never two at once, and none while a
    // snapshot of the same member was being sent.
    let defrags: Vec<Span2> = (0..3)
        .map(|i| {
            let d = intervals(
                &cluster.log(i),
                "starting defragment",
                "finished defragment",
            );
            assert_eq!(d.len(), 1, "member {i} defragmented {} times", d.len());
            d[0]
        })
        .collect();
    eprintln!("defragmentations (etcd's log): {defrags:?}");
    for a in 0..3 {
        for b in a + 1..3 {
            assert!(
                !defrags[a].overlaps(&defrags[b]),
                "members {a} and {b} defragmented at the same time: {:?} {:?}",
                defrags[a],
                defrags[b]
            );
        }
    }
    for (i, d) in defrags.iter().enumerate() {
        let snaps = intervals(
            &cluster.log(i),
            "sending database snapshot to client",
            "successfully sent database snapshot to client",
        );
        if i == e {
            // The one-shot snapshot and at least one of the daemon's (the catch-up backup;
            // the slot's backup may be taken by another node when the election moves while
            // E's member is busy).
            assert!(
                snaps.len() >= 2,
                "member {i} served {} snapshots",
                snaps.len()
            );
        }
        for s in &snaps {
            assert!(
                !s.overlaps(d),
                "member {i}: a snapshot {s:?} interleaved with its defragmentation {d:?}"
            );
        }
    }
    for (i, n) in nodes.iter().enumerate() {
        let log = std::fs::read_to_string(&n.log).unwrap_or_default();
        for l in log
            .lines()
            .filter(|l| l.contains("defragment") || l.contains("waits") || l.contains("handed"))
        {
            eprintln!("node-{i}: {l}");
        }
    }
    // No member defragmented while it was the raft leader (by its own raft log), and the
    // leader went last: the leadership moved once.
    for (i, d) in defrags.iter().enumerate() {
        assert!(
            !leading_at(&cluster.log(i), d.from),
            "member {i} defragmented while it led\n{}",
            logs(&nodes)
        );
    }
    let handovers: usize = nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(&n.log)
                .unwrap_or_default()
                .matches("handed the raft leadership over before defragmenting")
                .count()
        })
        .sum();
    eprintln!("node-{e} took the backups and led; leadership hand-overs: {handovers}");
    // Done: the command finds nothing worth doing now.
    let o = etcd_backup(
        &["defrag", "--config", nodes[1].config.to_str().unwrap()],
        &[],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("not defragmented: not worth it"),
        "{}",
        text(&o)
    );
    for n in &mut nodes {
        n.proc.signal("TERM");
        assert!(n.proc.wait_exit(Duration::from_secs(20)).is_some());
    }
}

/// The cluster-wide lock itself: one holder at a time, held past its TTL by the
/// keep-alives, taken over at once after a release, and freed by the lease when a holder
/// disappears without releasing it.
#[test]
fn the_lock_admits_one_holder_and_frees_itself_when_the_holder_is_gone() {
    use etcd_backup::etcd::defrag::{ClusterLock, LockError};
    use etcd_backup::etcd::Member;
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    let url = cluster.client_url(0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, format!("[etcd]\nendpoints = [\"{url}\"]\n")).unwrap();
    let cfg = etcd_backup::config::Config::load_with_env(&path, Some(Default::default())).unwrap();
    let name = etcd_backup::defrag::lock_name(&cfg);
    assert_eq!(name, "/etcd-backup/election/kubernetes:defrag");
    let ttl = Duration::from_secs(2);
    rt().block_on(async {
        let a = Member::connect(&cfg.etcd, &url).await.unwrap();
        let b = Member::connect(&cfg.etcd, &url).await.unwrap();
        let held = ClusterLock::acquire(&a, &name, ttl, Duration::from_secs(5))
            .await
            .unwrap();
        // B waits longer than the TTL and does not get it: A's keep-alives hold it.
        let r = ClusterLock::acquire(&b, &name, ttl, ttl * 2).await;
        assert!(matches!(r, Err(LockError::Busy { .. })), "{r:?}");
        held.release().await;
        let by_b = ClusterLock::acquire(&b, &name, ttl, Duration::from_secs(5))
            .await
            .expect("a released lock is free");
        // B goes away without releasing: its lease expires and A gets the lock.
        drop(by_b);
        let again = ClusterLock::acquire(&a, &name, ttl, Duration::from_secs(20))
            .await
            .expect("the lock of a holder that is gone frees itself");
        again.release().await;
    });
    // Nothing is left under the lock's name.
    let o = cluster.etcdctl(0, &["get", &name, "--prefix", "--keys-only"]);
    assert!(String::from_utf8_lossy(&o.stdout).trim().is_empty());

    // `etcd-backup defrag` on a cluster of one: its only member leads and goes anyway.
    // Any free page is worth it here: delete, compact, and write until one shows.
    for i in 0..20 {
        cluster.put(&format!("/k{i}"), &"x".repeat(10_000));
    }
    let rev = rt().block_on(async {
        let mut c = Client::connect([url.as_str()], None).await.unwrap();
        let del = c
            .delete("/k", Some(DeleteOptions::new().with_prefix()))
            .await
            .unwrap();
        let rev = del.header().unwrap().revision();
        c.compact(rev, Some(CompactionOptions::new().with_physical()))
            .await
            .unwrap();
        rev
    });
    wait_until(
        &format!("free pages after the compaction at {rev}"),
        Duration::from_secs(30),
        || {
            cluster.put("/tick", "t");
            let st = rt().block_on(status(&url));
            // Room to spare: the lock's own writes reuse a few free pages.
            st.db_size() - st.raft_used_db_size() >= 100 << 10
        },
    );
    std::fs::write(
        &path,
        format!(
            "[etcd]\nendpoints = [\"{url}\"]\n[backup]\nspool_dir = \"{}\"\n\
             [defrag]\nmin_free_ratio = 0.0\nmin_free_bytes = 0\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let o = etcd_backup(&["defrag", "--config", path.to_str().unwrap()], &[]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        out.contains("before: db_size")
            && out.contains("defragmented in")
            && out.contains("reclaimed"),
        "{}",
        text(&o)
    );
    assert_eq!(
        intervals(
            &cluster.log(0),
            "starting defragment",
            "finished defragment"
        )
        .len(),
        1,
        "{}",
        text(&o)
    );
}
