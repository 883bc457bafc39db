#!/usr/bin/env bash
# Mixtral-8x7B (MixtralForCausalLM): 32 layers, hidden 4096, 32 heads / 8 KV heads (GQA), 8 SwiGLU experts of
# 14336 on every layer, top-2 renormalised, RoPE base 1e6, RMSNorm, untied output, vocabulary 32000.
# Source of the sizes: Mistral AI, "Mixtral of experts" (announcement, 2023-12-11): "46.7B total parameters but
# only uses 12.9B parameters per token"; the shape is the published config.json (mistralai/Mixtral-8x7B-v0.1).
# --dry-run prints total 46,702,792,704 and active 12,879,925,248 (tests/test_examples.py checks 46.7B / 12.9B).
# EP 8 x TP 1 over 64 GPUs. Continue from the weights: tools/checkpoint_util.py import-hf, then LOAD=<it>.
source "$(dirname "$0")/hf_common.sh"
NAME=mixtral_8x7b; NNODES=${NNODES:-8}; VOCAB=32000
MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --ffn-hidden-size 14336 --num-attention-heads 32
  --group-query-attention --num-query-groups 8 --max-position-embeddings 32768
  --position-embedding-type rope --no-position-embedding --rotary-base 1000000
  --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
  --init-method-std 0.02 --micro-batch-size 1 --global-batch-size 256 --lr 1e-4 --min-lr 1e-5)
# transformers' router_aux_loss_coef 0.02 x top-k 2 = Megatron-LM's --moe-aux-loss-coeff (see hf_layouts.py)
MOE_ARGS=(--num-experts 8 --moe-router-topk 2 --moe-layer-freq 1 --moe-router-load-balancing-type aux_loss
  --moe-aux-loss-coeff 0.04 --disable-moe-token-dropping --moe-expert-parallel-size 8 --use-distributed-optimizer)
hf_args
launch "$@"
