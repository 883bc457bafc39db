#!/usr/bin/env bash
# 6.7B dense GPT (paper: 6.7B), TP 8. 128 GPUs by default: bash examples_moe/gpt_6.7B_dense.sh [--dry-run] [flags]
source "$(dirname "$0")/common.sh"
NAME=gpt_6.7B_dense; NNODES=${NNODES:-16}
MODEL_ARGS=(--num-layers 32 --hidden-size 4096 --num-attention-heads 32 --init-method-std 0.01
  --micro-batch-size 4 --global-batch-size 1024 --tensor-model-parallel-size 8
  --lr 1.2e-4 --min-lr 1.2e-5)
paper_args 260000000000
launch "$@"
