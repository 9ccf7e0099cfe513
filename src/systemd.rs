//! systemd integration: `READY=1`, `STATUS=`, `RELOADING=1` + `MONOTONIC_USEC=`,
//! `STOPPING=1` and the watchdog. Every call is a no-op outside systemd (no
//! `NOTIFY_SOCKET`).
//!
//! The watchdog is fed only while the daemon's work loop is alive: the loop and a running
//! cycle call [`Heartbeat::beat`]; [`run_watchdog`] sends `WATCHDOG=1` only if a beat came
//! recently, so a hung loop stops the pings and systemd restarts the service.

use sd_notify::NotifyState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// Tells systemd the service is up.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line shown by `systemctl status`.
pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Tells systemd a reload has started (with the monotonic timestamp it matches reloads by).
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[
            NotifyState::Reloading,
            now,
            NotifyState::Status("reloading configuration"),
        ]),
        Err(_) => send(&[NotifyState::Reloading]),
    }
}

/// Tells systemd the service is stopping.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Liveness of the work loop, shared between the loop, the cycle and the watchdog task.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Self::new()
    }
}

impl Heartbeat {
    /// A heartbeat that has just beaten.
    pub fn new() -> Self {
        Heartbeat {
            start: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Records that the work loop made progress.
    pub fn beat(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Time since the last beat.
    pub fn since_last(&self) -> Duration {
        let now = self.start.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// The watchdog interval systemd asked for (`WATCHDOG_USEC`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// Sends `WATCHDOG=1` every `interval / 2` while the heartbeat is fresher than `interval`.
pub async fn run_watchdog(interval: Duration, heartbeat: Heartbeat, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(interval / 2);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {
                if heartbeat.since_last() < interval {
                    send(&[NotifyState::Watchdog]);
                } else {
                    tracing::error!(since_last_beat = ?heartbeat.since_last(), "the work loop is stuck; withholding the watchdog ping so systemd restarts the service");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_ages() {
        let h = Heartbeat::new();
        h.beat();
        assert!(h.since_last() < Duration::from_secs(1));
        std::thread::sleep(Duration::from_millis(30));
        assert!(h.since_last() >= Duration::from_millis(30));
        h.beat();
        assert!(h.since_last() < Duration::from_millis(30));
    }
}
