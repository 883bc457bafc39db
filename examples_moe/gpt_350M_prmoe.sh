#!/usr/bin/env bash
# 350M PR-MoE-32/64 (paper: 4B): Residual-MoE, 32 experts in the first 10 MoE layers and 64 in the
# last 2. EP 32 (upstream's EP 64 cannot split a 32-expert layer), 64 GPUs.
source "$(dirname "$0")/common.sh"
NAME=gpt_350M_prmoe; NNODES=${NNODES:-8}
MODEL_ARGS=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --init-method-std 0.014
  --micro-batch-size 4 --global-batch-size 256 --tensor-model-parallel-size 1
  --lr 3.0e-4 --min-lr 1.0e-6)
MOE_ARGS=(--num-experts $(repeat 10 32) 64 64 --expert-interval 2 --topk 1 --mlp-type residual
  --moe-expert-parallel-size 32 "${MOE_COMMON[@]}")
paper_args 300000000000
launch "$@"
