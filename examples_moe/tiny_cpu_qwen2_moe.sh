#!/usr/bin/env bash
# Tiny Qwen2-MoE shape on CPU with synthetic tokens (--mock-data, no data or tokenizer): the flags of
# qwen2_57b_a14b.sh (RoPE base 1e6, RMSNorm, GQA, q/k/v biases, SwiGLU, no other biases, untied output,
# 64 fine-grained experts on every layer, top-8 not renormalised (--moe-router-pre-softmax), a shared expert of
# 8 experts' width scaled by a sigmoid gate, no token dropping, Megatron-LM's aux loss), shrunk to train in about
# a minute. Environment (default): OUTPUT_DIR output/tiny_qwen2_moe   ITERS 50   PYTHON python3
# (tiny_family_common.sh)
source "$(dirname "$0")/tiny_family_common.sh"
NAME=qwen2_moe
MODEL_ARGS=(--num-layers 2 --ffn-hidden-size 320 --num-attention-heads 4 --group-query-attention
  --num-query-groups 2 --add-qkv-bias --rotary-base 1000000 --norm-epsilon 1e-6)
MOE_ARGS=(--num-experts 64 --moe-ffn-hidden-size 48 --moe-router-topk 8 --moe-layer-freq 1 --moe-router-pre-softmax
  --moe-shared-expert-intermediate-size 384 --moe-shared-expert-gate
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.008 --disable-moe-token-dropping)
launch_tiny_family "$@"
