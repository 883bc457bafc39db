#!/usr/bin/env bash
# Shared by the tiny CPU recipes of the Hugging Face MoE families (tiny_cpu_mixtral.sh, tiny_cpu_qwen3_moe.sh,
# tiny_cpu_olmoe.sh, tiny_cpu_qwen2_moe.sh, tiny_cpu_deepseek_v3.sh): a family's block shrunk to hidden 64 and
# 2-3 layers, trained on synthetic tokens (--mock-data, vocabulary 512: no data or tokenizer) in about a minute
# on 2 cores. Environment (default): OUTPUT_DIR output/tiny_$NAME   ITERS 50   PYTHON python3
# A recipe sets NAME, MODEL_ARGS (layers, widths, heads, norms, RoPE base) and MOE_ARGS, then calls
# `launch_tiny_family "$@"` (extra flags pass through and override these).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ITERS=${ITERS:-50}
PYTHON=${PYTHON:-python3}

launch_tiny_family() {
  local out="${OUTPUT_DIR:-output/tiny_$NAME}"
  # what every family here shares: RoPE, RMSNorm, SwiGLU, no linear biases, untied output layer
  local common=(
    --hidden-size 64 --seq-length 64 --max-position-embeddings 64
    --position-embedding-type rope --no-position-embedding --normalization RMSNorm --swiglu --disable-bias-linear
    --untie-embeddings-and-output-weights
    --mock-data --vocab-size 512 --micro-batch-size 4 --global-batch-size 8 --train-iters "$ITERS"
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.1 --clip-grad 1.0
    --hidden-dropout 0.0 --attention-dropout 0.0 --log-interval 10 --eval-interval 1000 --eval-iters 1
    --save "$out/checkpoints" --save-interval 1000
  )
  "$PYTHON" "$ROOT/pretrain_gpt_moe.py" "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${common[@]}" "$@"
}
