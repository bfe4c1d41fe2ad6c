#!/usr/bin/env bash
# A/B of two tandem binaries on one benchmark command, alternating them so that
# this machine's drift lands on both: `bench/ab.sh OLD NEW ROUNDS OUTDIR -- ARGS...`
# runs `OLD ARGS` and `NEW ARGS` ROUNDS times each, in turn, and keeps every
# output as OUTDIR/{a,b}-<round>.json (stdout) and .log (stderr).
set -euo pipefail
if [ $# -lt 5 ] || [ "$5" != "--" ]; then
    echo "usage: bench/ab.sh OLD_BIN NEW_BIN ROUNDS OUTDIR -- TANDEM_ARGS..." >&2
    exit 2
fi
old=$1 new=$2 rounds=$3 out=$4
shift 5
mkdir -p "$out"
for r in $(seq 1 "$rounds"); do
    for side in a b; do
        bin=$old
        [ "$side" = b ] && bin=$new
        echo "ab: round $r, $side: $bin $*" >&2
        "$bin" "$@" >"$out/$side-$r.json" 2>"$out/$side-$r.log"
    done
done
