#!/usr/bin/env bash
# Builds the Debian package: target/debian/etcd-backup_<version>_<arch>.deb
# (release binary, unit, config as a conffile, man pages, completions, alert rules).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v cargo-deb >/dev/null; then
  echo "build-deb: installing cargo-deb 3.8.0" >&2
  cargo install cargo-deb --version 3.8.0 --locked --quiet
fi
cargo build --release --locked
rm -rf target/assets
target/release/etcd-backup gen-docs --out target/assets
gzip -9n target/assets/man/*.1
cargo deb --no-build --locked
