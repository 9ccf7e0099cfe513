//! Every background task of the daemon runs in one [`Supervisor`]: a task that panics or
//! ends while the daemon runs (and was not retired on purpose, as an election session or a
//! metrics listener replaced by a reload) makes the daemon log it and exit non-zero, so
//! systemd restarts it. The daemon never runs half alive.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use tokio::task::{Id, JoinSet};

/// The daemon's background tasks.
#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
    retiring: HashSet<Id>,
}

impl Supervisor {
    /// Runs `task` under supervision; `name` is what the log calls it.
    pub fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> Id {
        let id = self.tasks.spawn(task).id();
        self.names.insert(id, name);
        id
    }

    /// Marks task `id` as ending on purpose (its cancellation token was cancelled).
    pub fn retire(&mut self, id: Id) {
        self.retiring.insert(id);
    }

    /// Resolves when a task ends that was not retired: the message says which and how.
    /// Retired tasks that end are forgotten. Never resolves while no task is left.
    pub async fn failure(&mut self) -> String {
        loop {
            let Some(joined) = self.tasks.join_next_with_id().await else {
                return std::future::pending().await;
            };
            let (id, how) = match joined {
                Ok((id, ())) => (id, "ended unexpectedly".to_string()),
                Err(e) if e.is_panic() => (e.id(), format!("panicked: {}", panic_text(e))),
                Err(e) => (e.id(), "was cancelled".to_string()),
            };
            let name = self.names.remove(&id).unwrap_or("a background task");
            if self.retiring.remove(&id) {
                tracing::debug!(task = name, "a retired task ended");
                continue;
            }
            return format!("the {name} task {how}");
        }
    }

    /// Waits for every task to end (after the daemon's token was cancelled).
    pub async fn join_all(&mut self) {
        while let Some(r) = self.tasks.join_next_with_id().await {
            if let Err(e) = r {
                if e.is_panic() {
                    let name = self
                        .names
                        .get(&e.id())
                        .copied()
                        .unwrap_or("a background task");
                    tracing::error!(task = name, error = %panic_text(e), "a task panicked while stopping");
                }
            }
        }
    }

    /// Aborts what is left (after the shutdown deadline).
    pub fn abort_all(&mut self) {
        self.tasks.abort_all();
    }
}

fn panic_text(e: tokio::task::JoinError) -> String {
    let p = e.into_panic();
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_panicking_task_is_reported_by_name() {
        let mut s = Supervisor::default();
        s.spawn("forever", std::future::pending());
        s.spawn("metrics server", async { panic!("boom") });
        let msg = tokio::time::timeout(Duration::from_secs(5), s.failure())
            .await
            .unwrap();
        assert_eq!(msg, "the metrics server task panicked: boom");
    }

    #[tokio::test]
    async fn a_task_ending_is_a_failure_unless_retired() {
        let mut s = Supervisor::default();
        s.spawn("forever", std::future::pending());
        let id = s.spawn("old election session", async {});
        s.retire(id);
        assert!(
            tokio::time::timeout(Duration::from_millis(200), s.failure())
                .await
                .is_err(),
            "a retired task ending is no failure"
        );
        s.spawn("refresh", async {});
        let msg = tokio::time::timeout(Duration::from_secs(5), s.failure())
            .await
            .unwrap();
        assert_eq!(msg, "the refresh task ended unexpectedly");
    }
}
