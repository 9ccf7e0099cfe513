//! Progress of long transfers for people at a terminal: a bar with bytes, rate and ETA on
//! a terminal; on anything else (a pipe, the journal) a plain line every few seconds.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a plain progress line is written when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// A transfer's progress.
pub struct Progress {
    what: String,
    bar: Option<ProgressBar>,
    plain: Mutex<Plain>,
}

struct Plain {
    total: u64,
    done: u64,
    started: Instant,
    last: Instant,
}

impl Progress {
    /// A progress display for `what` (e.g. "snapshot", "download").
    pub fn new(what: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template(
                    "{msg:>10} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_message(what.to_string());
            b
        });
        let now = Instant::now();
        Progress {
            what: what.to_string(),
            bar,
            plain: Mutex::new(Plain {
                total: 0,
                done: 0,
                started: now,
                last: now,
            }),
        }
    }

    /// Sets the expected total in bytes.
    pub fn set_total(&self, total: u64) {
        if let Some(b) = &self.bar {
            b.set_length(total);
        }
        if let Ok(mut p) = self.plain.lock() {
            p.total = total;
        }
    }

    /// Records `n` more bytes.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
            return;
        }
        let Ok(mut p) = self.plain.lock() else { return };
        p.done += n;
        if p.last.elapsed() >= PLAIN_EVERY {
            p.last = Instant::now();
            let secs = p.started.elapsed().as_secs_f64().max(0.001);
            let rate = p.done as f64 / secs;
            let pct = if p.total > 0 {
                format!(" ({:.0} %)", p.done as f64 * 100.0 / p.total as f64)
            } else {
                String::new()
            };
            eprintln!(
                "{}: {} of {}{pct}, {}/s",
                self.what,
                crate::units::human_bytes(p.done),
                crate::units::human_bytes(p.total),
                crate::units::human_bytes(rate as u64)
            );
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
