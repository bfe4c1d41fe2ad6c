#!/usr/bin/env bash
# Runs every check CI runs: set-up (model + Python reference), formatting, lints,
# and the whole test suite in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --release --all-targets --quiet -- -D warnings
cargo test --release --workspace
