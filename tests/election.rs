//! One snapshotter per cluster: a real 3-member etcd cluster and three daemons, each a
//! separate `etcd-backup run` process talking to its own member, sharing one store.
//!
//! Every scenario ends with the same audit of the store: exactly one committed backup per
//! scheduled slot, no two committed cycles overlapping in time, and fencing tokens that never
//! go backwards. Waits are derived from the configured lease TTL and cron period.

mod support;

use etcd_backup::manifest::Manifest;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use support::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
use support::{metric, ChildProc};

/// The scenarios share two cores with three etcd members and three daemons each: one at a
/// time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Lease TTL of the election in these tests.
const TTL: Duration = Duration::from_secs(6);
/// Cron period (seconds) of the schedule.
const PERIOD: u64 = 4;

struct Node {
    name: String,
    config: PathBuf,
    log: PathBuf,
    port: u16,
    proc: Option<ChildProc>,
}

struct Fleet {
    cluster: EtcdCluster,
    dir: tempfile::TempDir,
    store: PathBuf,
    nodes: Vec<Node>,
}

impl Fleet {
    /// Three members, three daemons (node-i talks to member i).
    fn start() -> Fleet {
        let bins = EtcdBins::get(EtcdVersion::V3_5_1);
        let cluster = EtcdCluster::start(&bins, 3);
        cluster.put("/registry/marker", "v");
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("store");
        let mut fleet = Fleet {
            cluster,
            store,
            nodes: Vec::new(),
            dir,
        };
        for i in 0..3 {
            let name = format!("node-{i}");
            let config = fleet.dir.path().join(format!("{name}.toml"));
            let port = support::free_port();
            std::fs::write(
                &config,
                format!(
                    "[etcd]\nendpoints = [\"{}\"]\ndial_timeout = \"2s\"\nrequest_timeout = \"5s\"\n\
                     [storage]\nurl = \"file://{}\"\n\
                     [backup]\ncluster_name = \"e\"\nspool_dir = \"{}\"\ntimeout = \"60s\"\n\
                     [schedule]\ncron = \"*/{PERIOD} * * * * *\"\n\
                     [retention]\nkeep_last = 1000\n\
                     [metrics]\nlisten = \"127.0.0.1:{port}\"\nrefresh_interval = \"1s\"\n\
                     [election]\nlease_ttl = \"{}s\"\nnode_name = \"{name}\"\n",
                    fleet.cluster.client_url(i),
                    fleet.store.display(),
                    fleet.dir.path().join(format!("spool-{i}")).display(),
                    TTL.as_secs(),
                ),
            )
            .unwrap();
            let log = fleet.dir.path().join(format!("{name}.log"));
            fleet.nodes.push(Node {
                name,
                config,
                log,
                port,
                proc: None,
            });
            fleet.spawn(i);
        }
        fleet
    }

    fn spawn(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-backup"));
        cmd.args(["run", "--config", n.config.to_str().unwrap()])
            .env("RUST_LOG", "etcd_backup=debug");
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD_BACKUP_") || k == "NOTIFY_SOCKET" {
                cmd.env_remove(k);
            }
        }
        n.proc = Some(ChildProc::spawn(&n.name, cmd, &n.log));
    }

    fn proc(&mut self, i: usize) -> &mut ChildProc {
        self.nodes[i].proc.as_mut().expect("daemon started")
    }

    /// `etcd_backup_is_leader` of node `i`; `None` when it does not answer.
    fn gauge(&self, i: usize, name: &str) -> Option<f64> {
        let body = support::http_get(self.nodes[i].port, "/metrics", Duration::from_secs(1))?;
        metric(&body, name)
    }

    fn is_leader(&self, i: usize) -> bool {
        self.gauge(i, "etcd_backup_is_leader") == Some(1.0)
    }

    /// Nodes (among `among`) that report themselves leader.
    fn leaders(&self, among: &[usize]) -> Vec<usize> {
        among
            .iter()
            .copied()
            .filter(|&i| self.is_leader(i))
            .collect()
    }

    /// Waits for exactly one leader among `among`; returns it.
    fn wait_leader(&self, among: &[usize], timeout: Duration) -> usize {
        let mut found = None;
        support::wait_until(
            &format!("exactly one leader among {among:?}\n{}", self.logs()),
            timeout,
            || {
                let l = self.leaders(among);
                found = (l.len() == 1).then(|| l[0]);
                found.is_some()
            },
        );
        found.unwrap()
    }

    fn manifests(&self) -> Vec<Manifest> {
        let mut out = Vec::new();
        let root = self.store.join("e");
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let p = entry.path().join("manifest.json");
            if let Ok(text) = std::fs::read_to_string(&p) {
                out.push(
                    serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("{} is not a manifest: {e}", p.display())),
                );
            }
        }
        out.sort_by_key(|m: &Manifest| m.started_at);
        out
    }

    /// Waits for a committed backup by `node` that started after `after`.
    fn wait_backup_by(&self, node: usize, after: chrono::DateTime<chrono::Utc>, timeout: Duration) {
        let name = &self.nodes[node].name;
        support::wait_until(
            &format!("a backup by {name} after {after}\n{}", self.logs()),
            timeout,
            || {
                self.manifests()
                    .iter()
                    .any(|m| m.node == *name && m.started_at > after)
            },
        );
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter_map(|n| n.proc.as_ref().map(|p| p.log_tail(25)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `etcd-backup status --json` through node `i`'s configuration.
    fn status(&self, i: usize) -> serde_json::Value {
        let out = Command::new(env!("CARGO_BIN_EXE_etcd-backup"))
            .args(["status", "--json", "--config"])
            .arg(&self.nodes[i].config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The audit every scenario ends with.
    fn audit(&self) -> Vec<Manifest> {
        let ms = self.manifests();
        assert!(!ms.is_empty(), "no backups at all\n{}", self.logs());
        let mut per_slot: BTreeMap<_, Vec<&Manifest>> = BTreeMap::new();
        for m in &ms {
            let slot = m
                .slot
                .unwrap_or_else(|| panic!("daemon backup {} has no slot", m.id));
            assert!(
                m.fencing_token.is_some(),
                "backup {} has no fencing token",
                m.id
            );
            per_slot.entry(slot).or_default().push(m);
        }
        for (slot, list) in &per_slot {
            assert_eq!(
                list.len(),
                1,
                "slot {slot} was backed up {} times: {:?}",
                list.len(),
                list.iter().map(|m| (&m.node, &m.id)).collect::<Vec<_>>()
            );
        }
        for w in ms.windows(2) {
            assert!(
                w[1].started_at >= w[0].finished_at,
                "cycles overlap: {} by {} ({} .. {}) and {} by {} ({} .. {})",
                w[0].id,
                w[0].node,
                w[0].started_at,
                w[0].finished_at,
                w[1].id,
                w[1].node,
                w[1].started_at,
                w[1].finished_at
            );
            assert!(
                w[1].fencing_token >= w[0].fencing_token,
                "fencing token went backwards: {} ({:?}) then {} ({:?})",
                w[0].id,
                w[0].fencing_token,
                w[1].id,
                w[1].fencing_token
            );
        }
        ms
    }
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
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
    let mut f = Fleet::start();
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
    let mut f = Fleet::start();
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
    let mut f = Fleet::start();
    // Enough data that a cycle takes a while, so the pause lands inside one.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(load(&f.cluster.client_url(0), 40));
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
        .map(|m| m.id.clone())
        .collect();
    assert!(late.is_empty(), "the paused leader committed {late:?}");
    assert_eq!(f.leaders(&all), vec![next], "{}", f.logs());
    // Nothing half-done is left by the aborted cycle: every data object has its manifest.
    let root = f.store.join("e");
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
    let mut f = Fleet::start();
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

/// Writes about `mb` MiB of values through `endpoint`.
async fn load(endpoint: &str, mb: u32) {
    let c = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    let mut kv = c.kv_client();
    let value = vec![b'x'; 64 * 1024];
    for i in 0..mb * 16 {
        kv.put(format!("/load/{i}"), value.clone(), None)
            .await
            .unwrap();
    }
}
