#!/usr/bin/env bash
# 1.3B PR-MoE + MoS student (paper: 27B): 21 layers, 64 experts in the first 8 MoE layers and 128 in the
# last 2, distilled from the 24-layer 1.3B PR-MoE-64/128 teacher (gpt_1.3B_prmoe.sh). Staged KD stops at
# iteration 200K of ~286K (the 70% point, as 400K of the 350M run's 572K). EP 64 (upstream's EP 128
# cannot split a 64-expert layer), 64 GPUs.
#   TEACHER_CHECKPOINT  the teacher's --save directory (output/gpt_1.3B_prmoe/checkpoints)
#   KD_STOP_ITERS       200000
source "$(dirname "$0")/common.sh"
NAME=gpt_1.3B_mos; NNODES=${NNODES:-8}
MODEL_ARGS=(--num-layers 21 --hidden-size 2048 --num-attention-heads 16 --init-method-std 0.014
  --micro-batch-size 4 --global-batch-size 512 --tensor-model-parallel-size 1
  --lr 1.2e-4 --min-lr 1.0e-6)
MOE_ARGS=(--num-experts $(repeat 8 64) 128 128 --expert-interval 2 --topk 1 --mlp-type residual
  --moe-expert-parallel-size 64 "${MOE_COMMON[@]}")
KD_ARGS=(--mos --load-teacher "${TEACHER_CHECKPOINT:-output/gpt_1.3B_prmoe/checkpoints}"
  --num-layers-teacher 24 --hidden-size-teacher 2048 --num-attention-heads-teacher 16
  --num-experts-teacher $(repeat 10 64) 128 128 --mlp-type-teacher residual
  --kd-alpha-ce 1 --kd-beta-ce 1 --kd-temp 1.0 --kd-stop-iters "${KD_STOP_ITERS:-200000}")
paper_args 300000000000
launch "$@"
