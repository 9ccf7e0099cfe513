//! Backups that are safe to store: age encryption end to end (real etcd, `snapshot`,
//! `restore`, `verify`, drills), S3 server-side encryption with customer keys and upload
//! checksums against a real S3 server (Garage), and a scan of every output for the secrets
//! the run used.

use crate::support;

use crate::support::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
use crate::support::garage::garage;
use crate::support::text;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// A value written to etcd that must never appear in an encrypted stored object.
const MARKER: &str = "plaintext-marker-5f1c2e9a-must-not-be-stored";

fn etcd_backup(args: &[&str]) -> Output {
    support::etcd_backup(args, &[])
}

fn ok(o: Output) -> Output {
    assert!(o.status.success(), "{}", text(&o));
    o
}

fn keygen(path: &Path) -> String {
    let o = ok(etcd_backup(&["keygen", "--output", path.to_str().unwrap()]));
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

fn cluster_with_marker() -> EtcdCluster {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    for i in 0..20 {
        cluster.put(&format!("/registry/secrets/ns/s{i}"), MARKER);
    }
    cluster
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn encrypted_backups_round_trip_with_either_identity_and_hide_the_data() {
    let cluster = cluster_with_marker();
    let dir = tempfile::tempdir().unwrap();
    let (id_a, id_b, id_c) = (
        dir.path().join("a.key"),
        dir.path().join("b.key"),
        dir.path().join("c.key"),
    );
    let (ra, rb) = (keygen(&id_a), keygen(&id_b));
    keygen(&id_c);
    assert!(ra.starts_with("age1") && rb.starts_with("age1"));
    let mode = std::fs::metadata(&id_a).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let recipients_file = dir.path().join("recipients.txt");
    std::fs::write(&recipients_file, format!("# second operator\n{rb}\n")).unwrap();
    let store = dir.path().join("store");
    let write_config = |name: &str, encryption: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            format!(
                "[etcd]\nendpoints = [\"{}\"]\n[storage]\nurl = \"file://{}\"\n[backup]\ncluster_name = \"{name}\"\ncompression = \"none\"\nspool_dir = \"{}\"\n{encryption}\n",
                cluster.client_url(0),
                store.display(),
                dir.path().join("spool").display()
            ),
        )
        .unwrap();
        p
    };
    // Control: without encryption the marker is in the stored object (compression off).
    let plain = write_config("plain", "");
    ok(etcd_backup(&[
        "snapshot",
        "--config",
        plain.to_str().unwrap(),
    ]));
    let plain_objects: Vec<PathBuf> = files(&store.join("plain"))
        .into_iter()
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("snapshot.db")
        })
        .collect();
    assert_eq!(plain_objects.len(), 1);
    assert!(contains(
        &std::fs::read(&plain_objects[0]).unwrap(),
        MARKER.as_bytes()
    ));

    let enc = write_config(
        "enc",
        &format!(
            "[encryption]\nrecipients = [\"{ra}\"]\nrecipients_file = \"{}\"\n",
            recipients_file.display()
        ),
    );
    let cfg = enc.to_str().unwrap();
    let o = ok(etcd_backup(&["snapshot", "--config", cfg]));
    let id = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let stored = files(&store.join("enc"));
    let data: Vec<&PathBuf> = stored
        .iter()
        .filter(|p| p.file_name().unwrap() == "snapshot.db.age")
        .collect();
    assert_eq!(data.len(), 1, "{stored:?}");
    let bytes = std::fs::read(data[0]).unwrap();
    assert!(bytes.starts_with(b"age-encryption.org/v1"));
    assert!(
        !contains(&bytes, MARKER.as_bytes()),
        "the marker is stored in clear"
    );
    // The manifest names the recipients (public keys), never a secret.
    let manifest =
        std::fs::read_to_string(store.join("enc").join(&id).join("manifest.json")).unwrap();
    let m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    assert_eq!(m["encryption"]["method"], "age");
    let mut listed: Vec<String> = m["encryption"]["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    listed.sort();
    let mut expected = vec![ra.clone(), rb.clone()];
    expected.sort();
    assert_eq!(listed, expected);
    for k in [&id_a, &id_b] {
        let secret = std::fs::read_to_string(k).unwrap();
        let secret = secret.lines().last().unwrap();
        assert!(!manifest.contains(secret));
    }

    // `restore` of the newest backup into `out`, with `--identity` when given.
    let restore = |out: &Path, identity: Option<&Path>| -> Output {
        let mut args = vec![
            "restore",
            "--config",
            cfg,
            "--output",
            out.to_str().unwrap(),
        ];
        if let Some(id) = identity {
            args.extend(["--identity", id.to_str().unwrap()]);
        }
        etcd_backup(&args)
    };
    // Without an identity: a clear error that names the recipients.
    let out = dir.path().join("none.db");
    let o = restore(&out, None);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("encrypted") && t.contains(&ra) && t.contains(&rb) && t.contains("--identity"),
        "{t}"
    );
    assert!(!out.exists());
    // With an identity it was not made for: refused, naming both sides.
    let o = restore(&out, Some(&id_c));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("none of the identities"), "{}", text(&o));
    // A world-readable identity is refused.
    let loose = dir.path().join("loose.key");
    std::fs::copy(&id_a, &loose).unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = restore(&out, Some(&loose));
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("chmod 600"), "{}", text(&o));

    // Either identity restores the verified snapshot.
    for (n, k) in [&id_a, &id_b].iter().enumerate() {
        let out = dir.path().join(format!("restored-{n}.db"));
        ok(restore(&out, Some(k)));
        let snap = std::fs::read(&out).unwrap();
        assert!(contains(&snap, MARKER.as_bytes()));
        let o = ok(etcd_backup(&[
            "verify",
            "--file",
            out.to_str().unwrap(),
            "--json",
        ]));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["revision"].as_i64(), m["revision"].as_i64(), "{v}");
    }
    // `verify` from the store with the identity in the configuration.
    let with_identity = write_config(
        "enc",
        &format!(
            "[encryption]\nrecipients = [\"{ra}\"]\nidentity_file = \"{}\"\n",
            id_b.display()
        ),
    );
    let o = ok(etcd_backup(&[
        "verify",
        "--config",
        with_identity.to_str().unwrap(),
        "--json",
    ]));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&id),
        "{}",
        text(&o)
    );
    // And the drill (download, decrypt, verify; etcd not needed for this part).
    let o = ok(etcd_backup(&[
        "drill",
        "--config",
        with_identity.to_str().unwrap(),
    ]));
    assert!(text(&o).contains("restore drill passed"), "{}", text(&o));
}

#[test]
fn bad_encryption_settings_are_rejected_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    keygen(&key);
    let secret = std::fs::read_to_string(&key).unwrap();
    let secret = secret.lines().last().unwrap().to_string();
    let cfg = dir.path().join("c.toml");
    for (body, key_name) in [
        ("[encryption]\nrecipients = [\"age1nope\"]\n".to_string(), "encryption.recipients"),
        (format!("[encryption]\nrecipients = [\"{secret}\"]\n"), "encryption.recipients"),
        ("[encryption]\nrecipients_file = \"/nonexistent/r.txt\"\n".to_string(), "encryption.recipients_file"),
        ("[storage]\nurl = \"s3://b\"\nsse = \"sse-c\"\n".to_string(), "storage.sse"),
        ("[storage]\nurl = \"s3://b\"\nsse = \"sse-c\"\nsse_customer_key = \"dG9vIHNob3J0\"\n".to_string(), "storage.sse_customer_key"),
        ("[storage]\nurl = \"s3://b\"\nsse = \"rot13\"\n".to_string(), "storage.sse"),
        ("[storage]\nurl = \"s3://b\"\nchecksum = \"md5\"\n".to_string(), "storage.checksum"),
        (format!("[storage]\nurl = \"s3://b\"\nsse = \"sse-c\"\nsse_customer_key = \"{}\"\nchecksum = \"sha256\"\n", customer_key()), "storage.checksum"),
        ("[storage]\nurl = \"s3://b\"\nsecret_access_key = \"x\"\nsecret_access_key_file = \"/f\"\n".to_string(), "storage.secret_access_key"),
        ("[etcd]\nendpoints = [\"http://127.0.0.1:1\"]\nusername = \"u\"\npassword_file = \"/nonexistent/pw\"\n".to_string(), "etcd.password_file"),
    ] {
        std::fs::write(&cfg, &body).unwrap();
        let o = etcd_backup(&["check-config", "--config", cfg.to_str().unwrap()]);
        let t = text(&o);
        assert_eq!(o.status.code(), Some(2), "{body}\n{t}");
        assert!(t.contains(key_name), "{body}\n{t}");
        assert!(!t.contains(&secret), "the secret key leaked: {t}");
        assert!(!t.contains("dG9vIHNob3J0"), "the customer key leaked: {t}");
    }
}

/// Runs a command, keeping its output in `seen` for the secret scan.
fn run(seen: &mut String, args: &[&str], expect_ok: bool) -> Output {
    let o = etcd_backup(args);
    seen.push_str(&text(&o));
    assert_eq!(o.status.success(), expect_ok, "{args:?}\n{}", text(&o));
    o
}

/// Base64 of 32 pseudo-random bytes (an SSE-C key).
fn customer_key() -> String {
    use base64::Engine as _;
    let bytes: Vec<u8> = (0..32u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (std::process::id() as u8))
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Uploads with a SHA-256 checksum (what buckets with Object Lock require) are accepted by a
/// real S3 server and read back.
#[test]
fn checksummed_uploads_round_trip() {
    let cluster = cluster_with_marker();
    let g = garage();
    let bucket = g.create_bucket("cksum");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[etcd]\nendpoints = [\"{}\"]\n[storage]\nurl = \"s3://{bucket}/p\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\nchecksum = \"sha256\"\nsse = \"AES256\"\n[backup]\ncluster_name = \"ck\"\nspool_dir = \"{}\"\n",
            cluster.client_url(0),
            g.s3_endpoint,
            g.region,
            g.access_key_id,
            g.secret_access_key,
            dir.path().join("spool").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let cfg = config.to_str().unwrap();
    ok(etcd_backup(&["snapshot", "--config", cfg]));
    let o = ok(etcd_backup(&["verify", "--config", cfg]));
    assert!(text(&o).contains("OK"), "{}", text(&o));
}

/// Runs the whole product against real etcd (with authentication on) and Garage with SSE-C,
/// credentials from files and an encrypted backup; then scans everything
/// it printed, logged, served and stored for the secrets it used.
#[test]
fn sse_c_round_trip_and_no_secret_leaks_anywhere() {
    let cluster = cluster_with_marker();
    // etcd authentication: root with a password.
    let etcd_password = format!("etcd-pw-{:x}-secret", std::process::id());
    for args in [
        vec![
            "user",
            "add",
            "root",
            "--new-user-password",
            etcd_password.as_str(),
        ],
        vec!["auth", "enable"],
    ] {
        let o = cluster.etcdctl(0, &args);
        assert!(o.status.success(), "{args:?}: {}", text(&o));
    }
    let g = garage();
    let bucket = g.create_bucket("ssec");
    let dir = tempfile::tempdir().unwrap();
    let identity = dir.path().join("id.key");
    let recipient = keygen(&identity);
    let age_secret = std::fs::read_to_string(&identity)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let sse_key = customer_key();
    let creds = dir.path().join("creds");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(
        creds.join("s3-secret"),
        format!("{}\n", g.secret_access_key),
    )
    .unwrap();
    std::fs::write(creds.join("etcd-password"), &etcd_password).unwrap();
    let port = support::free_port();
    let config = dir.path().join("config.toml");
    // The customer key is inline: the file is mode 0644 at first, which the daemon and
    // check-config must warn about.
    std::fs::write(
        &config,
        format!(
            "[etcd]\nendpoints = [\"{}\"]\nusername = \"root\"\npassword_file = \"{}\"\n\
             [storage]\nurl = \"s3://{bucket}/p\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\n\
             secret_access_key_file = \"{}\"\nsse = \"sse-c\"\nsse_customer_key = \"{sse_key}\"\nchecksum = \"none\"\n\
             [backup]\ncluster_name = \"leak\"\nspool_dir = \"{}\"\n\
             [schedule]\ncron = \"*/2 * * * * *\"\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n\
             [encryption]\nrecipients = [\"{recipient}\"]\nidentity_file = \"{}\"\n",
            cluster.client_url(0),
            creds.join("etcd-password").display(),
            g.s3_endpoint,
            g.region,
            g.access_key_id,
            creds.join("s3-secret").display(),
            dir.path().join("spool").display(),
            identity.display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = config.to_str().unwrap();
    let mut seen = String::new();
    let o = run(&mut seen, &["check-config", "--config", cfg], true);
    let t = text(&o);
    assert!(t.contains("readable by every user"), "{t}");
    assert!(t.contains("<redacted>"), "{t}");
    let o = run(&mut seen, &["snapshot", "--config", cfg], true);
    let id = String::from_utf8(o.stdout).unwrap().trim().to_string();
    run(&mut seen, &["list", "--config", cfg, "--json"], true);
    run(&mut seen, &["status", "--config", cfg, "--json"], true);
    run(&mut seen, &["verify", "--config", cfg, "--json"], true);
    let restored = dir.path().join("restored.db");
    run(
        &mut seen,
        &[
            "restore",
            "--config",
            cfg,
            "--output",
            restored.to_str().unwrap(),
        ],
        true,
    );
    assert!(contains(
        &std::fs::read(&restored).unwrap(),
        MARKER.as_bytes()
    ));

    // SSE-C is real: without the customer key the object cannot be read.
    let no_key = dir.path().join("no-key.toml");
    let without: String = std::fs::read_to_string(&config)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("sse"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&no_key, without).unwrap();
    std::fs::set_permissions(&no_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let o = run(
        &mut seen,
        &["verify", "--config", no_key.to_str().unwrap(), &id],
        false,
    );
    assert!(!text(&o).contains("OK"), "{}", text(&o));

    // Failures with wrong credentials must not echo them either.
    let wrong = dir.path().join("wrong.toml");
    let body = std::fs::read_to_string(&config).unwrap();
    std::fs::write(creds.join("etcd-password-wrong"), "wrong-etcd-pw-77").unwrap();
    std::fs::write(
        &wrong,
        body.replace("etcd-password\"", "etcd-password-wrong\""),
    )
    .unwrap();
    run(
        &mut seen,
        &["snapshot", "--config", wrong.to_str().unwrap()],
        false,
    );

    // The daemon: a few cycles with debug logs, /metrics, SIGTERM.
    let log = dir.path().join("daemon.log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-backup"));
    cmd.args(["run", "--config", cfg])
        .env("RUST_LOG", "debug")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::File::options().append(true).open(&log).unwrap());
    for (k, _) in std::env::vars() {
        if k.starts_with("ETCD_BACKUP_") || k.starts_with("AWS_") || k == "NOTIFY_SOCKET" {
            cmd.env_remove(k);
        }
    }
    let mut daemon = cmd.spawn().unwrap();
    support::wait_until("two scheduled backups", Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("scheduled backup committed")
            .count()
            >= 2
    });
    let metrics = support::http_get(port, "/metrics", Duration::from_secs(5)).unwrap();
    assert!(metrics.contains("etcd_backup_cycles_total"));
    seen.push_str(&metrics);
    assert!(Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap()
        .success());
    assert!(daemon.wait().unwrap().success());
    let daemon_log = std::fs::read_to_string(&log).unwrap();
    assert!(
        daemon_log.contains("readable by every user"),
        "the daemon did not warn about the config file's mode"
    );
    seen.push_str(&daemon_log);
    // Every manifest in the store.
    let o = run(&mut seen, &["list", "--config", cfg, "--json"], true);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store_cfg =
        etcd_backup::config::Config::load_with_env(&config, Some(Default::default())).unwrap();
    let store = etcd_backup::store::BackupStore::open(&store_cfg.storage, "leak").unwrap();
    let listing = rt.block_on(store.list()).unwrap();
    assert_eq!(listing.backups.len(), list.as_array().unwrap().len());
    assert!(listing.backups.len() >= 3);
    for m in &listing.backups {
        assert!(m.encryption.is_some());
        seen.push_str(&serde_json::to_string(m).unwrap());
    }

    for (what, secret) in [
        ("the S3 secret key", g.secret_access_key.as_str()),
        ("the SSE-C key", sse_key.as_str()),
        ("the age identity", age_secret.as_str()),
        ("the etcd password", etcd_password.as_str()),
        ("the wrong etcd password", "wrong-etcd-pw-77"),
    ] {
        assert!(
            !seen.contains(secret),
            "{what} appears in the output:\n{}",
            seen.lines()
                .filter(|l| l.contains(secret))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
