//! Backups as operators really leave them, against real etcd and a `file://` store: copied
//! or renamed to another cluster name or directory, taken by a node with a wrong clock,
//! planted with a future date, two clusters sharing one directory, absurd durations and a
//! compression bomb. Every scenario keeps every backup it should.

use crate::support::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
use crate::support::{etcd_backup, text};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

fn start_etcd() -> (EtcdBins, EtcdCluster) {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let cluster = EtcdCluster::start(&bins, 1);
    (bins, cluster)
}

/// Writes a configuration for `store_dir` / `cluster_name` against `etcd`.
fn config(
    dir: &Path,
    file: &str,
    etcd: &str,
    store_dir: &Path,
    name: &str,
    extra: &str,
) -> PathBuf {
    let p = dir.join(file);
    std::fs::write(
        &p,
        format!(
            "[etcd]\nendpoints = [\"{etcd}\"]\ndial_timeout = \"2s\"\n[storage]\nurl = \"file://{}\"\n[backup]\ncluster_name = \"{name}\"\nspool_dir = \"{}\"\n{extra}\n",
            store_dir.display(),
            dir.join("spool").display(),
        ),
    )
    .unwrap();
    p
}

fn run(args: &[&str]) -> Output {
    etcd_backup(args, &[])
}

fn ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    o
}

fn snapshot(cfg: &Path) -> String {
    let o = ok(&["snapshot", "--config", cfg.to_str().unwrap()]);
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

fn list(cfg: &Path, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["list", "--json", "--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = ok(&args);
    serde_json::from_slice::<Value>(&o.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn prune(cfg: &Path, extra: &[&str]) -> Value {
    let mut args = vec!["prune", "--json", "--config", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = ok(&args);
    serde_json::from_slice(&o.stdout).unwrap()
}

fn files_under(p: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd {
            let e = e.unwrap();
            if e.file_type().unwrap().is_dir() {
                out.extend(files_under(&e.path()));
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out.sort();
    out
}

fn copy_dir(from: &Path, to: &Path) {
    let o = std::process::Command::new("cp")
        .arg("-r")
        .arg(from)
        .arg(to)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
}

fn ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// Waits until every id in `ids` is older than `secs` seconds (orphan age checks use ids).
fn wait_older_than(ids: &[String], secs: i64) {
    let newest = ids
        .iter()
        .map(|id| {
            chrono::NaiveDateTime::parse_from_str(&id[..16], "%Y%m%dT%H%M%SZ")
                .unwrap()
                .and_utc()
        })
        .max()
        .unwrap();
    crate::support::wait_until("the backups to age", Duration::from_secs(60), || {
        chrono::Utc::now() > newest + chrono::Duration::seconds(secs)
    });
}

#[test]
fn copied_and_renamed_backups_stay_backups() {
    let (_bins, etcd) = start_etcd();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let url = etcd.client_url(0);
    let take = config(dir.path(), "take.toml", &url, &store, "kubernetes", "");
    let mut taken = Vec::new();
    for i in 0..5 {
        etcd.put(&format!("/k{i}"), "v");
        taken.push(snapshot(&take));
    }
    // In the order taken (revision order; ids within one second sort at random).
    let newest = taken[4].clone();
    let mut oldest_two = taken[..2].to_vec();
    oldest_two.sort();
    taken.sort();
    // Renamed cluster (another cluster name in the same directory) and another directory
    // (another prefix or bucket, as `cp -r` or `aws s3 sync` leave it).
    copy_dir(&store.join("kubernetes"), &store.join("prod"));
    let moved = dir.path().join("elsewhere");
    std::fs::create_dir_all(&moved).unwrap();
    copy_dir(&store.join("kubernetes"), &moved.join("kubernetes"));
    // Old copies: a prune's orphan age (2 x backup.timeout) has passed.
    let extra = "timeout = \"1s\"\n[retention]\nkeep_last = 10\nmin_keep = 3";
    let renamed = config(dir.path(), "renamed.toml", &url, &store, "prod", extra);
    let elsewhere = config(
        dir.path(),
        "elsewhere.toml",
        &url,
        &moved,
        "kubernetes",
        extra,
    );
    wait_older_than(&taken, 3);
    for (cfg, root) in [(&renamed, store.join("prod")), (&elsewhere, moved.clone())] {
        let before = files_under(&root);
        assert_eq!(before.len(), 10);
        let listed = list(cfg, &[]);
        let mut got = ids(&listed);
        got.sort();
        assert_eq!(got, taken, "list shows the copies");
        assert!(listed
            .iter()
            .all(|e| e["foreign"] == false && e["future"] == false));
        let o = ok(&["verify", "--all", "--config", cfg.to_str().unwrap()]);
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).matches(": OK").count(),
            5
        );
        let latest = ok(&["verify", "--config", cfg.to_str().unwrap()]);
        assert!(String::from_utf8_lossy(&latest.stdout).contains(&newest));
        let r = prune(cfg, &[]);
        assert_eq!(r["deleted"].as_array().unwrap().len(), 0, "{r}");
        assert_eq!(r["orphans_removed"].as_array().unwrap().len(), 0, "{r}");
        assert_eq!(files_under(&root), before, "prune deleted copies");
    }
    // The policy still applies to the copies, with its safety rules.
    let keep3 = config(
        dir.path(),
        "keep3.toml",
        &url,
        &store,
        "prod",
        "timeout = \"1s\"\n[retention]\nkeep_last = 3\nmin_keep = 3",
    );
    let r = prune(&keep3, &[]);
    let mut deleted: Vec<String> = r["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    deleted.sort();
    assert_eq!(deleted, oldest_two, "{r}");
    assert_eq!(files_under(&store.join("prod")).len(), 6);
    // The originals were never touched.
    assert_eq!(files_under(&store.join("kubernetes")).len(), 10);
}

/// Rewrites backup `id` in `root` as if taken at `time` (a node with that clock): its
/// directory and manifest say so; its data and revision are the real ones.
fn redate(root: &Path, id: &str, time: chrono::DateTime<chrono::Utc>, copy: bool) -> String {
    let new_id = format!("{}-{}", time.format("%Y%m%dT%H%M%SZ"), &id[17..]);
    let from = root.join(id);
    let to = root.join(&new_id);
    if copy {
        copy_dir(&from, &to);
    } else {
        std::fs::rename(&from, &to).unwrap();
    }
    let mpath = to.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    let t = time.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    m["id"] = new_id.clone().into();
    for f in ["time", "started_at", "finished_at"] {
        m[f] = t.clone().into();
    }
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    new_id
}

#[test]
fn a_wrong_clock_keeps_its_backup_and_a_future_one_is_never_latest() {
    let (_bins, etcd) = start_etcd();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = config(
        dir.path(),
        "c.toml",
        &etcd.client_url(0),
        &store,
        "kubernetes",
        "[retention]\nkeep_last = 3\nmin_keep = 1",
    );
    let mut normal = Vec::new();
    for i in 0..4 {
        etcd.put(&format!("/k{i}"), "v");
        normal.push(snapshot(&cfg));
    }
    etcd.put("/last", "v");
    let root = store.join("kubernetes");
    // The newest backup (highest revision), taken by a node 30 days behind.
    let skewed = redate(
        &root,
        &snapshot(&cfg),
        chrono::Utc::now() - chrono::Duration::days(30),
        false,
    );
    // A manifest dated a year ahead (a wrong clock, or planted), copied from an old backup.
    let future = redate(
        &root,
        &normal[1],
        chrono::Utc::now() + chrono::Duration::days(365),
        true,
    );
    let listed = list(&cfg, &[]);
    assert_eq!(listed.len(), 6);
    assert_eq!(listed[0]["id"], skewed.as_str(), "newest by revision");
    let flagged: Vec<&str> = listed
        .iter()
        .filter(|e| e["future"] == true)
        .map(|e| e["id"].as_str().unwrap())
        .collect();
    assert_eq!(flagged, vec![future.as_str()]);
    let table = ok(&["list", "--config", cfg.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("future  "));

    // `restore latest` is the skewed node's backup, not the future one.
    let out = dir.path().join("latest.db");
    let o = ok(&[
        "restore",
        "--config",
        cfg.to_str().unwrap(),
        "latest",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("restored backup {skewed}")),
        "{}",
        text(&o)
    );

    let dry = prune(&cfg, &["--dry-run"]);
    let r = prune(&cfg, &[]);
    assert_eq!(
        dry["plan"], r["plan"],
        "the dry run is the plan the real run carried out"
    );
    assert_eq!(dry["deleted"], r["deleted"]);
    let mut deleted: Vec<String> = r["deleted"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    deleted.sort();
    let mut oldest_two = normal[..2].to_vec();
    oldest_two.sort();
    assert_eq!(deleted, oldest_two, "{r}");
    assert_eq!(r["future_backups"], 1);
    let left = ids(&list(&cfg, &[]));
    assert!(left.contains(&skewed) && left.contains(&future), "{left:?}");
    // Age rules never delete the future backup either.
    let aged = config(
        dir.path(),
        "aged.toml",
        &etcd.client_url(0),
        &store,
        "kubernetes",
        "[retention]\nkeep_last = 0\nmax_age = \"1h\"\nmin_keep = 1",
    );
    prune(&aged, &[]);
    assert!(ids(&list(&cfg, &[])).contains(&future));
}

#[test]
fn two_clusters_in_one_directory_keep_each_others_backups() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let a = EtcdCluster::start(&bins, 1);
    let b = EtcdCluster::start(&bins, 1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let policy = "[retention]\nkeep_last = 1\nmin_keep = 1";
    let ca = config(
        dir.path(),
        "a.toml",
        &a.client_url(0),
        &store,
        "kubernetes",
        policy,
    );
    let cb = config(
        dir.path(),
        "b.toml",
        &b.client_url(0),
        &store,
        "kubernetes",
        policy,
    );
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for i in 0..3 {
        a.put(&format!("/a{i}"), "v");
        b.put(&format!("/b{i}"), "v");
        ta.push(snapshot(&ca));
        tb.push(snapshot(&cb));
    }
    let seen_by_a = list(&ca, &[]);
    assert_eq!(seen_by_a.len(), 6);
    let cluster_of = |id: &str| {
        seen_by_a.iter().find(|e| e["id"] == id).unwrap()["cluster_id"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (id_a, id_b) = (cluster_of(&ta[0]), cluster_of(&tb[0]));
    assert_ne!(id_a, id_b);
    for e in &seen_by_a {
        assert_eq!(
            e["foreign"] == true,
            e["cluster_id"] == id_b.as_str(),
            "{e}"
        );
    }
    // `restore latest` from each side gets its own cluster's newest.
    for (cfg, want, name) in [(&ca, &ta[2], "a.db"), (&cb, &tb[2], "b.db")] {
        let out = dir.path().join(name);
        let o = ok(&[
            "restore",
            "--config",
            cfg.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(&format!("restored backup {want}")),
            "{}",
            text(&o)
        );
    }
    // Each prune deletes only its own cluster's old backups.
    let ra = prune(&ca, &[]);
    assert_eq!(ra["foreign_backups"], 3, "{ra}");
    let left: Vec<String> = ids(&list(&ca, &[]));
    assert_eq!(left.len(), 4, "{left:?}");
    assert!(
        tb.iter().all(|id| left.contains(id)),
        "B's backups were pruned by A"
    );
    prune(&cb, &[]);
    let mut left = ids(&list(&ca, &[]));
    left.sort();
    let mut want = vec![ta[2].clone(), tb[2].clone()];
    want.sort();
    assert_eq!(left, want);

    // With etcd unreachable, what needs the local id says so; an explicit id always works,
    // and --cluster-id picks a cluster on purpose.
    let dead = config(
        dir.path(),
        "dead.toml",
        &format!("http://127.0.0.1:{}", crate::support::free_port()),
        &store,
        "kubernetes",
        policy,
    );
    let dead_s = dead.to_str().unwrap();
    let out = dir.path().join("x.db");
    let o = run(&[
        "restore",
        "--config",
        dead_s,
        "latest",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--cluster-id"),
        "{}",
        text(&o)
    );
    let o = run(&["prune", "--config", dead_s]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("etcd cannot be reached"),
        "{}",
        text(&o)
    );
    ok(&[
        "restore",
        "--config",
        dead_s,
        &tb[2],
        "--output",
        out.to_str().unwrap(),
    ]);
    let out2 = dir.path().join("y.db");
    let o = ok(&[
        "restore",
        "--config",
        dead_s,
        "--cluster-id",
        &id_a,
        "--output",
        out2.to_str().unwrap(),
    ]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&ta[2]),
        "{}",
        text(&o)
    );
}

#[test]
fn absurd_durations_exit_2_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    for (extra, key) in [
        ("timeout = \"200000y\"", "backup.timeout"),
        ("[retention]\nmax_age = \"300000y\"", "retention.max_age"),
    ] {
        let cfg = config(
            dir.path(),
            "c.toml",
            "http://127.0.0.1:1",
            &dir.path().join("store"),
            "k",
            extra,
        );
        for cmd in ["prune", "check-config"] {
            let o = run(&[cmd, "--config", cfg.to_str().unwrap()]);
            assert_eq!(o.status.code(), Some(2), "{cmd} {extra}: {}", text(&o));
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(
                err.contains(key) && err.contains("longer than the maximum"),
                "{err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}

#[test]
fn a_compression_bomb_is_stopped_at_the_declared_size() {
    let (_bins, etcd) = start_etcd();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let cfg = config(dir.path(), "c.toml", &etcd.client_url(0), &store, "k", "");
    etcd.put("/k", "v");
    let id = snapshot(&cfg);
    // 2 GiB of zeros as zstd, with the manifest's stored hash and size updated to match:
    // only the raw size and hash (checked at the end) would catch it.
    let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..2048 {
        std::io::Write::write_all(&mut enc, &zeros).unwrap();
    }
    let bomb = enc.finish().unwrap();
    let bdir = store.join("k").join(&id);
    std::fs::write(bdir.join("snapshot.db.zst"), &bomb).unwrap();
    let mpath = bdir.join("manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&mpath).unwrap()).unwrap();
    m["stored_size"] = bomb.len().into();
    use sha2::Digest;
    m["stored_sha256"] = hex_lower(&sha2::Sha256::digest(&bomb)).into();
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    let declared = m["size"].as_u64().unwrap();

    let out = dir.path().join("restored.db");
    let started = std::time::Instant::now();
    let o = run(&[
        "restore",
        "--config",
        cfg.to_str().unwrap(),
        "latest",
        "--output",
        out.to_str().unwrap(),
    ]);
    let took = started.elapsed();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains(&format!("decompresses to more than the {declared} bytes")),
        "{}",
        text(&o)
    );
    // Nothing is left: no output, no partial file.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains("restored"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    eprintln!(
        "a {} byte bomb (2 GiB raw) was rejected in {took:?}",
        bomb.len()
    );
}

/// A raw S3 client for `bucket` on the test Garage.
fn raw_s3(bucket: &str) -> object_store::aws::AmazonS3 {
    let g = crate::support::garage::garage();
    object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_endpoint(&g.s3_endpoint)
        .with_region("garage")
        .with_allow_http(true)
        .with_access_key_id(&g.access_key_id)
        .with_secret_access_key(&g.secret_access_key)
        .build()
        .unwrap()
}

/// A configuration for `s3://bucket/prefix` on the test Garage.
fn s3_config(
    dir: &Path,
    file: &str,
    etcd: &str,
    bucket: &str,
    prefix: &str,
    name: &str,
) -> PathBuf {
    let g = crate::support::garage::garage();
    let p = dir.join(file);
    std::fs::write(
        &p,
        format!(
            "[etcd]\nendpoints = [\"{etcd}\"]\n[storage]\nurl = \"s3://{bucket}/{prefix}\"\nendpoint = \"{}\"\nregion = \"garage\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n[backup]\ncluster_name = \"{name}\"\ntimeout = \"1s\"\nspool_dir = \"{}\"\n[retention]\nkeep_last = 10\nmin_keep = 3\n",
            g.s3_endpoint,
            g.access_key_id,
            g.secret_access_key,
            dir.join("spool").display(),
        ),
    )
    .unwrap();
    p
}

/// Every key in `bucket`, sorted.
async fn s3_keys(s3: &object_store::aws::AmazonS3) -> Vec<String> {
    use futures::TryStreamExt;
    use object_store::ObjectStore;
    let mut v: Vec<String> = s3
        .list(None)
        .map_ok(|o| o.location.to_string())
        .try_collect()
        .await
        .unwrap();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn backups_copied_to_another_backend_bucket_and_prefix_stay_backups() {
    use object_store::ObjectStoreExt;
    let (_bins, etcd) = start_etcd();
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let url = etcd.client_url(0);
    let take = config(dir.path(), "take.toml", &url, &store, "kubernetes", "");
    let mut taken = Vec::new();
    for i in 0..3 {
        etcd.put(&format!("/k{i}"), "v");
        taken.push(snapshot(&take));
    }
    let newest = taken[2].clone();
    taken.sort();
    // file:// -> S3 (another backend, a prefix and another cluster name), as `aws s3 sync`
    // leaves it.
    let (b1, b2) = {
        let g = crate::support::garage::garage();
        (g.create_bucket("moved-a"), g.create_bucket("moved-b"))
    };
    let s1 = raw_s3(&b1);
    for f in files_under(&store.join("kubernetes")) {
        let rel = Path::new(&f)
            .strip_prefix(store.join("kubernetes"))
            .unwrap();
        let key = format!("moved/prod/{}", rel.display());
        s1.put(
            &object_store::path::Path::from(key.as_str()),
            std::fs::read(&f).unwrap().into(),
        )
        .await
        .unwrap();
    }
    // S3 bucket -> another bucket under another prefix.
    let s2 = raw_s3(&b2);
    for k in s3_keys(&s1).await {
        let body = s1
            .get(&object_store::path::Path::from(k.as_str()))
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let key = k.replacen("moved/prod/", "deep/er/prod/", 1);
        s2.put(&object_store::path::Path::from(key.as_str()), body.into())
            .await
            .unwrap();
    }
    wait_older_than(&taken, 3);
    for (cfg, s3) in [
        (
            s3_config(dir.path(), "b1.toml", &url, &b1, "moved", "prod"),
            &s1,
        ),
        (
            s3_config(dir.path(), "b2.toml", &url, &b2, "deep/er", "prod"),
            &s2,
        ),
    ] {
        let before = s3_keys(s3).await;
        assert_eq!(before.len(), 6);
        let mut got = ids(&list(&cfg, &[]));
        got.sort();
        assert_eq!(got, taken, "list shows the copies");
        let o = ok(&["verify", "--all", "--config", cfg.to_str().unwrap()]);
        assert_eq!(
            String::from_utf8_lossy(&o.stdout).matches(": OK").count(),
            3
        );
        let out = dir.path().join(format!("{}.db", before[0].len()));
        let o = ok(&[
            "restore",
            "--config",
            cfg.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains(&newest),
            "{}",
            text(&o)
        );
        std::fs::remove_file(&out).unwrap();
        let r = prune(&cfg, &[]);
        assert_eq!(r["deleted"].as_array().unwrap().len(), 0, "{r}");
        assert_eq!(r["orphans_removed"].as_array().unwrap().len(), 0, "{r}");
        assert_eq!(s3_keys(s3).await, before, "prune deleted copies");
    }
}

#[test]
fn the_daemon_counts_and_warns_about_foreign_and_future_backups_and_keeps_them() {
    let bins = EtcdBins::get(EtcdVersion::V3_5_1);
    let ours = EtcdCluster::start(&bins, 1);
    let theirs = EtcdCluster::start(&bins, 1);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let policy = "[retention]\nkeep_last = 1\nmin_keep = 1";
    // Another cluster's backups under the same cluster name, and one of ours dated ahead.
    let other = config(
        dir.path(),
        "other.toml",
        &theirs.client_url(0),
        &store,
        "kubernetes",
        policy,
    );
    theirs.put("/t", "v");
    let foreign = [snapshot(&other), snapshot(&other)];
    let oneshot = config(
        dir.path(),
        "one.toml",
        &ours.client_url(0),
        &store,
        "kubernetes",
        policy,
    );
    ours.put("/o", "v");
    let ahead = chrono::Utc::now() + chrono::Duration::days(365);
    let future = redate(&store.join("kubernetes"), &snapshot(&oneshot), ahead, false);

    let port = crate::support::free_port();
    let cfg = config(
        dir.path(),
        "daemon.toml",
        &ours.client_url(0),
        &store,
        "kubernetes",
        &format!("{policy}\n[schedule]\ncron = \"*/2 * * * * *\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\nrefresh_interval = \"1s\"\nstore_refresh_interval = \"1s\"\n"),
    );
    let log = dir.path().join("daemon.log");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_etcd-backup"));
    cmd.args(["run", "--config", cfg.to_str().unwrap()]);
    let mut daemon = crate::support::ChildProc::spawn("etcd-backup", cmd, &log);
    let scrape =
        || crate::support::http_get(port, "/metrics", Duration::from_secs(2)).unwrap_or_default();
    let gauge = |name: &str| crate::support::metric(&scrape(), name);
    crate::support::wait_until("two pruned cycles", Duration::from_secs(60), || {
        gauge("etcd_backup_pruned_total").unwrap_or(0.0) >= 1.0
            && gauge("etcd_backup_foreign_backups") == Some(2.0)
    });
    assert_eq!(gauge("etcd_backup_future_backups"), Some(1.0));
    // The last success is ours and not from the future.
    let last = gauge("etcd_backup_last_success_timestamp_seconds").unwrap();
    assert!(
        last > 0.0 && last < (chrono::Utc::now().timestamp() + 60) as f64,
        "{last}"
    );
    let age = gauge("etcd_backup_last_success_age_seconds").unwrap();
    assert!(age >= 0.0, "{age}");
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(20));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("backups of another etcd cluster"), "{text}");
    assert!(
        text.contains("dated more than 5 minutes in the future"),
        "{text}"
    );
    // Pruned down to our newest, with every foreign and future backup still there.
    let left = ids(&list(&oneshot, &[]));
    for id in foreign.iter().chain([&future]) {
        assert!(left.contains(id), "{id} was pruned: {left:?}");
    }
    assert_eq!(left.len(), 4, "{left:?}");
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
