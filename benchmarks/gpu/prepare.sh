#!/usr/bin/env bash
# Build the wheel bundles the GPU check carries (run here, online; see benchmarks/gpu/carry.md).
#
#   bash benchmarks/gpu/prepare.sh            # base (DALI, webdataset) and tier4 (Ray, MLflow)
#   bash benchmarks/gpu/prepare.sh base       # only the base bundle
#
# For each bundle: download the exact wheels of wheels.txt at uv.lock's versions for CPython 3.12
# on manylinux x86_64 (the GPU machine), install them into a staging tree with pip --target,
# pack it as tar.xz, cut it into parts of at most 60 MiB, and write .gpukit/plan.json (sizes and
# SHA-256 of every part). Prints the plan: the number of calls and the measured part sizes.
# Everything lands in .gpukit/, which git ignores. Needs pip (any Python), tar and xz.
set -euo pipefail
cd "$(dirname "$0")/../.."
KIT=.gpukit
PIP=${PIP:-"python3 -m pip"}
PY=${PY:-python3}
GROUPS_WANTED=${*:-base tier4}
PLATFORMS=""
for n in 17 24 27 28 31 34 35 39; do PLATFORMS="$PLATFORMS --platform manylinux_2_${n}_x86_64"; done
PLATFORMS="$PLATFORMS --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64"
TARGET="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none $PLATFORMS"

mkdir -p "$KIT/parts"
for group in $GROUPS_WANTED; do
  echo "== $group"
  rm -rf "$KIT/wheels/$group" "$KIT/stage/$group" "$KIT/$group.tar.xz" "$KIT"/parts/"$group".*
  mkdir -p "$KIT/wheels/$group" "$KIT/stage/$group"
  "$PY" benchmarks/gpu/kit.py versions "$group" > "$KIT/$group.versions"
  start=$(date +%s)
  $PIP download -q --no-deps $TARGET -d "$KIT/wheels/$group" -r "$KIT/$group.versions"
  # One version of each: two would stop the install there.
  dupes=$(ls "$KIT/wheels/$group" | sed 's/-[0-9].*//' | tr 'A-Z_' 'a-z-' | sort | uniq -d)
  if [ -n "$dupes" ]; then echo "two versions of: $dupes" >&2; exit 1; fi
  $PIP install -q --no-deps --no-compile --disable-pip-version-check $TARGET --target "$KIT/stage/$group" "$KIT"/wheels/"$group"/*.whl
  rm -rf "$KIT/stage/$group/bin"  # console scripts name this machine's interpreter; the check runs modules
  "$PY" benchmarks/gpu/kit.py prune "$KIT/stage/$group"
  tar -C "$KIT/stage/$group" -cf - . | xz -T0 -6 > "$KIT/$group.tar.xz"
  split -b 60M -d -a 2 "$KIT/$group.tar.xz" "$KIT/parts/$group."
  echo "$group: $(ls "$KIT/wheels/$group" | wc -l) wheels, $(du -sh "$KIT/stage/$group" | cut -f1) unpacked, $(( $(date +%s) - start )) s"
done
"$PY" benchmarks/gpu/kit.py plan
