#!/usr/bin/env bash
# Sparse upcycling on the Gutenberg corpus (docs/EXPERIMENTS.md): a dense model trained for DENSE_ITERS,
# then the same EXTRA_ITERS further batches (the data stream goes on) for (a) the dense model, (b) its
# upcycled MoE (8 experts every 2nd layer, top-1, fresh optimizer), and (c) an MoE trained from scratch on
# all DENSE_ITERS + EXTRA_ITERS batches. fp32, CPU.
# Usage: tools/experiments/upcycle_gutenberg.sh OUT_DIR   (reads ../shared/data/corpus/gutenberg)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT=${1:-upcycle_exp}
DATA=${DATA:-$ROOT/../shared/data/corpus/gutenberg}
DENSE_ITERS=${DENSE_ITERS:-100}
EXTRA_ITERS=${EXTRA_ITERS:-100}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
[ -f "$OUT/train.txt" ] || head -c 8000000 "$DATA/train.txt" > "$OUT/train.txt"
[ -f "$OUT/spm.model" ] || python3 "$ROOT/tools/train_tokenizer.py" --input "$OUT/train.txt" --model-prefix "$OUT/spm" --vocab-size 2048
[ -f "$OUT/gut_text_document.idx" ] || python3 "$ROOT/tools/preprocess_data.py" --input "$OUT/train.txt" \
  --output-prefix "$OUT/gut" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/spm.model" \
  --append-eod --workers 2 --quiet
COMMON=(--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 --micro-batch-size 8
  --global-batch-size 8 --lr 1e-3 --min-lr 1e-3 --lr-decay-style constant --lr-warmup-iters 10
  --hidden-dropout 0 --attention-dropout 0 --data-path "$OUT/gut_text_document" --split 98,2,0
  --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/spm.model" --log-interval 25
  --eval-iters 10 --seed 1234)
MOE=(--num-experts 8 --expert-interval 2 --topk 1 --disable-moe-token-dropping)
run() { local name=$1; shift; python3 "$ROOT/pretrain_gpt_moe.py" "${COMMON[@]}" "$@" > "$OUT/$name.log" 2>&1; \
  grep "validation loss" "$OUT/$name.log" | sed "s/^/$name: /"; }
[ -f "$OUT/dense/latest_checkpointed_iteration.txt" ] || run dense --train-iters "$DENSE_ITERS" --eval-interval "$DENSE_ITERS" --save "$OUT/dense"
[ -d "$OUT/upcycled0" ] || python3 "$ROOT/tools/checkpoint_util.py" upcycle --load "$OUT/dense" --save "$OUT/upcycled0" --num-experts 8 --expert-interval 2 --topk 1
TOTAL=$((DENSE_ITERS + EXTRA_ITERS))
run dense_continued --train-iters $TOTAL --eval-interval 25 --load "$OUT/dense" --no-load-optim --no-load-rng
run upcycled "${MOE[@]}" --train-iters $TOTAL --eval-interval 25 --load "$OUT/upcycled0" --no-load-optim --no-load-rng
run moe_scratch "${MOE[@]}" --train-iters $TOTAL --eval-interval 25
