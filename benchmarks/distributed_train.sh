#!/usr/bin/env bash
# Multi-GPU check: fairseq's own distributed training (NCCL) of a clustered
# translation model with the CUDA kernels and --fp16, world size 2 against world
# size 1 with the same total batch per update (--update-freq 2).
#
# Run on a machine with >= 2 GPUs, from the repository root:
#   bash benchmarks/distributed_train.sh [OUT_DIR]
#   PREBUILT=1 MAX_UPDATE=200 MAX_TOKENS=32768 bash benchmarks/distributed_train.sh   # extension already built
#   ATTENTION=full bash benchmarks/distributed_train.sh OUT_FULL   # the same with exact attention
# fairseq must be importable; on the lent GPU machines it travels as cp312 wheels
# in .whl/ (scripts/gpu_wheels.sh), installed by benchmarks/gpu_fairseq_env.sh.
# Prints the per-update losses of both runs, the throughput scaling, and exits
# non-zero if the first losses differ by more than the tolerance.
set -euo pipefail
# NVLink multicast off: it can take a shared host's GPUs out of service.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
OUT_DIR=${1:-${OUT:-/tmp/fairseq_clustered_distributed}}
WORK=${WORK:-/tmp/fairseq_clustered_distributed_work}
MAX_UPDATE=${MAX_UPDATE:-200}
MAX_TOKENS=${MAX_TOKENS:-16384}  # per GPU and micro-batch
WARMUP=${WARMUP:-20}  # updates left out of the throughput
ATTENTION=${ATTENTION:-improved}  # encoder self-attention: improved, clustered, or full (fairseq's, a baseline)
mkdir -p "$OUT_DIR" "$WORK"

if ! python3 -c "import fairseq" 2>/dev/null; then
    [ -f benchmarks/gpu_fairseq_env.sh ] || { echo "fairseq is not importable and benchmarks/gpu_fairseq_env.sh is missing" >&2; exit 2; }
    source benchmarks/gpu_fairseq_env.sh
fi
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$gpus" -ge 2 ] || { echo "need at least 2 GPUs, found $gpus" >&2; exit 2; }

# PREBUILT=1 uses an extension already built for this machine (carried with the run).
if [ "${PREBUILT:-0}" != 1 ]; then
    echo "== building the CUDA kernels"
    OUT="$OUT_DIR" STAGES=build PYTHON=python3 bash benchmarks/gpu_check.sh || { echo "build failed" >&2; exit 2; }
fi
python3 -m fairseq_clustered.info | tee "$OUT_DIR/info.txt"
grep -q "clustered_attention_fwd *cuda" "$OUT_DIR/info.txt" || { echo "CUDA kernels did not load" >&2; exit 2; }

echo "== data"
if [ ! -f "$WORK/bin/dict.src.txt" ]; then
    python3 benchmarks/distributed_data.py "$WORK/raw"
    python3 -m fairseq_cli.preprocess --source-lang src --target-lang tgt \
        --trainpref "$WORK/raw/train" --validpref "$WORK/raw/valid" \
        --destdir "$WORK/bin" --workers 8 > "$OUT_DIR/preprocess.log" 2>&1
fi

train() {  # world_size update_freq
    local world=$1 freq=$2
    echo "== fairseq-train --distributed-world-size $world --update-freq $freq"
    python3 -m fairseq_cli.train "$WORK/bin" --user-dir fairseq_clustered \
        --arch clustered_transformer --clustered-attention "$ATTENTION" \
        --encoder-layers 4 --decoder-layers 2 \
        --max-source-positions 1024 --max-target-positions 1024 \
        --optimizer adam --adam-betas '(0.9,0.98)' --lr 5e-4 --lr-scheduler inverse_sqrt \
        --warmup-updates 10 --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
        --dropout 0.0 --attention-dropout 0.0 --max-tokens "$MAX_TOKENS" --fp16 \
        --distributed-world-size "$world" --update-freq "$freq" --seed 1 \
        --max-update "$MAX_UPDATE" --no-save --disable-validation --num-workers 2 \
        --log-format json --log-interval 1 > "$OUT_DIR/train_ws$world.log" 2>&1 \
        || { tail -40 "$OUT_DIR/train_ws$world.log"; exit 1; }
    grep -m1 "encoder self-attention" "$OUT_DIR/train_ws$world.log" || true
}
train 1 2
train 2 1
python3 benchmarks/distributed_compare.py "$OUT_DIR/train_ws1.log" "$OUT_DIR/train_ws2.log" \
    --warmup "$WARMUP" --csv "$OUT_DIR/distributed.csv" | tee "$OUT_DIR/distributed.txt"
