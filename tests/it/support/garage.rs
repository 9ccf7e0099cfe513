//! A real S3 server: Garage 2.5.0 (built from crates.io by `scripts/install-deps.sh`),
//! single node on loopback, started once per test binary; each test makes its own bucket.
//!
//! Statics are never dropped, so the server is started through a small shell watchdog that
//! kills it as soon as the test process is gone.

use super::{deps_dir, free_port, run_ok, wait_until};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

/// Connection details of the shared Garage server.
#[derive(Debug)]
pub struct Garage {
    /// `http://127.0.0.1:PORT`
    pub s3_endpoint: String,
    /// The S3 region Garage expects.
    pub region: String,
    /// The test key's id.
    pub access_key_id: String,
    /// The test key's secret.
    pub secret_access_key: String,
    bin: PathBuf,
    config: PathBuf,
    admin_port: u16,
    admin_token: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// The shared server, started on first use.
pub fn garage() -> &'static Garage {
    static G: OnceLock<Garage> = OnceLock::new();
    G.get_or_init(start)
}

fn bin() -> PathBuf {
    let p = std::env::var_os("EB_GARAGE_BIN")
        .map_or_else(|| deps_dir().join("garage-2.5.0/bin/garage"), PathBuf::from);
    assert!(
        p.exists(),
        "Garage not found at {}: run scripts/install-deps.sh (it builds Garage 2.5.0 from crates.io) or set EB_GARAGE_BIN",
        p.display()
    );
    p
}

fn start() -> Garage {
    let bin = bin();
    let dir = tempfile::tempdir().unwrap();
    let (rpc, s3, admin) = (free_port(), free_port(), free_port());
    let admin_token = format!("admin-{:x}", std::process::id());
    let config = dir.path().join("garage.toml");
    std::fs::write(
        &config,
        format!(
            r#"metadata_dir = "{d}/meta"
data_dir = "{d}/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc}"
rpc_public_addr = "127.0.0.1:{rpc}"
rpc_secret = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6"

[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:{s3}"
root_domain = ".s3.garage.localhost"

[admin]
api_bind_addr = "127.0.0.1:{admin}"
admin_token = "{admin_token}"
"#,
            d = dir.path().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let log = dir.path().join("garage.log");
    // The watchdog: run Garage until it exits or this test process is gone.
    let script = r#"
"$1" -c "$2" server >>"$3" 2>&1 &
g=$!
while kill -0 "$4" 2>/dev/null && kill -0 "$g" 2>/dev/null; do sleep 0.5; done
kill "$g" 2>/dev/null
wait "$g" 2>/dev/null
"#;
    // Deliberately never waited for: the watchdog outlives every test and exits by itself.
    #[allow(clippy::zombie_processes)]
    let _watchdog = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("garage-watchdog")
        .arg(&bin)
        .arg(&config)
        .arg(&log)
        .arg(std::process::id().to_string())
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start garage");
    let g = Garage {
        s3_endpoint: format!("http://127.0.0.1:{s3}"),
        region: "garage".into(),
        access_key_id: "GK0123456789abcdef01234567".into(),
        secret_access_key: "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            .into(),
        bin,
        config,
        admin_port: admin,
        admin_token,
        log,
        _dir: dir,
    };
    wait_until(
        "Garage to answer `garage status`",
        Duration::from_secs(30),
        || g.cli(&["status"]).status.success(),
    );
    let id = String::from_utf8(run_ok(&mut g.cmd(&["node", "id", "-q"])).stdout).unwrap();
    let node = id.trim().split('@').next().unwrap().to_string();
    run_ok(&mut g.cmd(&["layout", "assign", "-z", "dc1", "-c", "1G", &node]));
    run_ok(&mut g.cmd(&["layout", "apply", "--version", "1"]));
    run_ok(&mut g.cmd(&[
        "key",
        "import",
        "--yes",
        "-n",
        "etcd-backup-test",
        &g.access_key_id,
        &g.secret_access_key,
    ]));
    wait_until("Garage's S3 API", Duration::from_secs(30), || {
        super::etcd::http_ok(g.admin_port, "/health")
    });
    g
}

impl Garage {
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("-c")
            .arg(&self.config)
            .args(args)
            .env_remove("RUST_LOG");
        c
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cmd(args).output().expect("run garage")
    }

    /// Creates a bucket named after `base` (made unique) that the test key may use.
    pub fn create_bucket(&self, base: &str) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{base}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        run_ok(&mut self.cmd(&["bucket", "create", &name]));
        run_ok(&mut self.cmd(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &name,
            "--key",
            "etcd-backup-test",
        ]));
        name
    }

    /// Unfinished multipart uploads in `bucket`, from Garage's admin API.
    pub fn incomplete_multipart_uploads(&self, bucket: &str) -> usize {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.admin_port)).unwrap();
        write!(
            s,
            "GET /v2/GetBucketInfo?globalAlias={bucket} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
            self.admin_token
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        let v: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("admin API answer is not JSON ({e}): {resp}"));
        v["unfinishedMultipartUploads"]
            .as_u64()
            .unwrap_or_else(|| panic!("no unfinishedMultipartUploads in {v}")) as usize
    }

    /// Waits until `bucket` has `want` unfinished multipart uploads: Garage updates that
    /// count in the background, so it lags a create or an abort, more so under load.
    /// Panics with the last count after 20 s.
    pub fn wait_incomplete_uploads(&self, bucket: &str, want: usize) {
        let start = std::time::Instant::now();
        loop {
            let n = self.incomplete_multipart_uploads(bucket);
            if n == want {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "bucket {bucket} still has {n} unfinished multipart uploads after 20 s, want {want}; Garage log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The server log's tail.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}
