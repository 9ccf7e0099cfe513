#!/usr/bin/env bash
# The main job, end to end, on a fresh Debian machine: starts a throwaway etcd 3.5.1 on
# loopback, loads some Kubernetes-like keys, runs one backup cycle into a local directory,
# lists it, verifies the stored snapshot and stops etcd again.
#
# Usage: bash scripts/demo.sh            (keeps nothing: everything lives in a temp dir)
#        EB_DEMO_DIR=/some/dir bash scripts/demo.sh   (keeps the backups there)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/install-deps.sh --no-garage --no-promtool
eval "$(bash scripts/install-deps.sh --print-env)"

echo "== building etcd-backup (release)"
cargo build --release --locked
BIN="$PWD/target/release/etcd-backup"

WORK="${EB_DEMO_DIR:-$(mktemp -d /tmp/etcd-backup-demo.XXXXXX)}"
mkdir -p "$WORK"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
CLIENT_PORT=$(free_port); PEER_PORT=$(free_port); METRICS_PORT=$(free_port)

ETCD_PID=""
cleanup() {
  if [ -n "$ETCD_PID" ]; then kill "$ETCD_PID" 2>/dev/null || true; wait "$ETCD_PID" 2>/dev/null || true; fi
  if [ -z "${EB_DEMO_DIR:-}" ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "== starting etcd 3.5.1 on 127.0.0.1:$CLIENT_PORT (data in $WORK/etcd)"
# etcd reads every ETCD_* environment variable as a flag: start it with none of them.
env $(env | awk -F= '/^ETCD_/{print "-u " $1}') \
  "$EB_ETCD_351_DIR/etcd" --name demo --data-dir "$WORK/etcd" \
  --listen-client-urls "http://127.0.0.1:$CLIENT_PORT" --advertise-client-urls "http://127.0.0.1:$CLIENT_PORT" \
  --listen-peer-urls "http://127.0.0.1:$PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
  --initial-cluster "demo=http://127.0.0.1:$PEER_PORT" --listen-metrics-urls "http://127.0.0.1:$METRICS_PORT" \
  > "$WORK/etcd.log" 2>&1 &
ETCD_PID=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$METRICS_PORT/health" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$METRICS_PORT/health" >/dev/null || { cat "$WORK/etcd.log"; echo "etcd did not start"; exit 1; }

echo "== loading 2000 Kubernetes-like keys (with overwrites and deletes)"
python3 - "$CLIENT_PORT" <<'PY'
import base64, json, sys, urllib.request
port = sys.argv[1]
def txn(ops):
    body = json.dumps({"success": ops}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v3/kv/txn", body, {"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
b64 = lambda s: base64.b64encode(s.encode()).decode()
def put(k, v): return {"requestPut": {"key": b64(k), "value": b64(v)}}
def delete(k): return {"requestDeleteRange": {"key": b64(k)}}
keys = [f"/registry/configmaps/ns{i % 20}/cm-{i}" for i in range(2000)]
for start in range(0, len(keys), 100):
    txn([put(k, json.dumps({"kind": "ConfigMap", "metadata": {"name": k.rsplit('/', 1)[1]}, "data": {"v": "x" * (i % 500)}}))
         for i, k in enumerate(keys[start:start + 100], start)])
for start in range(0, len(keys), 500):
    txn([put(k, "overwritten") for k in keys[start:start + 500:5]])
    txn([delete(k) for k in keys[start:start + 500:10]])
PY

cat > "$WORK/config.toml" <<EOF
[etcd]
endpoints = ["http://127.0.0.1:$CLIENT_PORT"]

[storage]
url = "file://$WORK/backups"

[backup]
cluster_name = "demo"
spool_dir = "$WORK/spool"
EOF

echo "== etcd-backup check-config"
"$BIN" check-config --config "$WORK/config.toml"
echo "== etcd-backup snapshot (one backup cycle)"
ID=$("$BIN" snapshot --config "$WORK/config.toml")
echo "backup id: $ID"
echo "== etcd-backup list"
"$BIN" list --config "$WORK/config.toml"
echo "== stored objects"
find "$WORK/backups" -type f -printf '%P  %s bytes\n' | sort
echo "== etcd-backup verify (download, decompress, sha256 against the manifest, snapshot structure)"
"$BIN" verify --config "$WORK/config.toml" "$ID"
echo "== etcd-backup restore, then etcdutl snapshot status on the restored file"
"$BIN" restore --config "$WORK/config.toml" "$ID" --output "$WORK/restored.db"
"$EB_ETCD_351_DIR/etcdutl" snapshot status "$WORK/restored.db" -w table
echo "== done: backup $ID of a live etcd, committed in $WORK/backups"
