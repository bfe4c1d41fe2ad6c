#!/usr/bin/env bash
# The split decode step against dense and llama.cpp, in one run, on the
# default model: decode tokens/s after a context of 8k and 32k tokens, 2 threads.
# tandem's 8k context is a real prefill of real text; 32k is above
# --prefill-max, so it gets a generated KV cache with the real weights (the
# output says synthetic_kv). llama-bench prefills its depth itself (untimed).
# Usage: LLAMA_BENCH=/path/to/llama-bench bench/split_vs_llamacpp.sh [DEPTHS] [POLICY]
set -euo pipefail
cd "$(dirname "$0")/.."
DEPTHS=${1:-8192,32768}
POLICY=${2:-lsh:k=10,l=150,t=2}
: "${LLAMA_BENCH:?set LLAMA_BENCH to the llama-bench binary (see bench/llamacpp.sh)}"
echo "# $(date -u +%FT%TZ) load:$(cut -d' ' -f1-3 /proc/loadavg) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)"
echo "## tandem ($POLICY and dense)"
target/release/tandem bench decode --threads 2 --cpu-workers 2 --context "$DEPTHS" \
  --policy "$POLICY" --tokens 32 --json
echo "## llama.cpp"
# Flash attention on: llama.cpp's faster setting at long depths, for both its
# decode and its untimed prefill; set FA=off or FA=off,on for the other setting.
"$LLAMA_BENCH" -m models/SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -p 0 -n 32 -d "$DEPTHS" -fa "${FA:-on}" -r 1 -o md
