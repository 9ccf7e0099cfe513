//! Test harness: real servers (etcd, Garage) on free loopback ports, stopped when the test
//! ends. A server binary that is missing makes the test fail with an install hint; tests
//! never skip.

pub mod etcd;
pub mod fleet;
pub mod garage;
pub mod proxy;

use std::collections::HashSet;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where `scripts/install-deps.sh` installs the test servers.
pub fn deps_dir() -> PathBuf {
    std::env::var_os("EB_DEPS_DIR").map_or_else(
        || {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            PathBuf::from(home).join(".cache/etcd-backup-deps")
        },
        PathBuf::from,
    )
}

/// A free TCP port on 127.0.0.1, never the same twice in one test process.
pub fn free_port() -> u16 {
    static USED: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let used = USED.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind a loopback port")
            .port();
        if used.lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// Polls `f` every 50 ms until it returns true; panics naming `what` after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A spawned server: output goes to a log file; killed (SIGKILL) and reaped on drop.
pub struct ChildProc {
    child: Option<Child>,
    log: PathBuf,
    name: String,
}

impl ChildProc {
    /// Spawns `cmd` with stdout and stderr appended to `log`. Environment variables that
    /// etcd would read as flags (`ETCD_*`) are removed.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> ChildProc {
        let out = File::options()
            .create(true)
            .append(true)
            .open(log)
            .expect("open log file");
        let err = out.try_clone().expect("clone log file");
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        ChildProc {
            child: Some(child),
            log: log.to_path_buf(),
            name: name.to_string(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, `KILL`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -s {sig} {} ({}) failed", self.pid(), self.name);
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Waits up to `timeout` for the process to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    return Some(st);
                }
            } else {
                return None;
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.len().saturating_sub(n);
        format!(
            "--- last {} lines of {} ({}) ---\n{}",
            lines.len() - start,
            self.name,
            self.log.display(),
            lines[start..].join("\n")
        )
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `GET path` on 127.0.0.1:`port`; the body, or `None` when the server does not answer
/// within `timeout` (a stopped process still has its socket, but never answers).
pub fn http_get(port: u16, path: &str, timeout: Duration) -> Option<String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_string())
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Runs the `etcd-backup` binary with `args`, without inherited `ETCD_BACKUP_*`/`AWS_*`
/// variables, with `env` added.
pub fn etcd_backup(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_etcd-backup"));
    cmd.args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("ETCD_BACKUP_") || k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run etcd-backup")
}

/// A command's exit code and output, for assertion messages.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Writes about `mb` MiB of 64 KiB values through `endpoint` with four concurrent writers;
/// `random` values do not compress (so that throttles and cuts bite), others compress well.
pub async fn load_values(endpoint: &str, mb: u32, random: bool) {
    let c = etcd_client::Client::connect([endpoint], None)
        .await
        .expect("connect to etcd to load data");
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let mut kv = c.kv_client();
        tasks.push(tokio::spawn(async move {
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ u64::from(t);
            for i in 0..mb * 4 {
                let v: Vec<u8> = (0..64 * 1024u32)
                    .map(|k| {
                        if random {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            x as u8
                        } else {
                            b'a' + ((k * 7 + i * 13 + t) % 26) as u8
                        }
                    })
                    .collect();
                kv.put(format!("/load/t{t}/v{i}"), v, None)
                    .await
                    .expect("load a value");
            }
        }));
    }
    for t in tasks {
        t.await.expect("loader task");
    }
}

/// Runs a command to completion and panics with its output when it fails.
pub fn run_ok(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({:?})\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}
