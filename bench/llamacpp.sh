#!/usr/bin/env bash
# Side-by-side baseline: llama.cpp's llama-bench on the same model, 2 threads,
# prefill 512 and decode 128 tokens at several KV depths. Downloads nothing.
#
# Usage: LLAMA_BENCH=/path/to/llama-bench bench/llamacpp.sh [MODEL] [DEPTHS]
#   MODEL  default models/SmolLM2-135M-Instruct.Q4_1.gguf
#   DEPTHS comma list, default 0,2048 (e.g. 0,2048,8192,32768)
#   THREADS env, default 2; REPS env, default 3
#
# How llama.cpp was built for this (outside the repo; llama-cpp-python's sdist
# vendors llama.cpp; its vendor/llama.cpp/CMakeLists.txt has the version):
#   apt-get update && apt-get install -y cmake
#   mkdir -p /work/peers && cd /work/peers
#   pip download --no-deps --no-binary :all: llama-cpp-python -d .
#   tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp
#   cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release
#   cmake --build build -j2 --target llama-bench llama-cli llama-simple
#   export LLAMA_BENCH=$PWD/build/bin/llama-bench
# On a Xeon with AMX inside a VM that does not grant AMX tile state, the native
# build segfaults in ggml_backend_amx_mul_mat; build without AMX instead:
#   cmake -B build-noamx -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
#     -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
#     -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
#     -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release
#   cmake --build build-noamx -j2 --target llama-bench
set -euo pipefail
cd "$(dirname "$0")/.."
: "${LLAMA_BENCH:?set LLAMA_BENCH to the llama-bench binary (see the build commands at the top of this script)}"
MODEL=${1:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
DEPTHS=${2:-0,2048}
THREADS=${THREADS:-2}
REPS=${REPS:-3}
[ -x "$LLAMA_BENCH" ] || { echo "llamacpp.sh: $LLAMA_BENCH is not executable" >&2; exit 1; }
[ -f "$MODEL" ] || { echo "llamacpp.sh: model $MODEL not found" >&2; exit 1; }
echo "# $(date -u +%FT%TZ) $(uname -n) load:$(cut -d' ' -f1-3 /proc/loadavg) model=$MODEL threads=$THREADS"
"$LLAMA_BENCH" --version 2>&1 | head -n 2 || true
# -d (depth) appeared in llama-bench mid-2025; older builds reject it: fall back to depth 0.
# Capture the help first: `grep -q` closing the pipe early would fail the pipeline.
help_text="$("$LLAMA_BENCH" --help 2>&1 || true)"
if grep -q -- '-d, --n-depth' <<<"$help_text"; then
  exec "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -d "$DEPTHS" -r "$REPS"
else
  echo "# this llama-bench has no -d; depth 0 only" >&2
  exec "$LLAMA_BENCH" -m "$MODEL" -t "$THREADS" -p 512 -n 128 -r "$REPS"
fi
