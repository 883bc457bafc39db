#!/usr/bin/env bash
# 6.7B+MoE-128 (not in the upstream scripts): the 1.3B+MoE-128 recipe on the 6.7B shape, TP 8 for the
# dense part, one expert per GPU per MoE layer (EP 128), 1,024 GPUs by default.
source "$(dirname "$0")/common.sh"
NAME=gpt_6.7B_moe128; NNODES=${NNODES:-128}
MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --init-method-std 0.01
  --micro-batch-size 4 --global-batch-size 1024 --tensor-model-parallel-size 8
  --lr 1.2e-4 --min-lr 1.0e-6)
MOE_ARGS=(--num-experts 128 --expert-interval 2 --topk 1 --mlp-type standard --moe-expert-parallel-size 128 "${MOE_COMMON[@]}")
paper_args 300000000000
launch "$@"
