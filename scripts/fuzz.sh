#!/usr/bin/env bash
# Fuzzes one parser with libFuzzer on stable Rust, e.g. `scripts/fuzz.sh gguf_header 1000000`.
# Targets: gguf_header, safetensors_header, tokenizer, chat_template, policy.
# RUNS (default 1000000) is the number of inputs; extra arguments go to libFuzzer
# (`-max_total_time=10`; `-fork=1 -ignore_crashes=1` keeps going past a
# crash). New interesting inputs land in fuzz/target/corpus/TARGET;
# crashes in fuzz/artifacts/TARGET.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
target=${1:?usage: scripts/fuzz.sh TARGET [RUNS] [libFuzzer options...]}
runs=${2:-1000000}
shift $(($# < 2 ? $# : 2))
triple=$(rustc -vV | sed -n 's/^host: //p')
# Coverage instrumentation with stable flags only (what cargo-fuzz passes,
# minus the sanitizer, which needs nightly). `--target` keeps build scripts
# uninstrumented.
export RUSTFLAGS="--cfg fuzzing -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares"
cargo build --release --quiet --target "$triple" --bin "$target"
work=target/corpus/$target
mkdir -p "$work" "artifacts/$target"
exec "target/$triple/release/$target" "$work" "corpus/$target" \
  -runs="$runs" -max_len=65536 -rss_limit_mb=2048 -timeout=10 \
  -artifact_prefix="artifacts/$target/" "$@"
