//! The configuration in force and SIGHUP: re-read, validate, and decide what must restart
//! (the metrics listener when its address changed, the election session when the
//! election's identity changed).

use super::metrics::{Metrics, Outcome, ResultLabels};
use crate::config::Config;
use crate::store::BackupStore;
use crate::systemd;
use std::sync::Arc;

/// The configuration in force and what is built from it.
pub(super) struct State {
    pub(super) config: Config,
    pub(super) store: BackupStore,
}

impl AsRef<Config> for State {
    fn as_ref(&self) -> &Config {
        &self.config
    }
}

impl State {
    pub(super) fn new(config: Config) -> Result<State, String> {
        let store = BackupStore::open(&config.storage, &config.backup.cluster_name)
            .map_err(|e| e.to_string())?;
        Ok(State { config, store })
    }
}

/// Whether `a` and `b` put this node in the same election through the same connection:
/// enabled, cluster name, key prefix, node name, lease TTL, the local member's endpoint,
/// TLS files, credentials and timeouts. When they differ, a reload restarts the session.
pub(super) fn same_election(a: &Config, b: &Config) -> bool {
    let (ea, eb) = (&a.election, &b.election);
    let tls = |c: &Config| {
        c.etcd
            .tls
            .as_ref()
            .map(|t| (t.ca_file.clone(), t.cert_file.clone(), t.key_file.clone()))
    };
    let creds = |c: &Config| {
        (
            c.etcd.username.clone(),
            c.etcd.password.as_ref().map(|p| p.expose().to_string()),
        )
    };
    ea.enabled == eb.enabled
        && ea.election_name(&a.backup.cluster_name) == eb.election_name(&b.backup.cluster_name)
        && ea.node_name == eb.node_name
        && ea.lease_ttl == eb.lease_ttl
        && a.etcd.endpoints.first() == b.etcd.endpoints.first()
        && a.etcd.dial_timeout == b.etcd.dial_timeout
        && a.etcd.request_timeout == b.etcd.request_timeout
        && tls(a) == tls(b)
        && creds(a) == creds(b)
}

/// Re-reads and validates the configuration file of `old`. Returns the new state, or
/// `None` (logged, counted) when the file is invalid: the old configuration stays.
pub(super) fn load(old: &State, metrics: &Metrics) -> Option<Arc<State>> {
    let path = old.config.source.clone();
    tracing::info!(file = %path.display(), "SIGHUP: reloading configuration");
    systemd::reloading();
    let outcome = Config::load(&path)
        .map_err(|e| e.to_string())
        .and_then(State::new);
    let result = if outcome.is_ok() {
        Outcome::Success
    } else {
        Outcome::Failure
    };
    metrics
        .config_reloads
        .get_or_create(&ResultLabels { result })
        .inc();
    match outcome {
        Ok(new) => Some(Arc::new(new)),
        Err(e) => {
            tracing::error!(error = %e, "configuration reload rejected; the previous configuration stays in force");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn config(text: &str) -> Config {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        Config::load_with_env(f.path(), Some(Default::default())).unwrap()
    }

    const BASE: &str = "[storage]\nurl = \"file:///var/b\"\n[backup]\ncluster_name = \"kz\"\n";

    #[test]
    fn the_election_identity_is_what_moves_the_session() {
        let a = config(BASE);
        assert!(same_election(&a, &config(BASE)));
        // Where cycles run and what they keep does not move the election.
        let b = config(&format!(
            "{BASE}[schedule]\ncron = \"*/5 * * * *\"\n[retention]\nkeep_last = 3\n"
        ));
        assert!(same_election(&a, &b));
        for changed in [
            "[storage]\nurl = \"file:///var/b\"\n[backup]\ncluster_name = \"kz2\"\n",
            &format!("{BASE}[election]\nkey_prefix = \"/other\"\n"),
            &format!("{BASE}[etcd]\nendpoints = [\"https://10.0.0.1:2379\"]\n"),
            &format!("{BASE}[etcd]\nusername = \"u\"\npassword = \"p\"\n"),
            &format!("{BASE}[election]\nenabled = false\n"),
            &format!("{BASE}[election]\nlease_ttl = \"30s\"\n"),
        ] {
            assert!(!same_election(&a, &config(changed)), "{changed}");
        }
        let p1 = config(&format!(
            "{BASE}[etcd]\nusername = \"u\"\npassword = \"p1\"\n"
        ));
        let p2 = config(&format!(
            "{BASE}[etcd]\nusername = \"u\"\npassword = \"p2\"\n"
        ));
        assert!(!same_election(&p1, &p2), "a new password");
    }
}
