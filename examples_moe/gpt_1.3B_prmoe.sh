#!/usr/bin/env bash
# 1.3B PR-MoE-64/128 (paper: 31B): Residual-MoE, 64 experts in the first 10 MoE layers and 128 in the
# last 2. EP 64, 64 GPUs.
source "$(dirname "$0")/common.sh"
NAME=gpt_1.3B_prmoe; NNODES=${NNODES:-8}
MODEL_ARGS=(--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --init-method-std 0.014
  --micro-batch-size 8 --global-batch-size 512 --tensor-model-parallel-size 1
  --lr 1.2e-4 --min-lr 1.0e-6)
MOE_ARGS=(--num-experts $(repeat 10 64) 128 128 --expert-interval 2 --topk 1 --mlp-type residual
  --moe-expert-parallel-size 64 "${MOE_COMMON[@]}")
paper_args 300000000000
launch "$@"
