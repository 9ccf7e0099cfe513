//! A TCP fault proxy between the product and a real server (Garage, etcd), controlled by the
//! test: pass traffic, refuse connections, stall, throttle to a bandwidth, or cut every
//! connection after some bytes.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    Pass,
    /// Close new connections at once (a server that is down); live ones are cut.
    Refuse,
    /// Accept and keep connections open, but forward nothing (a hung server or a black hole).
    Stall,
    /// Forward at most this many bytes per second, all connections and directions together.
    Throttle(u64),
    /// Cut each connection once it has carried this many bytes (either direction).
    CutAfter(u64),
}

struct Shared {
    fault: Mutex<Fault>,
    stop: AtomicBool,
    conns: Mutex<Vec<TcpStream>>,
    bytes: AtomicU64,
    /// The throttle's current 100 ms window: its start and the bytes sent in it.
    window: Mutex<(Instant, u64)>,
}

/// A running proxy; stopped on drop.
pub struct Proxy {
    port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::Pass),
            stop: AtomicBool::new(false),
            conns: Mutex::new(Vec::new()),
            bytes: AtomicU64::new(0),
            window: Mutex::new((Instant::now(), 0)),
        });
        let sh = shared.clone();
        thread::spawn(move || accept_loop(&listener, upstream, &sh));
        Proxy { port, shared }
    }

    /// Forwards to the host:port of `url` (`http://127.0.0.1:PORT`).
    pub fn for_url(url: &str) -> Proxy {
        let hostport = url.split("://").nth(1).unwrap_or(url).trim_end_matches('/');
        Proxy::start(hostport.parse().expect("an IP:port URL"))
    }

    /// `http://127.0.0.1:PORT` of the proxy.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Switches the fault; `Refuse` also cuts the live connections.
    pub fn set(&self, f: Fault) {
        *self.shared.fault.lock().unwrap() = f;
        if f == Fault::Refuse {
            self.cut_all();
        }
    }

    /// Cuts every live connection.
    pub fn cut_all(&self) {
        for c in self.shared.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }

    /// Bytes forwarded so far (both directions).
    pub fn bytes(&self) -> u64 {
        self.shared.bytes.load(Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.cut_all();
    }
}

fn accept_loop(listener: &TcpListener, upstream: SocketAddr, sh: &Arc<Shared>) {
    while !sh.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                if *sh.fault.lock().unwrap() == Fault::Refuse {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
                else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                {
                    let mut conns = sh.conns.lock().unwrap();
                    conns.retain(|c| c.peer_addr().is_ok());
                    conns.push(client.try_clone().unwrap());
                    conns.push(server.try_clone().unwrap());
                }
                let carried = Arc::new(AtomicU64::new(0));
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let sh = sh.clone();
                    let carried = carried.clone();
                    thread::spawn(move || pump(from, to, &sh, &carried));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, sh: &Shared, carried: &AtomicU64) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let mut sent = 0;
        while sent < n {
            let fault = *sh.fault.lock().unwrap();
            match fault {
                Fault::Stall => {
                    if sh.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    thread::sleep(Duration::from_millis(20));
                    continue;
                }
                Fault::Refuse => {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
                Fault::CutAfter(limit) if carried.load(Ordering::Relaxed) >= limit => {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
                _ => {}
            }
            let mut chunk = n - sent;
            if let Fault::Throttle(rate) = fault {
                // At most rate/10 bytes per 100 ms window, shared by every connection.
                let per_window = (rate / 10).max(1);
                let mut w = sh.window.lock().unwrap();
                if w.0.elapsed() >= Duration::from_millis(100) {
                    *w = (Instant::now(), 0);
                }
                if w.1 >= per_window {
                    let pause = Duration::from_millis(100).saturating_sub(w.0.elapsed());
                    drop(w);
                    thread::sleep(pause.max(Duration::from_millis(1)));
                    continue;
                }
                chunk = chunk.min(usize::try_from(per_window - w.1).unwrap_or(chunk));
                w.1 += chunk as u64;
            }
            if let Fault::CutAfter(limit) = fault {
                let left = limit.saturating_sub(carried.load(Ordering::Relaxed));
                chunk = chunk.min(usize::try_from(left).unwrap_or(chunk)).max(1);
            }
            if to.write_all(&buf[sent..sent + chunk]).is_err() {
                let _ = from.shutdown(Shutdown::Both);
                return;
            }
            sent += chunk;
            carried.fetch_add(chunk as u64, Ordering::Relaxed);
            sh.bytes.fetch_add(chunk as u64, Ordering::Relaxed);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
