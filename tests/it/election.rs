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
