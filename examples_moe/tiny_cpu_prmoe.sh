#!/usr/bin/env bash
# Tiny PR-MoE on CPU (the MoS teacher): 6 layers, Residual-MoE, experts 4 4 8 (more in the last layer).
source "$(dirname "$0")/tiny_common.sh"
NAME=prmoe
MODEL_ARGS=(--num-layers 6)
MOE_ARGS=(--num-experts 4 4 8 --expert-interval 2 --topk 1 --mlp-type residual "${MOE_COMMON[@]}")
launch_tiny "$@"
