#!/usr/bin/env bash
# Runs every check CI runs: set-up (models, Python reference, the CUDA
# toolchain for the kernel tests), formatting, lints, the whole test suite in
# release mode, and the CLI's device tests with the CUDA device built in.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --cuda-toolchain
cargo fmt --all -- --check
cargo clippy --release --all-targets --quiet -- -D warnings
cargo clippy --release --all-targets --quiet --features tandem-cli/cuda -- -D warnings
cargo test --release --workspace
cargo test --release -p tandem-cli --features cuda --test device
