#!/usr/bin/env bash
# Tiny Qwen3-MoE shape on CPU with synthetic tokens (--mock-data, no data or tokenizer): the flags of
# qwen3_30b_a3b.sh (RoPE, RMSNorm, per-head qk-norm, GQA, SwiGLU, no biases, untied output, fine-grained top-8
# of 16 experts renormalised, no token dropping, Megatron-LM's aux loss), shrunk to train in about a minute.
# Environment (default): OUTPUT_DIR output/tiny_qwen3_moe   ITERS 50   PYTHON python3
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ITERS=${ITERS:-50}
PYTHON=${PYTHON:-python3}
OUT=${OUTPUT_DIR:-output/tiny_qwen3_moe}
"$PYTHON" "$ROOT/pretrain_gpt_moe.py" \
  --num-layers 2 --hidden-size 64 --ffn-hidden-size 192 --num-attention-heads 4 --kv-channels 32 \
  --group-query-attention --num-query-groups 2 --qk-layernorm --seq-length 64 --max-position-embeddings 64 \
  --position-embedding-type rope --no-position-embedding --rotary-base 1000000 \
  --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear --untie-embeddings-and-output-weights \
  --num-experts 16 --moe-ffn-hidden-size 32 --moe-router-topk 8 --moe-layer-freq 1 \
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.008 --disable-moe-token-dropping \
  --mock-data --vocab-size 512 --micro-batch-size 4 --global-batch-size 8 --train-iters "$ITERS" \
  --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 5 --weight-decay 0.1 --clip-grad 1.0 \
  --hidden-dropout 0.0 --attention-dropout 0.0 --log-interval 10 --eval-interval 1000 --eval-iters 1 \
  --save "$OUT/checkpoints" --save-interval 1000 "$@"
