#!/usr/bin/env bash
# 350M PR-MoE + MoS student (paper: 3.5B): 21 layers, 32 experts in the first 8 MoE layers and 64 in the
# last 2, distilled from the 24-layer 350M PR-MoE-32/64 teacher (gpt_350M_prmoe.sh) until iteration
# 400K of ~572K (staged KD), LM loss only afterwards. EP 32, 64 GPUs.
#   TEACHER_CHECKPOINT  the teacher's --save directory (output/gpt_350M_prmoe/checkpoints)
#   KD_STOP_ITERS       400000
source "$(dirname "$0")/common.sh"
NAME=gpt_350M_mos; NNODES=${NNODES:-8}
MODEL_ARGS=(--num-layers 21 --hidden-size 1024 --num-attention-heads 16 --init-method-std 0.014
  --micro-batch-size 4 --global-batch-size 256 --tensor-model-parallel-size 1
  --lr 3.0e-4 --min-lr 1.0e-6)
MOE_ARGS=(--num-experts $(repeat 8 32) 64 64 --expert-interval 2 --topk 1 --mlp-type residual
  --moe-expert-parallel-size 32 "${MOE_COMMON[@]}")
KD_ARGS=(--mos --load-teacher "${TEACHER_CHECKPOINT:-output/gpt_350M_prmoe/checkpoints}"
  --num-layers-teacher 24 --hidden-size-teacher 1024 --num-attention-heads-teacher 16
  --num-experts-teacher $(repeat 10 32) 64 64 --mlp-type-teacher residual
  --kd-alpha-ce 1 --kd-beta-ce 1 --kd-temp 1.0 --kd-stop-iters "${KD_STOP_ITERS:-400000}")
paper_args 300000000000
launch "$@"
