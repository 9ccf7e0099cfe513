use super::*;
use chrono::TimeZone;
use proptest::prelude::*;

fn t(s: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
}

fn id(n: u32) -> BackupId {
    format!("20270115T0{n}0000Z-00000{n}").parse().unwrap()
}

fn base(n: u32, revision: i64, time: i64) -> Base {
    Base {
        id: id(n),
        revision,
        time: t(time),
        stored_sha256: format!("snap{n}"),
    }
}

/// A segment of `b`'s chain covering (after, last], observed over [t0, t1], linked to `prev`.
fn seg(
    b: &Base,
    after: i64,
    last: i64,
    t0: i64,
    t1: i64,
    prev: &str,
    token: i64,
) -> SegmentManifest {
    let stem = stem(after, last, token);
    SegmentManifest {
        format_version: FORMAT_VERSION,
        base: b.id.clone(),
        base_revision: b.revision,
        after_revision: after,
        last_revision: last,
        first_time: t(t0),
        last_time: t(t1),
        revisions: (last - after) as u64,
        events: (last - after) as u64 * 2,
        size: 100,
        sha256: format!("plain-{after}-{last}-{token}"),
        stored_size: 50,
        stored_sha256: format!("stored-{after}-{last}-{token}"),
        prev_sha256: prev.to_string(),
        compression: Compression::Zstd,
        encryption: None,
        object: object_name(&stem, Compression::Zstd, false),
        node: "n1".into(),
        fencing_token: Some(token),
        written_at: t(t1 + 1),
        tool_version: "test".into(),
    }
}

/// A healthy chain of `b` with segments ending at each of `ends`, one second apart.
fn chain(b: &Base, ends: &[i64]) -> Vec<SegmentManifest> {
    let mut out: Vec<SegmentManifest> = Vec::new();
    let mut after = b.revision;
    let mut prev = b.stored_sha256.clone();
    let mut time = b.time.timestamp() - 1_800_000_000;
    for &last in ends {
        let s = seg(b, after, last, time + 1, time + 2, &prev, 1);
        prev = s.stored_sha256.clone();
        after = last;
        time += 2;
        out.push(s);
    }
    out
}

#[test]
fn healthy_chain_reaches_its_last_segment_in_any_input_order() {
    let b = base(1, 100, 0);
    let mut segs = chain(&b, &[110, 120, 130]);
    segs.reverse();
    let r = verify_chain(&b, &segs, &[]);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.reach_revision, 130);
    assert_eq!(r.reach_time, t(6));
    let ranges: Vec<_> = r
        .path
        .iter()
        .map(|s| (s.after_revision, s.last_revision))
        .collect();
    assert_eq!(ranges, [(100, 110), (110, 120), (120, 130)]);
}

#[test]
fn empty_chain_reaches_the_base() {
    let b = base(1, 100, 0);
    let r = verify_chain(&b, &[], &[]);
    assert_eq!((r.reach_revision, r.reach_time), (100, b.time));
    assert!(r.path.is_empty() && r.problems.is_empty());
}

#[test]
fn replaced_segment_breaks_the_chain_where_it_sits() {
    let b = base(1, 100, 0);
    let mut segs = chain(&b, &[110, 120, 130]);
    // Segment (110, 120] was replaced: its stored hash changed, so (120, 130] no longer links.
    segs[1].stored_sha256 = "tampered".into();
    let r = verify_chain(&b, &segs, &[]);
    assert_eq!(r.reach_revision, 120);
    assert_eq!(
        r.problems,
        [ChainProblem::BrokenLink {
            segment: segs[2].stem(),
            at_revision: 120
        }]
    );
    assert!(r.problems[0]
        .to_string()
        .contains("hash chain broken at revision 120"));
}

#[test]
fn first_segment_must_link_to_the_base_snapshot() {
    let b = base(1, 100, 0);
    let mut segs = chain(&b, &[110]);
    segs[0].prev_sha256 = "another snapshot".into();
    let r = verify_chain(&b, &segs, &[]);
    assert_eq!(r.reach_revision, 100);
    assert!(matches!(
        r.problems[..],
        [ChainProblem::BrokenLink {
            at_revision: 100,
            ..
        }]
    ));
}

#[test]
fn missing_segment_is_a_gap() {
    let b = base(1, 100, 0);
    let mut segs = chain(&b, &[110, 120, 130, 140]);
    segs.remove(1);
    let r = verify_chain(&b, &segs, &[]);
    assert_eq!(r.reach_revision, 110);
    assert_eq!(r.problems, [ChainProblem::Gap { from: 110, to: 120 }]);
    assert_eq!(
        r.problems[0].to_string(),
        "gap: revisions 111..=120 are in no segment (events lost)"
    );
}

#[test]
fn failover_fork_is_not_a_problem_and_the_longer_branch_wins() {
    let b = base(1, 100, 0);
    let segs = chain(&b, &[110, 120]);
    // The old leader committed (120, 125] just before losing its term; the new leader had
    // read the chain up to 120 and continued with (120, 128], (128, 140].
    let old = seg(&b, 120, 125, 5, 5, &segs[1].stored_sha256, 1);
    let new1 = seg(&b, 120, 128, 5, 6, &segs[1].stored_sha256, 2);
    let new2 = seg(&b, 128, 140, 7, 8, &new1.stored_sha256, 2);
    let mut all = segs.clone();
    all.extend([old, new2.clone(), new1.clone()]);
    let r = verify_chain(&b, &all, &[]);
    assert!(r.problems.is_empty(), "{:?}", r.problems);
    assert_eq!(r.reach_revision, 140);
    assert_eq!(r.path.last(), Some(&new2));
    assert_eq!(r.path.len(), 4);
}

#[test]
fn longest_branch_wins_even_when_a_dead_end_starts_further() {
    let b = base(1, 100, 0);
    let dead = seg(&b, 100, 150, 1, 2, "snap1", 1);
    let a = seg(&b, 100, 120, 1, 2, "snap1", 2);
    let c = seg(&b, 120, 160, 3, 4, &a.stored_sha256, 2);
    let r = verify_chain(&b, &[dead, a, c], &[]);
    assert_eq!(r.reach_revision, 160);
    assert!(r.problems.is_empty());
}

#[test]
fn inconsistent_or_foreign_manifests_are_reported_and_ignored() {
    let b = base(1, 100, 0);
    let other = base(2, 100, 0);
    let mut segs = chain(&b, &[110, 120]);
    let mut wrong_count = segs[1].clone();
    wrong_count.revisions = 3;
    wrong_count.fencing_token = Some(9);
    wrong_count.object = object_name(&wrong_count.stem(), Compression::Zstd, false);
    let foreign = chain(&other, &[105]).remove(0);
    segs.push(wrong_count);
    segs.push(foreign);
    let mut reversed = seg(&b, 120, 120, 0, 0, "x", 1);
    reversed.revisions = 0;
    segs.push(reversed);
    let r = verify_chain(&b, &segs, &[]);
    assert_eq!(r.reach_revision, 120);
    assert_eq!(r.problems.len(), 3, "{:?}", r.problems);
    assert!(r
        .problems
        .iter()
        .all(|p| matches!(p, ChainProblem::Invalid { .. })));
}

#[test]
fn chain_end_is_reported() {
    let b = base(1, 100, 0);
    let end = ChainEnd {
        format_version: FORMAT_VERSION,
        base: b.id.clone(),
        last_revision: 110,
        reason: "compacted".into(),
        compact_revision: Some(115),
        time: t(9),
        node: "n1".into(),
    };
    let r = verify_chain(&b, &chain(&b, &[110]), std::slice::from_ref(&end));
    assert_eq!(r.ended, Some(end.clone()));
    assert_eq!(ChainEnd::from_json(&end.to_json()).unwrap(), end);
}

#[test]
fn manifest_json_round_trips_and_newer_formats_are_refused() {
    let b = base(1, 100, 0);
    let s = chain(&b, &[110]).remove(0);
    assert_eq!(SegmentManifest::from_json(&s.to_json()).unwrap(), s);
    let mut newer = s.clone();
    newer.format_version = FORMAT_VERSION + 1;
    assert!(SegmentManifest::from_json(&newer.to_json())
        .unwrap_err()
        .contains("upgrade"));
}

#[test]
fn keys_are_classified_and_nothing_else_is() {
    let layout = Layout::new("pre", "c1");
    let b = base(1, 100, 0);
    let mut s = chain(&b, &[110]).remove(0);
    assert_eq!(
        classify(&layout, &manifest_key(&layout, &s)),
        Some(SegmentKey::Manifest(b.id.clone()))
    );
    assert_eq!(
        classify(&layout, &object_key(&layout, &s)),
        Some(SegmentKey::Object(b.id.clone()))
    );
    s.encryption = Some(Encryption {
        method: crate::store::manifest::EncryptionMethod::Age,
        recipients: vec![],
    });
    s.object = object_name(&s.stem(), Compression::Gzip, true);
    assert!(s.object.ends_with(".seg.gz.age"));
    assert_eq!(
        classify(&layout, &object_key(&layout, &s)),
        Some(SegmentKey::Object(b.id.clone()))
    );
    assert_eq!(
        classify(&layout, &end_key(&layout, &b.id, 7)),
        Some(SegmentKey::End(b.id.clone()))
    );
    let dir = segments_dir(&layout, &b.id);
    for other in [
        format!("{dir}notes.txt"),
        format!("{dir}x/{}.json", s.stem()),
        format!("{dir}1-2-3.json"),
        format!("{dir}end-7.json"),
        format!("pre/c1/{}/manifest.json", b.id),
        format!("pre/c2/{}/segments/{}.json", b.id, s.stem()),
    ] {
        assert_eq!(classify(&layout, &other), None, "{other}");
    }
    // Snapshot naming knows segments as chain objects, never as backups' own objects.
    assert_eq!(
        layout.classify(&manifest_key(&layout, &s)),
        Some(crate::store::naming::ObjectKind::Chain(
            b.id.clone(),
            crate::store::naming::ChainName::Manifest
        ))
    );
}

// ---- planning ----

/// Two chains: base 1 at 100 (t=0) reaching 130 (t=6); base 2 at 200 (t=100) reaching 230
/// (t=106). Revisions 131..=199 are a gap.
fn two_chains() -> Vec<ChainReport> {
    let b1 = base(1, 100, 0);
    let b2 = base(2, 200, 100);
    vec![
        verify_chain(&b1, &chain(&b1, &[110, 120, 130]), &[]),
        verify_chain(&b2, &chain(&b2, &[210, 220, 230]), &[]),
    ]
}

#[test]
fn revision_plan_takes_the_newest_snapshot_and_only_the_needed_segments() {
    let chains = two_chains();
    let p = plan(&chains, Target::Revision(115)).unwrap();
    assert_eq!(p.base.revision, 100);
    assert_eq!(p.segments.len(), 2);
    assert_eq!(p.stop, Stop::AtRevision(115));
    let p = plan(&chains, Target::Revision(110)).unwrap();
    assert_eq!(p.segments.len(), 1);
    let p = plan(&chains, Target::Revision(200)).unwrap();
    assert_eq!((p.base.revision, p.segments.len()), (200, 0));
    let p = plan(&chains, Target::Revision(230)).unwrap();
    assert_eq!((p.base.revision, p.segments.len()), (200, 3));
    let p = plan(&chains, Target::Revision(100)).unwrap();
    assert_eq!((p.base.revision, p.segments.len()), (100, 0));
}

#[test]
fn revision_plan_errors_say_what_is_covered() {
    let chains = two_chains();
    let e = plan(&chains, Target::Revision(150)).unwrap_err();
    assert!(matches!(e, PlanError::NotCovered { .. }));
    assert!(e.to_string().contains("100..=130, 200..=230"), "{e}");
    let e = plan(&chains, Target::Revision(231)).unwrap_err();
    assert!(
        matches!(
            e,
            PlanError::Beyond {
                newest_revision: 230,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("--to-revision 230"));
    let e = plan(&chains, Target::Revision(99)).unwrap_err();
    assert!(matches!(
        e,
        PlanError::BeforeEverything {
            oldest_revision: 100,
            ..
        }
    ));
    assert_eq!(
        plan(&[], Target::Latest).unwrap_err(),
        PlanError::NoSnapshot
    );
}

#[test]
fn an_older_chain_serves_a_revision_the_newer_snapshot_postdates() {
    // Base 2 at 120 is newer than 115 is reached by; base 1's chain reaches past it.
    let b1 = base(1, 100, 0);
    let b2 = base(2, 120, 50);
    let chains = vec![
        verify_chain(&b1, &chain(&b1, &[110, 130]), &[]),
        verify_chain(&b2, &chain(&b2, &[125]), &[]),
    ];
    assert_eq!(
        plan(&chains, Target::Revision(115)).unwrap().base.revision,
        100
    );
    // At 128 both reach; the newest snapshot at or before it wins.
    let p = plan(&chains, Target::Revision(128)).unwrap();
    assert_eq!(p.base.revision, 100, "base 2's chain stops at 125");
    let p = plan(&chains, Target::Revision(122)).unwrap();
    assert_eq!((p.base.revision, p.segments.len()), (120, 1));
}

#[test]
fn latest_plan_uses_the_furthest_chain() {
    let p = plan(&two_chains(), Target::Latest).unwrap();
    assert_eq!(
        (p.base.revision, p.segments.len(), p.stop),
        (200, 3, Stop::AtRevision(230))
    );
}

#[test]
fn time_plan_picks_segments_observed_up_to_the_moment() {
    let chains = two_chains();
    // Base 1's segments are observed at [1,2], [3,4], [5,6].
    let p = plan(&chains, Target::Time(t(3))).unwrap();
    assert_eq!(
        (p.base.revision, p.segments.len(), p.stop),
        (100, 2, Stop::AtTime(t(3)))
    );
    let p = plan(&chains, Target::Time(t(6))).unwrap();
    assert_eq!(p.segments.len(), 3);
    let e = plan(&chains, Target::Time(t(50))).unwrap_err();
    assert!(matches!(e, PlanError::NotCovered { .. }), "{e}");
    let p = plan(&chains, Target::Time(t(104))).unwrap();
    assert_eq!((p.base.revision, p.segments.len()), (200, 2));
    let e = plan(&chains, Target::Time(t(107))).unwrap_err();
    assert!(
        matches!(
            e,
            PlanError::Beyond {
                newest_revision: 230,
                ..
            }
        ),
        "{e}"
    );
    let e = plan(&chains, Target::Time(t(-1))).unwrap_err();
    assert!(matches!(e, PlanError::BeforeEverything { .. }));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Removing any one segment from a healthy chain leaves a reach at its start and a
    /// reported gap (or nothing, when it was the last); tampering with any one stored
    /// hash cuts the chain right after it with a broken link.
    #[test]
    fn any_missing_or_replaced_segment_is_detected(
        steps in proptest::collection::vec(1i64..50, 1..12),
        pick in any::<prop::sample::Index>(),
        tamper in any::<bool>(),
    ) {
        let b = base(1, 1000, 0);
        let mut ends = Vec::new();
        let mut r = b.revision;
        for s in &steps { r += s; ends.push(r); }
        let mut segs = chain(&b, &ends);
        let i = pick.index(segs.len());
        let start = segs[i].after_revision;
        let last = segs[i].last_revision;
        let rep = if tamper {
            segs[i].stored_sha256 = "replaced".into();
            verify_chain(&b, &segs, &[])
        } else {
            segs.remove(i);
            verify_chain(&b, &segs, &[])
        };
        if tamper {
            prop_assert_eq!(rep.reach_revision, last);
            if i + 1 < ends.len() {
                let broken = ChainProblem::BrokenLink { segment: segs[i + 1].stem(), at_revision: last };
                prop_assert_eq!(&rep.problems, &vec![broken]);
            } else {
                prop_assert!(rep.problems.is_empty());
            }
        } else {
            prop_assert_eq!(rep.reach_revision, start);
            if i < segs.len() {
                prop_assert_eq!(&rep.problems, &vec![ChainProblem::Gap { from: start, to: last }]);
            } else {
                prop_assert!(rep.problems.is_empty());
            }
        }
        // Every revision up to the reach is plannable and no further.
        let chains = vec![rep.clone()];
        for target in b.revision..=rep.reach_revision {
            let p = plan(&chains, Target::Revision(target)).unwrap();
            let covered = p.segments.last().map_or(p.base.revision, |s| s.last_revision);
            prop_assert!(covered >= target);
            prop_assert!(p.segments.iter().all(|s| s.after_revision < target));
        }
        prop_assert!(plan(&chains, Target::Revision(rep.reach_revision + 1)).is_err());
    }
}
