#!/usr/bin/env bash
# One GPU call for the fairseq side: carry .whl, then
#   bash benchmarks/gpu_fairseq_check.sh
# builds the kernels, runs every GPU test of the suite (kernels, causal op, module,
# fairseq fp16/bf16 training steps) and the model benchmark. Logs and CSV go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fcl_gpu_fairseq}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
source benchmarks/gpu_fairseq_env.sh || exit 1
OUT="$OUT" STAGES=build bash benchmarks/gpu_check.sh || exit 1
echo "== GPU tests"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q --tb=short -p no:cacheprovider -ra \
    tests/test_fairseq_cli.py tests/test_causal_lm_cli.py tests/test_module.py tests/test_causal.py tests/test_cuda_kernels.py \
    -k "${TEST_SELECT:-gpu or cuda or CUDA or module}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== model benchmark"
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_model.py --csv "$OUT/bench_model.csv" ${BENCH_MODEL_ARGS:-} \
    2>&1 | tee "$OUT/bench_model.log" | tail -30
exit $status
