#!/usr/bin/env bash
# Shared by the Hugging Face MoE family recipes (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE): the published shapes
# under Megatron-LM's flag names, to pretrain from scratch or to continue from an import-hf checkpoint
# (LOAD=<dir written by tools/checkpoint_util.py import-hf>). A recipe sets NAME, MODEL_ARGS, MOE_ARGS, VOCAB
# (the family tokenizer's vocabulary: the dry run counts it without tokenizer files) and the node count,
# then calls `hf_args; launch "$@"` (common.sh: torchrun, HOSTFILE, --dry-run).
#
# Environment (default), besides common.sh's:
#   DATA_PATH         Megatron data prefix tokenized with the family's tokenizer   (data/${NAME}_text_document)
#   TOKENIZER_MODEL   a Hugging Face tokenizer directory (tokenizer.json); unset: --vocab-size $VOCAB, ids as given
#   SEQ_LENGTH        4096      LOAD  a checkpoint to continue from (with --finetune when it is an import)
#   MOCK_DATA=1       synthetic tokens instead of DATA_PATH (smoke tests of the launch)
HF_DATA_PATH=${DATA_PATH:-}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

hf_args() {
  local out="${OUTPUT_DIR:-output/$NAME}" seq=${SEQ_LENGTH:-4096}
  # shellcheck disable=SC2206
  local data=(${HF_DATA_PATH:-data/${NAME}_text_document})
  COMMON_ARGS=(
    --seq-length "$seq"
    --train-tokens "$TRAIN_TOKENS" --lr-decay-tokens "$TRAIN_TOKENS" --lr-warmup-iters 2000 --lr-decay-style cosine
    --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0 --bf16
    --hidden-dropout 0.0 --attention-dropout 0.0 --checkpoint-activations
    --log-interval 10 --eval-interval 1000 --eval-iters 10
    --save "$out/checkpoints" --load "${LOAD:-$out/checkpoints}" --save-interval "$SAVE_INTERVAL"
    --tensorboard-dir "$out/tensorboard"
  )
  if [ "${MOCK_DATA:-0}" = "1" ]; then
    COMMON_ARGS+=(--mock-data --vocab-size "$VOCAB")
  else
    COMMON_ARGS+=(--data-path "${data[@]}" --split 98,2,0)
  fi
  if [ -n "${TOKENIZER_MODEL:-}" ]; then
    COMMON_ARGS+=(--tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
  else
    COMMON_ARGS+=(--tokenizer-type NullTokenizer --vocab-size "$VOCAB")
  fi
}
