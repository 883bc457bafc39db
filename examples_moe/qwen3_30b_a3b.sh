#!/usr/bin/env bash
# Qwen3-30B-A3B (Qwen3MoeForCausalLM): 48 layers, hidden 2048, 32 heads / 4 KV heads of 128 (GQA), per-head
# q/k RMSNorm, 128 fine-grained SwiGLU experts of 768 on every layer, top-8 renormalised (norm_topk_prob),
# RoPE base 1e6, untied output, vocabulary 151936.
# Source of the sizes: the Qwen/Qwen3-30B-A3B model card: "Number of Parameters: 30.5B in total and 3.3B
# activated"; the shape is its config.json.
# --dry-run prints total 30,532,122,624 and active 3,353,032,704 (tests/test_examples.py checks 30.5B / 3.3B;
# the card truncates: 3.35B is "3.3B" there).
# EP 8 x TP 1 over 32 GPUs. Continue from the weights: tools/checkpoint_util.py import-hf, then LOAD=<it>.
source "$(dirname "$0")/hf_common.sh"
NAME=qwen3_30b_a3b; NNODES=${NNODES:-4}; VOCAB=151936
MODEL_ARGS=(--num-layers 48 --hidden-size 2048 --ffn-hidden-size 6144 --num-attention-heads 32 --kv-channels 128
  --group-query-attention --num-query-groups 4 --qk-layernorm --max-position-embeddings 40960
  --position-embedding-type rope --no-position-embedding --rotary-base 1000000
  --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
  --init-method-std 0.02 --micro-batch-size 1 --global-batch-size 512 --lr 3e-4 --min-lr 3e-5)
# transformers' router_aux_loss_coef 0.001 x top-k 8 = Megatron-LM's --moe-aux-loss-coeff (see hf_layouts.py)
MOE_ARGS=(--num-experts 128 --moe-ffn-hidden-size 768 --moe-router-topk 8 --moe-layer-freq 1
  --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.008 --disable-moe-token-dropping
  --moe-expert-parallel-size 8 --use-distributed-optimizer)
hf_args
launch "$@"
