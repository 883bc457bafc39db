#!/usr/bin/env bash
# 350M dense GPT (paper: 350M). 64 GPUs by default: bash examples_moe/gpt_350M_dense.sh [--dry-run] [flags]
source "$(dirname "$0")/common.sh"
NAME=gpt_350M_dense; NNODES=${NNODES:-8}
MODEL_ARGS=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16 --init-method-std 0.014
  --micro-batch-size 4 --global-batch-size 256 --tensor-model-parallel-size 1
  --lr 3.0e-4 --min-lr 3.0e-5)
paper_args 260000000000
launch "$@"
