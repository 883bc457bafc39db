#!/usr/bin/env bash
# OLMoE-1B-7B (OlmoeForCausalLM): 16 layers, hidden 2048, 16 heads, q/k RMSNorm, 64 fine-grained SwiGLU experts
# of 1024 on every layer, top-8 not renormalised (norm_topk_prob false: --moe-router-pre-softmax), RoPE base 1e4,
# untied output, vocabulary 50304 (50280 tokens padded).
# Source of the sizes: Muennighoff et al., "OLMoE: Open Mixture-of-Experts Language Models" (arXiv 2409.02060),
# Table 1: 6.9B total, 1.3B active parameters; the shape is allenai/OLMoE-1B-7B-0924's config.json.
# --dry-run prints total 6,919,161,856 and active 1,282,017,280 (tests/test_examples.py checks 6.9B / 1.3B).
# OLMoE normalises q and k over the whole projection (q_norm / k_norm of 2048): --qk-layernorm-full.
# EP 8 x TP 1 over 16 GPUs.
source "$(dirname "$0")/hf_common.sh"
NAME=olmoe_1b_7b; NNODES=${NNODES:-2}; VOCAB=50304
MODEL_ARGS=(--num-layers 16 --hidden-size 2048 --ffn-hidden-size 1024 --num-attention-heads 16 --qk-layernorm
  --qk-layernorm-full  --max-position-embeddings 4096 --position-embedding-type rope --no-position-embedding --rotary-base 10000
  --normalization RMSNorm --norm-epsilon 1e-5 --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
  --init-method-std 0.02 --micro-batch-size 4 --global-batch-size 1024 --lr 4e-4 --min-lr 5e-5)
# transformers' router_aux_loss_coef 0.01 x top-k 8 = Megatron-LM's --moe-aux-loss-coeff; the paper's router
# z-loss 0.001
MOE_ARGS=(--num-experts 64 --moe-ffn-hidden-size 1024 --moe-router-topk 8 --moe-layer-freq 1 --moe-router-pre-softmax
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.08 --moe-z-loss-coeff 0.001
  --disable-moe-token-dropping --moe-expert-parallel-size 8)
hf_args
launch "$@"
