//! Prometheus metrics: one typed struct, passed by `Arc`, with every series created at zero
//! at start so alerts see them before the first event. Label values come from closed enums,
//! never from error text. Names are final once documented in the README.

use crate::error::Stage;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

/// A float gauge.
pub type FGauge = Gauge<f64, AtomicU64>;

/// Outcome label.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum Outcome {
    /// It worked.
    Success,
    /// It did not.
    Failure,
}

/// `{result="success|failure"}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// The outcome.
    pub result: Outcome,
}

/// Stage label values: the stages of a cycle, and pruning.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum StageValue {
    /// A stage of the backup cycle.
    Cycle(Stage),
    /// Retention.
    Prune,
}

impl StageValue {
    /// Every value, in the order the stages run (series are created at zero for each).
    pub const ALL: [StageValue; 5] = [
        StageValue::Cycle(Stage::Snapshot),
        StageValue::Cycle(Stage::Verify),
        StageValue::Cycle(Stage::Upload),
        StageValue::Cycle(Stage::Commit),
        StageValue::Prune,
    ];
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        e.write_str(match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        })
    }
}

impl EncodeLabelValue for StageValue {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        e.write_str(match self {
            StageValue::Cycle(s) => s.as_str(),
            StageValue::Prune => "prune",
        })
    }
}

impl From<Stage> for StageValue {
    fn from(s: Stage) -> Self {
        StageValue::Cycle(s)
    }
}

/// `{stage="..."}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// The stage.
    pub stage: StageValue,
}

/// Outcome of a scheduled defragmentation attempt.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub enum DefragResult {
    /// The local member was defragmented.
    Success,
    /// The attempt failed.
    Failure,
    /// Not worth it, or not safe now (a member down, no leader, an alarm).
    Skipped,
}

impl EncodeLabelValue for DefragResult {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        e.write_str(match self {
            DefragResult::Success => "success",
            DefragResult::Failure => "failure",
            DefragResult::Skipped => "skipped",
        })
    }
}

/// `{result="success|failure|skipped"}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DefragLabels {
    /// The outcome.
    pub result: DefragResult,
}

/// `{version="..."}`
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    /// This build's version.
    pub version: String,
}

/// Every metric the daemon exports (prefix `etcd_backup_`).
pub struct Metrics {
    registry: Registry,
    /// Finish time of the newest committed backup in the store (any node's).
    pub last_success_timestamp: FGauge,
    /// Seconds since then; computed at scrape time.
    pub last_success_age: FGauge,
    /// Start time of this node's last attempted cycle.
    pub last_attempt_timestamp: FGauge,
    /// Cycles run by this node, by result.
    pub cycles: Family<ResultLabels, Counter>,
    /// Failed cycles by the stage that failed.
    pub failures: Family<StageLabels, Counter>,
    /// Duration of each stage.
    pub stage_duration: Family<StageLabels, Histogram>,
    /// How long etcd's snapshot stream was held open (its read transaction).
    pub snapshot_stream: Histogram,
    /// Raw size of this node's last committed snapshot.
    pub snapshot_size: Gauge,
    /// Stored size of this node's last committed backup.
    pub stored_size: Gauge,
    /// Committed backups in the store.
    pub backups_in_store: Gauge,
    /// Backups deleted by pruning.
    pub pruned: Counter,
    /// Backups in the store made by another etcd cluster (set by each prune).
    pub foreign_backups: Gauge,
    /// Backups in the store dated more than 5 minutes in the future (set by each prune).
    pub future_backups: Gauge,
    /// 1 while this node is the snapshotter.
    pub is_leader: Gauge,
    /// Times this node gained or lost the snapshotter role.
    pub leader_changes: Counter,
    /// 1 while this node takes part in the election (its lease is alive).
    pub election_up: Gauge,
    /// Size of the local member's database file.
    pub db_size: Gauge,
    /// Bytes in use of the local member's database.
    pub db_size_in_use: Gauge,
    /// The local member's backend quota, when it reports one.
    pub db_quota: Gauge,
    /// 1 when the last refresh reached the local member.
    pub etcd_up: Gauge,
    /// Longest gap between scheduled runs (for the backup-age alert).
    pub schedule_interval: FGauge,
    /// Configuration reloads by result.
    pub config_reloads: Family<ResultLabels, Counter>,
    /// Restore drills by result.
    pub restore_drills: Family<ResultLabels, Counter>,
    /// Finish time of the last successful restore drill.
    pub restore_drill_last_success_timestamp: FGauge,
    /// 1 when restore drills are scheduled on this node.
    pub restore_drill_enabled: Gauge,
    /// Always 1, labelled with the version.
    pub build_info: Family<VersionLabels, Gauge>,
    /// Scheduled defragmentations of the local member, by result.
    pub defrags: Family<DefragLabels, Counter>,
    /// When the local member was last defragmented.
    pub defrag_last_timestamp: FGauge,
    /// Bytes the last defragmentation returned to the file system.
    pub defrag_reclaimed: Gauge,
    /// `[continuous]` segments.
    pub continuous: ContinuousMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric, with every label combination at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("etcd_backup");
        let m = Metrics {
            registry: Registry::default(),
            last_success_timestamp: FGauge::default(),
            last_success_age: FGauge::default(),
            last_attempt_timestamp: FGauge::default(),
            cycles: Family::default(),
            failures: Family::default(),
            stage_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.05, 2.0, 16))
            }),
            snapshot_stream: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            snapshot_size: Gauge::default(),
            stored_size: Gauge::default(),
            backups_in_store: Gauge::default(),
            pruned: Counter::default(),
            foreign_backups: Gauge::default(),
            future_backups: Gauge::default(),
            is_leader: Gauge::default(),
            leader_changes: Counter::default(),
            election_up: Gauge::default(),
            db_size: Gauge::default(),
            db_size_in_use: Gauge::default(),
            db_quota: Gauge::default(),
            etcd_up: Gauge::default(),
            schedule_interval: FGauge::default(),
            config_reloads: Family::default(),
            restore_drills: Family::default(),
            restore_drill_last_success_timestamp: FGauge::default(),
            restore_drill_enabled: Gauge::default(),
            build_info: Family::default(),
            defrags: Family::default(),
            defrag_last_timestamp: FGauge::default(),
            defrag_reclaimed: Gauge::default(),
            continuous: ContinuousMetrics::default(),
        };
        m.register_backups(&mut registry);
        m.register_cluster(&mut registry);
        m.register_operations(&mut registry);
        m.create_series();
        m.last_success_age.set(f64::NAN);
        Metrics { registry, ..m }
    }

    /// The backups: last success, cycles and stages, sizes, pruning.
    fn register_backups(&self, r: &mut Registry) {
        r.register_with_unit(
            "last_success_timestamp",
            "Unix time the newest committed backup of the cluster finished (from the store, any node)",
            Unit::Seconds,
            self.last_success_timestamp.clone(),
        );
        r.register_with_unit(
            "last_success_age",
            "Seconds since the newest committed backup of the cluster finished",
            Unit::Seconds,
            self.last_success_age.clone(),
        );
        r.register_with_unit(
            "last_attempt_timestamp",
            "Unix time this node last started a backup cycle",
            Unit::Seconds,
            self.last_attempt_timestamp.clone(),
        );
        r.register(
            "cycles",
            "Backup cycles run by this node, by result",
            self.cycles.clone(),
        );
        r.register(
            "failures",
            "Failed backup cycles (and prunes), by the stage that failed",
            self.failures.clone(),
        );
        r.register_with_unit(
            "stage_duration",
            "Duration of each stage of a backup cycle",
            Unit::Seconds,
            self.stage_duration.clone(),
        );
        r.register_with_unit(
            "snapshot_stream",
            "How long etcd held its snapshot stream (and its read transaction) open in the last cycles: from opening the stream to its last byte, written to the spool at disk speed whatever the upload link",
            Unit::Seconds,
            self.snapshot_stream.clone(),
        );
        r.register_with_unit(
            "snapshot_size",
            "Raw size of the last snapshot this node committed",
            Unit::Bytes,
            self.snapshot_size.clone(),
        );
        r.register_with_unit(
            "stored_size",
            "Stored (compressed) size of the last backup this node committed",
            Unit::Bytes,
            self.stored_size.clone(),
        );
        r.register(
            "backups_in_store",
            "Committed backups of the cluster in the store",
            self.backups_in_store.clone(),
        );
        r.register(
            "pruned",
            "Backups deleted by retention",
            self.pruned.clone(),
        );
        r.register(
            "foreign_backups",
            "Backups under this cluster_name made by another etcd cluster id (never pruned or restored as latest)",
            self.foreign_backups.clone(),
        );
        r.register(
            "future_backups",
            "Backups dated more than 5 minutes in the future (wrong clock?; never latest, never aged out)",
            self.future_backups.clone(),
        );
    }

    /// The cluster as this node sees it: the election and the local member.
    fn register_cluster(&self, r: &mut Registry) {
        r.register(
            "is_leader",
            "1 while this node is the one taking backups",
            self.is_leader.clone(),
        );
        r.register(
            "leader_changes",
            "Times this node became or stopped being the one taking backups",
            self.leader_changes.clone(),
        );
        r.register(
            "election_up",
            "1 while this node takes part in the snapshotter election (connected to etcd, lease alive); 1 too when the election is off",
            self.election_up.clone(),
        );
        r.register_with_unit(
            "db_size",
            "Size of the local etcd member's database file",
            Unit::Bytes,
            self.db_size.clone(),
        );
        r.register_with_unit(
            "db_size_in_use",
            "Bytes in use of the local etcd member's database",
            Unit::Bytes,
            self.db_size_in_use.clone(),
        );
        r.register_with_unit(
            "db_quota",
            "Backend quota of the local etcd member (0 when the member does not report it)",
            Unit::Bytes,
            self.db_quota.clone(),
        );
        r.register(
            "etcd_up",
            "1 when the last status refresh reached the local etcd member",
            self.etcd_up.clone(),
        );
    }

    /// The schedule, reloads, drills, defragmentation, continuous backup and the build.
    fn register_operations(&self, r: &mut Registry) {
        r.register_with_unit(
            "schedule_interval",
            "Longest gap between two scheduled backups of the configured schedule",
            Unit::Seconds,
            self.schedule_interval.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration reloads (SIGHUP), by result",
            self.config_reloads.clone(),
        );
        self.continuous.register(r);
        r.register(
            "build_info",
            "Build information: always 1, labelled with the version",
            self.build_info.clone(),
        );
        r.register(
            "defrag",
            "Scheduled defragmentations of the local etcd member, by result (skipped: not worth it or not safe now)",
            self.defrags.clone(),
        );
        r.register_with_unit(
            "defrag_last_timestamp",
            "Unix time the local etcd member was last defragmented by this node",
            Unit::Seconds,
            self.defrag_last_timestamp.clone(),
        );
        r.register_with_unit(
            "defrag_reclaimed",
            "Bytes the last defragmentation of the local etcd member returned (its database file shrank by)",
            Unit::Bytes,
            self.defrag_reclaimed.clone(),
        );
    }

    /// Every labelled series at zero, so alerts see them before the first event.
    fn create_series(&self) {
        for result in [
            DefragResult::Success,
            DefragResult::Failure,
            DefragResult::Skipped,
        ] {
            let _ = self.defrags.get_or_create(&DefragLabels { result });
        }
        for result in [Outcome::Success, Outcome::Failure] {
            let l = ResultLabels { result };
            let _ = self.cycles.get_or_create(&l);
            let _ = self.config_reloads.get_or_create(&l);
            let _ = self.restore_drills.get_or_create(&l);
        }
        for stage in StageValue::ALL {
            let l = StageLabels { stage };
            let _ = self.failures.get_or_create(&l);
            let _ = self.stage_duration.get_or_create(&l);
        }
        self.build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
    }

    /// Records a finished cycle.
    pub fn observe_cycle(
        &self,
        result: &Result<crate::backup::CycleReport, crate::error::CycleError>,
    ) {
        match result {
            Ok(rep) => {
                self.cycles
                    .get_or_create(&ResultLabels {
                        result: Outcome::Success,
                    })
                    .inc();
                let t = &rep.times;
                for (stage, d) in [
                    (Stage::Snapshot, t.snapshot),
                    (Stage::Verify, t.verify),
                    (Stage::Upload, t.upload),
                    (Stage::Commit, t.commit),
                ] {
                    self.stage_duration
                        .get_or_create(&StageLabels {
                            stage: stage.into(),
                        })
                        .observe(d.as_secs_f64());
                }
                self.snapshot_stream.observe(t.stream.as_secs_f64());
                self.snapshot_size.set(rep.manifest.size as i64);
                self.stored_size.set(rep.manifest.stored_size as i64);
                let ts = rep.manifest.finished_at.timestamp_millis() as f64 / 1000.0;
                if ts > self.last_success_timestamp.get() {
                    self.last_success_timestamp.set(ts);
                }
            }
            Err(e) => {
                self.cycles
                    .get_or_create(&ResultLabels {
                        result: Outcome::Failure,
                    })
                    .inc();
                self.failures
                    .get_or_create(&StageLabels {
                        stage: e.stage.into(),
                    })
                    .inc();
            }
        }
    }

    /// The exposition text; ages are computed here, at scrape time.
    pub fn encode(&self, now_unix: f64) -> String {
        let last = self.last_success_timestamp.get();
        self.last_success_age.set(if last > 0.0 {
            (now_unix - last).max(0.0)
        } else {
            f64::NAN
        });
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Metrics of continuous backup (`[continuous]`).
#[derive(Debug, Default, Clone)]
pub struct ContinuousMetrics {
    /// Seconds the oldest event not yet committed in a segment has waited (0 when every
    /// event etcd reported is committed): the current data-loss window.
    pub lag: FGauge,
    /// Last revision committed in a segment.
    pub last_revision: Gauge,
    /// Segments committed.
    pub segments: Counter,
    /// Segments that failed to be written or committed.
    pub segment_failures: Counter,
    /// Chains ended by a gap (the watch was compacted past the chain, or it could not be
    /// continued).
    pub gaps: Counter,
}

impl ContinuousMetrics {
    fn register(&self, r: &mut Registry) {
        r.register_with_unit(
            "continuous_lag",
            "Seconds the oldest event not yet committed in a segment has waited: the current data-loss window of continuous backup",
            Unit::Seconds,
            self.lag.clone(),
        );
        r.register(
            "continuous_last_revision",
            "Last etcd revision committed in a continuous-backup segment",
            self.last_revision.clone(),
        );
        r.register(
            "continuous_segments",
            "Continuous-backup segments committed by this node",
            self.segments.clone(),
        );
        r.register(
            "continuous_segment_failures",
            "Continuous-backup segments that failed to be written or committed",
            self.segment_failures.clone(),
        );
        r.register(
            "continuous_gaps",
            "Continuous-backup chains ended by a gap (events lost: the watch was compacted past the chain)",
            self.gaps.clone(),
        );
    }
}

/// Converts the OpenMetrics exposition into the Prometheus text format (0.0.4), for
/// scrapers and tools that do not ask for OpenMetrics: counters are named with their
/// `_total` suffix in `# HELP`/`# TYPE`, and `# UNIT` and `# EOF` lines are dropped.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_exist_at_zero_and_names_are_prefixed() {
        let m = Metrics::new();
        let text = m.encode(1000.0);
        for name in [
            "etcd_backup_last_success_timestamp_seconds",
            "etcd_backup_last_success_age_seconds",
            "etcd_backup_cycles_total{result=\"failure\"} 0",
            "etcd_backup_failures_total{stage=\"prune\"} 0",
            "etcd_backup_stage_duration_seconds_bucket{le=",
            "etcd_backup_db_size_bytes",
            "etcd_backup_config_reloads_total{result=\"success\"} 0",
            "etcd_backup_build_info{version=",
            "etcd_backup_defrag_total{result=\"skipped\"} 0",
            "etcd_backup_defrag_last_timestamp_seconds 0",
            "etcd_backup_defrag_reclaimed_bytes 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn prometheus_text_names_counters_with_total() {
        let m = Metrics::new();
        let text = to_prometheus_text(&m.encode(1.0));
        assert!(
            text.contains("# TYPE etcd_backup_cycles_total counter"),
            "{text}"
        );
        assert!(text.contains("# HELP etcd_backup_cycles_total "), "{text}");
        assert!(
            text.contains("etcd_backup_cycles_total{result=\"success\"} 0"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE etcd_backup_db_size_bytes gauge"),
            "{text}"
        );
    }

    #[test]
    fn a_cycle_records_how_long_etcd_was_held() {
        let m = Metrics::new();
        let report = crate::backup::CycleReport {
            manifest: crate::store::manifest::sample("20260102T030405Z-0a1b2c", chrono::Utc::now()),
            times: crate::backup::StageTimes {
                stream: std::time::Duration::from_millis(1500),
                ..Default::default()
            },
        };
        m.observe_cycle(&Ok(report));
        let text = m.encode(1.0);
        assert!(
            text.contains("etcd_backup_snapshot_stream_seconds_count 1")
                && text.contains("etcd_backup_snapshot_stream_seconds_sum 1.5"),
            "{text}"
        );
    }

    #[test]
    fn age_is_computed_at_scrape_time() {
        let m = Metrics::new();
        m.last_success_timestamp.set(900.0);
        let text = m.encode(1000.0);
        assert!(
            text.contains("etcd_backup_last_success_age_seconds 100.0"),
            "{text}"
        );
    }
}
