#!/usr/bin/env bash
# Tiny Mixtral shape on CPU with synthetic tokens (--mock-data, no data or tokenizer): the flags of
# mixtral_8x7b.sh (RoPE base 1e6, RMSNorm, GQA, SwiGLU, no biases, untied output, 8 experts of 3.5x hidden on
# every layer, top-2 renormalised, no token dropping, Megatron-LM's aux loss), shrunk to train in about a minute.
# Environment (default): OUTPUT_DIR output/tiny_mixtral   ITERS 50   PYTHON python3   (tiny_family_common.sh)
source "$(dirname "$0")/tiny_family_common.sh"
NAME=mixtral
MODEL_ARGS=(--num-layers 2 --ffn-hidden-size 224 --num-attention-heads 4 --group-query-attention
  --num-query-groups 2 --rotary-base 1000000 --norm-epsilon 1e-5)
MOE_ARGS=(--num-experts 8 --moe-router-topk 2 --moe-layer-freq 1 --moe-router-load-balancing-type aux_loss
  --moe-aux-loss-coeff 0.04 --disable-moe-token-dropping)
launch_tiny_family "$@"
