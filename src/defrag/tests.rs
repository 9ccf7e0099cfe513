use super::*;
use crate::etcd::defrag::MemberReport;
use proptest::prelude::*;

const MIB: i64 = 1 << 20;

fn t() -> Thresholds {
    Thresholds {
        min_free_ratio: 0.3,
        min_free_bytes: 64 << 20,
    }
}

fn h(db: i64, used: i64, leader: u64) -> MemberHealth {
    MemberHealth {
        db_size: db,
        db_size_in_use: used,
        leader,
        raft_index: 100,
        raft_applied_index: 100,
        errors: vec![],
    }
}

fn m(id: u64, status: Result<MemberHealth, String>) -> MemberReport {
    MemberReport {
        id,
        name: format!("m{id}"),
        is_learner: false,
        status,
    }
}

/// Three members led by `leader`; the local one (1) has `db`/`used`, the others 1 GiB
/// files with 900/500 MiB in use (so 2 has less free space than 3).
fn cluster(leader: u64, db: i64, used: i64) -> ClusterReport {
    ClusterReport {
        local_id: 1,
        members: vec![
            m(1, Ok(h(db, used, leader))),
            m(2, Ok(h(1024 * MIB, 900 * MIB, leader))),
            m(3, Ok(h(1024 * MIB, 500 * MIB, leader))),
        ],
    }
}

#[test]
fn free_space_is_file_size_minus_in_use() {
    assert_eq!(free_space(&h(1000, 250, 1)), (750, 0.75));
    assert_eq!(free_space(&h(0, 0, 1)), (0, 0.0));
    // A member reporting more in use than the file (never seen; counted as no free space).
    assert_eq!(free_space(&h(100, 200, 1)), (0, 0.0));
}

#[test]
fn a_follower_with_enough_free_space_goes_without_hand_over() {
    assert_eq!(
        decide(&cluster(2, 512 * MIB, 100 * MIB), t(), false),
        Decision::Defragment {
            free: 412 * MIB as u64,
            db_size: 512 * MIB as u64,
            hand_over_to: None
        }
    );
}

#[test]
fn both_thresholds_must_be_met() {
    // 40 % free but only 40 MiB: below min_free_bytes.
    assert!(matches!(
        decide(&cluster(2, 100 * MIB, 60 * MIB), t(), false),
        Decision::Skip(Skip::NotWorthIt { free, .. }) if free == 40 * MIB as u64
    ));
    // 200 MiB free but only 20 %: below min_free_ratio.
    assert!(matches!(
        decide(&cluster(2, 1000 * MIB, 800 * MIB), t(), false),
        Decision::Skip(Skip::NotWorthIt { .. })
    ));
    // Exactly at both limits: goes.
    assert!(matches!(
        decide(&cluster(2, 640 * MIB, 448 * MIB), t(), false),
        Decision::Defragment { .. }
    ));
    // Nothing free never goes, even with zero thresholds.
    let zero = Thresholds {
        min_free_ratio: 0.0,
        min_free_bytes: 0,
    };
    assert!(matches!(
        decide(&cluster(2, 640 * MIB, 640 * MIB), zero, false),
        Decision::Skip(Skip::NotWorthIt { free: 0, .. })
    ));
}

#[test]
fn the_leader_hands_over_to_the_voting_member_with_least_free_space() {
    let d = decide(&cluster(1, 512 * MIB, 100 * MIB), t(), false);
    assert!(
        matches!(
            d,
            Decision::Defragment {
                hand_over_to: Some(2),
                ..
            }
        ),
        "{d:?}"
    );
    // A learner never becomes leader.
    let mut c = cluster(1, 512 * MIB, 100 * MIB);
    c.members[1].is_learner = true;
    assert!(matches!(
        decide(&c, t(), false),
        Decision::Defragment {
            hand_over_to: Some(3),
            ..
        }
    ));
    // Equal free space: the one that has applied more of the log, then the lower id.
    let mut c = cluster(1, 512 * MIB, 100 * MIB);
    c.members[2].status = Ok(h(1024 * MIB, 900 * MIB, 1));
    if let Ok(s) = &mut c.members[2].status {
        s.raft_applied_index = 101;
    }
    assert!(matches!(
        decide(&c, t(), false),
        Decision::Defragment {
            hand_over_to: Some(3),
            ..
        }
    ));
}

#[test]
fn the_leader_goes_last() {
    // m3 still has 524 MiB (51 %) free, m2 only 124 MiB (12 %): m3 goes first.
    assert_eq!(
        decide(&cluster(1, 512 * MIB, 100 * MIB), t(), true),
        Decision::LeaderWaits { pending: vec![3] }
    );
    // Once every other member is done, the leader hands over and goes.
    let mut c = cluster(1, 512 * MIB, 100 * MIB);
    c.members[2].status = Ok(h(600 * MIB, 500 * MIB, 1));
    assert!(matches!(
        decide(&c, t(), true),
        Decision::Defragment {
            hand_over_to: Some(_),
            ..
        }
    ));
    // A follower never waits; a leader that waited long enough goes.
    assert!(matches!(
        decide(&cluster(2, 512 * MIB, 100 * MIB), t(), true),
        Decision::Defragment {
            hand_over_to: None,
            ..
        }
    ));
    assert!(matches!(
        decide(&cluster(1, 512 * MIB, 100 * MIB), t(), false),
        Decision::Defragment {
            hand_over_to: Some(2),
            ..
        }
    ));
    // A leader that need not be defragmented does not wait either.
    assert!(matches!(
        decide(&cluster(1, 512 * MIB, 500 * MIB), t(), true),
        Decision::Skip(Skip::NotWorthIt { .. })
    ));
}

#[test]
fn a_sole_member_defragments_as_leader() {
    let c = ClusterReport {
        local_id: 1,
        members: vec![m(1, Ok(h(512 * MIB, 10 * MIB, 1)))],
    };
    assert!(matches!(
        decide(&c, t(), false),
        Decision::Defragment {
            hand_over_to: None,
            ..
        }
    ));
}

#[test]
fn never_while_the_cluster_is_degraded() {
    let worth = || cluster(2, 512 * MIB, 100 * MIB);
    // A member down.
    let mut c = worth();
    c.members[2].status = Err("connection refused".into());
    assert_eq!(
        decide(&c, t(), false),
        Decision::Skip(Skip::MemberDown {
            name: "m3".into(),
            why: "connection refused".into()
        })
    );
    // A member that has not started yet (unnamed).
    let mut c = worth();
    c.members[1].name.clear();
    c.members[1].status = Err("not started".into());
    assert!(
        matches!(decide(&c, t(), false), Decision::Skip(Skip::MemberDown { name, .. }) if name == "2")
    );
    // The local member itself does not answer.
    let mut c = worth();
    c.members[0].status = Err("timeout".into());
    assert!(matches!(
        decide(&c, t(), false),
        Decision::Skip(Skip::MemberDown { .. })
    ));
    // No leader.
    let mut c = worth();
    if let Ok(s) = &mut c.members[1].status {
        s.leader = 0;
    }
    assert_eq!(
        decide(&c, t(), false),
        Decision::Skip(Skip::NoLeader { name: "m2".into() })
    );
    // Members disagree on the leader.
    let mut c = worth();
    if let Ok(s) = &mut c.members[2].status {
        s.leader = 3;
    }
    assert_eq!(
        decide(&c, t(), false),
        Decision::Skip(Skip::LeaderUnsettled)
    );
    // A CORRUPT alarm stops everything; NOSPACE does not (defragmenting is its cure).
    let mut c = worth();
    if let Ok(s) = &mut c.members[1].status {
        s.errors = vec!["memberID:2 alarm:CORRUPT".into()];
    }
    assert!(matches!(
        decide(&c, t(), false),
        Decision::Skip(Skip::Alarm { .. })
    ));
    let mut c = worth();
    if let Ok(s) = &mut c.members[0].status {
        s.errors = vec!["memberID:1 alarm:NOSPACE".into()];
    }
    assert!(matches!(
        decide(&c, t(), false),
        Decision::Defragment { .. }
    ));
    // The local member missing from the list.
    let mut c = worth();
    c.local_id = 9;
    assert_eq!(decide(&c, t(), false), Decision::Skip(Skip::NotAMember));
}

#[test]
fn skip_reasons_read_as_sentences() {
    let s = Skip::NotWorthIt {
        free: 10 << 20,
        db_size: 100 << 20,
    }
    .to_string();
    assert!(s.contains("free"), "{s}");
    let s = Skip::MemberDown {
        name: "m2".into(),
        why: "refused".into(),
    }
    .to_string();
    assert!(s.contains("m2") && s.contains("lost a member"), "{s}");
}

fn member_strategy(id: u64) -> impl Strategy<Value = MemberReport> {
    (
        any::<bool>(),
        any::<bool>(),
        0i64..4096,
        0i64..4096,
        0u64..4,
        any::<bool>(),
    )
        .prop_map(move |(up, learner, db, used, leader, alarm)| {
            let mut health = h(db * MIB, used * MIB, leader);
            if alarm {
                health.errors = vec![format!("memberID:{id} alarm:CORRUPT")];
            }
            MemberReport {
                id,
                name: format!("m{id}"),
                is_learner: learner,
                status: if up { Ok(health) } else { Err("down".into()) },
            }
        })
}

proptest! {
    /// Whatever the cluster reports: a defragmentation is decided only when every member
    /// answers, all follow the same leader, no alarm is raised and the local member meets
    /// both thresholds; the hand-over happens exactly when the local member leads and
    /// another voting member exists, and goes to such a member.
    #[test]
    fn decisions_keep_the_rules(
        members in (1usize..=5).prop_flat_map(|n| {
            (1..=n as u64).map(member_strategy).collect::<Vec<_>>()
        }),
        ratio in 0.0f64..0.99,
        bytes in 0u64..(2048u64 << 20),
    ) {
        let report = ClusterReport { local_id: 1, members };
        let th = Thresholds { min_free_ratio: ratio, min_free_bytes: bytes };
        let patient = decide(&report, th, true);
        if let Decision::LeaderWaits { pending } = &patient {
            let local = report.members[0].status.clone().unwrap();
            prop_assert_eq!(local.leader, 1);
            prop_assert!(!pending.is_empty() && !pending.contains(&1));
            for id in pending {
                let other = report.members.iter().find(|m| m.id == *id).unwrap();
                let (f, r) = free_space(other.status.as_ref().unwrap());
                prop_assert!(f > 0 && f >= bytes && r >= ratio);
            }
        } else {
            // Patience changes nothing unless the leader waits.
            prop_assert_eq!(&patient, &decide(&report, th, false));
        }
        if let Decision::Defragment { free, hand_over_to, .. } = decide(&report, th, false) {
            let healths: Vec<_> = report.members.iter().map(|m| m.status.clone()).collect();
            prop_assert!(healths.iter().all(Result::is_ok));
            let hs: Vec<MemberHealth> = healths.into_iter().map(Result::unwrap).collect();
            let leader = hs[0].leader;
            prop_assert!(leader != 0 && hs.iter().all(|x| x.leader == leader));
            prop_assert!(hs.iter().all(|x| x.errors.is_empty()));
            let (f, r) = free_space(&hs[0]);
            prop_assert_eq!(f, free);
            prop_assert!(f > 0 && f >= bytes && r >= ratio);
            let others = report.members.iter().any(|m| m.id != 1 && !m.is_learner);
            prop_assert_eq!(hand_over_to.is_some(), leader == 1 && others);
            if let Some(to) = hand_over_to {
                let target = report.members.iter().find(|m| m.id == to).unwrap();
                prop_assert!(to != 1 && !target.is_learner);
            }
        }
    }
}
