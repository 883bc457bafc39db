#!/usr/bin/env bash
# Shared by the tiny CPU recipes: the paper's recipe shapes shrunk to run in minutes on 2 cores, on the
# no-download demo corpus (tools/prepare_demo_data.sh). Environment (default):
#   DEMO_DIR   data and tokenizer (demo)      OUTPUT_DIR  output/tiny_$NAME      ITERS  300      PYTHON python3
# A recipe sets NAME and MODEL_ARGS (+ MOE_ARGS, KD_ARGS) and calls `launch_tiny "$@"`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEMO_DIR=${DEMO_DIR:-demo}
ITERS=${ITERS:-300}
PYTHON=${PYTHON:-python3}

launch_tiny() {
  bash "$ROOT/tools/prepare_demo_data.sh" "$DEMO_DIR"
  local out="${OUTPUT_DIR:-output/tiny_$NAME}"
  local common=(
    --hidden-size 128 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128
    --micro-batch-size 16 --global-batch-size 32 --train-iters "$ITERS"
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
    --hidden-dropout 0.0 --attention-dropout 0.0
    --data-path "$DEMO_DIR/corpus_text_document" --split 95,5,0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DEMO_DIR/spm.model"
    --log-interval 25 --eval-interval 100 --eval-iters 4
    --save "$out/checkpoints" --save-interval 1000 --tensorboard-dir "$out/tensorboard"
  )
  "$PYTHON" "$ROOT/pretrain_gpt_moe.py" "${MODEL_ARGS[@]}" "${MOE_ARGS[@]+"${MOE_ARGS[@]}"}" \
    "${KD_ARGS[@]+"${KD_ARGS[@]}"}" "${common[@]}" "$@"
}

# the DeepSpeed-MoE settings of the paper recipes
MOE_COMMON=(--moe-loss-coeff 0.01 --moe-train-capacity-factor 1.0 --moe-eval-capacity-factor 1.0 --moe-min-capacity 4)
