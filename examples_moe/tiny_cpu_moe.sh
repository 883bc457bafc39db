#!/usr/bin/env bash
# Tiny standard MoE on CPU: 8 experts on every other layer, top-1, token dropping at capacity 1.0.
source "$(dirname "$0")/tiny_common.sh"
NAME=moe
MODEL_ARGS=(--num-layers 4)
MOE_ARGS=(--num-experts 8 --expert-interval 2 --topk 1 "${MOE_COMMON[@]}")
launch_tiny "$@"
