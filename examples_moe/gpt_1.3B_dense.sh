#!/usr/bin/env bash
# 1.3B dense GPT (paper: 1.3B), TP 4. 64 GPUs by default: bash examples_moe/gpt_1.3B_dense.sh [--dry-run] [flags]
source "$(dirname "$0")/common.sh"
NAME=gpt_1.3B_dense; NNODES=${NNODES:-8}
MODEL_ARGS=(--num-layers 24 --hidden-size 2048 --num-attention-heads 16 --init-method-std 0.014
  --micro-batch-size 2 --global-batch-size 512 --tensor-model-parallel-size 4
  --lr 2.0e-4 --min-lr 2.0e-5)
paper_args 260000000000
launch "$@"
