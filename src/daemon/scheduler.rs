//! When to back up: a pure state machine over the wall clock, this node's role and what the
//! store says about the newest committed backup. The daemon asks [`Scheduler::next`] what
//! to do, does it (wait, list the store, run a cycle) and reports back; no I/O here.
//!
//! The rules:
//! - A slot runs when its time comes, if this node may back up (it leads, or there is no
//!   election). A follower lets the slot pass: another node takes it.
//! - A failed cycle is tried once more after `[backup] retry_after`, if that is before the
//!   next slot and this node still leads.
//! - Catch-up: when a term starts (or the daemon starts without an election) and when a
//!   slot passed by more than [`LATE_TOLERANCE`] without running (a suspend, a clock step),
//!   the last slot at or before now is run once if the store holds no committed backup for
//!   it or a later one. A missed slot is run once, never lost, never run twice.

use crate::schedule::Schedule;
use chrono::{DateTime, Utc};
use std::time::Duration;

/// The longest single wait; the next slot is recomputed from the wall clock after each, so
/// clock steps and suspends do not make a run fire late.
pub const MAX_SLEEP: Duration = Duration::from_secs(60);

/// A slot whose time passed by more than this without running is not run as scheduled; the
/// catch-up rule decides whether it is run (once, late).
pub const LATE_TOLERANCE: chrono::Duration = chrono::Duration::seconds(60);

/// How long after a failed store listing the catch-up check is tried again.
pub const CATCH_UP_RECHECK: Duration = Duration::from_secs(10);

/// This node's place, as the scheduler needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// No election: this node always backs up.
    Solo,
    /// Another node leads, or this node is not in the election.
    Follower,
    /// This node leads the term with this fencing token.
    Leader(i64),
}

impl Role {
    fn may_run(self) -> bool {
        matches!(self, Role::Solo | Role::Leader(_))
    }
}

/// Why a cycle runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its slot came.
    Scheduled,
    /// The cycle for this slot failed; this is the one retry.
    Retry,
    /// The slot was missed (new term, start, suspend, clock step) and the store has no
    /// backup for it.
    CatchUp,
}

/// What the daemon should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing due: wait at most this long (or until the role changes), then ask again.
    Wait(Duration),
    /// List the store and call [`Scheduler::next`] again with the newest committed backup's
    /// slot, or [`Scheduler::store_unavailable`] when it cannot be listed.
    CheckStore,
    /// Run the cycle for `slot`, then report with [`Scheduler::finished`].
    Run {
        /// The slot the backup is for.
        slot: DateTime<Utc>,
        /// Why it runs.
        reason: Reason,
    },
}

/// How a cycle ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A backup was committed.
    Committed,
    /// It failed (it may be retried once).
    Failed,
    /// It stopped because the term ended or the daemon is shutting down: no retry here
    /// (a new term catches up).
    Aborted,
}

/// The newest committed backup, as the store reported it when asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Newest(pub Option<DateTime<Utc>>);

/// The scheduler's state.
#[derive(Debug, Clone)]
pub struct Scheduler {
    schedule: Schedule,
    retry_after: Option<Duration>,
    /// The next slot waited for.
    slot: Option<DateTime<Utc>>,
    /// The role seen at the last call (a new leader token starts a catch-up).
    seen: Option<Role>,
    catch_up: bool,
    /// When the store could last not be listed for the catch-up check.
    unavailable_at: Option<DateTime<Utc>>,
    /// A planned retry: (when, slot).
    retry: Option<(DateTime<Utc>, DateTime<Utc>)>,
    /// The slot retried last (each slot is retried at most once).
    retried: Option<DateTime<Utc>>,
}

impl Scheduler {
    /// A scheduler starting at `now`: the next slot after `now`; a catch-up check first
    /// (it only runs once this node may back up).
    pub fn new(schedule: Schedule, retry_after: Option<Duration>, now: DateTime<Utc>) -> Self {
        Scheduler {
            slot: schedule.next_after(now),
            schedule,
            retry_after,
            seen: None,
            catch_up: true,
            unavailable_at: None,
            retry: None,
            retried: None,
        }
    }

    /// The slot waited for (`None`: the schedule has no future run).
    pub fn next_slot(&self) -> Option<DateTime<Utc>> {
        self.slot
    }

    /// A reloaded schedule: the next slot is recomputed; a planned retry stays if it is
    /// still before the new next slot.
    pub fn set_schedule(
        &mut self,
        schedule: Schedule,
        retry_after: Option<Duration>,
        now: DateTime<Utc>,
    ) {
        self.slot = schedule.next_after(now);
        self.schedule = schedule;
        self.retry_after = retry_after;
        if let (Some((when, _)), Some(next)) = (self.retry, self.slot) {
            if when >= next {
                self.retry = None;
            }
        }
    }

    /// The store could not be listed for the catch-up check: it is tried again after
    /// [`CATCH_UP_RECHECK`].
    pub fn store_unavailable(&mut self, now: DateTime<Utc>) {
        self.unavailable_at = Some(now);
    }

    /// What to do at `now` with this node's `role`; `newest` is the store's answer after a
    /// [`Action::CheckStore`] (otherwise `None`).
    pub fn next(&mut self, now: DateTime<Utc>, role: Role, newest: Option<Newest>) -> Action {
        self.observe(role);
        if !role.may_run() {
            self.retry = None;
        }
        if let Some((when, slot)) = self.retry {
            if now >= when {
                self.retry = None;
                self.retried = Some(slot);
                return self.start(slot, Reason::Retry);
            }
        }
        // Slots that passed: run the one due now, let a follower's pass, and hand the late
        // ones to the catch-up rule.
        while let Some(at) = self.slot {
            if now < at {
                break;
            }
            if now - at > LATE_TOLERANCE {
                self.catch_up = true;
                self.slot = self.schedule.next_after(now);
                continue;
            }
            if !role.may_run() {
                self.slot = self.schedule.next_after(now);
                continue;
            }
            return self.start(at, Reason::Scheduled);
        }
        if self.catch_up && role.may_run() {
            if let Some(Newest(newest)) = newest {
                self.unavailable_at = None;
                self.catch_up = false;
                if let Some(prev) = self.schedule.previous_at_or_before(now) {
                    if newest.is_none_or(|n| n < prev) {
                        return self.start(prev, Reason::CatchUp);
                    }
                }
            } else {
                let recheck_due = self
                    .unavailable_at
                    .is_none_or(|t| (now - t).to_std().unwrap_or_default() >= CATCH_UP_RECHECK);
                if recheck_due {
                    return Action::CheckStore;
                }
            }
        }
        Action::Wait(self.wait(now, role))
    }

    /// How a cycle for `slot` started by [`Action::Run`] ended, at `now`.
    pub fn finished(&mut self, slot: DateTime<Utc>, outcome: Outcome, now: DateTime<Utc>) {
        self.retry = None;
        if outcome == Outcome::Failed && self.retried != Some(slot) {
            if let Some(after) = self
                .retry_after
                .and_then(|a| chrono::Duration::from_std(a).ok())
            {
                let when = now + after;
                if self.schedule.next_after(now).is_none_or(|next| when < next) {
                    self.retry = Some((when, slot));
                }
            }
        }
        // Slots that passed while the cycle ran are not run back to back.
        self.slot = self.schedule.next_after(now);
    }

    /// The retry planned, if any: (when, slot).
    pub fn planned_retry(&self) -> Option<(DateTime<Utc>, DateTime<Utc>)> {
        self.retry
    }

    fn observe(&mut self, role: Role) {
        if let Role::Leader(_) = role {
            if self.seen != Some(role) {
                // A new term: the last slot may have been missed while nobody led.
                self.catch_up = true;
                self.unavailable_at = None;
            }
        }
        self.seen = Some(role);
    }

    fn start(&mut self, slot: DateTime<Utc>, reason: Reason) -> Action {
        // Running a slot makes a pending catch-up moot (the store would show it).
        self.catch_up = false;
        self.unavailable_at = None;
        Action::Run { slot, reason }
    }

    fn wait(&self, now: DateTime<Utc>, role: Role) -> Duration {
        let until = |t: DateTime<Utc>| (t - now).to_std().unwrap_or_default();
        let mut w = self.slot.map_or(MAX_SLEEP, until).min(MAX_SLEEP);
        if let Some((when, _)) = self.retry {
            w = w.min(until(when));
        }
        if self.catch_up && role.may_run() {
            w = w.min(CATCH_UP_RECHECK);
        }
        w
    }
}

/// Counts the slots strictly between `after` and `until` (the runs a long cycle missed).
pub fn slots_between(s: &Schedule, after: DateTime<Utc>, until: DateTime<Utc>) -> usize {
    let mut n = 0;
    let mut t = after;
    while let Some(next) = s.next_after(t) {
        if next >= until || n > 10_000 {
            break;
        }
        n += 1;
        t = next;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use chrono_tz::Tz;

    fn t(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 5, 1, h, m, s).unwrap()
    }

    fn hourly() -> Schedule {
        Schedule::parse("0 * * * *", Tz::UTC).unwrap()
    }

    fn run(slot: DateTime<Utc>, reason: Reason) -> Action {
        Action::Run { slot, reason }
    }

    /// A scheduler started at 05:30 whose first catch-up check found the 05:00 backup.
    fn settled(role: Role) -> Scheduler {
        let mut s = Scheduler::new(hourly(), Some(Duration::from_secs(600)), t(5, 30, 0));
        if role == Role::Follower {
            // A follower does not catch up: the leader does.
            assert_eq!(s.next(t(5, 30, 0), role, None), Action::Wait(MAX_SLEEP));
            return s;
        }
        assert_eq!(s.next(t(5, 30, 0), role, None), Action::CheckStore);
        let a = s.next(t(5, 30, 0), role, Some(Newest(Some(t(5, 0, 0)))));
        assert_eq!(a, Action::Wait(MAX_SLEEP));
        s
    }

    #[test]
    fn slots_run_on_time_and_waits_are_capped() {
        let mut s = settled(Role::Solo);
        assert_eq!(
            s.next(t(5, 59, 30), Role::Solo, None),
            Action::Wait(Duration::from_secs(30))
        );
        assert_eq!(
            s.next(t(6, 0, 0), Role::Solo, None),
            run(t(6, 0, 0), Reason::Scheduled)
        );
        s.finished(t(6, 0, 0), Outcome::Committed, t(6, 0, 20));
        assert_eq!(s.next_slot(), Some(t(7, 0, 0)));
        assert_eq!(
            s.next(t(6, 0, 20), Role::Solo, None),
            Action::Wait(MAX_SLEEP)
        );
        // Up to a minute late (a busy host) still runs as scheduled.
        assert_eq!(
            s.next(t(7, 0, 59), Role::Solo, None),
            run(t(7, 0, 0), Reason::Scheduled)
        );
    }

    #[test]
    fn a_failed_slot_is_retried_once_before_the_next() {
        let mut s = settled(Role::Leader(7));
        assert_eq!(
            s.next(t(6, 0, 0), Role::Leader(7), None),
            run(t(6, 0, 0), Reason::Scheduled)
        );
        s.finished(t(6, 0, 0), Outcome::Failed, t(6, 1, 0));
        assert_eq!(s.planned_retry(), Some((t(6, 11, 0), t(6, 0, 0))));
        assert_eq!(
            s.next(t(6, 10, 30), Role::Leader(7), None),
            Action::Wait(Duration::from_secs(30))
        );
        assert_eq!(
            s.next(t(6, 11, 0), Role::Leader(7), None),
            run(t(6, 0, 0), Reason::Retry)
        );
        s.finished(t(6, 0, 0), Outcome::Failed, t(6, 12, 0));
        assert_eq!(s.planned_retry(), None, "one retry per slot");
        // A retry that would land after the next slot is not planned.
        assert_eq!(
            s.next(t(7, 0, 0), Role::Leader(7), None),
            run(t(7, 0, 0), Reason::Scheduled)
        );
        s.finished(t(7, 0, 0), Outcome::Failed, t(7, 55, 0));
        assert_eq!(s.planned_retry(), None);
        // Aborted (fenced, shutdown) cycles are not retried here.
        assert_eq!(
            s.next(t(8, 0, 0), Role::Leader(7), None),
            run(t(8, 0, 0), Reason::Scheduled)
        );
        s.finished(t(8, 0, 0), Outcome::Aborted, t(8, 1, 0));
        assert_eq!(s.planned_retry(), None);
    }

    #[test]
    fn losing_the_lead_drops_the_retry_and_followers_let_slots_pass() {
        let mut s = settled(Role::Leader(7));
        assert_eq!(
            s.next(t(6, 0, 0), Role::Leader(7), None),
            run(t(6, 0, 0), Reason::Scheduled)
        );
        s.finished(t(6, 0, 0), Outcome::Failed, t(6, 1, 0));
        assert!(matches!(
            s.next(t(6, 2, 0), Role::Follower, None),
            Action::Wait(_)
        ));
        assert_eq!(s.planned_retry(), None);
        assert!(matches!(
            s.next(t(7, 0, 0), Role::Follower, None),
            Action::Wait(_)
        ));
        assert_eq!(
            s.next_slot(),
            Some(t(8, 0, 0)),
            "the follower let 07:00 pass"
        );
    }

    #[test]
    fn a_new_term_catches_up_the_slot_nobody_took() {
        let mut s = settled(Role::Follower);
        // 06:00 passes while this node follows (the leader died at 05:59).
        assert!(matches!(
            s.next(t(6, 0, 0), Role::Follower, None),
            Action::Wait(_)
        ));
        // It wins a term at 06:00:40: the store has nothing for 06:00, so it runs it once.
        assert_eq!(
            s.next(t(6, 0, 40), Role::Leader(9), None),
            Action::CheckStore
        );
        assert_eq!(
            s.next(t(6, 0, 41), Role::Leader(9), Some(Newest(Some(t(5, 0, 0))))),
            run(t(6, 0, 0), Reason::CatchUp)
        );
        s.finished(t(6, 0, 0), Outcome::Committed, t(6, 1, 0));
        // The same term: no second catch-up.
        assert!(matches!(
            s.next(t(6, 2, 0), Role::Leader(9), None),
            Action::Wait(_)
        ));
        // Another term whose store check shows the slot taken: nothing to catch up.
        assert_eq!(
            s.next(t(6, 3, 0), Role::Leader(10), None),
            Action::CheckStore
        );
        assert!(matches!(
            s.next(t(6, 3, 0), Role::Leader(10), Some(Newest(Some(t(6, 0, 0))))),
            Action::Wait(_)
        ));
    }

    #[test]
    fn an_unlistable_store_is_checked_again_later_not_run_blindly() {
        let mut s = Scheduler::new(hourly(), None, t(5, 30, 0));
        assert_eq!(s.next(t(5, 30, 0), Role::Solo, None), Action::CheckStore);
        s.store_unavailable(t(5, 30, 0));
        assert_eq!(
            s.next(t(5, 30, 1), Role::Solo, None),
            Action::Wait(CATCH_UP_RECHECK)
        );
        assert_eq!(s.next(t(5, 30, 10), Role::Solo, None), Action::CheckStore);
        assert_eq!(
            s.next(t(5, 30, 11), Role::Solo, Some(Newest(None))),
            run(t(5, 0, 0), Reason::CatchUp)
        );
    }

    #[test]
    fn a_suspend_past_a_slot_runs_it_once_late_not_never() {
        let mut s = settled(Role::Solo);
        // Suspended from 05:59 to 06:07: the 06:00 slot is 7 minutes late.
        assert_eq!(s.next(t(6, 7, 0), Role::Solo, None), Action::CheckStore);
        assert_eq!(s.next_slot(), Some(t(7, 0, 0)));
        assert_eq!(
            s.next(t(6, 7, 1), Role::Solo, Some(Newest(Some(t(5, 0, 0))))),
            run(t(6, 0, 0), Reason::CatchUp)
        );
        s.finished(t(6, 0, 0), Outcome::Committed, t(6, 8, 0));
        assert!(matches!(
            s.next(t(6, 8, 0), Role::Solo, None),
            Action::Wait(_)
        ));
        // A clock step forward over several slots: only the last one is run.
        assert_eq!(s.next(t(9, 30, 0), Role::Solo, None), Action::CheckStore);
        assert_eq!(
            s.next(t(9, 30, 0), Role::Solo, Some(Newest(Some(t(6, 0, 0))))),
            run(t(9, 0, 0), Reason::CatchUp)
        );
        s.finished(t(9, 0, 0), Outcome::Committed, t(9, 31, 0));
        assert_eq!(s.next_slot(), Some(t(10, 0, 0)));
    }

    #[test]
    fn a_clock_step_backwards_waits_for_the_next_slot_without_running_twice() {
        let mut s = settled(Role::Solo);
        assert_eq!(
            s.next(t(6, 0, 0), Role::Solo, None),
            run(t(6, 0, 0), Reason::Scheduled)
        );
        s.finished(t(6, 0, 0), Outcome::Committed, t(6, 0, 30));
        // The clock steps back to 05:58: the next slot stays 07:00.
        assert_eq!(
            s.next(t(5, 58, 0), Role::Solo, None),
            Action::Wait(MAX_SLEEP)
        );
        assert_eq!(s.next_slot(), Some(t(7, 0, 0)));
    }

    #[test]
    fn a_follower_suspended_past_a_slot_does_not_catch_up_until_it_leads() {
        let mut s = settled(Role::Follower);
        assert!(matches!(
            s.next(t(6, 7, 0), Role::Follower, None),
            Action::Wait(_)
        ));
        assert_eq!(
            s.next(t(6, 7, 5), Role::Leader(3), None),
            Action::CheckStore
        );
    }

    #[test]
    fn a_reload_moves_the_next_slot() {
        let mut s = settled(Role::Solo);
        s.set_schedule(
            Schedule::parse("*/10 * * * *", Tz::UTC).unwrap(),
            None,
            t(5, 31, 0),
        );
        assert_eq!(s.next_slot(), Some(t(5, 40, 0)));
        assert_eq!(
            s.next(t(5, 40, 0), Role::Solo, None),
            run(t(5, 40, 0), Reason::Scheduled)
        );
    }

    #[test]
    fn overrun_slots_are_counted() {
        let s = Schedule::parse("*/10 * * * *", Tz::UTC).unwrap();
        assert_eq!(slots_between(&s, t(6, 0, 0), t(6, 5, 0)), 0);
        assert_eq!(slots_between(&s, t(6, 0, 0), t(6, 35, 0)), 3);
    }
}
