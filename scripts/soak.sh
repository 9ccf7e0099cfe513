#!/usr/bin/env bash
# Soak: three daemons against a 3-member etcd cluster and Garage behind a fault proxy, on a
# 1-minute schedule, with a writer changing etcd and seeded random faults (S3 refusing,
# cutting, stalling, crawling; the leader SIGKILLed, SIGTERMed and paused past its lease;
# etcd members killed) for DURATION; then the audit (every backup verifies, the newest
# restores, one backup per slot, no overlapping cycles, no orphans or incomplete uploads,
# daemon memory and open files bounded). The test lives in tests/it/soak.rs; CI runs it for
# 2 minutes on a 10-second schedule.
#
# Usage: bash scripts/soak.sh DURATION [SEED]     DURATION like 30m, 1h, 600s
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
DURATION="${1:?usage: soak.sh DURATION [SEED], e.g. 30m}"
case "$DURATION" in
  *h) SECS=$(( ${DURATION%h} * 3600 )) ;;
  *m) SECS=$(( ${DURATION%m} * 60 )) ;;
  *s) SECS=${DURATION%s} ;;
  *) SECS=$DURATION ;;
esac
bash scripts/install-deps.sh --no-promtool
eval "$(bash scripts/install-deps.sh --print-env)"
export EB_SOAK_SECS="$SECS" EB_SOAK_CRON="${EB_SOAK_CRON:-0 * * * * *}"
if [ -n "${2:-}" ]; then export EB_SOAK_SEED="$2"; fi
exec cargo test --locked --test it soak:: -- --nocapture
