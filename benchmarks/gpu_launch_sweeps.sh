#!/usr/bin/env bash
# One GPU call for the launch settings that benchmarks/kernel_resources.py flags as
# spilling registers (benchmarks/NOTES.md, ninth session): carry the built extension
# (fairseq_clustered/_C*.so), then
#   bash benchmarks/gpu_launch_sweeps.sh
# times, with benchmarks/launch_sweep.py, 4 against 8 warps for the causal forward
# (windows 128 and 256, head dims 64 and 128), 128 against 64 rows for the causal
# gradient kernels at head dim 128, and 4 against 8 warps for the centroid backward (with
# dropout, head dims 64 and 128). At head dim 128 through the launch tables' "_d128"
# entries, which serve it since the tenth session (results: benchmarks/NOTES.md). Logs go
# to $OUT (default /tmp/fcl_launch_sweeps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fcl_launch_sweeps}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
sweep() {  # sweep NAME ARGS...: one launch_sweep.py run, its table to $OUT/NAME.log
  local name=$1; shift
  echo "== $name: $*"
  timeout "${SWEEP_TIMEOUT:-120}" python3 benchmarks/launch_sweep.py "$@" 2>&1 | grep -vE "Warning|warn" \
    | tee "$OUT/$name.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
sweep causal_w128 --op causal --window 128 --lengths 16384,65536 --set causal.fwd.num_warps=4,8
sweep causal_w256 --op causal --window 256 --lengths 16384,65536 --set causal.fwd.num_warps=4,8
sweep causal_w128_d128 --op causal --window 128 --dim 128 --lengths 16384,65536 --set causal.fwd_d128.num_warps=4,8
sweep causal_w128_d128_bwd --op causal --window 128 --dim 128 --lengths 16384,65536 \
  --set causal.bwd_query.rows=128,64 --set causal.bwd_key.rows=128,64
sweep centroid --op clustered --dropout 0.1 --lengths 4096,8192,32768 --set centroid.bwd.num_warps=4,8
sweep centroid_d128 --op clustered --dropout 0.1 --dim 128 --lengths 4096,8192 --set centroid.bwd_d128.num_warps=4,8
exit $status
