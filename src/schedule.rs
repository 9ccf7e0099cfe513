//! The cron schedule: the next slot after a given instant, evaluated in the configured
//! timezone so that "every day at 02:00" stays at 02:00 local time across DST changes.
//!
//! Pure functions of their inputs; the daemon's loop supplies `now`.

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use std::fmt;

/// A parsed cron expression and the timezone it is evaluated in.
#[derive(Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
    text: String,
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?} in {})", self.text, self.tz.name())
    }
}

impl Schedule {
    /// Parses a 5-field cron expression (`min hour dom mon dow`). A 6-field form with a
    /// leading seconds field is accepted too, for short test schedules.
    ///
    /// # Errors
    /// A message saying what is wrong with the expression.
    pub fn parse(text: &str, tz: Tz) -> Result<Schedule, String> {
        let fields = text.split_whitespace().count();
        if !text.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            return Err(format!(
                "{text:?} has {fields} fields; write 5 fields (minute hour day-of-month month day-of-week), e.g. \"0 */6 * * *\""
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(text)
            .map_err(|e| format!("{text:?} is not a valid cron expression: {e}"))?;
        Ok(Schedule {
            cron,
            tz,
            text: text.to_string(),
        })
    }

    /// The first slot strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The latest slot at or before `at`.
    pub fn previous_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = at.with_timezone(&self.tz);
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// The longest gap between consecutive runs over the next `n` runs after `from` (a
    /// weekday-only schedule has a weekend gap). Alerting compares the age of the newest
    /// backup against this.
    pub fn max_interval(&self, from: DateTime<Utc>, n: usize) -> Option<chrono::Duration> {
        let mut prev = self.next_after(from)?;
        let mut max = None;
        for _ in 0..n {
            let next = self.next_after(prev)?;
            let gap = next - prev;
            if max.is_none_or(|m| gap > m) {
                max = Some(gap);
            }
            prev = next;
        }
        max
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, 0).unwrap()
    }

    #[test]
    fn every_six_hours_in_utc() {
        let s = Schedule::parse("0 */6 * * *", Tz::UTC).unwrap();
        assert_eq!(
            s.next_after(utc(2026, 1, 1, 0, 0)),
            Some(utc(2026, 1, 1, 6, 0))
        );
        assert_eq!(
            s.next_after(utc(2026, 1, 1, 23, 59)),
            Some(utc(2026, 1, 2, 0, 0))
        );
        assert_eq!(
            s.previous_at_or_before(utc(2026, 1, 1, 7, 0)),
            Some(utc(2026, 1, 1, 6, 0))
        );
    }

    #[test]
    fn local_time_is_kept_across_dst() {
        // 02:30 local does not exist on 2026-03-29 in Berlin; 03:00 local is 01:00 UTC then.
        let s = Schedule::parse("0 3 * * *", chrono_tz::Europe::Berlin).unwrap();
        // Winter: 03:00 CET = 02:00 UTC.
        assert_eq!(
            s.next_after(utc(2026, 3, 27, 12, 0)),
            Some(utc(2026, 3, 28, 2, 0))
        );
        // Summer: 03:00 CEST = 01:00 UTC.
        assert_eq!(
            s.next_after(utc(2026, 3, 28, 12, 0)),
            Some(utc(2026, 3, 29, 1, 0))
        );
        assert_eq!(
            s.next_after(utc(2026, 3, 29, 12, 0)),
            Some(utc(2026, 3, 30, 1, 0))
        );
    }

    #[test]
    fn fall_back_runs_once() {
        // 02:30 local happens twice on 2026-10-25 in Berlin; one run is enough.
        let s = Schedule::parse("30 2 * * *", chrono_tz::Europe::Berlin).unwrap();
        let first = s.next_after(utc(2026, 10, 24, 12, 0)).unwrap();
        let second = s.next_after(first).unwrap();
        assert!(
            second - first >= chrono::Duration::hours(23),
            "{first} then {second}"
        );
    }

    #[test]
    fn longest_gap() {
        let s = Schedule::parse("0 2 * * 1-5", Tz::UTC).unwrap();
        assert_eq!(
            s.max_interval(utc(2026, 1, 1, 0, 0), 20),
            Some(chrono::Duration::days(3))
        );
        let s = Schedule::parse("*/15 * * * *", Tz::UTC).unwrap();
        assert_eq!(
            s.max_interval(utc(2026, 1, 1, 0, 0), 20),
            Some(chrono::Duration::minutes(15))
        );
    }

    #[test]
    fn field_counts_are_checked() {
        assert!(Schedule::parse("* * * *", Tz::UTC).is_err());
        assert!(Schedule::parse("0 0 * * * * 2026", Tz::UTC).is_err());
        assert!(Schedule::parse("*/5 * * * * *", Tz::UTC).is_ok());
        assert!(Schedule::parse("@daily", Tz::UTC).is_ok());
        assert!(Schedule::parse("61 * * * *", Tz::UTC).is_err());
    }
}
