#!/usr/bin/env bash
# Checks the CUDA device on a machine with one NVIDIA GPU (H100 class) and
# 16 cores, unattended and offline, in under 8 minutes; prints one summary
# table at the end (also written to target/gpu-check/summary.md, beside
# each step's log).
#
# It expects, and installs nothing:
#   - this repository with its models (scripts/setup.sh) and, ideally, target/
#     from a `cargo build --release --features cuda` (else it builds, offline,
#     from the cargo registry cache);
#   - the NVIDIA driver, and the CUDA 12.9 libraries from PyPI
#     (scripts/setup.sh --cuda-gpu: NVRTC, ptxas and cuBLAS), found through
#     python3 or TANDEM_CUDA_LIBS (a colon-separated library path).
#
#   scripts/gpu-check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=target/gpu-check
mkdir -p "$OUT"
ROWS=()
# Every step's limit is cut to what is left of 7m50s.
DEADLINE=$((SECONDS + 470))

pkg_dir() {
    python3 -c "import $1 as m; print(list(m.__path__)[0])" 2>/dev/null
}

libs="${TANDEM_CUDA_LIBS:-}"
for module in nvidia.cuda_nvrtc nvidia.cublas nvidia.cuda_runtime; do
    dir=$(pkg_dir "$module") && libs="$libs:$dir/lib"
done
export LD_LIBRARY_PATH="${libs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
echo "gpu-check: ${gpu_name:-no nvidia-smi}; LD_LIBRARY_PATH=$LD_LIBRARY_PATH" >&2

# step NAME SECONDS COMMAND...: runs COMMAND with a limit, its output in
# $OUT/NAME.log, and records its status and time.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$limit" -le "$left" ] || limit=$((left > 1 ? left : 1))
    echo "gpu-check: $name" >&2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local status=ok
    [ $rc -eq 0 ] || status="FAILED (exit $rc)"
    [ $rc -eq 124 ] && status="TIMED OUT after ${limit}s"
    LAST_STATUS=$status
    LAST_TIME=$((SECONDS - start))
    [ "$status" = ok ] || tail -n 20 "$OUT/$name.log" >&2
}

record() {
    ROWS+=("| $1 | $LAST_STATUS | $LAST_TIME | $2 |")
}

step build 150 cargo build --release --offline --features cuda
record "build --features cuda" "target/release/tandem"

step devices 10 target/release/tandem devices
record "tandem devices" "$(grep '^cuda:' "$OUT/devices.log" | head -1)"

step gpu-tests 120 cargo test --release --offline -p tandem-cuda --test gpu -- \
    --ignored --nocapture --test-threads 1
record "GPU tests (CUDA vs CPU device)" \
    "$(grep -E '^test result|relative RMS' "$OUT/gpu-tests.log" | tr '\n' ';' | sed 's/;$//')"

# Both benchmark lines (the policy and dense) as "policy: ms/token (device, wait)".
bench_summary() {
    python3 - "$1" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1]):
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        rows.append(f"{r['policy']} at {r['context']}: {r['ms_per_token']:.2f} ms/token "
                    f"(device {r['device_ms_per_token']:.2f}, waiting {r['wait_ms_per_token']:.2f})")
print("; ".join(rows) or "no result")
PY
}

step bench-smollm2 60 target/release/tandem bench decode --device cuda \
    -m models/SmolLM2-135M-Instruct.Q4_1.gguf --context 8192 --tokens 32 --json
record "bench decode SmolLM2, 8k" "$(bench_summary "$OUT/bench-smollm2.log")"

step bench-8b 300 target/release/tandem bench decode --device cuda --shape llama3.1-8b \
    --context 98304 --tokens 16 --json
record "bench decode llama3.1-8b, 96k (goal: <= 40 ms/token)" "$(bench_summary "$OUT/bench-8b.log")"

{
    echo "GPU: ${gpu_name:-unknown}; $(nproc) cores; commit $(git rev-parse --short HEAD 2>/dev/null)"
    echo
    echo "| check | status | seconds | result |"
    echo "|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/summary.md"
! grep -q "FAILED\|TIMED OUT" "$OUT/summary.md"
