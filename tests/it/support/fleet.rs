//! A fleet for election and soak tests: a real 3-member etcd cluster and three
//! `etcd-backup run` processes, one per member, sharing one store.

use super::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
use super::{metric, ChildProc};
use etcd_backup::store::manifest::Manifest;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// One daemon.
pub struct Node {
    /// `[election] node_name`.
    pub name: String,
    /// Its configuration file.
    pub config: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its metrics port.
    pub port: u16,
    /// The process, while it runs.
    pub proc: Option<ChildProc>,
}

/// What the fleet's daemons are configured with.
pub struct FleetOptions {
    /// `[election] lease_ttl`.
    pub ttl: Duration,
    /// `[schedule] cron`.
    pub cron: String,
    /// The `[storage]` section's body; `None`: a shared local directory.
    pub storage: Option<String>,
    /// Values `[etcd]` adds (timeouts).
    pub etcd_extra: String,
}

/// A 3-member etcd cluster and three daemons (node-i talks to member i) sharing one store.
pub struct Fleet {
    /// The etcd cluster.
    pub cluster: EtcdCluster,
    /// Scratch directory (configs, logs, spools, the local store).
    pub dir: tempfile::TempDir,
    /// The daemons.
    pub nodes: Vec<Node>,
}

impl Fleet {
    /// Starts the cluster and the daemons.
    pub fn start(opts: &FleetOptions) -> Fleet {
        let bins = EtcdBins::get(EtcdVersion::V3_5_1);
        let cluster = EtcdCluster::start(&bins, 3);
        cluster.put("/registry/marker", "v");
        let dir = tempfile::tempdir().unwrap();
        let storage = opts
            .storage
            .clone()
            .unwrap_or_else(|| format!("url = \"file://{}\"", dir.path().join("store").display()));
        let mut fleet = Fleet {
            cluster,
            nodes: Vec::new(),
            dir,
        };
        for i in 0..3 {
            let name = format!("node-{i}");
            let config = fleet.dir.path().join(format!("{name}.toml"));
            let port = super::free_port();
            std::fs::write(
                &config,
                format!(
                    "[etcd]\nendpoints = [\"{}\"]\ndial_timeout = \"2s\"\nrequest_timeout = \"5s\"\n{}\n\
                     [storage]\n{storage}\n\
                     [backup]\ncluster_name = \"e\"\nspool_dir = \"{}\"\ntimeout = \"60s\"\n\
                     [schedule]\ncron = \"{}\"\n\
                     [retention]\nkeep_last = 1000\n\
                     [metrics]\nlisten = \"127.0.0.1:{port}\"\nrefresh_interval = \"1s\"\n\
                     [election]\nlease_ttl = \"{}s\"\nnode_name = \"{name}\"\n",
                    fleet.cluster.client_url(i),
                    opts.etcd_extra,
                    fleet.dir.path().join(format!("spool-{i}")).display(),
                    opts.cron,
                    opts.ttl.as_secs(),
                ),
            )
            .unwrap();
            std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600))
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

    /// Starts (or restarts) daemon `i`.
    pub fn spawn(&mut self, i: usize) {
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

    /// Daemon `i`'s process.
    pub fn proc(&mut self, i: usize) -> &mut ChildProc {
        self.nodes[i].proc.as_mut().expect("daemon started")
    }

    /// Metric `name` of node `i`; `None` when it does not answer.
    pub fn gauge(&self, i: usize, name: &str) -> Option<f64> {
        let body = super::http_get(self.nodes[i].port, "/metrics", Duration::from_secs(1))?;
        metric(&body, name)
    }

    /// Whether node `i` reports itself leader.
    pub fn is_leader(&self, i: usize) -> bool {
        self.gauge(i, "etcd_backup_is_leader") == Some(1.0)
    }

    /// Nodes (among `among`) that report themselves leader.
    pub fn leaders(&self, among: &[usize]) -> Vec<usize> {
        among
            .iter()
            .copied()
            .filter(|&i| self.is_leader(i))
            .collect()
    }

    /// Waits for exactly one leader among `among`; returns it.
    pub fn wait_leader(&self, among: &[usize], timeout: Duration) -> usize {
        let mut found = None;
        super::wait_until(
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

    /// Every committed backup in the store, oldest first.
    pub fn manifests(&self) -> Vec<Manifest> {
        let listing = self.listing();
        let mut out = listing.backups;
        out.sort_by_key(|m: &Manifest| m.started_at);
        out
    }

    /// The store's listing (through node 0's configuration).
    pub fn listing(&self) -> etcd_backup::store::Listing {
        let cfg = etcd_backup::config::Config::load_with_env(
            &self.nodes[0].config,
            Some(Default::default()),
        )
        .unwrap();
        let store = etcd_backup::store::BackupStore::open(&cfg.storage, "e").unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(store.list()).unwrap()
    }

    /// Waits for a committed backup by `node` that started after `after`.
    pub fn wait_backup_by(
        &self,
        node: usize,
        after: chrono::DateTime<chrono::Utc>,
        timeout: Duration,
    ) {
        let name = &self.nodes[node].name;
        super::wait_until(
            &format!("a backup by {name} after {after}\n{}", self.logs()),
            timeout,
            || {
                self.manifests()
                    .iter()
                    .any(|m| m.node == *name && m.started_at > after)
            },
        );
    }

    /// Node `i`'s log.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    /// The tails of every running node's log.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .filter_map(|n| n.proc.as_ref().map(|p| p.log_tail(25)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// `etcd-backup status --json` through node `i`'s configuration.
    pub fn status(&self, i: usize) -> serde_json::Value {
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

    /// The audit every scenario ends with: one backup per slot, no overlapping cycles,
    /// fencing tokens never going backwards.
    pub fn audit(&self) -> Vec<Manifest> {
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
