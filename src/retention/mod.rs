//! The retention policy: a pure function from (committed backups, now, policy) to a
//! keep/delete decision with reasons for every backup. No I/O; `prune` executes the plan.
//!
//! # Rules
//! - `keep_last`: the N newest backups.
//! - `keep_hourly` / `keep_daily` / `keep_weekly` / `keep_monthly`: for each of the last N
//!   periods *that contain backups*, the newest backup of that period. Periods are taken in
//!   the configured timezone: local calendar days, ISO weeks (Monday start, ISO week-year),
//!   calendar months, and local clock hours — where an hour is identified with its UTC
//!   offset, so the hour that repeats when clocks fall back counts as two periods, and the
//!   hour skipped when clocks spring forward simply has no backups.
//! - A backup is kept if ANY rule keeps it.
//! - `max_age`: when set, a backup that no rule keeps is deleted only if it is older than
//!   `max_age`; younger ones are kept ("within max_age"). When unset, a backup no rule keeps
//!   is deleted. With every `keep_*` at 0 and no `max_age`, everything is kept.
//!
//! # Safety rules (hold whatever the policy says)
//! - The newest backup is never deleted.
//! - The newest `min_keep` backups always remain.
//! - One plan deletes at most `max_delete_per_run` backups, oldest first; the rest wait for
//!   the next prune.
//! - Nothing is deleted while the newest backup is older than `max_age`: backups are
//!   failing, so everything there is stays.
//!
//! "Newest" is by etcd revision (the cluster's logical clock, which a wrong wall clock
//! cannot move), then time, then id; never by names. Periods (`keep_hourly` …) and
//! `max_age` use the backups' times. The input order does not matter. The caller passes only
//! this cluster's backups that are not dated in the future (see `prune`): foreign and
//! future backups are never subject to the policy.

pub mod prune;

use chrono::{DateTime, Datelike, Offset, Timelike, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// A committed backup, as the policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// The backup id.
    pub id: String,
    /// When it was taken (from its manifest).
    pub time: DateTime<Utc>,
    /// The etcd revision of its snapshot.
    pub revision: i64,
    /// The highest revision its continuous-backup chain names, when it has one (from the
    /// segment manifests' names: an upper bound of what the chain reaches).
    pub chain_reach: Option<i64>,
}

/// The `[retention]` policy.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionPolicy {
    /// Keep the N newest.
    pub keep_last: u32,
    /// Newest of each of the last N hours with backups.
    pub keep_hourly: u32,
    /// Newest of each of the last N days with backups.
    pub keep_daily: u32,
    /// Newest of each of the last N ISO weeks with backups.
    pub keep_weekly: u32,
    /// Newest of each of the last N months with backups.
    pub keep_monthly: u32,
    /// Delete what no rule keeps only when older than this.
    pub max_age: Option<Duration>,
    /// At least this many backups remain.
    pub min_keep: u32,
    /// At most this many deletions per plan.
    pub max_delete_per_run: u32,
    /// Timezone of the periods.
    pub timezone: Tz,
}

impl Default for RetentionPolicy {
    fn default() -> Self {
        RetentionPolicy {
            keep_last: 10,
            keep_hourly: 0,
            keep_daily: 0,
            keep_weekly: 0,
            keep_monthly: 0,
            max_age: None,
            min_keep: 3,
            max_delete_per_run: 100,
            timezone: Tz::UTC,
        }
    }
}

impl RetentionPolicy {
    /// The policy of `[retention]`, with periods evaluated in `tz`.
    pub fn from_config(cfg: &crate::config::RetentionConfig, tz: Tz) -> RetentionPolicy {
        RetentionPolicy {
            keep_last: cfg.keep_last,
            keep_hourly: cfg.keep_hourly,
            keep_daily: cfg.keep_daily,
            keep_weekly: cfg.keep_weekly,
            keep_monthly: cfg.keep_monthly,
            max_age: cfg.max_age,
            min_keep: cfg.min_keep,
            max_delete_per_run: cfg.max_delete_per_run,
            timezone: tz,
        }
    }
}

/// Why a backup is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum KeepReason {
    /// The newest backup is always kept.
    Newest,
    /// Its continuous-backup chain holds the newest committed revisions (past the newest
    /// snapshot): the newest restorable point stays restorable.
    NewestChain,
    /// Among the `keep_last` newest.
    Last {
        /// The configured N.
        n: u32,
    },
    /// Newest of an hour.
    Hourly {
        /// The hour, e.g. `2026-10-25 02:00+02:00`.
        period: String,
    },
    /// Newest of a day.
    Daily {
        /// The day, e.g. `2026-11-20`.
        period: String,
    },
    /// Newest of an ISO week.
    Weekly {
        /// The week, e.g. `2026-W47`.
        period: String,
    },
    /// Newest of a month.
    Monthly {
        /// The month, e.g. `2026-11`.
        period: String,
    },
    /// Younger than `max_age`.
    WithinMaxAge,
    /// Kept back so that `min_keep` backups remain.
    MinKeep,
    /// Nothing is deleted while the newest backup is older than `max_age`.
    NewestTooOld,
    /// Would be deleted, but this prune already reached `max_delete_per_run`.
    DeleteCap,
    /// No rule and no `max_age` configured: everything is kept.
    NoPolicy,
    /// Dated in the future (a wrong clock or a planted object): never aged out, never
    /// latest.
    Future,
    /// Made by another etcd cluster (another cluster id): never pruned from here.
    Foreign {
        /// Its cluster id.
        cluster_id: String,
    },
}

/// Why a backup is deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum DeleteReason {
    /// No rule keeps it (no `max_age` set).
    NotKept,
    /// Older than `max_age` and no rule keeps it.
    OlderThanMaxAge {
        /// The configured `max_age`.
        max_age: String,
    },
}

/// The decision for one backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", content = "reasons", rename_all = "snake_case")]
pub enum Action {
    /// Keep, for these reasons.
    Keep(Vec<KeepReason>),
    /// Delete, for this reason.
    Delete(DeleteReason),
}

/// One backup's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    /// The backup id.
    pub id: String,
    /// Its time.
    pub time: DateTime<Utc>,
    /// What happens to it.
    pub action: Action,
}

/// Decisions for every backup, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PrunePlan {
    /// Newest first.
    pub decisions: Vec<Decision>,
}

impl PrunePlan {
    /// The backups to delete.
    pub fn to_delete(&self) -> impl Iterator<Item = &Decision> {
        self.decisions
            .iter()
            .filter(|d| matches!(d.action, Action::Delete(_)))
    }

    /// The backups to keep.
    pub fn kept(&self) -> impl Iterator<Item = &Decision> {
        self.decisions
            .iter()
            .filter(|d| matches!(d.action, Action::Keep(_)))
    }
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::Newest => f.write_str("newest backup"),
            KeepReason::NewestChain => f.write_str(
                "its continuous-backup chain holds the newest committed revisions",
            ),
            KeepReason::Last { n } => write!(f, "among the last {n}"),
            KeepReason::Hourly { period } => write!(f, "newest of hour {period}"),
            KeepReason::Daily { period } => write!(f, "newest of day {period}"),
            KeepReason::Weekly { period } => write!(f, "newest of week {period}"),
            KeepReason::Monthly { period } => write!(f, "newest of month {period}"),
            KeepReason::WithinMaxAge => f.write_str("younger than max_age"),
            KeepReason::MinKeep => f.write_str("kept so that min_keep backups remain"),
            KeepReason::NewestTooOld => f.write_str(
                "the newest backup is older than max_age (backups are failing): nothing is deleted",
            ),
            KeepReason::DeleteCap => f.write_str("deferred: this prune reached max_delete_per_run"),
            KeepReason::NoPolicy => f.write_str("no retention rule configured"),
            KeepReason::Future => f.write_str(
                "dated more than 5 minutes in the future (wrong clock?): never aged out, never latest",
            ),
            KeepReason::Foreign { cluster_id } => write!(
                f,
                "made by another etcd cluster ({}): never pruned from here (use --cluster-id to select it)",
                crate::store::manifest::printable(cluster_id)
            ),
        }
    }
}

impl fmt::Display for DeleteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeleteReason::NotKept => f.write_str("kept by no rule"),
            DeleteReason::OlderThanMaxAge { max_age } => {
                write!(f, "older than max_age {max_age} and kept by no rule")
            }
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Keep(reasons) => {
                f.write_str("keep: ")?;
                for (i, r) in reasons.iter().enumerate() {
                    if i > 0 {
                        f.write_str("; ")?;
                    }
                    write!(f, "{r}")?;
                }
                Ok(())
            }
            Action::Delete(r) => write!(f, "delete: {r}"),
        }
    }
}

#[derive(Clone, Copy)]
enum Tier {
    Hourly,
    Daily,
    Weekly,
    Monthly,
}

/// The period `t` falls in, as a comparable key and a label.
fn period(tier: Tier, t: DateTime<Utc>, tz: Tz) -> (i64, String) {
    let l = t.with_timezone(&tz);
    match tier {
        Tier::Hourly => {
            // The UTC instant the local hour starts at: unique per real hour, also for the
            // hour that repeats when clocks fall back.
            let offset = l.offset().fix().local_minus_utc();
            let start = t.timestamp() - i64::from(l.minute() * 60 + l.second());
            (
                start,
                format!(
                    "{} {:02}:00{}",
                    l.format("%Y-%m-%d"),
                    l.hour(),
                    format_offset(offset)
                ),
            )
        }
        Tier::Daily => (
            i64::from(l.year()) * 1000 + i64::from(l.ordinal()),
            l.format("%Y-%m-%d").to_string(),
        ),
        Tier::Weekly => {
            let w = l.iso_week();
            (
                i64::from(w.year()) * 100 + i64::from(w.week()),
                format!("{}-W{:02}", w.year(), w.week()),
            )
        }
        Tier::Monthly => (
            i64::from(l.year()) * 100 + i64::from(l.month()),
            l.format("%Y-%m").to_string(),
        ),
    }
}

fn format_offset(secs: i32) -> String {
    let sign = if secs < 0 { '-' } else { '+' };
    let a = secs.abs();
    format!("{sign}{:02}:{:02}", a / 3600, (a % 3600) / 60)
}

/// Decides, for every backup, whether to keep or delete it, and why.
pub fn plan(backups: &[BackupSummary], now: DateTime<Utc>, policy: &RetentionPolicy) -> PrunePlan {
    let mut sorted: Vec<&BackupSummary> = backups.iter().collect();
    sorted.sort_by(|a, b| {
        b.revision
            .cmp(&a.revision)
            .then_with(|| b.time.cmp(&a.time))
            .then_with(|| b.id.cmp(&a.id))
    });
    let n = sorted.len();
    let mut reasons: Vec<Vec<KeepReason>> = vec![Vec::new(); n];
    if n == 0 {
        return PrunePlan {
            decisions: Vec::new(),
        };
    }
    reasons[0].push(KeepReason::Newest);
    // The chain that reaches furthest holds the newest restorable point: when it is not the
    // newest snapshot's, its base stays too (a chain is useless without its base).
    let reach = |b: &BackupSummary| b.chain_reach.unwrap_or(b.revision).max(b.revision);
    if let Some(i) = (0..n).max_by_key(|&i| (reach(sorted[i]), sorted[i].revision)) {
        if i != 0 && reach(sorted[i]) > reach(sorted[0]) {
            reasons[i].push(KeepReason::NewestChain);
        }
    }

    let rules_active = policy.keep_last > 0
        || policy.keep_hourly > 0
        || policy.keep_daily > 0
        || policy.keep_weekly > 0
        || policy.keep_monthly > 0;
    if !rules_active && policy.max_age.is_none() {
        for r in &mut reasons {
            r.push(KeepReason::NoPolicy);
        }
        return finish(&sorted, reasons, None);
    }

    for r in reasons.iter_mut().take(policy.keep_last as usize) {
        r.push(KeepReason::Last {
            n: policy.keep_last,
        });
    }
    // Periods are calendar rules: they walk the backups by time, newest first.
    let mut by_time: Vec<usize> = (0..n).collect();
    by_time.sort_by(|&a, &b| {
        sorted[b]
            .time
            .cmp(&sorted[a].time)
            .then_with(|| sorted[b].id.cmp(&sorted[a].id))
    });
    for (tier, count) in [
        (Tier::Hourly, policy.keep_hourly),
        (Tier::Daily, policy.keep_daily),
        (Tier::Weekly, policy.keep_weekly),
        (Tier::Monthly, policy.keep_monthly),
    ] {
        if count == 0 {
            continue;
        }
        let mut seen: Option<i64> = None;
        let mut kept = 0;
        for &i in &by_time {
            let b = sorted[i];
            if kept >= count {
                break;
            }
            let (key, label) = period(tier, b.time, policy.timezone);
            if seen != Some(key) {
                seen = Some(key);
                kept += 1;
                reasons[i].push(match tier {
                    Tier::Hourly => KeepReason::Hourly { period: label },
                    Tier::Daily => KeepReason::Daily { period: label },
                    Tier::Weekly => KeepReason::Weekly { period: label },
                    Tier::Monthly => KeepReason::Monthly { period: label },
                });
            }
        }
    }

    let cutoff = policy
        .max_age
        .and_then(|a| chrono::Duration::from_std(a).ok())
        .and_then(|a| now.checked_sub_signed(a));
    if let Some(cutoff) = cutoff {
        if sorted
            .iter()
            .map(|b| b.time)
            .max()
            .is_some_and(|t| t < cutoff)
        {
            for r in &mut reasons {
                r.push(KeepReason::NewestTooOld);
            }
            return finish(&sorted, reasons, None);
        }
        for (i, b) in sorted.iter().enumerate() {
            if reasons[i].is_empty() && b.time >= cutoff {
                reasons[i].push(KeepReason::WithinMaxAge);
            }
        }
    }

    // min_keep: the newest `min_keep` backups always stay, whatever else the rules keep (so
    // that a rule keeping an older backup never frees a newer one).
    let want = (policy.min_keep as usize).min(n);
    for r in reasons.iter_mut().take(want) {
        if r.is_empty() {
            r.push(KeepReason::MinKeep);
        }
    }

    // The delete cap: the oldest candidates go first.
    let candidates: Vec<usize> = (0..n).filter(|&i| reasons[i].is_empty()).collect();
    let cap = policy.max_delete_per_run as usize;
    if candidates.len() > cap {
        let deferred = candidates.len() - cap;
        for &i in candidates.iter().take(deferred) {
            reasons[i].push(KeepReason::DeleteCap);
        }
    }
    let max_age = policy
        .max_age
        .map(|a| humantime::format_duration(a).to_string());
    finish(&sorted, reasons, max_age)
}

fn finish(
    sorted: &[&BackupSummary],
    reasons: Vec<Vec<KeepReason>>,
    max_age: Option<String>,
) -> PrunePlan {
    let decisions = sorted
        .iter()
        .zip(reasons)
        .map(|(b, r)| Decision {
            id: b.id.clone(),
            time: b.time,
            action: if r.is_empty() {
                Action::Delete(match &max_age {
                    Some(a) => DeleteReason::OlderThanMaxAge { max_age: a.clone() },
                    None => DeleteReason::NotKept,
                })
            } else {
                Action::Keep(r)
            },
        })
        .collect();
    PrunePlan { decisions }
}

/// The local time `y-m-d h:mi` in `tz`, as UTC (the earlier instant when ambiguous).
#[cfg(test)]
fn local(tz: Tz, y: i32, m: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    chrono::TimeZone::with_ymd_and_hms(&tz, y, m, d, h, mi, 0)
        .earliest()
        .expect("a valid local time")
        .with_timezone(&Utc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn b(id: &str, t: DateTime<Utc>) -> BackupSummary {
        BackupSummary {
            id: id.to_string(),
            time: t,
            revision: 0,
            chain_reach: None,
        }
    }

    fn utc(y: i32, m: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, mi, 0).unwrap()
    }

    fn survivors(p: &PrunePlan) -> BTreeSet<String> {
        p.kept().map(|d| d.id.clone()).collect()
    }

    fn none_policy() -> RetentionPolicy {
        RetentionPolicy {
            keep_last: 0,
            min_keep: 1,
            ..RetentionPolicy::default()
        }
    }

    /// Backups every 6 hours from `start`, `n` of them, ids "b000", "b001", ...
    fn every_6h(start: DateTime<Utc>, n: usize) -> Vec<BackupSummary> {
        (0..n)
            .map(|i| {
                b(
                    &format!("b{i:03}"),
                    start + chrono::Duration::hours(6 * i as i64),
                )
            })
            .collect()
    }

    #[test]
    fn keep_last_only() {
        let backups = every_6h(utc(2026, 1, 1, 0, 0), 20);
        let p = plan(
            &backups,
            utc(2026, 2, 1, 0, 0),
            &RetentionPolicy {
                keep_last: 5,
                min_keep: 1,
                ..RetentionPolicy::default()
            },
        );
        let expect: BTreeSet<String> = (15..20).map(|i| format!("b{i:03}")).collect();
        assert_eq!(survivors(&p), expect);
        assert_eq!(p.to_delete().count(), 15);
        assert!(p.decisions.windows(2).all(|w| w[0].time >= w[1].time));
        assert_eq!(
            p.decisions[0].action.to_string(),
            "keep: newest backup; among the last 5"
        );
    }

    #[test]
    fn tiers_over_months() {
        // Every 6 h for 90 days (Jan 1 00:00 .. Mar 31 18:00 UTC).
        let backups = every_6h(utc(2026, 1, 1, 0, 0), 360);
        let policy = RetentionPolicy {
            keep_last: 2,
            keep_daily: 7,
            keep_weekly: 4,
            keep_monthly: 3,
            min_keep: 1,
            max_delete_per_run: 1000,
            ..RetentionPolicy::default()
        };
        let p = plan(&backups, utc(2026, 4, 1, 0, 0), &policy);
        let s = survivors(&p);
        let time_of = |id: &str| backups.iter().find(|x| x.id == id).unwrap().time;
        let mut times: Vec<DateTime<Utc>> = s.iter().map(|id| time_of(id)).collect();
        times.sort();
        let expect = vec![
            utc(2026, 1, 31, 18, 0), // month 2026-01
            utc(2026, 2, 28, 18, 0), // month 2026-02
            utc(2026, 3, 15, 18, 0), // week 2026-W11 (Sunday 03-15)
            utc(2026, 3, 22, 18, 0), // week W12
            utc(2026, 3, 25, 18, 0), // days 03-25 .. 03-31
            utc(2026, 3, 26, 18, 0),
            utc(2026, 3, 27, 18, 0),
            utc(2026, 3, 28, 18, 0),
            utc(2026, 3, 29, 18, 0), // also week W13
            utc(2026, 3, 30, 18, 0),
            utc(2026, 3, 31, 12, 0), // keep_last 2
            utc(2026, 3, 31, 18, 0), // newest, month 2026-03, day, week W14
        ];
        assert_eq!(times, expect);
        assert_eq!(p.to_delete().count(), 360 - 12);
    }

    #[test]
    fn max_age_keeps_young_backups_and_deletes_old_unkept_ones() {
        let backups = every_6h(utc(2026, 1, 1, 0, 0), 40); // 10 days
        let policy = RetentionPolicy {
            keep_last: 2,
            max_age: Some(Duration::from_secs(3 * 86400)),
            min_keep: 1,
            ..RetentionPolicy::default()
        };
        let now = utc(2026, 1, 11, 0, 0);
        let p = plan(&backups, now, &policy);
        for d in &p.decisions {
            let young = d.time >= now - chrono::Duration::days(3);
            assert_eq!(
                matches!(d.action, Action::Keep(_)),
                young,
                "{} {}",
                d.id,
                d.action
            );
        }
        let deleted = p.to_delete().next().unwrap();
        assert_eq!(
            deleted.action.to_string(),
            "delete: older than max_age 3days and kept by no rule"
        );
    }

    #[test]
    fn no_policy_keeps_everything() {
        let backups = every_6h(utc(2026, 1, 1, 0, 0), 30);
        let p = plan(&backups, utc(2027, 1, 1, 0, 0), &none_policy());
        assert_eq!(p.to_delete().count(), 0);
        assert!(p.decisions[5]
            .action
            .to_string()
            .contains("no retention rule"));
    }

    #[test]
    fn failing_backups_freeze_deletion() {
        let backups = every_6h(utc(2026, 1, 1, 0, 0), 30);
        let policy = RetentionPolicy {
            keep_last: 1,
            max_age: Some(Duration::from_secs(86400)),
            min_keep: 1,
            ..RetentionPolicy::default()
        };
        // Newest is from Jan 8; a month later nothing may be deleted.
        let p = plan(&backups, utc(2026, 2, 8, 0, 0), &policy);
        assert_eq!(p.to_delete().count(), 0);
        assert!(p.decisions[10]
            .action
            .to_string()
            .contains("backups are failing"));
    }

    #[test]
    fn min_keep_overrides_and_newest_always_stays() {
        let backups = every_6h(utc(2026, 1, 1, 0, 0), 10);
        let policy = RetentionPolicy {
            keep_last: 1,
            max_age: Some(Duration::from_secs(60)),
            min_keep: 4,
            ..RetentionPolicy::default()
        };
        // 30 seconds after the newest backup: everything else is older than max_age.
        let now = utc(2026, 1, 3, 6, 0) + chrono::Duration::seconds(30);
        let p = plan(&backups, now, &policy);
        let expect: BTreeSet<String> = (6..10).map(|i| format!("b{i:03}")).collect();
        assert_eq!(survivors(&p), expect);
        assert!(p.decisions[1].action.to_string().contains("min_keep"));
    }

    #[test]
    fn delete_cap_deletes_oldest_first() {
        let backups = every_6h(utc(2026, 1, 1, 0, 0), 50);
        let policy = RetentionPolicy {
            keep_last: 5,
            min_keep: 1,
            max_delete_per_run: 10,
            ..RetentionPolicy::default()
        };
        let p = plan(&backups, utc(2026, 3, 1, 0, 0), &policy);
        let deleted: BTreeSet<String> = p.to_delete().map(|d| d.id.clone()).collect();
        let expect: BTreeSet<String> = (0..10).map(|i| format!("b{i:03}")).collect();
        assert_eq!(deleted, expect);
        assert!(p.decisions[10].action.to_string().contains("deferred"));
    }

    #[test]
    fn hourly_across_fall_back_counts_the_repeated_hour_twice() {
        let tz = chrono_tz::Europe::Berlin;
        // 2026-10-25: 02:00-03:00 local happens twice (00:00-01:00 and 01:00-02:00 UTC).
        let backups = vec![
            b("a", utc(2026, 10, 24, 23, 30)), // 01:30 CEST
            b("b", utc(2026, 10, 25, 0, 30)),  // 02:30 CEST
            b("c", utc(2026, 10, 25, 1, 30)),  // 02:30 CET (the repeated hour)
            b("d", utc(2026, 10, 25, 1, 50)),  // 02:50 CET, same hour as c
        ];
        let policy = RetentionPolicy {
            keep_last: 0,
            keep_hourly: 3,
            min_keep: 1,
            timezone: tz,
            ..RetentionPolicy::default()
        };
        let p = plan(&backups, utc(2026, 10, 26, 0, 0), &policy);
        assert_eq!(
            survivors(&p),
            ["a", "b", "d"]
                .iter()
                .map(std::string::ToString::to_string)
                .collect()
        );
        let labels: Vec<String> = p.kept().map(|d| d.action.to_string()).collect();
        assert!(
            labels.iter().any(|l| l.contains("2026-10-25 02:00+01:00")),
            "{labels:?}"
        );
        assert!(
            labels.iter().any(|l| l.contains("2026-10-25 02:00+02:00")),
            "{labels:?}"
        );
    }

    #[test]
    fn daily_across_spring_forward_and_timezones() {
        let tz = chrono_tz::America::New_York;
        // 2026-03-08: 02:00 -> 03:00 local. 23:30 local on the 7th is 04:30 UTC on the 8th.
        let backups = vec![
            b("sat-late", local(tz, 2026, 3, 7, 23, 30)),
            b("sun-1", local(tz, 2026, 3, 8, 1, 30)),
            b("sun-3", local(tz, 2026, 3, 8, 3, 30)),
        ];
        let policy = RetentionPolicy {
            keep_last: 0,
            keep_daily: 2,
            min_keep: 1,
            timezone: tz,
            ..RetentionPolicy::default()
        };
        let p = plan(&backups, utc(2026, 3, 10, 0, 0), &policy);
        assert_eq!(
            survivors(&p),
            ["sat-late", "sun-3"]
                .iter()
                .map(std::string::ToString::to_string)
                .collect()
        );
        // In UTC all three fall on 2026-03-08: only the newest day survives there.
        let p = plan(
            &backups,
            utc(2026, 3, 10, 0, 0),
            &RetentionPolicy {
                timezone: Tz::UTC,
                ..policy
            },
        );
        assert_eq!(
            survivors(&p),
            ["sun-3"]
                .iter()
                .map(std::string::ToString::to_string)
                .collect()
        );
    }

    #[test]
    fn month_ends_and_iso_week_years() {
        let tz = chrono_tz::Europe::Berlin;
        // 23:30 UTC on Jan 31 is already February in Berlin.
        let backups = vec![
            b("jan30", utc(2026, 1, 30, 12, 0)),
            b("jan31-late", utc(2026, 1, 31, 23, 30)),
            b("feb28", utc(2026, 2, 28, 12, 0)),
        ];
        let policy = RetentionPolicy {
            keep_last: 0,
            keep_monthly: 2,
            min_keep: 1,
            timezone: tz,
            ..RetentionPolicy::default()
        };
        let p = plan(&backups, utc(2026, 3, 2, 0, 0), &policy);
        assert_eq!(
            survivors(&p),
            ["feb28", "jan30"]
                .iter()
                .map(std::string::ToString::to_string)
                .collect()
        );
        // 2026-12-28 (Mon) and 2027-01-03 (Sun) are both in ISO week 2026-W53.
        let backups = vec![
            b("w52", utc(2026, 12, 25, 12, 0)),
            b("mon", utc(2026, 12, 28, 12, 0)),
            b("sun", utc(2027, 1, 3, 12, 0)),
        ];
        let policy = RetentionPolicy {
            keep_last: 0,
            keep_weekly: 2,
            min_keep: 1,
            ..RetentionPolicy::default()
        };
        let p = plan(&backups, utc(2027, 1, 4, 0, 0), &policy);
        assert_eq!(
            survivors(&p),
            ["sun", "w52"]
                .iter()
                .map(std::string::ToString::to_string)
                .collect()
        );
        assert!(p.decisions[0].action.to_string().contains("2026-W53"));
    }

    // ---- properties ----

    fn arb_backups() -> impl Strategy<Value = Vec<BackupSummary>> {
        // Up to 300 backups over ~2 years, duplicates of times allowed.
        proptest::collection::vec((0i64..63_072_000, 0u32..4), 0..300).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (secs, dup))| {
                    // A quarter of the times are snapped to 6-hour marks, so equal times occur.
                    let secs = if dup == 0 { secs - secs % 21_600 } else { secs };
                    let t = DateTime::from_timestamp(1_767_225_600 + secs, 0).unwrap();
                    b(&format!("id{i:04}"), t)
                })
                .collect()
        })
    }

    fn arb_policy() -> impl Strategy<Value = RetentionPolicy> {
        (
            (0u32..15, 0u32..30, 0u32..15, 0u32..10, 0u32..15),
            proptest::option::of(1u64..400),
            (1u32..8, 1u32..400),
            prop_oneof![
                Just(Tz::UTC),
                Just(chrono_tz::Europe::Berlin),
                Just(chrono_tz::America::New_York),
                Just(chrono_tz::Asia::Kolkata)
            ],
        )
            .prop_map(
                |((l, h, d, w, m), age_days, (min_keep, cap), tz)| RetentionPolicy {
                    keep_last: l,
                    keep_hourly: h,
                    keep_daily: d,
                    keep_weekly: w,
                    keep_monthly: m,
                    max_age: age_days.map(|d| Duration::from_secs(d * 86400)),
                    min_keep,
                    max_delete_per_run: cap,
                    timezone: tz,
                },
            )
    }

    fn arb_now() -> impl Strategy<Value = DateTime<Utc>> {
        (0i64..80_000_000).prop_map(|s| DateTime::from_timestamp(1_767_225_600 + s, 0).unwrap())
    }

    fn deleted(p: &PrunePlan) -> BTreeSet<String> {
        p.to_delete().map(|d| d.id.clone()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn safety_rules_hold(bs in arb_backups(), policy in arb_policy(), now in arb_now()) {
            let p = plan(&bs, now, &policy);
            prop_assert_eq!(p.decisions.len(), bs.len());
            let ids: BTreeSet<String> = bs.iter().map(|x| x.id.clone()).collect();
            let planned: BTreeSet<String> = p.decisions.iter().map(|d| d.id.clone()).collect();
            prop_assert_eq!(&ids, &planned);
            if let Some(newest) = bs.iter().max_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id))) {
                prop_assert!(!deleted(&p).contains(&newest.id));
                if let Some(age) = policy.max_age {
                    if newest.time < now - chrono::Duration::from_std(age).unwrap() {
                        prop_assert_eq!(p.to_delete().count(), 0);
                    }
                }
            }
            let kept = p.kept().count();
            prop_assert!(kept >= (policy.min_keep as usize).min(bs.len()));
            prop_assert!(p.to_delete().count() <= policy.max_delete_per_run as usize);
        }

        #[test]
        fn the_newest_restorable_point_keeps_its_base(bs in arb_backups(), reaches in proptest::collection::vec(proptest::option::of(0i64..2_000), 300), policy in arb_policy(), now in arb_now()) {
            // Revisions grow with time; some backups have a chain reaching past them.
            let mut bs = bs;
            bs.sort_by(|a, b| a.time.cmp(&b.time).then_with(|| a.id.cmp(&b.id)));
            for (i, (b, r)) in bs.iter_mut().zip(&reaches).enumerate() {
                b.revision = 1_000 * (i as i64 + 1);
                b.chain_reach = r.map(|r| b.revision + r);
            }
            let p = plan(&bs, now, &policy);
            let reach = |b: &BackupSummary| b.chain_reach.unwrap_or(b.revision);
            if let Some(top) = bs.iter().map(reach).max() {
                // Some backup that reaches the newest point is kept.
                let gone = deleted(&p);
                prop_assert!(
                    bs.iter().any(|b| reach(b) == top && !gone.contains(&b.id)),
                    "the newest restorable point {top} lost"
                );
            }
        }

        #[test]
        fn input_order_does_not_matter(bs in arb_backups(), policy in arb_policy(), now in arb_now(), seed in any::<u64>()) {
            let mut shuffled = bs.clone();
            // A deterministic shuffle from the seed.
            let mut s = seed | 1;
            for i in (1..shuffled.len()).rev() {
                s ^= s << 13; s ^= s >> 7; s ^= s << 17;
                shuffled.swap(i, (s % (i as u64 + 1)) as usize);
            }
            prop_assert_eq!(plan(&bs, now, &policy), plan(&shuffled, now, &policy));
        }

        #[test]
        fn pruning_twice_deletes_nothing_more(bs in arb_backups(), mut policy in arb_policy(), now in arb_now()) {
            policy.max_delete_per_run = 1000;
            let first = plan(&bs, now, &policy);
            let gone = deleted(&first);
            let rest: Vec<BackupSummary> = bs.iter().filter(|x| !gone.contains(&x.id)).cloned().collect();
            let second = plan(&rest, now, &policy);
            prop_assert_eq!(second.to_delete().count(), 0, "second plan: {:?}", second);
        }

        #[test]
        fn more_keeping_never_deletes_more(bs in arb_backups(), mut policy in arb_policy(), now in arb_now(), which in 0usize..5, extra in 1u32..10) {
            policy.max_delete_per_run = 1000;
            // With no rule and no max_age everything is kept; adding a rule changes that.
            prop_assume!(policy.max_age.is_some() || policy.keep_last + policy.keep_hourly + policy.keep_daily + policy.keep_weekly + policy.keep_monthly > 0);
            let base = deleted(&plan(&bs, now, &policy));
            let mut more = policy.clone();
            match which {
                0 => more.keep_last += extra,
                1 => more.keep_hourly += extra,
                2 => more.keep_daily += extra,
                3 => more.keep_weekly += extra,
                _ => more.keep_monthly += extra,
            }
            let after = deleted(&plan(&bs, now, &more));
            prop_assert!(after.is_subset(&base), "{:?} not within {:?}", after, base);
        }
    }
}
