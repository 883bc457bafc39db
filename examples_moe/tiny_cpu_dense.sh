#!/usr/bin/env bash
# Tiny dense GPT on CPU (4 layers, hidden 128): bash examples_moe/tiny_cpu_dense.sh [flags]
source "$(dirname "$0")/tiny_common.sh"
NAME=dense
MODEL_ARGS=(--num-layers 4)
launch_tiny "$@"
