#!/usr/bin/env bash
# The README's main job: build a corpus from text that ships with Python, train a 4k SentencePiece
# tokenizer on it, preprocess, train a small MoE GPT (8 experts every other layer) for a few
# minutes on CPU, print validation loss / perplexity and the expert load, save a checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
OUT=${DEMO_DIR:-demo}
PY=${PYTHON:-python3}
bash tools/prepare_demo_data.sh "$OUT"
# bf16 only where this machine runs it fast (megatron.planning.precision_probe: GPU support or CPU bf16 units)
PRECISION_FLAG=""
if [ "$($PY -m megatron.planning.precision_probe 2>/dev/null)" = bf16 ]; then PRECISION_FLAG="--bf16"; fi
$PY pretrain_gpt_moe.py \
  --num-layers 4 --hidden-size 128 --num-attention-heads 4 --seq-length 128 \
  --num-experts 8 --expert-interval 2 --topk 1 --moe-loss-coeff 0.01 \
  --moe-train-capacity-factor 1.0 --moe-eval-capacity-factor 1.0 --moe-min-capacity 4 \
  --micro-batch-size 16 --global-batch-size 32 --train-iters ${DEMO_ITERS:-300} \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 \
  --adam-beta2 0.95 --clip-grad 1.0 --hidden-dropout 0.0 --attention-dropout 0.0 \
  --data-path "$OUT/corpus_text_document" --split 95,5,0 \
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/spm.model" \
  --log-interval 25 --eval-interval 100 --eval-iters 4 \
  --save "$OUT/checkpoints" --save-interval 150 --overwrite-checkpoints \
  --tensorboard-dir "$OUT/tensorboard" $PRECISION_FLAG "$@"  # each demo run starts afresh: it may replace its own checkpoints
