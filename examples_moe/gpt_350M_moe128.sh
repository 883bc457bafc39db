#!/usr/bin/env bash
# 350M+MoE-128 (paper: 13B): 128 experts on every other layer, top-1, EP 64 over 64 GPUs.
source "$(dirname "$0")/common.sh"
NAME=gpt_350M_moe128; NNODES=${NNODES:-8}
MODEL_ARGS=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --init-method-std 0.014
  --micro-batch-size 4 --global-batch-size 256 --tensor-model-parallel-size 1
  --lr 2.0e-4 --min-lr 2.0e-6)
MOE_ARGS=(--num-experts 128 --expert-interval 2 --topk 1 --mlp-type standard --moe-expert-parallel-size 64 "${MOE_COMMON[@]}")
paper_args 300000000000
launch "$@"
