//! Soak: three daemons against a 3-member etcd cluster and Garage (behind a fault proxy),
//! with a writer that keeps changing etcd and seeded random faults — S3 refusing, cutting,
//! stalling and crawling; the leader SIGKILLed, paused past its lease and stopped; etcd
//! members killed — for `EB_SOAK_SECS` seconds (default 120; `scripts/soak.sh DURATION` runs
//! it longer on a 1-minute schedule).
//!
//! Then the audit: one backup per slot, no overlapping cycles, every committed backup
//! verifies and the newest restores, no orphaned objects, no incomplete uploads, and each
//! daemon's memory and open files stayed within a small bound.

use crate::support;

use crate::support::fleet::{Fleet, FleetOptions};
use crate::support::garage::garage;
use crate::support::proxy::{Fault, Proxy};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn secs(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_secs(lo + self.below(hi - lo + 1))
    }
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Resident memory (KiB) and open file descriptors of `pid`.
fn usage(pid: u32) -> Option<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}

/// Per process: the usage after warm-up and the last sample.
#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    first: Option<(u64, usize)>,
    last: Option<(u64, usize)>,
}

fn stamp(start: Instant) -> String {
    format!("[{:>6.1}s]", start.elapsed().as_secs_f64())
}

#[test]
fn soak() {
    let secs: u64 = env_or("EB_SOAK_SECS", "120")
        .parse()
        .expect("EB_SOAK_SECS in seconds");
    let cron = env_or("EB_SOAK_CRON", "*/10 * * * * *");
    let seed: u64 = env_or(
        "EB_SOAK_SEED",
        &(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            | 1)
        .to_string(),
    )
    .parse()
    .expect("EB_SOAK_SEED is a number");
    let ttl = Duration::from_secs(6);
    println!("soak: {secs} s, schedule {cron:?}, seed {seed} (EB_SOAK_SEED={seed} repeats it)");
    let mut rng = Rng(seed.max(1));

    let g = garage();
    let bucket = g.create_bucket("soak");
    let s3 = Proxy::for_url(&g.s3_endpoint);
    let storage = format!(
        "url = \"s3://{bucket}/soak\"\nendpoint = \"{}\"\nregion = \"{}\"\naccess_key_id = \"{}\"\nsecret_access_key = \"{}\"\n\
         connect_timeout = \"2s\"\nrequest_timeout = \"8s\"\nmax_retries = 2\nretry_timeout = \"20s\"",
        s3.url(),
        g.region,
        g.access_key_id,
        g.secret_access_key
    );
    let mut f = Fleet::start(&FleetOptions {
        ttl,
        cron: cron.clone(),
        storage: Some(storage),
        etcd_extra: String::new(),
    });
    let all = [0, 1, 2];
    f.wait_leader(&all, ttl + Duration::from_secs(20));
    let start = Instant::now();

    // A writer that keeps etcd busy: puts, overwrites and deletes on every member.
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, writes) = (stop.clone(), writes.clone());
        let urls = f.cluster.client_urls();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let url = &urls[(i % 3) as usize];
                    if let Ok(Ok(c)) = tokio::time::timeout(
                        Duration::from_secs(2),
                        etcd_client::Client::connect([url.as_str()], None),
                    )
                    .await
                    {
                        let mut kv = c.kv_client();
                        for _ in 0..50 {
                            let key = format!("/registry/configmaps/soak/cm-{}", i % 500);
                            let r = if i.is_multiple_of(7) {
                                tokio::time::timeout(Duration::from_secs(2), kv.delete(key, None))
                                    .await
                                    .map(|r| r.map(|_| ()))
                            } else {
                                let v = format!(
                                    "{{\"i\":{i},\"pad\":\"{}\"}}",
                                    "x".repeat((i % 2000) as usize)
                                );
                                tokio::time::timeout(Duration::from_secs(2), kv.put(key, v, None))
                                    .await
                                    .map(|r| r.map(|_| ()))
                            };
                            if matches!(r, Ok(Ok(()))) {
                                writes.fetch_add(1, Ordering::Relaxed);
                            }
                            i += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
        })
    };

    let mut usage_by_pid: BTreeMap<u32, Usage> = BTreeMap::new();
    let sample = |f: &Fleet, usage_by_pid: &mut BTreeMap<u32, Usage>, warm: bool| {
        for n in &f.nodes {
            if let Some(p) = &n.proc {
                if let Some(u) = usage(p.pid()) {
                    let e = usage_by_pid.entry(p.pid()).or_default();
                    if e.first.is_none() && warm {
                        e.first = Some(u);
                    }
                    e.last = Some(u);
                }
            }
        }
    };
    std::thread::sleep(Duration::from_secs(10));
    sample(&f, &mut usage_by_pid, true);

    let mut actions: BTreeMap<&str, usize> = BTreeMap::new();
    let deadline = start + Duration::from_secs(secs);
    while Instant::now() + Duration::from_secs(25) < deadline {
        std::thread::sleep(rng.secs(6, 15));
        sample(&f, &mut usage_by_pid, false);
        let leader = f.leaders(&all).first().copied();
        let action = rng.below(8);
        let name = match action {
            0..=3 => {
                let (fault, (lo, hi), what, name) = match action {
                    0 => (Fault::Refuse, (3, 10), "refuses connections", "s3 refuse"),
                    1 => (
                        Fault::CutAfter(1 << 20),
                        (3, 10),
                        "cuts connections after 1 MiB",
                        "s3 cut",
                    ),
                    2 => (Fault::Stall, (3, 8), "stalls", "s3 stall"),
                    _ => (
                        Fault::Throttle(1_000_000),
                        (5, 10),
                        "crawls at 1 MB/s",
                        "s3 slow",
                    ),
                };
                let d = rng.secs(lo, hi);
                println!("{} S3 {what} for {d:?}", stamp(start));
                s3.set(fault);
                std::thread::sleep(d);
                s3.set(Fault::Pass);
                name
            }
            4 | 7 if leader.is_some() => {
                let l = leader.unwrap();
                let sig = if action == 4 { "KILL" } else { "TERM" };
                println!("{} SIG{sig} the leader {}", stamp(start), f.nodes[l].name);
                f.proc(l).signal(sig);
                let st = f.proc(l).wait_exit(Duration::from_secs(30));
                assert!(st.is_some(), "{} did not exit on SIG{sig}", f.nodes[l].name);
                if sig == "TERM" {
                    assert!(st.unwrap().success(), "{}", f.logs());
                }
                std::thread::sleep(Duration::from_secs(2));
                f.spawn(l);
                if action == 4 {
                    "leader SIGKILL"
                } else {
                    "leader SIGTERM"
                }
            }
            5 if leader.is_some() => {
                let l = leader.unwrap();
                println!(
                    "{} SIGSTOP the leader {} past its lease",
                    stamp(start),
                    f.nodes[l].name
                );
                f.proc(l).signal("STOP");
                std::thread::sleep(ttl + Duration::from_secs(2));
                f.proc(l).signal("CONT");
                "leader paused"
            }
            6 => {
                let m = rng.below(3) as usize;
                println!("{} etcd member {m} killed for 5 s", stamp(start));
                f.cluster.kill(m);
                std::thread::sleep(Duration::from_secs(5));
                f.cluster.restart(m);
                "etcd member killed"
            }
            _ => "nothing (no leader at that moment)",
        };
        *actions.entry(name).or_default() += 1;
        for (i, n) in f.nodes.iter_mut().enumerate() {
            let running = n
                .proc
                .as_mut()
                .is_some_and(super::support::ChildProc::is_running);
            assert!(
                running,
                "daemon {i} died:\n{}",
                n.proc.as_ref().map(|p| p.log_tail(60)).unwrap_or_default()
            );
        }
    }

    // Faults off: the fleet must commit again.
    s3.set(Fault::Pass);
    let calm = chrono::Utc::now();
    support::wait_until(
        &format!("a backup after the faults\n{}", f.logs()),
        Duration::from_secs(180),
        || f.manifests().iter().any(|m| m.started_at > calm),
    );
    sample(&f, &mut usage_by_pid, false);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    for i in all {
        f.proc(i).signal("TERM");
    }
    for i in all {
        let st = f.proc(i).wait_exit(Duration::from_secs(30));
        assert!(st.is_some_and(|s| s.success()), "{}", f.logs());
    }

    // The audit.
    let ms = f.audit();
    let o = Command::new(env!("CARGO_BIN_EXE_etcd-backup"))
        .args(["verify", "--all", "--config"])
        .arg(&f.nodes[0].config)
        .output()
        .unwrap();
    let verified = String::from_utf8_lossy(&o.stdout).matches(": OK").count();
    assert!(
        o.status.success() && verified == ms.len(),
        "{verified} of {} backups verified\n{}{}",
        ms.len(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let restored = f.dir.path().join("restored.db");
    let o = Command::new(env!("CARGO_BIN_EXE_etcd-backup"))
        .args(["restore", "latest", "--output"])
        .arg(&restored)
        .arg("--config")
        .arg(&f.nodes[0].config)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listing = f.listing();
    let committed: std::collections::BTreeSet<String> =
        listing.backups.iter().map(|m| m.id.to_string()).collect();
    let orphans: Vec<String> = listing
        .data_objects
        .keys()
        .map(ToString::to_string)
        .filter(|id| !committed.contains(id))
        .collect();
    assert!(
        orphans.is_empty(),
        "data objects without a manifest: {orphans:?}"
    );
    assert!(
        listing.dangling.is_empty(),
        "manifests without data: {:?}",
        listing.dangling
    );
    g.wait_incomplete_uploads(&bucket, 0);
    let mut per_node: BTreeMap<&str, usize> = BTreeMap::new();
    for m in &ms {
        *per_node.entry(m.node.as_str()).or_default() += 1;
    }

    println!("\nsoak audit ({secs} s, seed {seed}, schedule {cron:?})");
    println!("  faults injected: {actions:?}");
    println!(
        "  etcd writes during the soak: {}",
        writes.load(Ordering::Relaxed)
    );
    println!(
        "  committed backups: {} ({per_node:?}); all verified: {verified}; newest restored; one per slot; no overlaps; fencing tokens monotonic",
        ms.len()
    );
    println!("  orphaned objects: 0, manifests without data: 0, incomplete uploads: 0");
    println!("  daemon processes (pid: RSS KiB and open fds, after warm-up -> at the end):");
    for (pid, u) in &usage_by_pid {
        if let (Some(a), Some(b)) = (u.first, u.last) {
            println!(
                "    {pid}: {} KiB -> {} KiB, {} fds -> {} fds",
                a.0, b.0, a.1, b.1
            );
            assert!(
                b.0 <= a.0 + 24 * 1024,
                "pid {pid}: RSS grew from {} to {} KiB",
                a.0,
                b.0
            );
            assert!(
                b.1 <= a.1 + 16,
                "pid {pid}: open fds grew from {} to {}",
                a.1,
                b.1
            );
        }
    }
}
