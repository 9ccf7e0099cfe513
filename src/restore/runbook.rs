//! The whole-cluster runbook `restore` prints: for a kubeadm control plane of N members, the
//! exact steps in order, with the members' names and peer URLs from the backup's manifest.
//! A pure function of its input, so every line can be tested.

use crate::restore::etcdutl::{cluster_token, BUMP_SINCE};
use crate::store::manifest::Manifest;
use std::fmt::Write;

/// How the restore commands carry `--bump-revision`/`--mark-compacted`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BumpPlan {
    /// On: the etcdutl found supports them, or none was found to ask.
    Use(u64),
    /// The etcdutl found is too old: the flags are shown commented out.
    Commented(u64),
    /// `--no-bump`: not shown.
    Off,
}

/// One member to restore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunbookMember {
    /// `--name`.
    pub name: String,
    /// `--initial-advertise-peer-urls`.
    pub peer_url: String,
    /// Where `etcdctl endpoint status` reaches it.
    pub client_url: Option<String>,
}

/// The client TLS files for `etcdctl`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdctlTls {
    /// `--cacert`.
    pub ca: String,
    /// `--cert`.
    pub cert: String,
    /// `--key`.
    pub key: String,
}

impl Default for EtcdctlTls {
    /// kubeadm's files.
    fn default() -> Self {
        EtcdctlTls {
            ca: "/etc/kubernetes/pki/etcd/ca.crt".into(),
            cert: "/etc/kubernetes/pki/etcd/healthcheck-client.crt".into(),
            key: "/etc/kubernetes/pki/etcd/healthcheck-client.key".into(),
        }
    }
}

/// Everything the runbook is filled in from.
#[derive(Debug, Clone)]
pub struct RunbookInput<'a> {
    /// The backup being restored.
    pub backup: &'a Manifest,
    /// The snapshot file `restore` wrote (copied to the same path on every node).
    pub snapshot: &'a str,
    /// `[etcd] endpoints`.
    pub endpoints: &'a [String],
    /// Client TLS for `etcdctl` (`[etcd]` files, else kubeadm's).
    pub tls: EtcdctlTls,
    /// The flags.
    pub bump: BumpPlan,
}

/// The members to restore: the voting members recorded in the manifest; for a manifest
/// without a member list (written by an older version), one placeholder member per
/// `[etcd] endpoints` host, with a note saying what to check.
pub fn members(m: &Manifest, endpoints: &[String]) -> (Vec<RunbookMember>, Option<String>) {
    let mut recorded: Vec<RunbookMember> = m
        .members
        .iter()
        .filter(|x| !x.is_learner && !x.name.is_empty() && !x.peer_urls.is_empty())
        .map(|x| RunbookMember {
            name: x.name.clone(),
            peer_url: x.peer_urls[0].clone(),
            client_url: x.client_urls.first().cloned(),
        })
        .collect();
    recorded.sort_by(|a, b| a.name.cmp(&b.name));
    if !recorded.is_empty() {
        return (recorded, None);
    }
    let placeholders = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let host = url::Url::parse(e)
                .ok()
                .and_then(|u| u.host_str().map(str::to_string))
                .unwrap_or_else(|| format!("NODE_{}_IP", i + 1));
            RunbookMember {
                name: format!("NODE_{}", i + 1),
                peer_url: format!("https://{host}:2380"),
                client_url: Some(e.clone()),
            }
        })
        .collect();
    (
        placeholders,
        Some(format!(
            "backup {} records no member list (it was made by an older etcd-backup): replace NODE_i with each member's --name and check each peer URL against --initial-advertise-peer-urls in that node's /etc/kubernetes/manifests/etcd.yaml",
            m.id
        )),
    )
}

/// Renders the runbook.
pub fn render(input: &RunbookInput) -> String {
    let m = input.backup;
    let (members, note) = members(m, input.endpoints);
    let file = input.snapshot;
    let initial_cluster = members
        .iter()
        .map(|x| format!("{}={}", x.name, x.peer_url))
        .collect::<Vec<_>>()
        .join(",");
    let token = cluster_token(&m.id);
    let status_endpoints = if !members.is_empty() && members.iter().all(|x| x.client_url.is_some())
    {
        members
            .iter()
            .filter_map(|x| x.client_url.clone())
            .collect::<Vec<_>>()
    } else {
        input.endpoints.to_vec()
    }
    .join(",");
    let mut o = String::new();
    write_header(&mut o, input, &members, note.as_deref());
    write_stop_steps(&mut o, file, &m.sha256);
    write_restore_step(&mut o, input, &members, &initial_cluster, &token);
    write_start_steps(&mut o, input, &status_endpoints);
    o
}

/// Which backup, which members, and how to read what follows.
fn write_header(
    w: &mut String,
    input: &RunbookInput,
    members: &[RunbookMember],
    note: Option<&str>,
) {
    let m = input.backup;
    let n = members.len();
    let _ = writeln!(
        w,
        "=== Disaster recovery of a kubeadm control plane: {n} etcd member{} from backup {} ===",
        if n == 1 { "" } else { "s" },
        m.id
    );
    let _ = writeln!(
        w,
        "Backup: revision {}, taken {}, cluster id {}; snapshot sha256 {}",
        m.revision,
        m.time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        m.cluster_id,
        m.sha256
    );
    let _ = writeln!(w, "Members (from the backup's manifest):");
    for x in members {
        let _ = writeln!(
            w,
            "  {:<20} peer {}{}",
            x.name,
            x.peer_url,
            x.client_url
                .as_ref()
                .map(|c| format!("  client {c}"))
                .unwrap_or_default()
        );
    }
    if let Some(note) = note {
        let _ = writeln!(w, "NOTE: {note}");
    }
    let _ = writeln!(
        w,
        "Run every step as root, on EVERY control-plane node, before going on to the next step."
    );
    let _ = writeln!(w);
}

/// Steps 1–3: the file on every node, the API server and etcd stopped, the old data kept.
fn write_stop_steps(w: &mut String, file: &str, sha256: &str) {
    let _ = writeln!(
        w,
        "1. Copy {file} to the same path on every control-plane node and check it there:"
    );
    let _ = writeln!(w, "     sha256sum {file}    # must print {sha256}");
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "2. Stop the kube-apiserver, then etcd (the kubelet stops a static pod whose manifest leaves its directory):"
    );
    let _ = writeln!(w, "     mkdir -p /etc/kubernetes/manifests-stopped");
    let _ = writeln!(
        w,
        "     mv /etc/kubernetes/manifests/kube-apiserver.yaml /etc/kubernetes/manifests-stopped/"
    );
    let _ = writeln!(
        w,
        "     mv /etc/kubernetes/manifests/etcd.yaml /etc/kubernetes/manifests-stopped/"
    );
    let _ = writeln!(
        w,
        "     crictl ps --name 'kube-apiserver|etcd'    # repeat until it lists neither"
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "3. Keep the old data directory (do not delete it: it is the way back):"
    );
    let _ = writeln!(w, "     mv /var/lib/etcd /var/lib/etcd.before-restore");
    let _ = writeln!(w);
}

/// Step 4: one `etcdutl snapshot restore` per member.
fn write_restore_step(
    w: &mut String,
    input: &RunbookInput,
    members: &[RunbookMember],
    initial_cluster: &str,
    token: &str,
) {
    let file = input.snapshot;
    let _ = writeln!(
        w,
        "4. Restore each member's data directory from the same file, with its own name and peer URL:"
    );
    let _ = writeln!(
        w,
        "   (etcdutl comes in etcd's release archive; kubeadm hosts often lack it: copy it in first{})",
        match input.bump {
            BumpPlan::Use(_) => format!(
                "; --bump-revision/--mark-compacted need etcdutl {BUMP_SINCE}, `etcdutl version` shows yours"
            ),
            _ => String::new(),
        }
    );
    for x in members {
        let _ = writeln!(w, "   on {}:", x.name);
        let _ = writeln!(w, "     etcdutl snapshot restore {file} \\");
        let _ = writeln!(w, "       --data-dir /var/lib/etcd \\");
        let _ = writeln!(w, "       --name {} \\", x.name);
        let _ = writeln!(w, "       --initial-cluster {initial_cluster} \\");
        let _ = writeln!(w, "       --initial-cluster-token {token} \\");
        match input.bump {
            BumpPlan::Use(b) => {
                let _ = writeln!(w, "       --initial-advertise-peer-urls {} \\", x.peer_url);
                let _ = writeln!(w, "       --bump-revision {b} --mark-compacted");
            }
            BumpPlan::Commented(b) => {
                let _ = writeln!(
                    w,
                    "       --initial-advertise-peer-urls {}  # --bump-revision {b} --mark-compacted  (upgrade etcdutl to {BUMP_SINCE}, then add these)",
                    x.peer_url
                );
            }
            BumpPlan::Off => {
                let _ = writeln!(w, "       --initial-advertise-peer-urls {}", x.peer_url);
            }
        }
    }
    let _ = writeln!(w);
}

/// Steps 5–9 and the way back: etcd, the check, the API server, the caches, a new backup.
fn write_start_steps(w: &mut String, input: &RunbookInput, status_endpoints: &str) {
    let m = input.backup;
    let _ = writeln!(
        w,
        "5. Start etcd on every node, one right after the other (a member waits for a quorum):"
    );
    let _ = writeln!(
        w,
        "     mv /etc/kubernetes/manifests-stopped/etcd.yaml /etc/kubernetes/manifests/"
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "6. Check etcd: every member listed, one leader, the same revision on all{}:",
        match input.bump {
            BumpPlan::Use(b) => format!(" (at least {})", m.revision.saturating_add_unsigned(b)),
            _ => String::new(),
        }
    );
    let _ = writeln!(
        w,
        "     etcdctl --endpoints {status_endpoints} \\\n       --cacert {} --cert {} --key {} \\\n       endpoint status -w table",
        input.tls.ca, input.tls.cert, input.tls.key
    );
    let _ = writeln!(w);
    let _ = writeln!(w, "7. Start the kube-apiserver on every node:");
    let _ = writeln!(
        w,
        "     mv /etc/kubernetes/manifests-stopped/kube-apiserver.yaml /etc/kubernetes/manifests/"
    );
    let _ = writeln!(
        w,
        "     kubectl --kubeconfig /etc/kubernetes/admin.conf get nodes"
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "8. Restart what caches cluster state, on every node: the kube-controller-manager and kube-scheduler"
    );
    let _ = writeln!(
        w,
        "   (move their manifests to /etc/kubernetes/manifests-stopped/ and back), then `systemctl restart kubelet`."
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "9. Take a fresh backup (the restored cluster has a new cluster id): etcd-backup snapshot"
    );
    let _ = writeln!(w);
    let _ = writeln!(
        w,
        "Way back, if etcd does not come up: repeat step 2, then on every node `rm -rf /var/lib/etcd && mv /var/lib/etcd.before-restore /var/lib/etcd`, then steps 5 and 7."
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::manifest::{sample, ClusterMember};

    fn three() -> Manifest {
        let mut m = sample("20260102T030405Z-0a1b2c", chrono::Utc::now());
        m.members = (1..=3)
            .map(|i| ClusterMember {
                id: format!("{i:016x}"),
                name: format!("cp{i}"),
                peer_urls: vec![format!("https://10.0.0.{i}:2380")],
                client_urls: vec![format!("https://10.0.0.{i}:2379")],
                is_learner: false,
            })
            .collect();
        m
    }

    fn input<'a>(m: &'a Manifest, endpoints: &'a [String], bump: BumpPlan) -> RunbookInput<'a> {
        RunbookInput {
            backup: m,
            snapshot: "/root/restore.db",
            endpoints,
            tls: EtcdctlTls::default(),
            bump,
        }
    }

    #[test]
    fn every_member_is_restored_with_its_own_name_and_peer_url() {
        let m = three();
        let eps = vec!["https://127.0.0.1:2379".to_string()];
        let r = render(&input(&m, &eps, BumpPlan::Use(1_000_000_000)));
        let cluster =
            "cp1=https://10.0.0.1:2380,cp2=https://10.0.0.2:2380,cp3=https://10.0.0.3:2380";
        for i in 1..=3 {
            assert!(r.contains(&format!("   on cp{i}:\n")), "{r}");
            assert!(r.contains(&format!("--name cp{i} \\")), "{r}");
            assert!(
                r.contains(&format!(
                    "--initial-advertise-peer-urls https://10.0.0.{i}:2380 \\\n       --bump-revision 1000000000 --mark-compacted"
                )),
                "{r}"
            );
        }
        assert_eq!(
            r.matches(&format!("--initial-cluster {cluster} \\"))
                .count(),
            3,
            "{r}"
        );
        assert_eq!(
            r.matches("--initial-cluster-token etcd-restore-20260102T030405Z-0a1b2c")
                .count(),
            3
        );
        assert!(r.contains("3 etcd members"), "{r}");
        assert!(r.contains(&format!("# must print {}", m.sha256)));
        assert!(r.contains(
            "--endpoints https://10.0.0.1:2379,https://10.0.0.2:2379,https://10.0.0.3:2379"
        ));
        assert!(r.contains("at least 1000000042"), "{r}");
        assert!(!r.contains("NOTE"), "{r}");
    }

    #[test]
    fn the_steps_come_in_the_safe_order() {
        let m = three();
        let r = render(&input(&m, &[], BumpPlan::Use(7)));
        let pos = |s: &str| r.find(s).unwrap_or_else(|| panic!("missing {s:?} in\n{r}"));
        let order = [
            "sha256sum /root/restore.db",
            "mv /etc/kubernetes/manifests/kube-apiserver.yaml",
            "mv /etc/kubernetes/manifests/etcd.yaml",
            "mv /var/lib/etcd /var/lib/etcd.before-restore",
            "etcdutl snapshot restore /root/restore.db",
            "mv /etc/kubernetes/manifests-stopped/etcd.yaml /etc/kubernetes/manifests/",
            "endpoint status -w table",
            "mv /etc/kubernetes/manifests-stopped/kube-apiserver.yaml /etc/kubernetes/manifests/",
            "systemctl restart kubelet",
            "etcd-backup snapshot",
        ];
        for w in order.windows(2) {
            assert!(
                pos(w[0]) < pos(w[1]),
                "{:?} must come before {:?}",
                w[0],
                w[1]
            );
        }
    }

    #[test]
    fn an_old_etcdutl_gets_the_flags_commented_and_no_bump_drops_them() {
        let m = three();
        let r = render(&input(&m, &[], BumpPlan::Commented(1_000_000_000)));
        for line in r.lines().filter(|l| l.contains("--bump-revision")) {
            let code = line.split('#').next().unwrap();
            assert!(!code.contains("--bump-revision"), "{line}");
            assert!(
                line.contains("upgrade etcdutl to 3.5.10 or later (or 3.6)"),
                "{line}"
            );
            // The command ends at the comment: no continuation after it.
            assert!(!line.trim_end().ends_with('\\'), "{line}");
        }
        assert_eq!(
            r.matches("# --bump-revision 1000000000 --mark-compacted")
                .count(),
            3
        );
        let off = render(&input(&m, &[], BumpPlan::Off));
        assert!(
            !off.contains("--bump-revision") && !off.contains("--mark-compacted"),
            "{off}"
        );
        assert!(off.contains("--initial-advertise-peer-urls https://10.0.0.3:2380\n"));
    }

    #[test]
    fn learners_are_not_restored_as_voters() {
        let mut m = three();
        m.members[2].is_learner = true;
        let (ms, note) = members(&m, &[]);
        assert_eq!(
            ms.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            ["cp1", "cp2"]
        );
        assert!(note.is_none());
    }

    #[test]
    fn an_old_manifest_gets_placeholders_from_the_endpoints_and_a_note() {
        let m = sample("20260102T030405Z-0a1b2c", chrono::Utc::now());
        let eps = vec![
            "https://10.1.0.1:2379".to_string(),
            "https://10.1.0.2:2379".to_string(),
        ];
        let r = render(&input(&m, &eps, BumpPlan::Use(5)));
        assert!(
            r.contains("NODE_1=https://10.1.0.1:2380,NODE_2=https://10.1.0.2:2380"),
            "{r}"
        );
        assert!(
            r.contains("NOTE: backup 20260102T030405Z-0a1b2c records no member list"),
            "{r}"
        );
        assert!(
            r.contains("--endpoints https://10.1.0.1:2379,https://10.1.0.2:2379"),
            "{r}"
        );
    }
}
