#!/usr/bin/env bash
# Qwen2-57B-A14B (Qwen2MoeForCausalLM): 28 layers, hidden 3584, 28 heads / 4 KV heads (GQA), q/k/v biases,
# 64 fine-grained SwiGLU experts of 2560 on every layer, top-8 not renormalised (norm_topk_prob false:
# --moe-router-pre-softmax), a shared expert of 20480 scaled by a sigmoid gate, RoPE base 1e6, untied output,
# vocabulary 151936.
# Source of the sizes: the Qwen/Qwen2-57B-A14B model card and the Qwen2 technical report (arXiv 2407.10671,
# Table 1): 57B total, 14B activated parameters; the shape is its config.json.
# --dry-run prints total 57,408,658,944 and active 14,249,270,784 (tests/test_examples.py checks 57B / 14B).
# EP 8 x TP 1 over 64 GPUs. Continue from the weights: tools/checkpoint_util.py import-hf, then LOAD=<it>.
source "$(dirname "$0")/hf_common.sh"
NAME=qwen2_57b_a14b; NNODES=${NNODES:-8}; VOCAB=151936
MODEL_ARGS=(--num-layers 28 --hidden-size 3584 --ffn-hidden-size 18944 --num-attention-heads 28
  --group-query-attention --num-query-groups 4 --add-qkv-bias --max-position-embeddings 32768
  --position-embedding-type rope --no-position-embedding --rotary-base 1000000
  --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
  --init-method-std 0.02 --micro-batch-size 1 --global-batch-size 512 --lr 1e-4 --min-lr 1e-5)
# transformers' router_aux_loss_coef 0.001 x top-k 8 = Megatron-LM's --moe-aux-loss-coeff (see hf_layouts.py)
MOE_ARGS=(--num-experts 64 --moe-ffn-hidden-size 2560 --moe-router-topk 8 --moe-layer-freq 1 --moe-router-pre-softmax
  --moe-shared-expert-intermediate-size 20480 --moe-shared-expert-gate
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.008 --disable-moe-token-dropping
  --moe-expert-parallel-size 8 --use-distributed-optimizer)
hf_args
launch "$@"
