#!/usr/bin/env bash
# Runs the full test suite on a Debian machine: installs what the tests need when it is
# missing (protoc, etcd 3.5.1 and 3.4.23, Garage 2.5.0, promtool), then runs every test.
# Usage: bash scripts/test.sh [extra cargo test arguments]
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bash scripts/install-deps.sh
eval "$(bash scripts/install-deps.sh --print-env)"

cargo test --locked --all-targets "$@"
