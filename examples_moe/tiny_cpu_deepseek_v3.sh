#!/usr/bin/env bash
# Tiny DeepSeek-V3 shape on CPU with synthetic tokens (--mock-data, no data or tokenizer): the flags of
# deepseek_v3_671b.sh (multi-latent attention with q and kv compression and a decoupled RoPE part, RoPE base 1e4,
# RMSNorm, SwiGLU, no biases, untied output, init std 0.006, a dense first layer then MoE layers of 32 routed
# experts + 1 shared, top-8 within 4 of 8 groups, sigmoid scores renormalised and scaled by 2.5, the aux-loss-free
# expert bias, the sequence-wise balance loss, fp32 router, no token dropping), shrunk to train in about a minute.
# Environment (default): OUTPUT_DIR output/tiny_deepseek_v3   ITERS 50   PYTHON python3   (tiny_family_common.sh)
source "$(dirname "$0")/tiny_family_common.sh"
NAME=deepseek_v3
MODEL_ARGS=(--num-layers 3 --ffn-hidden-size 160 --num-attention-heads 4
  --multi-latent-attention --q-lora-rank 32 --kv-lora-rank 16 --qk-head-dim 16 --qk-pos-emb-head-dim 8
  --v-head-dim 16 --rotary-base 10000 --norm-epsilon 1e-6 --init-method-std 0.006)
MOE_ARGS=(--num-experts 32 --moe-layer-freq "([0]*1+[1]*2)" --moe-ffn-hidden-size 32
  --moe-shared-expert-intermediate-size 32 --moe-router-topk 8 --moe-router-score-function sigmoid
  --moe-router-norm-topk-prob true --moe-router-topk-scaling-factor 2.5 --moe-router-num-groups 8
  --moe-router-group-topk 4 --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
  --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4 --moe-router-dtype fp32
  --disable-moe-token-dropping)
launch_tiny_family "$@"
