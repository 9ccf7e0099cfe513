#!/usr/bin/env bash
# Benchmarks a backup cycle against the usual script, on one etcd member and one Garage
# bucket, in one run: the cases are interleaved and repeated, medians are reported.
#
#   1. etcdctl snapshot save to local disk (the physical limit of a cycle here)
#   2. the script: etcdctl snapshot save + etcdctl snapshot status + gzip + aws s3 cp
#   3. etcd-backup snapshot, zstd (default) and gzip (like for like)
#   4. etcd-backup restore latest --output  vs  aws s3 cp + gunzip
#   5. etcd-backup snapshot (zstd) through a proxy that limits the upload to 8 MB/s
#   plus the verifier alone (verify --file) and the daemon idle (RSS, CPU over 30 s).
#
# For every snapshot it also reports how long etcd held it (its read transaction), from
# etcd's own log lines ("sending database snapshot to client" -> "successfully sent database
# snapshot to client"), and, once, zstd levels 1-6 and --long against gzip -6 on the
# snapshot (single-threaded CLI: time and size).
#
# Usage: bash scripts/bench.sh [--size 1GiB] [--rounds 3] [--work DIR] [--cycles-only]
# --cycles-only runs cases 1, 3 (zstd) and 5 only: the stream, cycle and memory targets.
# Needs: cargo, root for apt-get (installs etcd, Garage, GNU time and the AWS CLI when
# missing). The database is built by examples/etcd-load.rs (Kubernetes-like values, with
# history). Disk: about 6x the size under --work (default /var/tmp).
set -euo pipefail
cd "$(dirname "$0")/.."
# etcd reads every ETCD_* variable as a flag, etcd-backup every ETCD_BACKUP_* as a setting.
for v in $(env | awk -F= '/^ETCD_/{print $1}'); do unset "$v"; done
export PATH="$HOME/.cargo/bin:$PATH"

SIZE=1GiB
ROUNDS=3
WORK_BASE=/var/tmp
ALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --cycles-only) ALL=0; shift ;;
    --size) SIZE="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --work) WORK_BASE="$2"; shift 2 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

bash scripts/install-deps.sh --no-promtool
eval "$(bash scripts/install-deps.sh --print-env)"
need_apt=()
[ -x /usr/bin/time ] || need_apt+=(time)
command -v aws >/dev/null 2>&1 || need_apt+=(awscli)
if [ ${#need_apt[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

echo "== building (release)"
cargo build --release --locked --bin etcd-backup --example etcd-load
BIN="$PWD/target/release/etcd-backup"
LOADER="$PWD/target/release/examples/etcd-load"
ETCDCTL="$EB_ETCD_351_DIR/etcdctl"

WORK=$(mktemp -d "$WORK_BASE/etcd-backup-bench.XXXXXX")
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
CP=$(free_port); PP=$(free_port); MP=$(free_port)
RPC=$(free_port); S3=$(free_port); ADMIN=$(free_port); DAEMON_PORT=$(free_port)
PIDS=()
# Every server started here is stopped on every way out: normal end, an error (set -e),
# Ctrl-C or a TERM. Each is started so that its PID is the server's own (no subshell).
cleanup() {
  trap - EXIT INT TERM
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "== etcd 3.5.1 on 127.0.0.1:$CP (data in $WORK/etcd)"
"$EB_ETCD_351_DIR/etcd" --name bench --data-dir "$WORK/etcd" \
  --listen-client-urls "http://127.0.0.1:$CP" --advertise-client-urls "http://127.0.0.1:$CP" \
  --listen-peer-urls "http://127.0.0.1:$PP" --initial-advertise-peer-urls "http://127.0.0.1:$PP" \
  --initial-cluster "bench=http://127.0.0.1:$PP" --listen-metrics-urls "http://127.0.0.1:$MP" \
  --quota-backend-bytes $((16 * 1024 * 1024 * 1024)) --snapshot-count 1000000 \
  > "$WORK/etcd.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$MP/health" >/dev/null 2>&1 && break; sleep 0.1; done

echo "== Garage on 127.0.0.1:$S3"
KEY_ID=GK0123456789abcdef0bench01
SECRET=0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
cat > "$WORK/garage.toml" <<EOF
metadata_dir = "$WORK/garage/meta"
data_dir = "$WORK/garage/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$RPC"
rpc_public_addr = "127.0.0.1:$RPC"
rpc_secret = "4425f5c26c5e11581d3223904324dcb5b5d5dfb14e5e7f35e38c595424f5f1e6"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$S3"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$ADMIN"
admin_token = "bench-admin"
EOF
chmod 600 "$WORK/garage.toml"
G() { env -u RUST_LOG "$EB_GARAGE_BIN" -c "$WORK/garage.toml" "$@"; }
env -u RUST_LOG "$EB_GARAGE_BIN" -c "$WORK/garage.toml" server > "$WORK/garage.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 1 100); do G status >/dev/null 2>&1 && break; sleep 0.2; done
NODE=$(G node id -q | cut -d@ -f1)
G layout assign -z dc1 -c 100G "$NODE" >/dev/null
G layout apply --version 1 >/dev/null
G key import --yes -n bench "$KEY_ID" "$SECRET" >/dev/null
G bucket create bench >/dev/null
G bucket allow --read --write --owner bench --key bench >/dev/null
export AWS_ACCESS_KEY_ID=$KEY_ID AWS_SECRET_ACCESS_KEY=$SECRET AWS_DEFAULT_REGION=garage
AWS=(aws --endpoint-url "http://127.0.0.1:$S3" --only-show-errors)

# A slow link to S3: a proxy in front of Garage that forwards the upload (client to
# server) at 8 MB/s, the answers unthrottled.
SLOW=$(free_port)
cat > "$WORK/throttle.py" <<'PY'
import asyncio, sys, time
listen, upstream, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
bucket = {"t": time.monotonic(), "debt": 0.0}
async def pace(n):
    # One shared budget for every connection's upload direction.
    now = time.monotonic()
    b = bucket
    b["debt"] = max(0.0, b["debt"] - (now - b["t"]) * rate) + n
    b["t"] = now
    if b["debt"] > rate / 20:
        await asyncio.sleep((b["debt"] - rate / 20) / rate)
async def pipe(r, w, limit):
    try:
        while True:
            d = await r.read(65536)
            if not d:
                break
            if limit:
                await pace(len(d))
            w.write(d)
            await w.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        w.close()
async def handle(cr, cw):
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", upstream)
    except OSError:
        cw.close()
        return
    await asyncio.gather(pipe(cr, uw, True), pipe(ur, cw, False))
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", listen)
    async with srv:
        await srv.serve_forever()
asyncio.run(main())
PY
python3 "$WORK/throttle.py" "$SLOW" "$S3" 8000000 > "$WORK/throttle.log" 2>&1 &
PIDS+=($!)

echo "== loading $SIZE of Kubernetes-like objects"
"$LOADER" --endpoint "http://127.0.0.1:$CP" --size "$SIZE"
DB_SIZE=$("$ETCDCTL" --endpoints "http://127.0.0.1:$CP" endpoint status -w json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["Status"]["dbSize"])')
echo "   etcd database: $DB_SIZE bytes"

for c in zstd gzip slow; do
  comp=$c s3=$S3
  [ "$c" = slow ] && comp=zstd s3=$SLOW
  cat > "$WORK/$c.toml" <<EOF
[etcd]
endpoints = ["http://127.0.0.1:$CP"]
[storage]
url = "s3://bench/eb-$c"
endpoint = "http://127.0.0.1:$s3"
region = "garage"
access_key_id = "$KEY_ID"
secret_access_key = "$SECRET"
[backup]
cluster_name = "bench"
compression = "$comp"
spool_dir = "$WORK/spool"
timeout = "2h"
[retention]
keep_last = 100
[metrics]
listen = "127.0.0.1:$DAEMON_PORT"
EOF
  chmod 600 "$WORK/$c.toml"
done

RESULTS="$WORK/results.tsv"
: > "$RESULTS"
# measure NAME STORED_FILE_OR_CMD -- command...: wall seconds and peak RSS (all processes of
# the case, from GNU time's maximum resident set of the command and its children).
measure() {
  local name="$1"; shift
  local tv="$WORK/time.txt"
  sync
  /usr/bin/time -v -o "$tv" "$@" > "$WORK/out.txt" 2> "$WORK/err.txt" || { cat "$WORK/err.txt"; echo "bench: $name failed" >&2; exit 1; }
  local wall rss
  wall=$(awk -F': ' '/Elapsed \(wall clock\)/{n=split($2,a,":"); s=0; for(i=1;i<=n;i++) s=s*60+a[i]; print s}' "$tv")
  rss=$(awk -F': ' '/Maximum resident set size/{print $2}' "$tv")
  LAST_WALL=$wall
  printf '%s\t%s\t%s\t%s\n' "$ROUND" "$name" "$wall" "$rss" >> "$RESULTS"
}
stored() { printf '%s\tstored:%s\t%s\t0\n' "$ROUND" "$1" "$2" >> "$RESULTS"; }
# hold NAME: how long etcd held the last snapshot it sent, from its own log lines.
hold() {
  local h
  h=$(python3 - "$WORK/etcd.log" <<'PY'
import json, sys
from datetime import datetime
start = end = None
for line in open(sys.argv[1], errors="replace"):
    if "database snapshot to client" not in line:
        continue
    try:
        e = json.loads(line)
    except ValueError:
        continue
    t = datetime.fromisoformat(e["ts"].replace("Z", "+00:00"))
    if e.get("msg", "").startswith("sending"):
        start, end = t, None
    elif e.get("msg", "").startswith("successfully sent") and start:
        end = t
print(f"{(end - start).total_seconds():.3f}" if start and end else "nan")
PY
)
  printf '%s\thold:%s\t%s\t0\n' "$ROUND" "$1" "$h" >> "$RESULTS"
  echo "   etcd held the snapshot ${h}s"
}

SNAP="$WORK/snap.db"
for ROUND in $(seq 1 "$ROUNDS"); do
  echo "== round $ROUND/$ROUNDS"
  rm -f "$SNAP" "$SNAP.gz"
  measure "1 etcdctl snapshot save" "$ETCDCTL" --endpoints "http://127.0.0.1:$CP" snapshot save "$SNAP"
  echo "   etcdctl snapshot save: ${LAST_WALL}s"
  hold "1 etcdctl snapshot save"
  if [ "$ROUND" = 1 ] && [ "$ALL" = 1 ]; then
    # Compression levels on this snapshot: single-threaded CLI, wall time and size.
    for lv in 1 2 3 4 5 6 "3 --long" "1 --long"; do
      # shellcheck disable=SC2086
      measure "z zstd -$lv" sh -c "zstd -q -T1 -$lv -c \"\$1\" > \"\$1.z\"" _ "$SNAP"
      printf '%s\tstored:zstd CLI -%s\t%s\t0\n' "$ROUND" "$lv" "$(stat -c %s "$SNAP.z")" >> "$RESULTS"
    done
    measure "z gzip -6" sh -c 'gzip -6 -c "$1" > "$1.z"' _ "$SNAP"
    printf '%s\tstored:gzip CLI -6\t%s\t0\n' "$ROUND" "$(stat -c %s "$SNAP.z")" >> "$RESULTS"
    rm -f "$SNAP.z"
  fi
  [ "$ALL" = 1 ] && measure "v etcd-backup verify --file" "$BIN" verify --file "$SNAP" --json
  rm -f "$SNAP"
  if [ "$ALL" = 1 ]; then
    measure "2 script: save+status+gzip+aws s3 cp" bash -c '
      set -e
      "$1" --endpoints "$2" snapshot save "$3" >/dev/null
      "$1" snapshot status "$3" -w table >/dev/null
      gzip "$3"
      shift 3
      "$@" s3 cp "'"$SNAP"'.gz" "s3://bench/script/snap-'"$ROUND"'.db.gz"
    ' _ "$ETCDCTL" "http://127.0.0.1:$CP" "$SNAP" "${AWS[@]}"
    echo "   script pipeline: ${LAST_WALL}s"
    stored "gzip (script)" "$(stat -c %s "$SNAP.gz")"
  fi

  cycles=(zstd gzip)
  [ "$ALL" = 1 ] || cycles=(zstd)
  for c in "${cycles[@]}"; do
    measure "3 etcd-backup snapshot ($c)" "$BIN" snapshot --config "$WORK/$c.toml"
    echo "   etcd-backup snapshot ($c): ${LAST_WALL}s"
    hold "3 etcd-backup snapshot ($c)"
    stored "etcd-backup $c" "$("$BIN" list --config "$WORK/$c.toml" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["stored_size"])')"
  done

  measure "5 etcd-backup snapshot (zstd, 8 MB/s link)" "$BIN" snapshot --config "$WORK/slow.toml"
  echo "   etcd-backup snapshot (zstd, 8 MB/s link): ${LAST_WALL}s"
  hold "5 etcd-backup snapshot (zstd, 8 MB/s link)"

  [ "$ALL" = 1 ] || continue
  rm -f "$WORK/r.db" "$SNAP" "$SNAP.gz"
  measure "4 etcd-backup restore (zstd)" "$BIN" restore latest --config "$WORK/zstd.toml" --output "$WORK/r.db"
  echo "   etcd-backup restore: ${LAST_WALL}s"
  rm -f "$WORK/r.db"
  measure "4 aws s3 cp + gunzip" bash -c '
    set -e
    out="$1"; shift
    "$@" s3 cp "s3://bench/script/snap-'"$ROUND"'.db.gz" "$out.gz"
    gunzip "$out.gz"
  ' _ "$WORK/r.db" "${AWS[@]}"
  echo "   aws s3 cp + gunzip: ${LAST_WALL}s"
  rm -f "$WORK/r.db"
done

IDLE_RSS=0
IDLE_TICKS=0
if [ "$ALL" = 1 ]; then
echo "== daemon idle (30 s between cycles; it holds the election lease meanwhile)"
sed 's/^\[backup\]/[schedule]\ncron = "0 0 1 1 *"\n[backup]/' "$WORK/zstd.toml" > "$WORK/daemon.toml"
# A daemon that starts on an empty store takes a backup at once; this store is not empty.
"$BIN" run --config "$WORK/daemon.toml" > "$WORK/daemon.log" 2>&1 &
DPID=$!
PIDS+=("$DPID")
sleep 10
t0=$(awk '{print $14+$15}' "/proc/$DPID/stat")
sleep 30
t1=$(awk '{print $14+$15}' "/proc/$DPID/stat")
IDLE_RSS=$(awk '/VmRSS/{print $2}' "/proc/$DPID/status")
IDLE_TICKS=$((t1 - t0))
kill "$DPID"
fi

python3 - "$RESULTS" "$DB_SIZE" "$SIZE" "$ROUNDS" "$IDLE_RSS" "$IDLE_TICKS" <<'PY'
import statistics, sys
path, db_size, size, rounds, idle_rss, idle_ticks = sys.argv[1:]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
times, rss, stored, holds = {}, {}, {}, {}
for _, name, a, b in rows:
    if name.startswith("stored:"):
        stored.setdefault(name[7:], []).append(int(a))
    elif name.startswith("hold:"):
        holds.setdefault(name[5:], []).append(float(a))
    else:
        times.setdefault(name, []).append(float(a))
        rss.setdefault(name, []).append(int(b))
base = statistics.median(times["1 etcdctl snapshot save"])
db = int(db_size)
print()
print(f"etcd database {db/2**30:.2f} GiB ({size} loaded), {rounds} rounds, medians")
print(f"{'case':40} {'wall s':>8} {'x save':>7} {'peak RSS MiB':>13}")
for name in sorted(times):
    t = statistics.median(times[name])
    r = statistics.median(rss[name]) / 1024
    extra = f"   {db/t/1e9:.2f} GB/s" if name.startswith("v ") else ""
    print(f"{name:40} {t:8.2f} {t/base:7.2f} {r:13.1f}{extra}")
print()
print(f"{'etcd held the snapshot (its log)':40} {'s':>8} {'x save':>7}")
hbase = statistics.median(holds["1 etcdctl snapshot save"])
for name in sorted(holds):
    h = statistics.median(holds[name])
    print(f"{name:40} {h:8.2f} {h/hbase:7.2f}")
med = lambda d, k: statistics.median(d[k]) if k in d else None
print()
if any(n.startswith("z ") for n in times):
    print(f"{'compression (CLI, one thread)':40} {'wall s':>8} {'bytes':>14} {'s x bytes/GB':>13}")
    for name in sorted(n for n in times if n.startswith("z ")):
        t = statistics.median(times[name])
        key = name[2:].replace("zstd ", "zstd CLI ").replace("gzip ", "gzip CLI ")
        b = statistics.median(stored[key])
        print(f"{name[2:]:40} {t:8.2f} {b:14d} {t*b/1e9:13.2f}")
    print()
gz = med(stored, "gzip (script)")
print(f"{'stored object':40} {'bytes':>14} {'x gzip':>7} {'% of DB':>8}")
for name in sorted(stored):
    s = statistics.median(stored[name])
    print(f"{name:40} {s:14d} {s/gz if gz else float('nan'):7.2f} {100*s/db:7.1f}%")
print()
t_zstd = med(times, "3 etcd-backup snapshot (zstd)")
print(f"cycle (zstd) / etcdctl save:     {t_zstd/base:.2f}  (target <= 1.25)")
print(f"cycle (zstd) / etcd's stream to etcdctl:  {t_zstd/hbase:.2f}  (target <= 1.15)")
print(f"etcd's hold, 8 MB/s link / etcdctl's:     {med(holds, '5 etcd-backup snapshot (zstd, 8 MB/s link)')/hbase:.2f}  (target <= 1.15)")
print(f"peak RSS, 8 MB/s link:           {med(rss, '5 etcd-backup snapshot (zstd, 8 MB/s link)')/1024:.1f} MiB  (target <= 48)")
if gz:
    t_script = med(times, "2 script: save+status+gzip+aws s3 cp")
    t_rest = med(times, "4 etcd-backup restore (zstd)")
    t_cli = med(times, "4 aws s3 cp + gunzip")
    print(f"script / cycle (zstd):           {t_script/t_zstd:.2f}  (target >= 2.5)")
    print(f"stored zstd / gzip:              {med(stored, 'etcd-backup zstd')/gz:.2f}")
    print(f"restore / (aws cp + gunzip):     {t_rest/t_cli:.2f}  (target <= 1.2)")
    print(f"daemon idle: {int(idle_rss)/1024:.1f} MiB RSS, {idle_ticks} CPU ticks in 30 s")
PY
