#!/usr/bin/env bash
# The GPU check's measurement call: every result as JSON under $OUT, inside 8 minutes.
#
#   bash benchmarks/gpu/run.sh                 # on the GPU machine (benchmarks/gpu/carry.md)
#   bash benchmarks/gpu/run.sh --dry-run       # here: CPU, tiny sizes, the same code paths
#
# Uses the bundles that benchmarks/gpu/kit.py installed (/tmp/gpukit/env.sh), if any; the tiers
# that need a missing bundle are skipped and say so. Options go to benchmarks/gpu/tiers.py
# (--budget SECONDS, default 450; --tiers 1,2,3,4; --cap-scale X). Writes $OUT/gpu_check.json and
# $OUT/gpu_check.log (OUT defaults to ./gpu_check_out). The whole call is killed after
# GPU_CHECK_LIMIT_S seconds (default 470, inside the device tool's call); a dry run given a longer
# --budget on a busy machine raises it with the budget.
set -uo pipefail
cd "$(dirname "$0")/../.."
STORE=${GPUKIT_STORE:-/tmp/gpukit}
if [ -f "$STORE/env.sh" ]; then . "$STORE/env.sh"; fi
export OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
{ echo "== $(date -u +%FT%TZ) $(uname -n)"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -2; } >> "$OUT/gpu_check.log"
exec timeout -k 10 "${GPU_CHECK_LIMIT_S:-470}" "$PY" benchmarks/gpu/tiers.py --out "$OUT" --python "$PY" "$@"
