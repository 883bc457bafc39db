#!/usr/bin/env bash
# Tiny MoS student on CPU: 4 layers, experts 4 8 (the teacher's list minus a small-expert layer),
# distilled from the tiny PR-MoE teacher (run tiny_cpu_prmoe.sh first) for the first 70% of training.
#   TEACHER_CHECKPOINT   output/tiny_prmoe/checkpoints
source "$(dirname "$0")/tiny_common.sh"
NAME=mos
MODEL_ARGS=(--num-layers 4)
MOE_ARGS=(--num-experts 4 8 --expert-interval 2 --topk 1 --mlp-type residual "${MOE_COMMON[@]}")
KD_ARGS=(--mos --load-teacher "${TEACHER_CHECKPOINT:-output/tiny_prmoe/checkpoints}" --num-layers-teacher 6
  --num-experts-teacher 4 4 8 --kd-alpha-ce 1 --kd-beta-ce 1 --kd-temp 1.0 --kd-stop-iters $((ITERS * 7 / 10)))
launch_tiny "$@"
