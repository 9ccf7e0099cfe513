//! Pacing of the upload (`[storage] max_upload_rate`).

use std::time::Duration;
use tokio::time::Instant;

/// Paces a stream of chunks to an average of `rate` bytes per second: each chunk may go
/// once the ones before it have had their time. Idle time earns no credit, so the link never
/// sees more than one chunk (plus the store's parts in flight) above the rate.
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    next: Option<Instant>,
}

impl Pacer {
    /// A pacer for `rate` bytes per second (more than zero).
    pub fn new(rate: u64) -> Self {
        Self {
            rate: rate.max(1),
            next: None,
        }
    }

    /// The decision, pure: when a chunk of `len` bytes asked for at `now` may go. Books its
    /// time.
    pub fn book(&mut self, now: Instant, len: usize) -> Instant {
        let at = self.next.map_or(now, |n| n.max(now));
        self.next = Some(at + Duration::from_secs_f64(len as f64 / self.rate as f64));
        at
    }

    /// Waits until a chunk of `len` bytes may go, and books its time.
    pub async fn pace(&mut self, len: usize) {
        let at = self.book(Instant::now(), len);
        tokio::time::sleep_until(at).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn holds_the_average_rate() {
        let mut p = Pacer::new(MIB as u64);
        let t0 = Instant::now();
        // A sender that is always ready: each chunk goes when the pacer allows.
        let mut now = t0;
        for i in 0..10u64 {
            now = p.book(now, MIB);
            assert_eq!(now - t0, Duration::from_secs(i), "chunk {i}");
        }
        now = p.book(now, MIB / 2);
        assert_eq!(now - t0, Duration::from_secs(10));
        now = p.book(now, 1);
        assert_eq!(now - t0, Duration::from_millis(10_500));
        // 10.5 MiB plus a byte in 10.5 s: the rate, never above it.
    }

    #[test]
    fn idle_time_earns_no_burst() {
        let mut p = Pacer::new(MIB as u64);
        let t0 = Instant::now();
        assert_eq!(p.book(t0, MIB), t0);
        // The uploader had nothing to send for a minute.
        let later = t0 + Duration::from_secs(60);
        let mut now = later;
        for i in 0..4u64 {
            now = p.book(now, MIB);
            assert_eq!(now - later, Duration::from_secs(i), "chunk {i}");
        }
    }

    #[tokio::test]
    async fn pace_waits_for_the_booked_time() {
        // A high rate keeps this quick; the assertion is on order, not on a threshold.
        let mut p = Pacer::new(64 * MIB as u64);
        let t0 = Instant::now();
        p.pace(MIB).await;
        p.pace(MIB).await;
        p.pace(1).await;
        assert!(t0.elapsed() >= Duration::from_secs_f64(2.0 / 64.0));
    }
}
