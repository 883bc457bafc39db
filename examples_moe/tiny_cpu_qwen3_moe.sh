#!/usr/bin/env bash
# Tiny Qwen3-MoE shape on CPU with synthetic tokens (--mock-data, no data or tokenizer): the flags of
# qwen3_30b_a3b.sh (RoPE, RMSNorm, per-head qk-norm, GQA, SwiGLU, no biases, untied output, fine-grained top-8
# of 16 experts renormalised, no token dropping, Megatron-LM's aux loss), shrunk to train in about a minute.
# Environment (default): OUTPUT_DIR output/tiny_qwen3_moe   ITERS 50   PYTHON python3   (tiny_family_common.sh)
source "$(dirname "$0")/tiny_family_common.sh"
NAME=qwen3_moe
MODEL_ARGS=(--num-layers 2 --ffn-hidden-size 192 --num-attention-heads 4 --kv-channels 32
  --group-query-attention --num-query-groups 2 --qk-layernorm --rotary-base 1000000 --norm-epsilon 1e-6)
MOE_ARGS=(--num-experts 16 --moe-ffn-hidden-size 32 --moe-router-topk 8 --moe-layer-freq 1
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.008 --disable-moe-token-dropping)
launch_tiny_family "$@"
