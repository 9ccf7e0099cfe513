//! Tests against real snapshots from etcd 3.5.1 and 3.4.23 (`tests/fixtures/snapshots`,
//! made as its README says) and against corrupted copies of them made here.

use super::bbolt::{self, fnv1a64};
use super::etcd_layout::EtcdLayout;
use super::*;
use proptest::prelude::*;
use std::time::{Duration, Instant};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/snapshots");
const ALL: [&str; 4] = [
    "etcd-3.5.1-tiny",
    "etcd-3.5.1-history",
    "etcd-3.4.23-tiny",
    "etcd-3.4.23-history",
];
const FULL: VerifyOptions = VerifyOptions {
    check_trailer: true,
};
const NO_TRAILER: VerifyOptions = VerifyOptions {
    check_trailer: false,
};
const PS: usize = 4096;

fn path(name: &str, ext: &str) -> PathBuf {
    Path::new(FIXTURES).join(format!("{name}{ext}"))
}

fn load(name: &str) -> Vec<u8> {
    std::fs::read(path(name, ".db")).unwrap()
}

/// A number from a flat JSON object such as `{"hash":123,"revision":4}`.
fn json_u64(name: &str, ext: &str, field: &str) -> u64 {
    let text = std::fs::read_to_string(path(name, ext)).unwrap();
    let at = text
        .find(&format!("\"{field}\""))
        .unwrap_or_else(|| panic!("{field} in {text}"));
    let rest = &text[at + field.len() + 2..];
    let rest = rest.trim_start_matches([':', ' ']);
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().unwrap()
}

fn walk_stats(bytes: &[u8]) -> bbolt::WalkSummary {
    let choice = bbolt::choose_meta(bytes, (bytes.len() - 32) as u64).unwrap();
    bbolt::walk(bytes, &choice.meta, &mut EtcdLayout::default()).unwrap()
}

#[test]
fn fixtures_agree_with_etcdutl_snapshot_status() {
    for name in ALL {
        let r = verify_file(&path(name, ".db"), &FULL).unwrap_or_else(|e| panic!("{name}: {e}"));
        let status = ".status.json";
        assert_eq!(
            u64::from(r.hash),
            json_u64(name, status, "hash"),
            "{name}: hash"
        );
        assert_eq!(
            r.revision,
            json_u64(name, status, "revision") as i64,
            "{name}: revision"
        );
        assert_eq!(
            r.total_key_entries,
            json_u64(name, status, "totalKey"),
            "{name}: totalKey"
        );
        assert_eq!(
            r.page_count * u64::from(r.page_size),
            json_u64(name, status, "totalSize"),
            "{name}: totalSize"
        );
        assert_eq!(
            r.live_keys,
            json_u64(name, ".extra.json", "liveKeys"),
            "{name}: live keys"
        );
        assert_eq!(r.file_size, r.page_count * u64::from(r.page_size) + 32);
        assert!(r.has_trailer && r.trailer_checked, "{name}");
        assert_eq!(
            (r.meta_used, r.meta_warning.as_deref()),
            (0, None),
            "{name}"
        );
        assert_eq!(r.page_size, 4096, "{name}");
        assert!(r.consistent_index.is_some_and(|c| c > 0), "{name}");
        assert_eq!(
            r.storage_version, None,
            "{name}: no storageVersion before 3.6"
        );
        for b in [
            "key", "meta", "lease", "members", "cluster", "alarm", "auth",
        ] {
            assert!(r.buckets.iter().any(|x| x == b), "{name}: bucket {b}");
        }
        let mut sorted = r.buckets.clone();
        sorted.sort();
        assert_eq!(sorted, r.buckets, "{name}: buckets in key order");
        // etcd 3.5 stores the raft term; 3.4 does not.
        assert_eq!(r.term.is_some(), name.contains("3.5"), "{name}: term");
    }
}

#[test]
fn fixtures_cover_inline_buckets_branch_and_overflow_pages() {
    for name in ALL {
        let s = walk_stats(&load(name));
        if name.ends_with("tiny") {
            assert!(s.inline_buckets >= 5, "{name}: {s:?}");
        } else {
            assert!(s.branch_pages >= 2, "{name}: {s:?}");
            assert!(s.leaf_pages >= 50, "{name}: {s:?}");
            assert!(s.overflow_pages >= 5, "{name}: {s:?}");
            assert!(
                s.unreachable_pages > 0,
                "{name}: free pages after compaction: {s:?}"
            );
        }
    }
}

#[test]
fn live_keys_counted_in_partitions_match_the_server() {
    for name in ["etcd-3.5.1-history", "etcd-3.4.23-history"] {
        let b = load(name);
        let choice = bbolt::choose_meta(&b[..], (b.len() - 32) as u64).unwrap();
        let mut first = EtcdLayout::with_live_key_limit(100, 0, 1);
        bbolt::walk(&b[..], &choice.meta, &mut first).unwrap();
        let s = first.finish().unwrap();
        assert_eq!(s.live_keys, None, "{name}: over a limit of 100");
        let live = EtcdLayout::live_keys_only(s.key_entries, 100, |l| {
            bbolt::walk(&b[..], &choice.meta, l).map(|_| ())
        })
        .unwrap();
        assert_eq!(live, json_u64(name, ".extra.json", "liveKeys"), "{name}");
    }
}

#[test]
fn memory_and_slices_give_the_same_report_as_files() {
    let s = load("etcd-3.5.1-history");
    let a = verify_bytes(&s, &FULL).unwrap();
    let b = verify_file(&path("etcd-3.5.1-history", ".db"), &FULL).unwrap();
    assert_eq!(a, b);
    let c = verify_bytes(&s, &NO_TRAILER).unwrap();
    assert!(!c.trailer_checked);
    assert_eq!(c.hash, a.hash);
}

/// The history fixture from 3.5.1, the base of the corrupted corpus.
fn sample() -> &'static [u8] {
    static S: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    S.get_or_init(|| load("etcd-3.5.1-history"))
}

fn header(b: &[u8], p: usize) -> (u64, u16, u16, u32) {
    let h = &b[p * PS..p * PS + 16];
    (
        u64::from_le_bytes(h[..8].try_into().unwrap()),
        u16::from_le_bytes([h[8], h[9]]),
        u16::from_le_bytes([h[10], h[11]]),
        u32::from_le_bytes(h[12..16].try_into().unwrap()),
    )
}

fn u32_at(b: &[u8], o: usize) -> usize {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize
}

/// The pages the walk reaches.
fn reached(b: &[u8]) -> Vec<bool> {
    let choice = bbolt::choose_meta(b, (b.len() - 32) as u64).unwrap();
    bbolt::reached_pages(b, &choice.meta).unwrap()
}

/// Reached tree pages (not overflow pages) with the given flags.
fn live_pages_with(b: &[u8], flags: u16) -> Vec<usize> {
    let reached = reached(b);
    let mut pages = Vec::new();
    let mut p = 2;
    while p < reached.len() {
        let (id, f, _, overflow) = header(b, p);
        if reached[p] && id == p as u64 && f == flags {
            pages.push(p);
        }
        p += if reached[p] { overflow as usize + 1 } else { 1 };
    }
    pages
}

/// Free pages: not reached.
fn free_pages(b: &[u8]) -> Vec<usize> {
    let reached = reached(b);
    (2..reached.len()).filter(|&p| !reached[p]).collect()
}

fn expect_page_fault(b: &[u8], faults: &[PageFault], page: Option<usize>) -> String {
    match verify_bytes(b, &NO_TRAILER) {
        Err(e @ VerifyError::Page { .. }) => {
            let VerifyError::Page {
                fault, page: at, ..
            } = &e
            else {
                unreachable!()
            };
            assert!(faults.contains(fault), "expected {faults:?}, got {e}");
            if let Some(p) = page {
                assert_eq!(*at, p as u64, "{e}");
            }
            let m = e.to_string();
            assert!(
                m.contains(&format!("page {at} (offset {})", at * PS as u64)),
                "{m}"
            );
            m
        }
        Err(other) => panic!("expected a page error {faults:?}, got: {other}"),
        Ok(r) => panic!("a corrupted file passed verification: {r:?}"),
    }
}

fn expect_trailer_mismatch(b: &[u8]) {
    match verify_bytes(b, &FULL) {
        Err(VerifyError::TrailerMismatch { offset, .. }) => {
            assert_eq!(offset, b.len() as u64 - 32);
        }
        other => panic!("expected a trailer mismatch, got {other:?}"),
    }
}

/// Rewrites a u64 field of the meta structs (offset within the meta) in both meta
/// pages, with valid checksums.
fn set_meta_u64(b: &mut [u8], field: usize, value: u64) {
    for m in [16, PS + 16] {
        b[m + field..m + field + 8].copy_from_slice(&value.to_le_bytes());
        let sum = fnv1a64(&b[m..m + 56]);
        b[m + 56..m + 64].copy_from_slice(&sum.to_le_bytes());
    }
}

#[test]
fn truncated_files_are_rejected() {
    let s = sample();
    let half = &s[..s.len() / 2 + 100];
    assert!(matches!(
        verify_bytes(half, &FULL),
        Err(VerifyError::TrailerMissing { .. })
    ));
    match verify_bytes(half, &NO_TRAILER) {
        Err(e @ VerifyError::Length { .. }) => assert!(e.to_string().contains("truncated"), "{e}"),
        other => panic!("{other:?}"),
    }
    // One page short, trailer kept.
    let mut short = s[..s.len() - 32 - PS].to_vec();
    short.extend_from_slice(&s[s.len() - 32..]);
    expect_trailer_mismatch(&short);
    match verify_bytes(&short, &NO_TRAILER) {
        Err(e @ VerifyError::Length { .. }) => {
            let m = e.to_string();
            assert!(
                m.contains("truncated")
                    && m.contains(&format!("says {} pages", (s.len() - 32) / PS)),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The trailer cut off: the database is intact but not a streamed snapshot.
    let raw = &s[..s.len() - 32];
    assert!(matches!(
        verify_bytes(raw, &FULL),
        Err(VerifyError::TrailerMissing { .. })
    ));
    let r = verify_bytes(raw, &NO_TRAILER).unwrap();
    assert!(!r.has_trailer);
    // 100 bytes: meta page 0 is readable, the rest is missing.
    assert!(matches!(
        verify_bytes(&s[..100], &NO_TRAILER),
        Err(VerifyError::Length { .. })
    ));
    assert!(matches!(
        verify_bytes(&[], &NO_TRAILER),
        Err(VerifyError::Meta { .. })
    ));
    assert!(matches!(
        verify_bytes(&[0u8; 32], &FULL),
        Err(VerifyError::TrailerMismatch { .. })
    ));
    assert!(matches!(
        verify_bytes(&[0u8; 32], &NO_TRAILER),
        Err(VerifyError::Meta { .. })
    ));
    // Bytes appended.
    let mut long = s[..s.len() - 32].to_vec();
    long.extend_from_slice(&[0u8; PS]);
    match verify_bytes(&long, &NO_TRAILER) {
        Err(e @ VerifyError::Length { .. }) => assert!(e.to_string().contains("longer"), "{e}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn one_bad_meta_page_falls_back_to_the_other() {
    let s = sample();
    let good = verify_bytes(s, &NO_TRAILER).unwrap();
    let mut one = s.to_vec();
    one[16 + 20] ^= 0x40; // meta 0's root field: the checksum no longer matches
    let r = verify_bytes(&one, &NO_TRAILER).unwrap();
    assert_eq!(r.meta_used, 1);
    assert_eq!(r.txid, good.txid - 1, "meta 1 has the previous txid");
    let w = r.meta_warning.as_deref().unwrap();
    assert!(w.contains("meta page 0") && w.contains("checksum"), "{w}");
    assert_eq!((r.hash, r.revision), (good.hash, good.revision));
    // The trailer catches the damage.
    expect_trailer_mismatch(&one);

    // Meta 1 damaged: meta 0 is used, with a warning.
    let mut other = s.to_vec();
    other[PS + 16] ^= 0x01; // meta 1's magic
    let r = verify_bytes(&other, &NO_TRAILER).unwrap();
    assert_eq!(r.meta_used, 0);
    assert!(r.meta_warning.unwrap().contains("meta page 1: bad magic"));

    // Meta 0's page header (outside the checksum).
    let mut hdr = s.to_vec();
    hdr[8] = 0x02;
    let r = verify_bytes(&hdr, &NO_TRAILER).unwrap();
    assert_eq!(r.meta_used, 1);
}

#[test]
fn two_bad_meta_pages_are_rejected() {
    let s = sample();
    let mut both = s.to_vec();
    both[16 + 20] ^= 0x40;
    both[PS + 16 + 44] ^= 0x01;
    match verify_bytes(&both, &NO_TRAILER) {
        Err(e @ VerifyError::Meta { .. }) => {
            let m = e.to_string();
            assert!(m.contains("meta page 0: checksum mismatch"), "{m}");
            assert!(
                m.contains("meta page 1: at offset 4096: checksum mismatch"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    // A big-endian database is named as such.
    let mut be = s.to_vec();
    for m in [16, PS + 16] {
        be[m..m + 4].reverse();
    }
    let e = verify_bytes(&be, &NO_TRAILER).unwrap_err();
    assert!(e.to_string().contains("big-endian"), "{e}");
}

#[test]
fn meta_pointing_outside_or_at_the_wrong_page_is_rejected() {
    let s = sample();
    // Root beyond the end: both metas are then invalid.
    let mut far = s.to_vec();
    set_meta_u64(&mut far, 16, 1 << 40);
    assert!(matches!(
        verify_bytes(&far, &NO_TRAILER),
        Err(VerifyError::Meta { .. })
    ));
    // Root at a live leaf of bucket `key`: wrong tree, not an etcd layout.
    let leaf = live_pages_with(s, 0x02)[3];
    let mut wrong = s.to_vec();
    set_meta_u64(&mut wrong, 16, leaf as u64);
    assert!(verify_bytes(&wrong, &NO_TRAILER).is_err());
    // Page count one less: the length check names it.
    let mut pg = s.to_vec();
    let pgid = u64::from_le_bytes(s[16 + 40..16 + 48].try_into().unwrap());
    set_meta_u64(&mut pg, 40, pgid - 1);
    assert!(matches!(
        verify_bytes(&pg, &NO_TRAILER),
        Err(VerifyError::Length { .. })
    ));
}

#[test]
fn branch_page_damage_is_rejected() {
    let s = sample();
    let b = live_pages_with(s, 0x01)[0];
    let e0 = b * PS + 16;
    // The first child pointing at the branch page itself: a cycle.
    let mut cyc = s.to_vec();
    cyc[e0 + 8..e0 + 16].copy_from_slice(&(b as u64).to_le_bytes());
    let m = expect_page_fault(&cyc, &[PageFault::ReachedTwice], Some(b));
    assert!(m.contains("cycle"), "{m}");
    // Two children pointing at the same page.
    let mut shared = s.to_vec();
    let second = s[e0 + 16 + 8..e0 + 16 + 16].to_vec();
    shared[e0 + 8..e0 + 16].copy_from_slice(&second);
    expect_page_fault(
        &shared,
        &[PageFault::BranchKeyMismatch, PageFault::ReachedTwice],
        None,
    );
    // A child out of range names the branch page and element.
    let mut oob = s.to_vec();
    oob[e0 + 8..e0 + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    let m = expect_page_fault(&oob, &[PageFault::OutOfBounds], Some(b));
    assert!(
        m.contains(&format!("page {b} element 0 points to page")),
        "{m}"
    );
    // A key byte: no longer the child's first key.
    let mut key = s.to_vec();
    let pos = u32_at(s, e0);
    key[e0 + pos + 16] ^= 0x01;
    expect_page_fault(
        &key,
        &[PageFault::BranchKeyMismatch, PageFault::KeyOrder],
        None,
    );
    // The branch page's flags.
    let mut flags = s.to_vec();
    flags[b * PS + 8] = 0x03;
    let m = expect_page_fault(&flags, &[PageFault::WrongType], Some(b));
    assert!(m.contains("0x0003"), "{m}");
    // Element count beyond the page.
    let mut count = s.to_vec();
    count[b * PS + 10..b * PS + 12].copy_from_slice(&0xFFFEu16.to_le_bytes());
    expect_page_fault(&count, &[PageFault::BadElement], Some(b));
}

#[test]
fn leaf_page_damage_is_rejected() {
    let s = sample();
    // A live leaf of bucket `key` with several elements, whose first two keys differ in
    // their main revision.
    let key_at = |p: usize, i: usize| {
        let e = p * PS + 16 + i * 16;
        let k = e + u32_at(s, e + 4);
        &s[k..k + u32_at(s, e + 8)]
    };
    let l = *live_pages_with(s, 0x02)
        .iter()
        .find(|&&p| {
            header(s, p).2 > 3
                && key_at(p, 0).len() == 17
                && key_at(p, 0)[..8] != key_at(p, 1)[..8]
                && key_at(p, 0)[16] < 255
        })
        .unwrap();
    let e = |i: usize| l * PS + 16 + i * 16;
    // Element 1's key made smaller than element 0's.
    let mut order = s.to_vec();
    let k1 = e(1) + u32_at(s, e(1) + 4);
    order[k1..k1 + 8].fill(0);
    let m = expect_page_fault(&order, &[PageFault::KeyOrder], Some(l));
    assert!(
        m.contains("element 1's key") && m.contains("out of order"),
        "{m}"
    );
    // Element 0's sub revision raised: still ordered, but the parent's key for the page
    // no longer matches.
    let mut first = s.to_vec();
    let k0 = e(0) + u32_at(s, e(0) + 4);
    first[k0 + 16] = first[k0 + 16].wrapping_add(1);
    expect_page_fault(&first, &[PageFault::BranchKeyMismatch], Some(l));
    // Element 0's main revision raised past element 1's.
    let mut up = s.to_vec();
    up[k0] ^= 0x40;
    let m = expect_page_fault(&up, &[PageFault::KeyOrder], Some(l));
    assert!(m.contains("element 1's key"), "{m}");
    // A key byte in the middle of a revision: its '_' separator.
    let mut sep = s.to_vec();
    let k2 = e(2) + u32_at(s, e(2) + 4);
    sep[k2 + 8] = b'-';
    match verify_bytes(&sep, &NO_TRAILER) {
        Err(err @ VerifyError::Etcd { .. }) => {
            let m = err.to_string();
            assert!(
                m.contains(&format!("page {l}, element 2")) && m.contains("'_'"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    // An element's key size far beyond the page.
    let mut big = s.to_vec();
    big[e(2) + 8..e(2) + 12].copy_from_slice(&100_000u32.to_le_bytes());
    let m = expect_page_fault(&big, &[PageFault::BadElement], Some(l));
    assert!(m.contains("element 2") && m.contains("outside"), "{m}");
    // An element's value size past the page span.
    let mut val = s.to_vec();
    val[e(1) + 12..e(1) + 16].copy_from_slice(&(PS as u32).to_le_bytes());
    expect_page_fault(&val, &[PageFault::BadElement], Some(l));
    // A key position pointing back into the element table.
    let mut pos = s.to_vec();
    pos[e(0) + 4..e(0) + 8].copy_from_slice(&0u32.to_le_bytes());
    expect_page_fault(&pos, &[PageFault::BadElement], Some(l));
    // Unknown element flags.
    let mut flags = s.to_vec();
    flags[e(0)] = 0x7;
    let m = expect_page_fault(&flags, &[PageFault::BadElement], Some(l));
    assert!(m.contains("unknown flags"), "{m}");
    // A bucket flag on a plain value: its value is no bucket header.
    let mut bucket = s.to_vec();
    bucket[e(0)] = 0x1;
    assert!(verify_bytes(&bucket, &NO_TRAILER).is_err());
    // 4 billion overflow pages: an error, not an allocation.
    let mut over = s.to_vec();
    over[l * PS + 12..l * PS + 16].copy_from_slice(&u32::MAX.to_le_bytes());
    let m = expect_page_fault(&over, &[PageFault::OutOfBounds], Some(l));
    assert!(m.contains("4294967295 overflow pages"), "{m}");
}

#[test]
fn swapped_zeroed_and_cyclic_pages_are_rejected() {
    let s = sample();
    let leaves = live_pages_with(s, 0x02);
    let (a, b) = (leaves[5], leaves[9]);
    let mut swapped = s.to_vec();
    let (pa, pb) = (
        s[a * PS..(a + 1) * PS].to_vec(),
        s[b * PS..(b + 1) * PS].to_vec(),
    );
    swapped[a * PS..(a + 1) * PS].copy_from_slice(&pb);
    swapped[b * PS..(b + 1) * PS].copy_from_slice(&pa);
    let m = expect_page_fault(&swapped, &[PageFault::WrongId], None);
    assert!(
        m.contains(&format!("has id {b}")) || m.contains(&format!("has id {a}")),
        "{m}"
    );

    let mut zero = s.to_vec();
    zero[a * PS..(a + 1) * PS].fill(0);
    let m = expect_page_fault(&zero, &[PageFault::WrongId], Some(a));
    assert!(m.contains("has id 0"), "{m}");

    // Bucket `key`'s root pointed at the root page: a cycle through the bucket tree.
    let root = u64::from_le_bytes(s[16 + 16..16 + 24].try_into().unwrap()) as usize;
    let (_, _, n, _) = header(s, root);
    let key_elem = (0..n as usize)
        .map(|i| root * PS + 16 + i * 16)
        .find(|&e| {
            let k = e + u32_at(s, e + 4);
            &s[k..k + u32_at(s, e + 8)] == b"key"
        })
        .unwrap();
    let v = key_elem + u32_at(s, key_elem + 4) + 3;
    let mut cyc = s.to_vec();
    cyc[v..v + 8].copy_from_slice(&(root as u64).to_le_bytes());
    let m = expect_page_fault(&cyc, &[PageFault::ReachedTwice], Some(root));
    assert!(m.contains(&format!("from page {root} element")), "{m}");
}

#[test]
fn trailer_damage_is_caught_only_by_the_trailer_check() {
    let s = sample();
    let mut t = s.to_vec();
    let n = t.len();
    t[n - 5] ^= 0x80;
    expect_trailer_mismatch(&t);
    verify_bytes(&t, &NO_TRAILER).unwrap();
    // Damage in a free page: only the trailer sees it.
    let free = free_pages(s)[0];
    let mut z = s.to_vec();
    z[free * PS + 100] ^= 1;
    expect_trailer_mismatch(&z);
}

#[test]
fn inline_bucket_damage_is_rejected() {
    let s = load("etcd-3.5.1-tiny");
    let root = u64::from_le_bytes(s[16 + 16..16 + 24].try_into().unwrap()) as usize;
    let (_, _, n, _) = header(&s, root);
    // The first inline bucket of the root page.
    let e = (0..n as usize)
        .map(|i| root * PS + 16 + i * 16)
        .find(|&e| {
            let v = e + u32_at(&s, e + 4) + u32_at(&s, e + 8);
            s[e] == 1 && s[v..v + 8] == [0; 8]
        })
        .unwrap();
    let page = e + u32_at(&s, e + 4) + u32_at(&s, e + 8) + 16;
    let mut flags = s.clone();
    flags[page + 8] = 0x01;
    let m = expect_page_fault(&flags, &[PageFault::BadElement], Some(root));
    assert!(m.contains("inline bucket"), "{m}");
    let mut count = s.clone();
    count[page + 10] = 0xF0;
    let m = expect_page_fault(&count, &[PageFault::BadElement], Some(root));
    assert!(m.contains("inline bucket"), "{m}");
}

/// A freelist page built from the free pages of a fixture, referenced from both metas.
fn with_freelist(s: &[u8]) -> (Vec<u8>, Vec<u64>, usize) {
    let free = free_pages(s);
    let (fl, rest) = free.split_first().unwrap();
    let ids: Vec<u64> = rest.iter().map(|&p| p as u64).collect();
    let mut b = s.to_vec();
    let at = fl * PS;
    b[at..at + PS].fill(0);
    b[at..at + 8].copy_from_slice(&(*fl as u64).to_le_bytes());
    b[at + 8..at + 10].copy_from_slice(&0x10u16.to_le_bytes());
    b[at + 10..at + 12].copy_from_slice(&(ids.len() as u16).to_le_bytes());
    for (i, id) in ids.iter().enumerate() {
        b[at + 16 + i * 8..at + 24 + i * 8].copy_from_slice(&id.to_le_bytes());
    }
    set_meta_u64(&mut b, 32, *fl as u64);
    (b, ids, *fl)
}

#[test]
fn a_stored_freelist_is_checked() {
    let (b, ids, fl) = with_freelist(sample());
    let r = verify_bytes(&b, &NO_TRAILER).unwrap();
    assert_eq!(r.unreachable_pages, ids.len() as u64, "free pages");
    // One free page left out: unreachable and unfreed.
    let mut lost = b.clone();
    let at = fl * PS;
    lost[at + 10..at + 12].copy_from_slice(&(ids.len() as u16 - 1).to_le_bytes());
    expect_page_fault(
        &lost,
        &[PageFault::Unreachable],
        Some(*ids.last().unwrap() as usize),
    );
    // A live page listed as free.
    let mut used = b.clone();
    let live = live_pages_with(sample(), 0x02)[0] as u64;
    used[at + 16..at + 24].copy_from_slice(&live.to_le_bytes());
    expect_page_fault(&used, &[PageFault::FreeAndUsed], Some(live as usize));
    // A page freed twice.
    let mut twice = b.clone();
    twice.copy_within(at + 16..at + 24, at + 24);
    expect_page_fault(&twice, &[PageFault::Freelist], Some(fl));
    // A count beyond the page.
    let mut huge = b.clone();
    huge[at + 10..at + 12].copy_from_slice(&0xFFFFu16.to_le_bytes());
    huge[at + 16..at + 24].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_page_fault(&huge, &[PageFault::Freelist], Some(fl));
}

#[test]
fn unreadable_files_name_the_path() {
    let e = verify_file(Path::new("/nonexistent/snap.db"), &FULL).unwrap_err();
    assert!(matches!(e, VerifyError::Io { .. }));
    assert!(e.to_string().contains("/nonexistent/snap.db"), "{e}");
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, bit: u8 },
    Set { at: usize, byte: u8 },
    Truncate { len: usize },
    Splice { from: usize, to: usize, len: usize },
}

fn mutation(n: usize) -> impl Strategy<Value = Mutation> {
    // Half of the mutations hit page headers and element tables, where they matter most.
    let hot = (0..n / PS, 0usize..160).prop_map(|(p, o)| p * PS + o);
    prop_oneof![
        (0..n, 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (hot.clone(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        (hot, any::<u8>()).prop_map(|(at, byte)| Mutation::Set { at, byte }),
        (0..n).prop_map(|len| Mutation::Truncate { len }),
        (0..n, 0..n, 1usize..9000).prop_map(|(from, to, len)| Mutation::Splice { from, to, len }),
    ]
}

fn apply(b: &mut Vec<u8>, m: &Mutation) {
    match *m {
        Mutation::Flip { at, bit } => {
            if at < b.len() {
                b[at] ^= 1 << bit;
            }
        }
        Mutation::Set { at, byte } => {
            if at < b.len() {
                b[at] = byte;
            }
        }
        Mutation::Truncate { len } => b.truncate(len),
        Mutation::Splice { from, to, len } => {
            if from < b.len() && to < b.len() {
                let len = len.min(b.len() - from).min(b.len() - to);
                b.copy_within(from..from + len, to);
            }
        }
    }
}

proptest! {
    // PROPTEST_CASES raises the count for longer runs.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Mutated snapshots never panic or hang; when verification passes, the report is
    /// consistent with the file.
    #[test]
    fn mutated_snapshots_never_panic(
        which in 0usize..2,
        muts in proptest::collection::vec(mutation(sample().len()), 1..6),
    ) {
        let mut b = if which == 0 { sample().to_vec() } else { load("etcd-3.4.23-tiny") };
        for m in &muts {
            apply(&mut b, m);
        }
        let started = Instant::now();
        let r = verify_bytes(&b, &NO_TRAILER);
        prop_assert!(started.elapsed() < Duration::from_secs(5));
        if let Ok(rep) = r {
            prop_assert!(rep.page_count * u64::from(rep.page_size) <= b.len() as u64);
            prop_assert!(rep.buckets.iter().any(|b| b == "key"));
        } else if let Err(e) = r {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}
