#!/usr/bin/env bash
# One GPU call for the CUDA kernels: build the extension, report which kernels
# loaded, run the kernel tests, the attention benchmark, and compute-sanitizer
# (memcheck + racecheck) over the kernel tests at small sizes.
#
#   bash benchmarks/gpu_check.sh                         # everything
#   STAGES=build,test bash benchmarks/gpu_check.sh       # a subset
#   BENCH_ARGS="--lengths 1024,4096" bash benchmarks/gpu_check.sh
#   TESTS="tests/test_causal_fused.py" BENCH_ARGS="--causal" bash benchmarks/gpu_check.sh
#   TEST_PROCS=1 bash benchmarks/gpu_check.sh           # the tests in one pytest process (default 3)
#
# Logs, CSV and PNG go to $OUT (default /tmp/fcl_gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fcl_gpu_check}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGES=${STAGES:-build,test,bench,sanitize}
has() { [[ ",$STAGES," == *",$1,"* ]]; }
status=0

if has build; then
  echo "== build"
  start=$(date +%s)
  # The system compiler, as torch's JIT extensions use: built with the GPU machine's
  # CC/CXX (a wrapped /opt/gcc toolchain) the extension died with SIGSEGV whenever a
  # TORCH_CHECK failed inside it, instead of raising RuntimeError (test_extension_errors_gpu).
  if ! CC=${FCL_CC:-cc} CXX=${FCL_CXX:-c++} LDSHARED="${FCL_CXX:-c++} -shared" FAIRSEQ_CLUSTERED_CUDA=1 \
      $PY setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    grep -E "error|Error" "$OUT/build.log" | head -30; tail -20 "$OUT/build.log"; exit 1
  fi
  grep -E "warning" "$OUT/build.log" | grep -v -E "AutogradState|Wc\+\+20|3306" | head -10
  echo "built in $(( $(date +%s) - start )) s; torch C++ ABI: $($PY -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
  $PY -m fairseq_clustered.info 2>&1 | tail -9
fi

if has test; then
  # TEST_PROCS pytest processes share the GPU, each over every TEST_PROCS-th test: Triton's cold
  # compiles are CPU-bound, and one process took over 560 s for these files where three (and one
  # for the graph tests) took 155 s (thirty-fifth session).
  procs=${TEST_PROCS:-3}
  echo "== tests ($procs processes)"
  $PY -m pytest --collect-only -q -p no:cacheprovider ${TESTS:-tests/test_cuda_kernels.py tests/test_improved_triton.py tests/test_centroid_triton.py tests/test_graph_cache.py} 2>/dev/null \
    | grep "::" >"$OUT/test_ids.txt"
  pids=()
  for ((i = 0; i < procs; i++)); do
    awk -v n="$procs" -v i="$i" 'NR % n == i' "$OUT/test_ids.txt" >"$OUT/test_ids_$i.txt"
    mapfile -t ids <"$OUT/test_ids_$i.txt"  # one per line: some test ids hold spaces
    [ ${#ids[@]} -gt 0 ] || continue
    $PY -m pytest -q --tb=short -p no:cacheprovider -rxs "${ids[@]}" >"$OUT/test_$i.log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  cat "$OUT"/test_*.log >"$OUT/test.log"
  grep -v "^SKIPPED.*needs a CUDA" "$OUT/test.log" | grep -E "FAILED|ERROR|Error|passed|failed" | tail -40
fi

if has bench; then
  echo "== benchmark"
  $PY benchmarks/bench_attention.py --out "$OUT/bench_attention" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | grep -v "^  N=" | tail -60
fi
if has sanitize; then
  # Small sizes (FCL_SANITIZE=1); opcheck / compile / graphs are left out (no new kernels there).
  # racecheck is slow: it covers the kernels with shared memory (hash, Lloyd, segment
  # sums, the improved kernels' caches) on the smallest sizes. API errors are not reported:
  # the graph cache's GraphInputs ends each scan of a kernel's parameters at the index where
  # cuFuncGetParamInfo returns CUDA_ERROR_INVALID_VALUE (the driver gives no count), which
  # memcheck would list as one error per kernel of every captured graph.
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    echo "== compute-sanitizer $tool"
    if [ $tool = memcheck ]; then
      select="gpu and not opcheck and not compile and not graph"
    else
      select="(hash or lloyd or cluster_order or edge or improved_gpu or dropout) and not fp16 and not fp32 and not 133"
    fi
    FCL_SANITIZE=1 timeout ${SANITIZE_TIMEOUT:-200} compute-sanitizer --tool $tool --print-limit 20 \
      --report-api-errors no \
      $PY -m pytest -q -x -p no:cacheprovider tests/test_cuda_kernels.py tests/test_causal_fused.py tests/test_causal_triton.py \
      -k "($select) or kernel_matches" >"$OUT/sanitize_$tool.log" 2>&1
    rc=$?
    grep -E "ERROR SUMMARY|passed|failed|error" "$OUT/sanitize_$tool.log" | tail -5
    [ $rc -eq 0 ] || { status=1; echo "$tool exit $rc"; }
  done
fi

exit $status
