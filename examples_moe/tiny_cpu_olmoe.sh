#!/usr/bin/env bash
# Tiny OLMoE shape on CPU with synthetic tokens (--mock-data, no data or tokenizer): the flags of olmoe_1b_7b.sh
# (RoPE base 1e4, RMSNorm, q/k RMSNorm over the whole projection, SwiGLU, no biases, untied output, 64 fine-grained
# experts of hidden/2 on every layer, top-8 not renormalised (--moe-router-pre-softmax), no token dropping,
# Megatron-LM's aux loss and the router z-loss), shrunk to train in about a minute.
# Environment (default): OUTPUT_DIR output/tiny_olmoe   ITERS 50   PYTHON python3   (tiny_family_common.sh)
source "$(dirname "$0")/tiny_family_common.sh"
NAME=olmoe
MODEL_ARGS=(--num-layers 2 --ffn-hidden-size 32 --num-attention-heads 4 --qk-layernorm --qk-layernorm-full
  --rotary-base 10000 --norm-epsilon 1e-5)
MOE_ARGS=(--num-experts 64 --moe-ffn-hidden-size 32 --moe-router-topk 8 --moe-layer-freq 1 --moe-router-pre-softmax
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.08 --moe-z-loss-coeff 0.001
  --disable-moe-token-dropping)
launch_tiny_family "$@"
