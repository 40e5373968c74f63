#!/usr/bin/env bash
# One GPU call for the causal Triton kernels in blocks (windows up to 256): carry the built
# extension (fairseq_clustered/_C*.so) or let STAGES include build, then
#   bash benchmarks/gpu_causal_window_check.sh
# runs the causal GPU tests (window-256 cases included) and the causal benchmark at
# windows 128 and 256. Logs and CSV go to $OUT (default /tmp/fcl_causal_window).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fcl_causal_window}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
if [[ ",${STAGES:-test,bench}," == *",build,"* ]]; then
  OUT="$OUT" STAGES=build bash benchmarks/gpu_check.sh || exit 1
fi
echo "== causal GPU tests"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q --tb=short -p no:cacheprovider -x \
    tests/test_causal_fused.py tests/test_causal_triton.py 2>&1 | tee "$OUT/tests.log" | tail -5
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
for window in 128 256; do
  echo "== causal benchmark, window $window"
  python3 benchmarks/bench_attention.py --causal --graph --methods sdpa,causal_clustered --window "$window" \
      --repeats 20 ${BENCH_ARGS:-} --out "$OUT/causal_w$window" 2>&1 | grep -E "^ +[0-9]+ |wrote" \
      | tee "$OUT/causal_w$window.log"
done
exit $status
