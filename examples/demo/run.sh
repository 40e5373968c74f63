#!/usr/bin/env bash
# The demo (`make demo`): train and evaluate a clustered-attention translation model
# (Spanish -> English) on two public-domain Bibles, with fairseq's own command lines.
#
#   1. fetch Debian's sword-text-sparv (Reina-Valera 1909) and sword-text-kjv (King James)
#      with `apt-get download` and unpack them with `dpkg -x` (nothing is installed);
#   2. extract ~31k aligned verse pairs (examples/demo/prepare_bible.py);
#   3. fairseq-preprocess (word level, 10k/8k vocabularies);
#   4. fairseq-train --user-dir fairseq_clustered --arch clustered_transformer, with
#      improved clustered attention in every encoder layer (a small model, a fixed
#      number of updates: about 10-20 minutes on a 2-core CPU, far less on a GPU);
#   5. fairseq-generate on 500 held-out verses (beam search) and print BLEU;
#   6. for comparison, BLEU of the same checkpoint with exact encoder attention
#      (fairseq-generate --model-overrides "{'clustered_attention': 'full'}").
#
# Re-runnable: each step is skipped when its output exists (an interrupted training
# resumes from checkpoint_last.pt). Settings via environment:
#   DEMO_DIR (default work/demo), DEMO_UPDATES (default 400), DEMO_ATTENTION
#   (improved | clustered | full, default improved), DEMO_CLUSTERS (default 16).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${VENV:-.venv}
BIN="$VENV/bin"
DEMO_DIR=${DEMO_DIR:-work/demo}
UPDATES=${DEMO_UPDATES:-400}
ATTENTION=${DEMO_ATTENTION:-improved}
CLUSTERS=${DEMO_CLUSTERS:-16}
SWORD="$DEMO_DIR/sword"
TEXT="$DEMO_DIR/text"
DATA="$DEMO_DIR/data-bin"
CKPT="$DEMO_DIR/checkpoints-$ATTENTION-c$CLUSTERS"
mkdir -p "$DEMO_DIR"
export PYTHONUNBUFFERED=1  # progress lines appear as they happen, through the pipes below
say() { echo "[demo $(date +%H:%M:%S)] $*"; }

# 1. the two Bibles from Debian's archive
if [ ! -d "$SWORD/usr/share/sword/modules/texts/ztext/engKJV2006eb" ] \
   || [ ! -d "$SWORD/usr/share/sword/modules/texts/ztext/spaRV1909eb" ]; then
    command -v apt-get >/dev/null || { echo "the demo fetches its data with apt-get (Debian/Ubuntu)"; exit 1; }
    say "fetching sword-text-kjv and sword-text-sparv (public domain, about 5.5 MB)"
    mkdir -p "$DEMO_DIR/debs"
    if ! (cd "$DEMO_DIR/debs" && apt-get download sword-text-kjv sword-text-sparv); then
        say "apt-get download failed; refreshing the package lists once (apt-get update) and retrying"
        apt-get update -qq
        (cd "$DEMO_DIR/debs" && apt-get download sword-text-kjv sword-text-sparv)
    fi
    for deb in "$DEMO_DIR"/debs/*.deb; do dpkg -x "$deb" "$SWORD"; done
else
    say "Bible modules already unpacked in $SWORD"
fi

# 2. verse pairs
if [ ! -s "$TEXT/test.en" ]; then
    say "extracting verse pairs"
    "$BIN/python" examples/demo/prepare_bible.py --sword-root "$SWORD/usr/share/sword" --out-dir "$TEXT"
else
    say "verse pairs already in $TEXT ($(wc -l < "$TEXT/train.en") training pairs)"
fi

# 3. binarize
if [ ! -s "$DATA/test.es-en.en.bin" ]; then
    say "fairseq-preprocess"
    "$BIN/fairseq-preprocess" --source-lang es --target-lang en \
        --trainpref "$TEXT/train" --validpref "$TEXT/valid" --testpref "$TEXT/test" \
        --destdir "$DATA" --nwordssrc 10000 --nwordstgt 8000 --workers 2 2>&1 \
        | grep -E "replaced|Wrote" || true
else
    say "binarized data already in $DATA"
fi

# 4. train (a marker file records a finished run; an interrupted one resumes from checkpoint_last.pt)
DONE="$CKPT/.trained-$UPDATES-updates"
if [ ! -f "$DONE" ]; then
    say "fairseq-train: clustered_transformer, $ATTENTION attention (C=$CLUSTERS) in the encoder, $UPDATES updates"
    "$BIN/fairseq-train" "$DATA" --user-dir fairseq_clustered \
        --arch clustered_transformer --clustered-attention "$ATTENTION" \
        --clustered-num-clusters "$CLUSTERS" --clustered-topk 8 \
        --encoder-layers 3 --decoder-layers 2 --encoder-embed-dim 256 --decoder-embed-dim 256 \
        --encoder-ffn-embed-dim 512 --decoder-ffn-embed-dim 512 \
        --encoder-attention-heads 4 --decoder-attention-heads 4 --share-decoder-input-output-embed \
        --optimizer adam --adam-betas '(0.9,0.98)' --lr 2e-3 --lr-scheduler inverse_sqrt \
        --warmup-updates 200 --criterion label_smoothed_cross_entropy --label-smoothing 0.1 \
        --dropout 0.1 --max-tokens 4096 --max-update "$UPDATES" --seed 1 \
        --save-dir "$CKPT" --save-interval-updates 200 --keep-interval-updates 1 --no-epoch-checkpoints \
        --validate-interval-updates 200 --num-workers 0 \
        --no-progress-bar --log-format simple --log-interval 25 2>&1 \
        | grep --line-buffered -E "encoder self-attention|train_inner|valid on|done training|Loaded checkpoint|Error|error"
    touch "$DONE"
else
    say "training already done ($CKPT, $UPDATES updates)"
fi

# 5. evaluate on the held-out verses
RESULT="$CKPT/generate-test.txt"
if [ ! -s "$RESULT" ] || [ "$RESULT" -ot "$DONE" ]; then
    say "fairseq-generate on 500 held-out verses (beam 4)"
    "$BIN/fairseq-generate" "$DATA" --user-dir fairseq_clustered --path "$CKPT/checkpoint_last.pt" \
        --gen-subset test --beam 4 --batch-size 64 > "$RESULT.tmp" 2>&1
    mv "$RESULT.tmp" "$RESULT"
fi
echo "Three held-out verses (S = Spanish source, T = King James reference, H = model output):"
for i in 0 1 2; do
    for side in S T H; do  # H lines carry a score column before the text: drop it
        grep -P "^$side-$i\t" "$RESULT" | awk -F'\t' '{print "    " $1 "  " $NF}' | cut -c1-170
    done
done

# 6. the same checkpoint with exact encoder attention, through fairseq's --model-overrides
if [ "$ATTENTION" != full ]; then
    EXACT="$CKPT/generate-test-exact.txt"
    if [ ! -s "$EXACT" ] || [ "$EXACT" -ot "$DONE" ]; then
        "$BIN/fairseq-generate" "$DATA" --user-dir fairseq_clustered --path "$CKPT/checkpoint_last.pt" \
            --gen-subset test --beam 4 --batch-size 64 \
            --model-overrides "{'clustered_attention': 'full'}" > "$EXACT.tmp" 2>&1
        mv "$EXACT.tmp" "$EXACT"
    fi
    say "for comparison, the same model evaluated with exact encoder attention (--model-overrides):"
    grep "BLEU4" "$EXACT" | sed 's/^.*Generate/    Generate/'
fi
say "RESULT, BLEU on 500 held-out verses ($ATTENTION attention in the encoder, C=$CLUSTERS, $UPDATES updates; output in $RESULT):"
grep "BLEU4" "$RESULT" | sed 's/^.*Generate/Generate/'
