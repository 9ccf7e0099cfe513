//! One snapshotter per cluster: a real 3-member etcd cluster and three daemons, each a
//! separate `etcd-backup run` process talking to its own member, sharing one store.
//!
//! Every scenario ends with the same audit of the store: exactly one committed backup per
//! scheduled slot, no two committed cycles overlapping in time, and fencing tokens that never
//! go backwards. Waits are derived from the configured lease TTL and cron period.

use crate::support;

use crate::support::fleet::{Fleet, FleetOptions};
use etcd_backup::store::manifest::Manifest;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The scenarios share two cores with three etcd members and three daemons each: one at a
/// time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Lease TTL of the election in these tests.
const TTL: Duration = Duration::from_secs(6);
/// Cron period (seconds) of the schedule.
const PERIOD: u64 = 4;

fn options() -> FleetOptions {
    FleetOptions {
        ttl: TTL,
        cron: format!("*/{PERIOD} * * * * *"),
        storage: None,
        etcd_extra: String::new(),
    }
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

fn period() -> Duration {
    Duration::from_secs(PERIOD)
}

/// Time for the first election and the first cycles (three processes starting on two cores).
fn startup() -> Duration {
    TTL + Duration::from_secs(20)
}

#[test]
fn one_leader_one_backup_per_period_and_sigterm_hands_over_at_once() {
    let _g = serial();
    let mut f = Fleet::start(&options());
    let all = [0, 1, 2];
    let leader = f.wait_leader(&all, startup());
    f.wait_backup_by(leader, now() - chrono::Duration::hours(1), startup());

    // Several periods: never more than one leader, and the leader alone backs up.
    let watch_from = now();
    let until = Instant::now() + period() * 4;
    while Instant::now() < until {
        let l = f.leaders(&all);
        assert_eq!(
            l,
            vec![leader],
            "leaders changed without a fault\n{}",
            f.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let during: Vec<Manifest> = f
        .manifests()
        .into_iter()
        .filter(|m| m.started_at > watch_from)
        .collect();
    assert!(
        during.len() >= 3,
        "expected a backup per {PERIOD}s period, got {}\n{}",
        during.len(),
        f.logs()
    );
    assert!(
        during.iter().all(|m| m.node == f.nodes[leader].name),
        "a follower backed up: {:?}",
        during.iter().map(|m| &m.node).collect::<Vec<_>>()
    );

    // `status` names the leader from any node's configuration.
    let st = f.status((leader + 1) % 3);
    assert_eq!(
        st["election"]["leader"]["node"], f.nodes[leader].name,
        "{st}"
    );
    assert!(st["election"]["leader"]["since"].is_string(), "{st}");
    assert!(st["backups"]["count"].as_u64().unwrap() >= 3, "{st}");

    // SIGTERM: the leader resigns, another node leads well before the TTL runs out.
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    let stopped = Instant::now();
    f.proc(leader).signal("TERM");
    let next = f.wait_leader(&others, TTL / 2);
    let handover = stopped.elapsed();
    assert!(handover < TTL / 2, "handover took {handover:?}");
    let st = f.proc(leader).wait_exit(Duration::from_secs(20));
    assert!(st.is_some_and(|s| s.success()), "{}", f.logs());
    assert!(
        f.log(leader).contains("resigned the leadership"),
        "{}",
        f.logs()
    );
    f.wait_backup_by(next, now(), period() * 3);
    f.audit();
}

#[test]
fn sigkill_leader_is_replaced_within_the_ttl() {
    let _g = serial();
    let mut f = Fleet::start(&options());
    let all = [0, 1, 2];
    let leader = f.wait_leader(&all, startup());
    f.wait_backup_by(leader, now() - chrono::Duration::hours(1), startup());

    let others: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    let killed_at = now();
    let killed = Instant::now();
    f.proc(leader).signal("KILL");
    let next = f.wait_leader(&others, TTL + Duration::from_secs(5));
    assert!(
        killed.elapsed() <= TTL + Duration::from_secs(5),
        "failover took {:?}",
        killed.elapsed()
    );
    f.wait_backup_by(next, killed_at, period() * 3);
    let ms = f.audit();
    // The new leader's backups carry a newer fencing token than the dead leader's.
    let old = ms.iter().rfind(|m| m.node == f.nodes[leader].name).unwrap();
    let new = ms.iter().find(|m| m.node == f.nodes[next].name).unwrap();
    assert!(new.fencing_token > old.fencing_token, "{old:?}\n{new:?}");
}

#[test]
fn paused_leader_is_fenced_commits_nothing_and_rejoins_as_follower() {
    let _g = serial();
    let mut f = Fleet::start(&options());
    // Enough data that a cycle takes a while, so the pause lands inside one.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(support::load_values(&f.cluster.client_url(0), 40, false));
    let all = [0, 1, 2];
    let leader = f.wait_leader(&all, startup());
    f.wait_backup_by(leader, now() - chrono::Duration::hours(1), startup());

    // Pause the leader as soon as its next cycle starts.
    let starts = f.log(leader).matches("starting scheduled backup").count();
    support::wait_until("the next cycle to start", period() * 3, || {
        f.log(leader).matches("starting scheduled backup").count() > starts
    });
    f.proc(leader).signal("STOP");
    let paused_at = now();
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    let next = f.wait_leader(&others, TTL + Duration::from_secs(5));
    // The new leader takes the slot the paused one was working on (catch-up) and goes on.
    f.wait_backup_by(next, paused_at, period() * 3);

    f.proc(leader).signal("CONT");
    let resumed = Instant::now();
    // It notices at once that its lease is gone, aborts the cycle and follows.
    support::wait_until(
        &format!("the resumed node to follow\n{}", f.logs()),
        TTL + Duration::from_secs(5),
        || {
            f.gauge(leader, "etcd_backup_is_leader") == Some(0.0)
                && f.gauge(leader, "etcd_backup_election_up") == Some(1.0)
        },
    );
    std::thread::sleep((period() * 2).saturating_sub(resumed.elapsed()));
    assert!(f.proc(leader).is_running(), "{}", f.logs());
    let log = f.log(leader);
    assert!(
        log.contains("backup aborted: leadership lost"),
        "the paused cycle was not fenced:\n{log}"
    );
    let late: Vec<String> = f
        .manifests()
        .iter()
        .filter(|m| m.node == f.nodes[leader].name && m.finished_at > paused_at)
        .map(|m| m.id.to_string())
        .collect();
    assert!(late.is_empty(), "the paused leader committed {late:?}");
    assert_eq!(f.leaders(&all), vec![next], "{}", f.logs());
    // Nothing half-done is left by the aborted cycle: every data object has its manifest.
    let root = f.dir.path().join("store").join("e");
    for entry in std::fs::read_dir(&root).unwrap().flatten() {
        let files: Vec<String> = std::fs::read_dir(entry.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            files.iter().any(|f| f == "manifest.json"),
            "uncommitted backup left in the store: {} {files:?}",
            entry.path().display()
        );
    }
    f.audit();
}

#[test]
fn daemon_survives_its_etcd_member_going_away_and_rejoins() {
    let _g = serial();
    let mut f = Fleet::start(&options());
    let all = [0, 1, 2];
    let leader = f.wait_leader(&all, startup());
    f.wait_backup_by(leader, now() - chrono::Duration::hours(1), startup());

    // The leader's own member dies: it cannot renew its lease, another node takes over.
    let down_at = now();
    f.cluster.kill(leader);
    let others: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    let next = f.wait_leader(&others, TTL + Duration::from_secs(5));
    support::wait_until(
        &format!(
            "the orphaned daemon to report the election down\n{}",
            f.logs()
        ),
        TTL + Duration::from_secs(5),
        || {
            f.gauge(leader, "etcd_backup_election_up") == Some(0.0)
                && f.gauge(leader, "etcd_backup_is_leader") == Some(0.0)
        },
    );
    f.wait_backup_by(next, down_at, period() * 3);
    assert!(f.proc(leader).is_running(), "{}", f.logs());

    // The member comes back: the daemon rejoins (as a follower) without a restart.
    f.cluster.restart(leader);
    support::wait_until(
        &format!("the daemon to rejoin the election\n{}", f.logs()),
        Duration::from_secs(45),
        || f.gauge(leader, "etcd_backup_election_up") == Some(1.0),
    );
    assert_eq!(f.leaders(&all), vec![next]);

    // And it can lead again: stop the two others.
    for &i in &others {
        f.proc(i).signal("TERM");
    }
    for &i in &others {
        assert!(f.proc(i).wait_exit(Duration::from_secs(20)).is_some());
    }
    let back = Instant::now();
    assert_eq!(f.wait_leader(&[leader], TTL), leader);
    assert!(back.elapsed() < TTL);
    f.wait_backup_by(leader, down_at, period() * 3);
    f.audit();
}

/// Daemons that all talk to one etcd member (the stall scenarios), sharing a local store.
struct Shared {
    cluster: support::etcd::EtcdCluster,
    dir: tempfile::TempDir,
    nodes: Vec<(String, std::path::PathBuf, u16, support::ChildProc)>,
}

impl Shared {
    fn start(daemons: usize, ttl_s: u64, cron: &str) -> Shared {
        use support::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
        let cluster = EtcdCluster::start(&EtcdBins::get(EtcdVersion::V3_5_1), 1);
        cluster.put("/registry/marker", "v");
        let dir = tempfile::tempdir().unwrap();
        let mut s = Shared {
            cluster,
            dir,
            nodes: Vec::new(),
        };
        for i in 0..daemons {
            let name = format!("node-{i}");
            let config = s.dir.path().join(format!("{name}.toml"));
            let port = support::free_port();
            s.write_config(&config, &name, port, ttl_s, cron, "e");
            let log = s.dir.path().join(format!("{name}.log"));
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-backup"));
            cmd.args(["run", "--config", config.to_str().unwrap()])
                .env("RUST_LOG", "etcd_backup=debug");
            for (k, _) in std::env::vars_os() {
                let n = k.to_string_lossy();
                if n.starts_with("ETCD_BACKUP_") || n == "NOTIFY_SOCKET" {
                    cmd.env_remove(&k);
                }
            }
            let p = support::ChildProc::spawn(&name, cmd, &log);
            s.nodes.push((name, config, port, p));
        }
        s
    }

    fn write_config(
        &self,
        path: &std::path::Path,
        name: &str,
        port: u16,
        ttl_s: u64,
        cron: &str,
        cluster_name: &str,
    ) {
        std::fs::write(
            path,
            format!(
                "[etcd]\nendpoints = [\"{}\"]\ndial_timeout = \"2s\"\nrequest_timeout = \"5s\"\n\
                 [storage]\nurl = \"file://{}\"\n\
                 [backup]\ncluster_name = \"{cluster_name}\"\nspool_dir = \"{}\"\ntimeout = \"60s\"\n\
                 [schedule]\ncron = \"{cron}\"\n[retention]\nkeep_last = 1000\n\
                 [metrics]\nlisten = \"127.0.0.1:{port}\"\nrefresh_interval = \"1s\"\n\
                 [election]\nlease_ttl = \"{ttl_s}s\"\nnode_name = \"{name}\"\n",
                self.cluster.client_url(0),
                self.dir.path().join("store").display(),
                self.dir.path().join(format!("spool-{name}")).display(),
            ),
        )
        .unwrap();
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
    }

    fn leaders(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| {
                support::http_get(self.nodes[i].2, "/metrics", Duration::from_secs(1))
                    .and_then(|b| support::metric(&b, "etcd_backup_is_leader"))
                    == Some(1.0)
            })
            .collect()
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.3.log_tail(40))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{}.log", self.nodes[i].0)))
            .unwrap_or_default()
    }

    fn manifests(&self, cluster_name: &str) -> Vec<Manifest> {
        let root = self.dir.path().join("store").join(cluster_name);
        let mut out = Vec::new();
        for e in std::fs::read_dir(root).into_iter().flatten().flatten() {
            if let Ok(b) = std::fs::read(e.path().join("manifest.json")) {
                out.push(serde_json::from_slice::<Manifest>(&b).unwrap());
            }
        }
        out
    }

    fn wait_slot(
        &self,
        cluster_name: &str,
        slot: chrono::DateTime<chrono::Utc>,
        timeout: Duration,
    ) {
        support::wait_until(
            &format!("a backup committed for slot {slot}\n{}", self.logs()),
            timeout,
            || {
                self.manifests(cluster_name)
                    .iter()
                    .any(|m| m.slot == Some(slot))
            },
        );
    }
}

/// The next whole minute at least `min_ahead` away.
fn next_minute(min_ahead: Duration) -> chrono::DateTime<chrono::Utc> {
    use chrono::{DurationRound, TimeDelta};
    let earliest = now() + chrono::Duration::from_std(min_ahead).unwrap();
    let floor = earliest.duration_trunc(TimeDelta::minutes(1)).unwrap();
    if floor >= earliest {
        floor
    } else {
        floor + TimeDelta::minutes(1)
    }
}

fn sleep_until(at: chrono::DateTime<chrono::Utc>) {
    if let Ok(d) = (at - now()).to_std() {
        std::thread::sleep(d);
    }
}

/// An etcd stall (SIGSTOP, an fsync stall, a paused VM) across a slot, longer than the
/// HTTP/2 keep-alive: every session fails and the revokes time out. Once etcd answers again
/// a stale lease is revoked before anyone campaigns (a keep-alive queued during the stall
/// may have renewed it for a whole TTL), so some node leads within seconds, runs the missed
/// slot under its new term and the next slot on time.
#[test]
fn etcd_stall_across_a_slot_leaves_no_stale_leader() {
    let _g = serial();
    let s = Shared::start(2, 60, "* * * * *");
    support::wait_until(
        &format!("a leader\n{}", s.logs()),
        Duration::from_secs(40),
        || s.leaders().len() == 1,
    );
    let slot = next_minute(Duration::from_secs(8));
    sleep_until(slot - chrono::Duration::milliseconds(500));
    s.cluster.signal(0, "STOP");
    std::thread::sleep(Duration::from_secs(41));
    // The stall did what it does in the field: the leader's session failed (its fencing
    // check in the slot's cycle could not be confirmed), and so did the revoke of its lease.
    assert!(
        (0..2).any(|i| {
            let log = s.log(i);
            log.contains("not taking part in the election")
                && log.contains("it is revoked before this node campaigns again")
        }),
        "no session ended during the stall:\n{}",
        s.logs()
    );
    s.cluster.signal(0, "CONT");
    let resumed = Instant::now();
    // Within seconds, not after the old lease's TTL (60 s) ran out.
    support::wait_until(
        &format!("a leader after etcd resumed\n{}", s.logs()),
        Duration::from_secs(10),
        || s.leaders().len() == 1,
    );
    eprintln!("a node leads {:?} after etcd resumed", resumed.elapsed());
    // The slot during the stall is run once, late, under the new term.
    s.wait_slot("e", slot, Duration::from_secs(30));
    // And the next slot on time.
    let next = slot + chrono::Duration::minutes(1);
    s.wait_slot(
        "e",
        next,
        (next - now()).to_std().unwrap_or_default() + Duration::from_secs(30),
    );
    assert_eq!(s.leaders().len(), 1, "{}", s.logs());
    assert!(
        (0..2).any(|i| s
            .log(i)
            .contains("revoked the lease of the previous session")),
        "{}",
        s.logs()
    );
}

/// A fencing check that cannot be confirmed (the seam: no time to confirm) ends the
/// session: the lease is revoked, the node campaigns again and wins a new term with a new
/// fencing token; the old key is gone.
#[tokio::test(flavor = "multi_thread")]
async fn an_uncertain_fencing_check_ends_the_session_and_a_new_term_starts() {
    use etcd_backup::etcd::election::{self, Role};
    use support::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
    let cluster = EtcdCluster::start(&EtcdBins::get(EtcdVersion::V3_5_1), 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[etcd]\nendpoints = [\"{}\"]\n[storage]\nurl = \"file://{}\"\n[backup]\ncluster_name = \"f\"\n[election]\nlease_ttl = \"10s\"\nnode_name = \"solo\"\n",
            cluster.client_url(0),
            dir.path().join("s").display()
        ),
    )
    .unwrap();
    let config =
        etcd_backup::config::Config::load_with_env(&path, Some(Default::default())).unwrap();
    let settings = election::Settings::from_config(&config);
    let name = settings.name.clone();
    let (tx, mut rx) = tokio::sync::watch::channel(Role::Disconnected(None));
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(election::run(settings, tx, cancel.clone()));
    let leader =
        |rx: &mut tokio::sync::watch::Receiver<Role>| rx.borrow_and_update().term().cloned();
    let wait_term = |mut rx: tokio::sync::watch::Receiver<Role>, not: Option<i64>| async move {
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                if let Some(t) = leader(&mut rx) {
                    if Some(t.token()) != not && !t.has_ended() {
                        return t;
                    }
                }
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("a term within 20 s")
    };
    let first = wait_term(rx.clone(), None).await;
    assert!(first.check("a normal check").await.is_ok());
    let err = first
        .check_within("an uncertain check", Duration::ZERO)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("did not confirm"), "{err}");
    assert!(first.has_ended());
    let second = wait_term(rx.clone(), Some(first.token())).await;
    assert!(second.token() > first.token());
    assert!(second.check("the new term").await.is_ok());
    // etcd agrees: the key of the new term leads, the old one is gone.
    let member = etcd_backup::etcd::Member::connect(&config.etcd, &cluster.client_url(0))
        .await
        .unwrap();
    let now_leading = election::current_leader(&member, &name)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now_leading.token, second.token());
    let _ = leader(&mut rx);
    cancel.cancel();
    task.await.unwrap();
}

/// A fencing check of a running daemon fails (its election key was deleted behind its
/// back, as an operator or a compaction tool might): the session ends, the node campaigns
/// again, and the next slot is committed under a new term instead of every cycle being
/// fenced for good.
#[test]
fn a_failed_fencing_check_ends_the_session_and_backups_go_on() {
    let _g = serial();
    let s = Shared::start(1, 10, "*/3 * * * * *");
    support::wait_until(
        &format!("the first backup\n{}", s.logs()),
        Duration::from_secs(40),
        || !s.manifests("e").is_empty(),
    );
    let token = |ms: &[Manifest]| ms.iter().filter_map(|m| m.fencing_token).max();
    let before = token(&s.manifests("e")).unwrap();
    let out = s.cluster.etcdctl(0, &["del", "--prefix", "/etcd-backup/"]);
    assert!(out.status.success(), "{out:?}");
    let deleted_at = now();
    support::wait_until(
        &format!("a backup under a new term\n{}", s.logs()),
        Duration::from_secs(30),
        || {
            s.manifests("e")
                .iter()
                .any(|m| m.started_at > deleted_at && m.fencing_token > Some(before))
        },
    );
    let log = s.log(0);
    assert!(log.contains("the leadership term ended"), "{log}");
}

/// SIGHUP with a new `cluster_name` moves the election: the node leaves the old election
/// (no key left under it) and leads the new one, which `status` for the new name shows.
#[test]
fn a_reload_with_a_new_cluster_name_moves_the_election() {
    let _g = serial();
    let s = Shared::start(1, 10, "0 0 1 1 *");
    support::wait_until(
        &format!("a leader\n{}", s.logs()),
        Duration::from_secs(40),
        || s.leaders() == vec![0],
    );
    let keys = |name: &str| {
        let out = s.cluster.etcdctl(
            0,
            &[
                "get",
                "--prefix",
                "--keys-only",
                &format!("/etcd-backup/election/{name}/"),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert!(!keys("e").is_empty(), "the node campaigns on the old key");
    let (name, config, port, proc) = &s.nodes[0];
    s.write_config(config, name, *port, 10, "0 0 1 1 *", "kz2");
    proc.signal("HUP");
    let status = || {
        let out = support::etcd_backup(
            &["status", "--json", "--config", config.to_str().unwrap()],
            &[],
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap_or_default()
    };
    support::wait_until(
        &format!("the node to lead the election of kz2\n{}", s.logs()),
        Duration::from_secs(20),
        || status()["election"]["leader"]["node"] == "node-0",
    );
    let st = status();
    assert_eq!(st["election"]["name"], "/etcd-backup/election/kz2", "{st}");
    assert_eq!(
        keys("e"),
        "",
        "a key is left in the old election\n{}",
        s.logs()
    );
    assert!(!keys("kz2").is_empty());
    assert_eq!(s.leaders(), vec![0], "{}", s.logs());
}
