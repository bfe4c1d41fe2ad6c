#!/usr/bin/env bash
# Runs every check CI runs: set-up (models, Python reference, the CUDA
# toolchain for the kernel tests), formatting, lints, the whole test suite in
# release mode, the CLI's and the C ABI's device tests with the CUDA device
# built in, and a short run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --cuda-toolchain
cargo fmt --all -- --check
cargo clippy --release --all-targets --quiet -- -D warnings
cargo clippy --release --all-targets --quiet --features tandem-cli/cuda,tandem-capi/cuda -- -D warnings
cargo test --release --workspace
cargo test --release -p tandem-cli --features cuda --test device
cargo test --release -p tandem-capi --features cuda --test device
# A short coverage-guided run of every fuzz target (scripts/fuzz.sh runs the long ones).
for target in gguf_header safetensors_header tokenizer chat_template policy; do
    scripts/fuzz.sh "$target" 50000
done
