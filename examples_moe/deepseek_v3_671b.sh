#!/usr/bin/env bash
# DeepSeek-V3 (DeepseekV3ForCausalLM): 61 layers (3 dense of width 18432, then 58 MoE), hidden 7168, 128 heads of
# multi-latent attention (q rank 1536, kv rank 512, 128 + 64 RoPE qk dims, 128 v dims per head), 256 routed
# SwiGLU experts of 2048 + 1 shared, top-8 within 4 of 8 groups, sigmoid scores, the aux-loss-free expert bias
# (update rate 0.001), routed scaling 2.5, sequence-wise balance loss 1e-4, untied output, vocabulary 129280.
# Source of the sizes: DeepSeek-V3 Technical Report (arXiv 2412.19437), abstract: "671B total parameters with 37B
# activated for each token"; the shape is deepseek-ai/DeepSeek-V3's config.json.
# --dry-run prints total 671,026,419,200 and active 37,552,297,472 (the report rounds: 671B / 37B). Both exclude
# the multi-token-prediction (MTP) module (the other 14B of the 685B Hugging Face checkpoint), as the report's
# 671B does: it is not built here, and import-hf skips its weights with a note.
# Context 4K with plain RoPE, as the report's pre-training; its YaRN extension (the published config.json) is
# --rope-type yarn --rotary-scaling-factor 40 --mscale 1 --mscale-all-dim 1 --original-max-position-embeddings 4096
# --max-position-embeddings 163840.
# Parallelism as the report's pre-training: PP 16, EP 64, ZeRO-1 DP over 2048 GPUs; TP 1 (MLA splits its heads under TP, as Megatron-LM).
# Hyperparameters (report section 4.2): init std 0.006, peak lr 2.2e-4 to 2.2e-5, batch 15360 sequences (the
# report ramps it up from 3072), 14.8T tokens; bf16 here (the report trains in FP8).
# Continue from the weights: tools/checkpoint_util.py import-hf, then LOAD=<it>.
TRAIN_TOKENS=${TRAIN_TOKENS:-14800000000000}
source "$(dirname "$0")/hf_common.sh"
NAME=deepseek_v3_671b; NNODES=${NNODES:-256}; VOCAB=129280
MODEL_ARGS=(--num-layers 61 --hidden-size 7168 --ffn-hidden-size 18432 --num-attention-heads 128
  --multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64
  --v-head-dim 128 --max-position-embeddings 4096 --position-embedding-type rope --no-position-embedding
  --rotary-base 10000 --normalization RMSNorm --norm-epsilon 1e-6 --swiglu --disable-bias-linear
  --untie-embeddings-and-output-weights --init-method-std 0.006
  --micro-batch-size 1 --global-batch-size 15360 --lr 2.2e-4 --min-lr 2.2e-5
  --tensor-model-parallel-size 1 --pipeline-model-parallel-size 16 --decoder-first-pipeline-num-layers 1)
MOE_ARGS=(--num-experts 256 --moe-layer-freq "([0]*3+[1]*58)" --moe-ffn-hidden-size 2048
  --moe-shared-expert-intermediate-size 2048 --moe-router-topk 8 --moe-router-score-function sigmoid
  --moe-router-norm-topk-prob true --moe-router-topk-scaling-factor 2.5 --moe-router-num-groups 8
  --moe-router-group-topk 4 --moe-router-enable-expert-bias --moe-router-bias-update-rate 1e-3
  --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-4 --moe-router-dtype fp32
  --disable-moe-token-dropping --moe-expert-parallel-size 64 --use-distributed-optimizer)
hf_args
launch "$@"
