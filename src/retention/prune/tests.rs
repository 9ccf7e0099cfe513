use super::*;
use crate::store::manifest::{sample, Manifest};
use crate::store::testing::{faulty, keys, memory, put_backup};
use crate::store::DataObject;
use object_store::ObjectStoreExt;
use proptest::prelude::*;
use std::collections::BTreeSet;

const LOCAL: &str = "cdf818194e3a8c32";
const OTHER: &str = "aaaaaaaaaaaaaaaa";

/// Thirty days after the wall clock (whole seconds), so that objects the in-memory store
/// stamps with the real time are old enough to be orphans.
fn now() -> DateTime<Utc> {
    static NOW: std::sync::LazyLock<DateTime<Utc>> = std::sync::LazyLock::new(|| {
        let t = Utc::now() + chrono::Duration::days(30);
        DateTime::from_timestamp(t.timestamp(), 0).unwrap()
    });
    *NOW
}

/// A manifest of `cluster` taken `hours_ago` hours before [`now`] at `revision`.
fn man(hours_ago: i64, revision: i64, cluster: &str, n: u32) -> Manifest {
    let t = now() - chrono::Duration::hours(hours_ago);
    let id = format!("{}-{n:06x}", t.format("%Y%m%dT%H%M%SZ"));
    let mut m = sample(&id, t);
    m.revision = revision;
    m.cluster_id = cluster.into();
    m
}

fn policy(keep_last: u32) -> RetentionPolicy {
    RetentionPolicy {
        keep_last,
        min_keep: 1,
        max_delete_per_run: 1000,
        ..RetentionPolicy::default()
    }
}

fn input<'a>(
    listing: &'a Listing,
    layout: &'a Layout,
    policy: &'a RetentionPolicy,
    cluster: &'a str,
) -> PlanInput<'a> {
    PlanInput {
        listing,
        uploads: Ok(&[]),
        layout,
        now: now(),
        policy,
        cluster_id: cluster,
        orphan_age: Duration::from_secs(3600),
    }
}

fn deleted_ids(p: &Plan) -> BTreeSet<String> {
    p.steps
        .iter()
        .filter_map(|s| match s {
            Step::DeleteBackup { id, .. } => Some(id.to_string()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_clock_skewed_backup_with_the_highest_revision_is_the_newest() {
    let (store, _) = memory("", "kubernetes");
    for i in 0..5 {
        put_backup(&store, &man(10 - i, 100 + i, LOCAL, i as u32), Some(b"d")).await;
    }
    // Taken last (highest revision) by a node whose clock was 30 days behind.
    let skewed = man(30 * 24, 200, LOCAL, 99);
    put_backup(&store, &skewed, Some(b"d")).await;
    let listing = store.list().await.unwrap();
    assert_eq!(listing.backups[0].id, skewed.id, "ordered by revision");
    let p = plan(&input(&listing, store.layout(), &policy(3), LOCAL));
    let gone = deleted_ids(&p);
    assert!(!gone.contains(&skewed.id.to_string()), "{}", p.render());
    assert_eq!(gone.len(), 3, "{}", p.render());
    assert!(p.render().contains("newest backup"), "{}", p.render());
}

#[tokio::test]
async fn future_and_foreign_backups_are_never_deleted_nor_latest() {
    let (store, _) = memory("", "kubernetes");
    for i in 0..4 {
        put_backup(&store, &man(100 - i, 10 + i, LOCAL, i as u32), Some(b"d")).await;
        put_backup(
            &store,
            &man(100 - i, 50 + i, OTHER, 10 + i as u32),
            Some(b"d"),
        )
        .await;
    }
    let future = man(-24 * 365, 5, LOCAL, 77);
    put_backup(&store, &future, Some(b"d")).await;
    let listing = store.list().await.unwrap();
    let latest = listing.latest(now(), LOCAL).unwrap();
    assert_eq!(
        latest.revision, 13,
        "not the future one, not the other cluster's"
    );
    assert_eq!(listing.latest(now(), OTHER).unwrap().revision, 53);
    let p = plan(&input(&listing, store.layout(), &policy(1), LOCAL));
    assert_eq!(p.foreign_backups, 4);
    assert_eq!(p.future_backups, 1);
    assert_eq!(deleted_ids(&p).len(), 3, "{}", p.render());
    for s in &p.steps {
        let Step::DeleteBackup { id, .. } = s else {
            panic!("unexpected {s}")
        };
        let m = listing.backups.iter().find(|m| m.id == *id).unwrap();
        assert_eq!(m.cluster_id, LOCAL);
        assert!(!m.is_future(now()));
    }
    // Selecting the other cluster on purpose prunes its backups, and leaves ours.
    let p = plan(&input(&listing, store.layout(), &policy(1), OTHER));
    assert_eq!(p.foreign_backups, 5);
    assert_eq!(deleted_ids(&p).len(), 3);
    // max_age never ages out the future backup.
    let aged = RetentionPolicy {
        keep_last: 0,
        max_age: Some(Duration::from_secs(3600)),
        ..policy(0)
    };
    let p = plan(&input(&listing, store.layout(), &aged, LOCAL));
    assert!(!deleted_ids(&p).contains(&future.id.to_string()));
}

#[tokio::test]
async fn copied_backups_stay_backups_whatever_their_manifests_say() {
    // Format-1 manifests hold the full key of where they were first written.
    let (store, raw) = memory("moved/here", "prod");
    for i in 0..5u32 {
        let mut m = man(50 - i64::from(i), 10 + i64::from(i), LOCAL, i);
        m.format_version = 1;
        m.object = format!("kubernetes/{}/snapshot.db.zst", m.id);
        m.cluster_name = "kubernetes".into();
        put_backup(&store, &m, Some(b"d")).await;
    }
    let listing = store.list().await.unwrap();
    assert_eq!(listing.backups.len(), 5);
    assert!(listing.dangling.is_empty() && listing.unreadable.is_empty());
    let before = keys(raw.as_ref()).await;
    let p = plan(&input(&listing, store.layout(), &policy(3), LOCAL));
    assert_eq!(p.steps.len(), 2, "{}", p.render());
    let ex = execute(&store, &p).await;
    assert!(ex.failed.is_empty());
    assert_eq!(keys(raw.as_ref()).await.len(), before.len() - 4);
}

#[tokio::test]
async fn orphans_dangling_unreadable_and_the_cap() {
    let (store, raw) = memory("", "c");
    let l = store.layout().clone();
    for i in 0..6u32 {
        put_backup(
            &store,
            &man(20 - i64::from(i), i64::from(i), LOCAL, i),
            Some(b"d"),
        )
        .await;
    }
    // An old orphan, a young orphan, an old dangling manifest, an unreadable manifest with
    // data, a dangling manifest of another cluster.
    let put = |k: String, v: &'static [u8]| {
        let raw = raw.clone();
        async move {
            raw.put(&object_store::path::Path::from(k.as_str()), v.into())
                .await
                .unwrap();
        }
    };
    let old_orphan = man(30, 0, LOCAL, 100);
    put(l.data_key(&old_orphan.id, ".zst"), b"x").await;
    let young = BackupId::new(now());
    put(l.data_key(&young, ".zst"), b"x").await;
    let dangling = man(30, 0, LOCAL, 101);
    put_backup(&store, &dangling, None).await;
    let bad = man(30, 0, LOCAL, 102);
    put(l.manifest_key(&bad.id), b"{").await;
    put(l.data_key(&bad.id, ".zst"), b"x").await;
    let other = man(30, 0, OTHER, 103);
    put_backup(&store, &other, None).await;

    let listing = store.list().await.unwrap();
    let pol = policy(2);
    let p = plan(&input(&listing, &l, &pol, LOCAL));
    let ks: Vec<&str> = p.steps.iter().flat_map(Step::keys).collect();
    assert!(ks.contains(&l.data_key(&old_orphan.id, ".zst").as_str()));
    assert!(ks.contains(&l.manifest_key(&dangling.id).as_str()));
    for kept in [
        l.data_key(&young, ".zst"),
        l.data_key(&bad.id, ".zst"),
        l.manifest_key(&bad.id),
        l.manifest_key(&other.id),
    ] {
        assert!(!ks.contains(&kept.as_str()), "{kept}: {}", p.render());
        assert!(
            p.left_alone.iter().any(|a| a.key == kept) || kept == l.data_key(&bad.id, ".zst"),
            "{kept} not reported"
        );
    }
    assert_eq!(deleted_ids(&p).len(), 4);
    assert_eq!(p.steps.len(), 6);

    // Every deletion counts toward the cap: backups first, the rest deferred.
    let capped = RetentionPolicy {
        max_delete_per_run: 5,
        ..pol
    };
    let p = plan(&input(&listing, &l, &capped, LOCAL));
    assert_eq!(p.steps.len(), 5);
    assert_eq!(deleted_ids(&p).len(), 4);
    assert_eq!(p.deferred.len(), 1);
    assert!(p.render().contains("deferred"));
}

#[tokio::test]
async fn failed_deletes_keep_data_and_are_reported() {
    let (store, f) = faulty("", "c");
    let ms: Vec<Manifest> = (0..4u32)
        .map(|i| man(20 - i64::from(i), i64::from(i), LOCAL, i))
        .collect();
    for m in &ms {
        put_backup(&store, m, Some(b"d")).await;
    }
    let l = store.layout().clone();
    // The manifest of the oldest cannot be deleted; the data of the next cannot either.
    f.faults.lock().unwrap().delete =
        [l.manifest_key(&ms[0].id), store.data_key(&ms[1]).unwrap()].into();
    let listing = store.list().await.unwrap();
    let p = plan(&input(&listing, &l, &policy(2), LOCAL));
    assert_eq!(
        p.steps.len(),
        2,
        "{:?} {}",
        keys(f.as_ref()).await,
        p.render()
    );
    let ex = execute(&store, &p).await;
    assert_eq!(ex.failed.len(), 2);
    assert!(ex.done.is_empty());
    let left = keys(f.as_ref()).await;
    // Its manifest could not go: its data stays with it.
    assert!(left.contains(&l.manifest_key(&ms[0].id)));
    assert!(left.contains(&store.data_key(&ms[0]).unwrap()));
    // Manifest gone, data left: an orphan a later prune removes.
    assert!(!left.contains(&l.manifest_key(&ms[1].id)));
    f.faults.lock().unwrap().delete.clear();
    let again = plan(&input(&store.list().await.unwrap(), &l, &policy(2), LOCAL));
    assert!(
        again.steps.contains(&Step::RemoveOrphan {
            key: store.data_key(&ms[1]).unwrap()
        }),
        "{}",
        again.render()
    );
}

#[tokio::test]
async fn a_dangling_manifest_goes_only_when_its_data_is_confirmed_absent() {
    let (store, f) = faulty("", "c");
    let l = store.layout().clone();
    put_backup(&store, &man(1, 9, LOCAL, 1), Some(b"d")).await;
    let d = man(30, 1, LOCAL, 2);
    put_backup(&store, &d, None).await;
    let listing = store.list().await.unwrap();
    let p = plan(&input(&listing, &l, &policy(2), LOCAL));
    assert_eq!(p.steps.len(), 1, "{}", p.render());
    // The store cannot say: nothing is removed.
    f.faults.lock().unwrap().head = [store.data_key(&d).unwrap()].into();
    let ex = execute(&store, &p).await;
    assert_eq!(ex.failed.len(), 1);
    assert!(keys(f.as_ref()).await.contains(&l.manifest_key(&d.id)));
    // The data appeared after the listing (a lagging listing): kept.
    f.faults.lock().unwrap().head.clear();
    f.put(
        &object_store::path::Path::from(store.data_key(&d).unwrap().as_str()),
        "d".into(),
    )
    .await
    .unwrap();
    let ex = execute(&store, &p).await;
    assert_eq!(ex.skipped.len(), 1);
    assert!(keys(f.as_ref()).await.contains(&l.manifest_key(&d.id)));
    // Confirmed absent: removed.
    f.delete(&object_store::path::Path::from(
        store.data_key(&d).unwrap().as_str(),
    ))
    .await
    .unwrap();
    let ex = execute(&store, &p).await;
    assert_eq!(ex.done.len(), 1);
    assert!(!keys(f.as_ref()).await.contains(&l.manifest_key(&d.id)));
}

#[tokio::test]
async fn a_partial_listing_fails_the_prune_and_deletes_nothing() {
    let (store, f) = faulty("", "c");
    for i in 0..8u32 {
        put_backup(
            &store,
            &man(20 - i64::from(i), i64::from(i), LOCAL, i),
            Some(b"d"),
        )
        .await;
    }
    let before = keys(f.as_ref()).await;
    f.faults.lock().unwrap().list_after = Some(5);
    let r = prune(
        &store,
        &policy(1),
        now(),
        Duration::from_secs(60),
        LOCAL,
        false,
    )
    .await;
    assert!(r.is_err());
    f.faults.lock().unwrap().list_after = None;
    assert_eq!(keys(f.as_ref()).await.len(), before.len());
    // A manifest that cannot be read keeps its whole directory.
    let m0 = man(20, 0, LOCAL, 0);
    f.faults.lock().unwrap().get = [store.layout().manifest_key(&m0.id)].into();
    let o = prune(
        &store,
        &policy(1),
        now(),
        Duration::from_secs(60),
        LOCAL,
        false,
    )
    .await
    .unwrap();
    assert_eq!(o.deleted().len(), 6);
    let left = keys(f.as_ref()).await;
    assert!(left.contains(&store.data_key(&m0).unwrap()));
    assert!(left.contains(&store.layout().manifest_key(&m0.id)));
}

#[tokio::test]
async fn a_manifest_larger_than_a_mebibyte_is_unreadable_not_parsed() {
    let (store, raw) = memory("", "c");
    let m = man(5, 1, LOCAL, 1);
    put_backup(&store, &m, Some(b"d")).await;
    let mut big = m.to_json();
    big.truncate(big.len() - 2);
    big.extend(b",\"pad\":\"");
    big.extend(std::iter::repeat_n(b'x', 1024 * 1024));
    big.extend(b"\"}\n");
    raw.put(
        &object_store::path::Path::from(store.layout().manifest_key(&m.id).as_str()),
        big.into(),
    )
    .await
    .unwrap();
    let listing = store.list().await.unwrap();
    assert!(listing.backups.is_empty());
    assert_eq!(listing.unreadable.len(), 1);
    assert!(
        listing.unreadable[0].1.contains("bytes, more than"),
        "{:?}",
        listing.unreadable
    );
}

#[tokio::test]
async fn dry_run_prints_exactly_what_the_real_run_does() {
    let (store, raw) = memory("p", "c");
    let l = store.layout().clone();
    for i in 0..12u32 {
        put_backup(
            &store,
            &man(200 - 7 * i64::from(i), i64::from(i), LOCAL, i),
            Some(b"d"),
        )
        .await;
    }
    put_backup(&store, &man(90, 3, OTHER, 50), Some(b"d")).await;
    let orphan = man(30, 0, LOCAL, 60);
    raw.put(
        &object_store::path::Path::from(l.data_key(&orphan.id, ".gz").as_str()),
        "x".into(),
    )
    .await
    .unwrap();
    let pol = RetentionPolicy {
        max_delete_per_run: 7,
        ..policy(3)
    };
    let before: BTreeSet<String> = keys(raw.as_ref()).await.into_iter().collect();
    let dry = prune(&store, &pol, now(), Duration::from_secs(3600), LOCAL, true)
        .await
        .unwrap();
    assert_eq!(
        keys(raw.as_ref()).await.len(),
        before.len(),
        "a dry run deletes nothing"
    );
    let real = prune(&store, &pol, now(), Duration::from_secs(3600), LOCAL, false)
        .await
        .unwrap();
    assert_eq!(dry.plan.render(), real.plan.render());
    assert_eq!(
        serde_json::to_value(&dry.plan).unwrap(),
        serde_json::to_value(&real.plan).unwrap()
    );
    let ex = real.executed.as_ref().unwrap();
    assert_eq!(ex.done, dry.plan.steps);
    let after: BTreeSet<String> = keys(raw.as_ref()).await.into_iter().collect();
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    let planned: BTreeSet<String> = dry
        .plan
        .steps
        .iter()
        .flat_map(Step::keys)
        .map(String::from)
        .collect();
    assert_eq!(gone, planned);
    // 9 backups to delete and an orphan, 7 allowed: 2 backups wait (kept, "deferred")
    // and so does the orphan.
    assert_eq!(dry.plan.steps.len(), 7);
    assert_eq!(dry.plan.deferred.len(), 1);
    assert_eq!(dry.plan.render().matches("deferred").count(), 3);
}

// ---- properties over in-memory listings ----

#[derive(Debug, Clone)]
enum Dir {
    /// A manifest (local/foreign/future) with or without its data.
    Backup {
        cluster: bool,
        future: bool,
        data: bool,
        /// With a continuous-backup chain.
        chain: bool,
    },
    Unreadable {
        data: bool,
    },
    Orphan,
    /// Chain objects in a directory without a manifest.
    OrphanChain,
}

/// A chain's objects under `id`: two segments, their manifests, a chain-end record.
fn chain_objects(layout: &Layout, id: &BackupId, t: DateTime<Utc>) -> Vec<DataObject> {
    let dir = format!("{}/{id}/segments", layout.base());
    [
        "00000000000000000010-00000000000000000020-1.json",
        "00000000000000000010-00000000000000000020-1.seg.zst",
        "00000000000000000020-00000000000000000030-2.json",
        "00000000000000000020-00000000000000000030-2.seg.zst.age",
        "end-00000000000000000030.json",
    ]
    .iter()
    .map(|n| DataObject {
        key: format!("{dir}/{n}"),
        size: 1,
        modified: t,
    })
    .collect()
}

fn arb_dirs() -> impl Strategy<Value = Vec<(Dir, i64, i64)>> {
    let dir = prop_oneof![
        6 => (prop::bool::weighted(0.7), prop::bool::weighted(0.1), prop::bool::weighted(0.9), prop::bool::weighted(0.3))
            .prop_map(|(c, f, d, ch)| Dir::Backup { cluster: c, future: f, data: d, chain: ch }),
        1 => any::<bool>().prop_map(|d| Dir::Unreadable { data: d }),
        1 => Just(Dir::Orphan),
        1 => Just(Dir::OrphanChain),
    ];
    proptest::collection::vec((dir, 0i64..2000, 0i64..500), 0..60)
}

fn build(dirs: &[(Dir, i64, i64)], layout: &Layout) -> Listing {
    let mut l = Listing::default();
    for (i, (d, hours, rev)) in dirs.iter().enumerate() {
        let n = i as u32;
        match d {
            Dir::Backup {
                cluster,
                future,
                data,
                chain,
            } => {
                let h = if *future { -*hours - 1 } else { *hours };
                let m = man(h, *rev, if *cluster { LOCAL } else { OTHER }, n);
                l.manifest_ids.insert(m.id.clone());
                if *chain {
                    l.chain_objects
                        .insert(m.id.clone(), chain_objects(layout, &m.id, m.time));
                }
                if *data {
                    l.data_objects
                        .entry(m.id.clone())
                        .or_default()
                        .push(DataObject {
                            key: layout.data_key_for(&m.id, &m.object).unwrap(),
                            size: 1,
                            modified: m.time,
                        });
                    l.backups.push(m);
                } else {
                    let k = layout.manifest_key(&m.id);
                    l.dangling.push((m, k));
                }
            }
            Dir::Unreadable { data } => {
                let m = man(*hours, 0, LOCAL, n);
                l.manifest_ids.insert(m.id.clone());
                l.unreadable
                    .push((layout.manifest_key(&m.id), "bad".into()));
                if *data {
                    l.data_objects
                        .entry(m.id.clone())
                        .or_default()
                        .push(DataObject {
                            key: layout.data_key(&m.id, ".zst"),
                            size: 1,
                            modified: m.time,
                        });
                }
            }
            Dir::OrphanChain => {
                let m = man(*hours, 0, LOCAL, n);
                l.chain_objects
                    .insert(m.id.clone(), chain_objects(layout, &m.id, m.time));
            }
            Dir::Orphan => {
                let m = man(*hours, 0, LOCAL, n);
                l.data_objects
                    .entry(m.id.clone())
                    .or_default()
                    .push(DataObject {
                        key: layout.data_key(&m.id, ".zst"),
                        size: 1,
                        modified: m.time,
                    });
            }
        }
    }
    l.backups.sort_by(crate::store::newest_first);
    l
}

fn arb_policy() -> impl Strategy<Value = RetentionPolicy> {
    (
        0u32..6,
        0u32..5,
        prop::option::of(1u64..100),
        1u32..5,
        0u32..30,
    )
        .prop_map(|(last, daily, age_h, min_keep, cap)| RetentionPolicy {
            keep_last: last,
            keep_daily: daily,
            max_age: age_h.map(|h| Duration::from_secs(h * 3600)),
            min_keep,
            max_delete_per_run: cap,
            ..RetentionPolicy::default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn the_planner_holds_its_hard_rules(dirs in arb_dirs(), pol in arb_policy(), orphan_h in 0u64..100) {
        let layout = Layout::new("p", "c");
        let listing = build(&dirs, &layout);
        let p = plan(&PlanInput {
            orphan_age: Duration::from_secs(orphan_h * 3600),
            ..input(&listing, &layout, &pol, LOCAL)
        });
        // Every deletion counts toward the cap.
        prop_assert!(p.steps.len() <= pol.max_delete_per_run as usize);
        let readable: Vec<&Manifest> = listing.backups.iter().chain(listing.dangling.iter().map(|(m, _)| m)).collect();
        let deleted_backups: BTreeSet<BackupId> = p.steps.iter().filter_map(|s| match s {
            Step::DeleteBackup { id, .. } => Some(id.clone()),
            _ => None,
        }).collect();
        for s in &p.steps {
            match s {
                Step::DeleteBackup { id, chain_keys, .. } => {
                    let m = listing.backups.iter().find(|m| m.id == *id).unwrap();
                    prop_assert_eq!(&m.cluster_id, LOCAL, "a foreign backup deleted");
                    prop_assert!(!m.is_future(now()), "a future backup deleted");
                    // Its whole chain goes with it, commit markers first.
                    let mut want: Vec<String> = listing.chain_objects.get(id).map(|v| v.iter().map(|o| o.key.clone()).collect()).unwrap_or_default();
                    want.sort();
                    let mut got = chain_keys.clone();
                    let first_object = got.iter().position(|k| !k.ends_with(".json")).unwrap_or(got.len());
                    prop_assert!(got[first_object..].iter().all(|k| !k.ends_with(".json")), "{:?}", got);
                    got.sort();
                    prop_assert_eq!(got, want);
                }
                Step::RemoveOrphanChain { key } => {
                    let Some(crate::store::naming::ObjectKind::Chain(id, _)) = layout.classify(key) else {
                        panic!("{key}")
                    };
                    prop_assert!(!listing.manifest_ids.contains(&id), "the chain of a backup with a manifest");
                    prop_assert!(id.time() < now() - chrono::Duration::hours(orphan_h as i64));
                }
                Step::RemoveOrphan { key } => {
                    // Never data a readable manifest names, never in a directory with a manifest.
                    for m in &readable {
                        prop_assert_ne!(Some(key.clone()), layout.data_key_for(&m.id, &m.object));
                    }
                    let Some(crate::store::naming::ObjectKind::Data(id)) = layout.classify(key) else {
                        panic!("{key}")
                    };
                    prop_assert!(!listing.manifest_ids.contains(&id));
                    prop_assert!(id.time() < now() - chrono::Duration::hours(orphan_h as i64));
                }
                Step::RemoveDangling { key, data_key } => {
                    let (m, _) = listing.dangling.iter().find(|(_, k)| k == key).unwrap();
                    prop_assert_eq!(&m.cluster_id, LOCAL);
                    prop_assert!(!listing.data_objects.get(&m.id).is_some_and(|v| v.iter().any(|o| &o.key == data_key)));
                }
                Step::AbortUpload { .. } => {}
            }
        }
        // No chain object of a kept backup (or of any directory with a manifest) is deleted,
        // except with its backup.
        for s in &p.steps {
            let chain_of_other = |k: &str| match layout.classify(k) {
                Some(crate::store::naming::ObjectKind::Chain(id, _)) => listing.manifest_ids.contains(&id) && !deleted_backups.contains(&id),
                _ => false,
            };
            for k in s.keys() {
                prop_assert!(!chain_of_other(k), "{} deletes {}", s, k);
            }
        }
        // The newest min_keep committed local backups stay.
        let mut local: Vec<&Manifest> = listing.backups.iter().filter(|m| m.cluster_id == LOCAL && !m.is_future(now())).collect();
        local.sort_by(|a, b| crate::store::newest_first(a, b));
        for m in local.iter().take(pol.min_keep as usize) {
            prop_assert!(!deleted_backups.contains(&m.id));
        }
        // Every listed backup has a decision.
        prop_assert_eq!(p.decisions.len(), listing.backups.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Over random in-memory stores (some deletes failing), the real run deletes exactly
    /// the keys of the plan the dry run printed, minus what failed, and nothing else.
    #[test]
    fn a_real_run_does_exactly_the_dry_runs_plan(dirs in arb_dirs(), pol in arb_policy(), failing in proptest::collection::vec(any::<prop::sample::Index>(), 0..3)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (store, f) = faulty("p", "c");
            let layout = store.layout().clone();
            let listing = build(&dirs, &layout);
            // Write what the listing describes.
            for m in listing.backups.iter().chain(listing.dangling.iter().map(|(m, _)| m)) {
                store.put_manifest(&m.id, m).await.unwrap();
            }
            for (k, _) in &listing.unreadable {
                f.put(&object_store::path::Path::from(k.as_str()), "{".into()).await.unwrap();
            }
            for objs in listing.data_objects.values().chain(listing.chain_objects.values()) {
                for o in objs {
                    f.put(&object_store::path::Path::from(o.key.as_str()), "d".into()).await.unwrap();
                }
            }
            let before: BTreeSet<String> = keys(f.as_ref()).await.into_iter().collect();
            let dry = prune(&store, &pol, now(), Duration::from_secs(3600), LOCAL, true).await.unwrap();
            prop_assert_eq!(keys(f.as_ref()).await.len(), before.len());
            let all: Vec<&String> = before.iter().collect();
            let fail: std::collections::HashSet<String> = if all.is_empty() {
                Default::default()
            } else {
                failing.iter().map(|i| (*i.get(&all)).clone()).collect()
            };
            f.faults.lock().unwrap().delete = fail.clone();
            let real = prune(&store, &pol, now(), Duration::from_secs(3600), LOCAL, false).await.unwrap();
            prop_assert_eq!(dry.plan.render(), real.plan.render());
            let after: BTreeSet<String> = keys(f.as_ref()).await.into_iter().collect();
            let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
            let planned: BTreeSet<String> = dry.plan.steps.iter().flat_map(Step::keys).map(String::from).collect();
            prop_assert!(gone.is_subset(&planned), "deleted outside the plan: {:?}", gone.difference(&planned).collect::<Vec<_>>());
            prop_assert!(gone.iter().all(|k| !fail.contains(k)));
            if fail.is_empty() {
                prop_assert_eq!(&gone, &planned);
            }
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn chains_go_with_their_base_and_the_newest_chain_keeps_its_base() {
    let (store, f) = memory("", "kubernetes");
    let layout = store.layout().clone();
    let put = |k: String| {
        let f = f.clone();
        async move {
            f.put(&object_store::path::Path::from(k.as_str()), "x".into())
                .await
                .unwrap();
        }
    };
    // Four backups, oldest first, at revisions 100..400; each has a chain.
    let ms: Vec<Manifest> = (0..4)
        .map(|i| man(40 - i * 10, 100 * (i + 1), LOCAL, i as u32))
        .collect();
    for (i, m) in ms.iter().enumerate() {
        put_backup(&store, m, Some(b"d")).await;
        // The chain of backup 1 reaches past the newest snapshot (400): the writer had not
        // moved on to the newest snapshot yet.
        let last = if i == 1 { 480 } else { m.revision + 50 };
        for o in chain_objects(&layout, &m.id, m.time) {
            put(o
                .key
                .replace("00000000000000000030", &format!("{last:020}")))
            .await;
        }
    }
    let listing = store.list().await.unwrap();
    assert_eq!(listing.foreign, 0, "chain objects are ours");
    let p = plan(&input(&listing, &layout, &policy(1), LOCAL));
    let gone = deleted_ids(&p);
    let want: BTreeSet<String> = [&ms[0], &ms[2]].iter().map(|m| m.id.to_string()).collect();
    assert_eq!(gone, want, "{}", p.render());
    assert!(
        p.render()
            .contains("its continuous-backup chain holds the newest committed revisions"),
        "{}",
        p.render()
    );
    assert!(
        p.render()
            .contains("with its continuous-backup chain (5 objects)"),
        "{}",
        p.render()
    );
    let before = keys(f.as_ref()).await;
    let done = execute(&store, &p).await;
    assert!(done.failed.is_empty(), "{:?}", done.failed);
    let after = keys(f.as_ref()).await;
    for k in &before {
        let of = |m: &Manifest| k.contains(&m.id.to_string());
        let deleted_dir = of(&ms[0]) || of(&ms[2]);
        assert_eq!(after.contains(k), !deleted_dir, "{k}");
    }

    // A prune that stopped after the manifest leaves a chain without its base: removed once
    // old enough, never while young.
    let orphan = man(30, 50, LOCAL, 77);
    for o in chain_objects(&layout, &orphan.id, orphan.time) {
        put(o.key).await;
    }
    let listing = store.list().await.unwrap();
    let p = plan(&input(&listing, &layout, &policy(1), LOCAL));
    let orphans: Vec<&Step> = p
        .steps
        .iter()
        .filter(|s| matches!(s, Step::RemoveOrphanChain { .. }))
        .collect();
    assert_eq!(orphans.len(), 5, "{}", p.render());
    let one = policy(1);
    let young = PlanInput {
        orphan_age: Duration::from_secs(3600 * 24 * 365),
        ..input(&listing, &layout, &one, LOCAL)
    };
    let p = plan(&young);
    assert!(
        p.steps
            .iter()
            .all(|s| !matches!(s, Step::RemoveOrphanChain { .. })),
        "{}",
        p.render()
    );
}
