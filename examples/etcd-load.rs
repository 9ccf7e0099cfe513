//! Loads an etcd member with a realistic, Kubernetes-like data set of a chosen size, fast:
//! concurrent transactions of many puts each.
//!
//! Values are JSON objects of 1–20 KiB with the redundancy of real Kubernetes objects
//! (repeated field names, labels, managed fields), plus about 10 % random Secret-like
//! blobs; a share of keys is overwritten and deleted so the database has history.
//!
//! ```sh
//! cargo run --release --example etcd-load -- --endpoint http://127.0.0.1:2379 --size 1GiB
//! ```

use etcd_client::{Client, Txn, TxnOp};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const PUTS_PER_TXN: usize = 32;
const WORKERS: usize = 8;

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("GiB") {
        (n, 1u64 << 30)
    } else if let Some(n) = s.strip_suffix("MiB") {
        (n, 1 << 20)
    } else if let Some(n) = s.strip_suffix("KiB") {
        (n, 1 << 10)
    } else {
        (s, 1)
    };
    num.trim()
        .parse::<f64>()
        .ok()
        .map(|v| (v * mult as f64) as u64)
}

/// A Kubernetes-like object of roughly `target` bytes.
fn object(rng: &mut impl Rng, kind: &str, ns: usize, name: &str, target: usize) -> Vec<u8> {
    if kind == "secrets" {
        // Secrets: mostly random (certificates, tokens), base64-like.
        let mut data = String::with_capacity(target);
        data.push_str(&format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"ns-{ns}\"}},\"type\":\"kubernetes.io/tls\",\"data\":{{\"tls.crt\":\""
        ));
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        while data.len() < target {
            data.push(ALPHABET[rng.random_range(0..64)] as char);
        }
        data.push_str("\"}}");
        return data.into_bytes();
    }
    let mut s = format!(
        "{{\"apiVersion\":\"apps/v1\",\"kind\":\"{kind}\",\"metadata\":{{\"name\":\"{name}\",\"namespace\":\"ns-{ns}\",\"uid\":\"{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}\",\"resourceVersion\":\"{}\",\"labels\":{{\"app.kubernetes.io/name\":\"{name}\",\"app.kubernetes.io/part-of\":\"shop\",\"team\":\"t{}\"}},\"managedFields\":[",
        rng.random::<u32>(),
        rng.random::<u16>(),
        rng.random_range(0..4096),
        rng.random_range(0..4096),
        rng.random::<u64>() & 0xffff_ffff_ffff,
        rng.random_range(1000..9_999_999),
        ns % 13
    );
    let mut i = 0;
    while s.len() + 200 < target {
        s.push_str(&format!(
            "{{\"manager\":\"kube-controller-manager\",\"operation\":\"Update\",\"apiVersion\":\"v1\",\"time\":\"2026-11-{:02}T{:02}:{:02}:{:02}Z\",\"fieldsType\":\"FieldsV1\",\"fieldsV1\":{{\"f:spec\":{{\"f:replicas\":{{}},\"f:template\":{{\"f:containers\":{{\"k:{{\\\"name\\\":\\\"c{i}\\\"}}\":{{\"f:image\":{{}},\"f:env\":{{}}}}}}}}}}}},\"podIP\":\"10.{}.{}.{}\"}},",
            rng.random_range(1..29),
            rng.random_range(0..24),
            rng.random_range(0..60),
            rng.random_range(0..60),
            rng.random_range(0..255),
            rng.random_range(0..255),
            rng.random_range(0..255),
        ));
        i += 1;
    }
    s.push_str("{}]}}");
    s.into_bytes()
}

#[tokio::main]
async fn main() {
    let mut endpoint = "http://127.0.0.1:2379".to_string();
    let mut size: u64 = 1 << 30;
    let mut seed: u64 = 1;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let v = args.next().unwrap_or_default();
        match a.as_str() {
            "--endpoint" => endpoint = v,
            "--size" => size = parse_size(&v).expect("--size like 100MiB or 1GiB"),
            "--seed" => seed = v.parse().expect("--seed N"),
            _ => {
                eprintln!("usage: etcd-load [--endpoint URL] [--size 1GiB] [--seed N]");
                std::process::exit(2);
            }
        }
    }
    let client = Client::connect([endpoint.as_str()], None)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {endpoint}: {e}"));
    let written = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let (mut kv, written, next) = (client.kv_client(), written.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + w as u64);
            while written.load(Ordering::Relaxed) < size {
                let batch = next.fetch_add(PUTS_PER_TXN as u64, Ordering::Relaxed);
                let mut ops = Vec::with_capacity(PUTS_PER_TXN);
                let mut bytes = 0u64;
                for j in 0..PUTS_PER_TXN as u64 {
                    let n = batch + j;
                    let kind = match n % 10 {
                        0 => "secrets",
                        1..=3 => "configmaps",
                        4..=6 => "pods",
                        _ => "deployments",
                    };
                    let ns = (n % 97) as usize;
                    let name = format!("{kind}-{n}");
                    let target = rng.random_range(1024..20 * 1024);
                    let v = object(&mut rng, kind, ns, &name, target);
                    bytes += v.len() as u64;
                    ops.push(TxnOp::put(
                        format!("/registry/{kind}/ns-{ns}/{name}"),
                        v,
                        None,
                    ));
                }
                kv.txn(Txn::new().and_then(ops)).await.expect("txn");
                // History: overwrite every 5th batch's first key, delete every 7th.
                if batch % (5 * PUTS_PER_TXN as u64) == 0 {
                    let k = format!(
                        "/registry/configmaps/ns-{}/configmaps-{}",
                        (batch + 1) % 97,
                        batch + 1
                    );
                    kv.put(k, object(&mut rng, "configmaps", 0, "x", 2048), None)
                        .await
                        .expect("put");
                }
                if batch % (7 * PUTS_PER_TXN as u64) == 0 {
                    let k = format!("/registry/pods/ns-{}/pods-{}", (batch + 4) % 97, batch + 4);
                    kv.delete(k, None).await.expect("delete");
                }
                written.fetch_add(bytes, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("loader task");
    }
    let secs = start.elapsed().as_secs_f64();
    let mb = written.load(Ordering::Relaxed) as f64 / 1e6;
    eprintln!(
        "loaded {mb:.0} MB of values in {secs:.1} s ({:.0} MB/s) into {endpoint}",
        mb / secs
    );
}
