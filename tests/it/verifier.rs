//! The built-in snapshot verifier against real snapshots from etcd 3.5.1 and 3.4.23:
//! it must agree with `etcdutl`/`etcdctl snapshot status` on hash, revision, key count and
//! size, and reject every kind of corruption with a message naming what and where (mutated
//! files that must never panic are a property test in `src/verify/tests.rs`).

use crate::support::etcd::{EtcdBins, EtcdCluster, EtcdVersion};
use etcd_backup::verify::{verify_bytes, verify_file, VerifyError, VerifyOptions};
use std::path::Path;
use std::sync::OnceLock;

const NO_TRAILER_CHECK: VerifyOptions = VerifyOptions {
    check_trailer: false,
};
const FULL: VerifyOptions = VerifyOptions {
    check_trailer: true,
};

/// Writes `mb` megabytes of Kubernetes-like values with history (overwrites, deletes, a
/// lease, values large enough for overflow pages).
async fn load(endpoint: &str, mb: usize) {
    let c = etcd_client::Client::connect([endpoint], None)
        .await
        .unwrap();
    let lease = c.lease_client().grant(3600, None).await.unwrap().id();
    let mut tasks = Vec::new();
    let per_task = mb.div_ceil(4);
    for t in 0..4usize {
        let mut kv = c.kv_client();
        tasks.push(tokio::spawn(async move {
            let mut written = 0usize;
            let mut i = 0usize;
            while written < per_task << 20 {
                let mut ops = Vec::new();
                for j in 0..16 {
                    let n = t * 1_000_000 + i * 16 + j;
                    // Mostly 1–12 KiB, every 50th 40 KiB (several overflow pages).
                    let size = if n.is_multiple_of(50) {
                        40_000
                    } else {
                        1024 + (n * 7919) % 11_000
                    };
                    let body: String =
                        format!("{{\"kind\":\"ConfigMap\",\"name\":\"cm-{n}\",\"data\":\"")
                            .chars()
                            .chain((0..size).map(|k| (b'a' + ((k * 31 + n) % 26) as u8) as char))
                            .collect();
                    written += body.len();
                    ops.push(etcd_client::TxnOp::put(
                        format!("/registry/configmaps/ns{}/cm-{n}", n % 13),
                        body,
                        None,
                    ));
                }
                kv.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
                if i.is_multiple_of(5) {
                    let n = t * 1_000_000 + i * 16;
                    kv.put(
                        format!("/registry/configmaps/ns{}/cm-{n}", n % 13),
                        "overwritten",
                        None,
                    )
                    .await
                    .unwrap();
                }
                if i.is_multiple_of(7) {
                    let n = t * 1_000_000 + i * 16 + 1;
                    kv.delete(format!("/registry/configmaps/ns{}/cm-{n}", n % 13), None)
                        .await
                        .unwrap();
                }
                i += 1;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    c.kv_client()
        .put(
            "/registry/leases/held",
            "x",
            Some(etcd_client::PutOptions::new().with_lease(lease)),
        )
        .await
        .unwrap();
}

/// `snapshot save` with the version's own etcdctl, then `snapshot status -w json`.
fn save_and_status(
    cluster: &EtcdCluster,
    bins: &EtcdBins,
    dir: &Path,
) -> (Vec<u8>, serde_json::Value) {
    let file = dir.join("snap.db");
    let o = cluster.etcdctl(0, &["snapshot", "save", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut cmd = match &bins.etcdutl {
        Some(u) => std::process::Command::new(u),
        None => {
            let mut c = std::process::Command::new(&bins.etcdctl);
            c.env("ETCDCTL_API", "3");
            c
        }
    };
    let o = cmd
        .args(["snapshot", "status", "-w", "json"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let status: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    (std::fs::read(&file).unwrap(), status)
}

fn assert_agrees(bytes: &[u8], status: &serde_json::Value, label: &str) {
    let started = std::time::Instant::now();
    let r = verify_bytes(bytes, &FULL).unwrap_or_else(|e| panic!("{label}: {e}"));
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{label}: {} MB verified in {secs:.3} s ({:.0} MB/s)",
        bytes.len() / 1_000_000,
        bytes.len() as f64 / 1e6 / secs
    );
    assert_eq!(
        u64::from(r.hash),
        status["hash"].as_u64().unwrap(),
        "{label}: hash"
    );
    assert_eq!(
        r.revision,
        status["revision"].as_i64().unwrap(),
        "{label}: revision"
    );
    // etcd 3.4 and 3.5 count every entry of every bucket; 3.6+ would count live keys.
    assert_eq!(
        r.total_key_entries,
        status["totalKey"].as_u64().unwrap(),
        "{label}: total keys"
    );
    assert_eq!(
        r.page_count * u64::from(r.page_size),
        status["totalSize"].as_u64().unwrap(),
        "{label}: total size"
    );
    assert!(r.has_trailer);
    assert!(r.live_keys > 0 && r.live_keys < r.total_key_entries);
    assert!(r.buckets.iter().any(|b| b == "key") && r.consistent_index.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn agrees_with_etcdutl_on_small_and_large_snapshots_of_3_5_and_3_4() {
    for version in [EtcdVersion::V3_5_1, EtcdVersion::V3_4_23] {
        let bins = EtcdBins::get(version);
        let cluster = EtcdCluster::start(&bins, 1);
        let dir = tempfile::tempdir().unwrap();
        load(&cluster.client_url(0), 2).await;
        let (small, status) = save_and_status(&cluster, &bins, dir.path());
        assert_agrees(&small, &status, &format!("{version:?} small"));
        load(&cluster.client_url(0), 100).await;
        let (large, status) = save_and_status(&cluster, &bins, dir.path());
        assert!(large.len() > 100_000_000, "{} bytes", large.len());
        assert_agrees(&large, &status, &format!("{version:?} large"));
    }
}

/// A small real snapshot with branch pages, shared by the corruption tests.
fn sample() -> &'static Vec<u8> {
    static S: OnceLock<Vec<u8>> = OnceLock::new();
    S.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let bins = EtcdBins::get(EtcdVersion::V3_5_1);
        let cluster = EtcdCluster::start(&bins, 1);
        rt.block_on(load(&cluster.client_url(0), 1));
        let dir = tempfile::tempdir().unwrap();
        save_and_status(&cluster, &bins, dir.path()).0
    })
}

const PS: usize = 4096;

/// Page ids with the given page flags.
fn pages_with(bytes: &[u8], flags: u16) -> Vec<usize> {
    let n = (bytes.len() - 32) / PS;
    (2..n)
        .filter(|&p| {
            let h = &bytes[p * PS..p * PS + 16];
            u64::from_le_bytes(h[..8].try_into().unwrap()) == p as u64
                && u16::from_le_bytes([h[8], h[9]]) == flags
        })
        .collect()
}

fn structure_error(bytes: &[u8], opts: &VerifyOptions) -> String {
    match verify_bytes(bytes, opts) {
        Err(
            e @ (VerifyError::Page { .. } | VerifyError::Meta { .. } | VerifyError::Length { .. }),
        ) => e.to_string(),
        Err(other) => panic!("expected a structure error, got: {other}"),
        Ok(r) => panic!("a corrupted file passed verification: {r:?}"),
    }
}

#[test]
fn the_sample_is_valid_and_has_branch_and_leaf_pages() {
    let s = sample();
    verify_bytes(s, &FULL).unwrap();
    assert!(
        !pages_with(s, 0x01).is_empty(),
        "no branch page in the sample"
    );
    assert!(pages_with(s, 0x02).len() > 10);
}

#[test]
fn truncated_files_are_rejected() {
    let s = sample();
    let half = &s[..s.len() / 2];
    assert!(matches!(
        verify_bytes(half, &FULL),
        Err(VerifyError::TrailerMissing { .. } | VerifyError::TrailerMismatch { .. })
    ));
    let m = structure_error(half, &NO_TRAILER_CHECK);
    assert!(m.contains("truncated") || m.contains("pages"), "{m}");
    // One page short, trailer still present.
    let mut short = s[..s.len() - 32 - PS].to_vec();
    short.extend_from_slice(&s[s.len() - 32..]);
    let m = structure_error(&short, &NO_TRAILER_CHECK);
    assert!(m.contains("truncated"), "{m}");
    assert!(verify_bytes(&s[..100], &NO_TRAILER_CHECK).is_err());
    assert!(verify_bytes(&[], &FULL).is_err());
}

#[test]
fn meta_page_damage_is_rejected() {
    let s = sample();
    let mut one = s.clone();
    one[16 + 20] ^= 0x40; // meta 0's root field
                          // bbolt falls back to meta page 1, which describes the same database.
    let r = verify_bytes(&one, &NO_TRAILER_CHECK).unwrap();
    assert_eq!(r.meta_used, 1);
    let w = r.meta_warning.unwrap();
    assert!(w.contains("meta page 0") && w.contains("checksum"), "{w}");
    let mut both = one.clone();
    both[PS + 16 + 20] ^= 0x40;
    let m = structure_error(&both, &NO_TRAILER_CHECK);
    assert!(m.contains("neither meta page is valid"), "{m}");
    // With the trailer checked, the damage is caught before the structure is read.
    assert!(matches!(
        verify_bytes(&one, &FULL),
        Err(VerifyError::TrailerMissing { .. } | VerifyError::TrailerMismatch { .. })
    ));
}

#[test]
fn branch_page_damage_is_rejected() {
    let s = sample();
    // Freed pages can still carry a branch header; damage every page that looks like a
    // branch, so the live ones are hit whichever they are.
    let branches = pages_with(s, 0x01);
    assert!(!branches.is_empty());
    let names_a_branch = |m: &str| branches.iter().any(|b| m.contains(&format!("page {b}")));
    // Point each first child at the branch page itself: a cycle.
    let mut cyc = s.clone();
    for &b in &branches {
        cyc[b * PS + 16 + 8..b * PS + 16 + 16].copy_from_slice(&(b as u64).to_le_bytes());
    }
    let m = structure_error(&cyc, &NO_TRAILER_CHECK);
    assert!(names_a_branch(&m), "{m}");
    // A key byte: the child's first key no longer matches, or order breaks.
    let mut key = s.clone();
    for &b in &branches {
        let pos = u32::from_le_bytes(s[b * PS + 16..b * PS + 20].try_into().unwrap()) as usize;
        key[b * PS + 16 + pos] ^= 0x01;
    }
    let m = structure_error(&key, &NO_TRAILER_CHECK);
    assert!(m.contains("page"), "{m}");
    // A child id out of range.
    let mut oob = s.clone();
    for &b in &branches {
        oob[b * PS + 16 + 8..b * PS + 16 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    }
    let m = structure_error(&oob, &NO_TRAILER_CHECK);
    assert!(names_a_branch(&m) && m.contains("outside"), "{m}");
}

#[test]
fn leaf_page_damage_is_rejected() {
    let s = sample();
    // Leaves with several elements; freed pages can look like leaves too, so every one of
    // them is damaged and the live ones are hit whichever they are.
    let leaves: Vec<usize> = pages_with(s, 0x02)
        .into_iter()
        .filter(|&p| u16::from_le_bytes([s[p * PS + 10], s[p * PS + 11]]) > 3)
        .collect();
    assert!(!leaves.is_empty());
    let names_a_leaf = |m: &str| leaves.iter().any(|l| m.contains(&format!("page {l}")));
    // An element's key size far beyond the page.
    let mut big = s.clone();
    for &l in &leaves {
        let e = l * PS + 16 + ELEM_KSIZE;
        big[e..e + 4].copy_from_slice(&100_000u32.to_le_bytes());
    }
    let m = structure_error(&big, &NO_TRAILER_CHECK);
    assert!(names_a_leaf(&m) && m.contains("outside the page"), "{m}");
    // Two keys swapped in order: element 1's key made smaller than element 0's.
    let mut order = s.clone();
    for &l in &leaves {
        let e1 = l * PS + 16 + 16;
        let pos1 = u32::from_le_bytes(s[e1 + 4..e1 + 8].try_into().unwrap()) as usize;
        for k in 0..8 {
            order[e1 + pos1 + k] = 0;
        }
    }
    let m = structure_error(&order, &NO_TRAILER_CHECK);
    assert!(m.contains("out of order") || m.contains("first key"), "{m}");
    // Unknown element flags.
    let mut flags = s.clone();
    for &l in &leaves {
        flags[l * PS + 16] = 0x7;
    }
    let m = structure_error(&flags, &NO_TRAILER_CHECK);
    assert!(names_a_leaf(&m), "{m}");
}

const ELEM_KSIZE: usize = 8;

#[test]
fn swapped_and_zeroed_pages_and_trailer_damage_are_rejected() {
    let s = sample();
    let leaves = pages_with(s, 0x02);
    let (a, b) = (leaves[0], leaves[1]);
    let mut swapped = s.clone();
    let (pa, pb) = (
        s[a * PS..(a + 1) * PS].to_vec(),
        s[b * PS..(b + 1) * PS].to_vec(),
    );
    swapped[a * PS..(a + 1) * PS].copy_from_slice(&pb);
    swapped[b * PS..(b + 1) * PS].copy_from_slice(&pa);
    let m = structure_error(&swapped, &NO_TRAILER_CHECK);
    assert!(m.contains("has id") || m.contains("page"), "{m}");

    let mut zero = s.clone();
    zero[a * PS..(a + 1) * PS].fill(0);
    let m = structure_error(&zero, &NO_TRAILER_CHECK);
    assert!(m.contains(&format!("page {a}")), "{m}");

    let mut trailer = s.clone();
    let n = trailer.len();
    trailer[n - 5] ^= 0x80;
    match verify_bytes(&trailer, &FULL) {
        Err(e @ VerifyError::TrailerMismatch { .. }) => {
            assert!(e.to_string().contains("does not match"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    // The structure itself is intact.
    verify_bytes(&trailer, &NO_TRAILER_CHECK).unwrap();
}

#[test]
fn verify_file_names_the_file_when_it_cannot_be_read() {
    let e = verify_file(Path::new("/nonexistent/snap.db"), &FULL).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/snap.db"), "{e}");
}
