#!/usr/bin/env bash
# tandem (dense) and llama.cpp side by side, in one run, on the default model:
# decode tokens/s at depths 0 and 2048 and prefill tokens/s, 2 threads.
# Usage: LLAMA_BENCH=/path/to/llama-bench bench/decode_vs_llamacpp.sh [DEPTHS]
set -euo pipefail
cd "$(dirname "$0")/.."
DEPTHS=${1:-0,2048}
echo "# $(date -u +%FT%TZ) load:$(cut -d' ' -f1-3 /proc/loadavg) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "## tandem"
target/release/tandem bench decode --threads 2 --context "0,512,$DEPTHS" --tokens 128
echo "## llama.cpp"
bench/llamacpp.sh models/SmolLM2-135M-Instruct.Q4_1.gguf "$DEPTHS"
