#!/usr/bin/env bash
# Shared by the paper recipes. A recipe sets NAME, MODEL_ARGS (and MOE_ARGS, KD_ARGS)
# and the default node count, then calls `launch "$@"`.
#
# Environment (default):
#   DATA_PATH        Megatron data prefix, or "w1 p1 w2 p2"   (data/pile_text_document)
#   VOCAB_FILE       GPT-2 vocab.json                        (../shared/data/gpt2/gpt2-vocab.json if present, else data/gpt2-vocab.json)
#   MERGE_FILE       GPT-2 merges.txt                        (likewise)
#   OUTPUT_DIR       checkpoints and TensorBoard go under it  (output/$NAME)
#   NNODES, GPUS_PER_NODE, NODE_RANK, MASTER_ADDR, MASTER_PORT   torchrun rendezvous (recipe default, 8, 0, localhost, 6000)
#   RDZV_ID          rendezvous job id, the same on every node (megatron-moe-$NAME)
#   HOSTFILE         a DeepSpeed-style hostfile ("host slots=N" per line, # comments): sets NNODES (its lines),
#                    GPUS_PER_NODE (slots), MASTER_ADDR (first host) and NODE_RANK (this host's line)
#   TORCHRUN         the launcher command (torchrun)
# Multi-node: run the same command on every node (same MASTER_ADDR / MASTER_PORT / RDZV_ID, each with
# its NODE_RANK, or one HOSTFILE); the nodes meet through torchrun's c10d rendezvous on MASTER_ADDR.
#   TRAIN_TOKENS     300000000000      SAVE_INTERVAL 1000      PYTHON python3
# `--dry-run` anywhere in the arguments runs one process that builds the model on the meta device,
# prints parameters / FLOPs / the per-GPU memory plan for NNODES x GPUS_PER_NODE GPUs, and exits.
# Every other argument is passed to pretrain_gpt_moe.py after the recipe's (the last flag wins).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SHARED_GPT2="$ROOT/../shared/data/gpt2"
if [ -f "$SHARED_GPT2/gpt2-vocab.json" ]; then DEFAULT_VOCAB_DIR="$SHARED_GPT2"; else DEFAULT_VOCAB_DIR="data"; fi
DATA_PATH=${DATA_PATH:-data/pile_text_document}
VOCAB_FILE=${VOCAB_FILE:-$DEFAULT_VOCAB_DIR/gpt2-vocab.json}
MERGE_FILE=${MERGE_FILE:-$DEFAULT_VOCAB_DIR/gpt2-merges.txt}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODE_RANK_FROM_ENV=${NODE_RANK:-}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
TRAIN_TOKENS=${TRAIN_TOKENS:-300000000000}
SAVE_INTERVAL=${SAVE_INTERVAL:-1000}
PYTHON=${PYTHON:-python3}
TORCHRUN=${TORCHRUN:-torchrun}

# DeepSpeed-style hostfile -> NNODES, GPUS_PER_NODE, MASTER_ADDR, NODE_RANK (this host's line).
read_hostfile() {
  local file=$1 hosts=() slots=() line host n me i
  [ -f "$file" ] || { echo "error: HOSTFILE $file: no such file" >&2; exit 2; }
  while IFS= read -r line || [ -n "$line" ]; do
    line=${line%%#*}
    read -r host n <<<"$line" || true
    [ -z "${host:-}" ] && continue
    n=${n#slots=}
    if ! [[ "$n" =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ]; then
      echo "error: HOSTFILE $file: line '$line' needs 'HOST slots=N' with N >= 1" >&2; exit 2
    fi
    hosts+=("$host"); slots+=("$n")
  done <"$file"
  [ "${#hosts[@]}" -ge 1 ] || { echo "error: HOSTFILE $file: no hosts in it" >&2; exit 2; }
  for n in "${slots[@]}"; do
    [ "$n" = "${slots[0]}" ] || { echo "error: HOSTFILE $file: every host needs the same slots (torchrun starts the same number of processes per node)" >&2; exit 2; }
  done
  NNODES=${#hosts[@]}; GPUS_PER_NODE=${slots[0]}; MASTER_ADDR=${hosts[0]}
  if [ -z "${NODE_RANK_FROM_ENV:-}" ]; then
    NODE_RANK=""
    for me in "${HOSTFILE_SELF:-$(hostname)}" "$(hostname -s 2>/dev/null || true)" "$(hostname -f 2>/dev/null || true)"; do
      for i in "${!hosts[@]}"; do
        if [ -n "$me" ] && [ "${hosts[$i]}" = "$me" ]; then NODE_RANK=$i; break 2; fi
      done
    done
    [ -n "$NODE_RANK" ] || { echo "error: HOSTFILE $file: this host ($(hostname)) is not listed; set NODE_RANK" >&2; exit 2; }
  fi
}

# GPT-3 recipe shared by every paper run: seq 2048, 300B tokens, 375M warmup tokens, Adam (0.9, 0.95),
# weight decay 0.1, clip 1.0, cosine decay, fp16 with DeepSpeed's scaler settings, activation
# checkpointing, split 98/2/0, GPT-2 BPE, log every 10, evaluate every 100 for 10 iterations.
paper_args() {
  # $1: LR decay tokens (dense 260B, MoE 300B)
  local out="${OUTPUT_DIR:-output/$NAME}"
  # shellcheck disable=SC2206
  local data=($DATA_PATH)
  COMMON_ARGS=(
    --seq-length 2048 --max-position-embeddings 2048
    --train-tokens "$TRAIN_TOKENS" --lr-decay-tokens "$1" --lr-warmup-tokens 375000000 --lr-decay-style cosine
    --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --weight-decay 0.1 --clip-grad 1.0
    --fp16 --initial-loss-scale 2048 --loss-scale-window 500 --hysteresis 2 --min-loss-scale 1
    --checkpoint-activations
    --data-path "${data[@]}" --split 98,2,0
    --tokenizer-type GPT2BPETokenizer --vocab-file "$VOCAB_FILE" --merge-file "$MERGE_FILE"
    --log-interval 10 --eval-interval 100 --eval-iters 10
    --save "$out/checkpoints" --load "$out/checkpoints" --save-interval "$SAVE_INTERVAL"
    --tensorboard-dir "$out/tensorboard"
  )
}

# DeepSpeed-MoE settings of every MoE recipe: aux-loss 0.01, capacity factor 1.0, min capacity 4, token dropping on.
MOE_COMMON=(--moe-loss-coeff 0.01 --moe-train-capacity-factor 1.0 --moe-eval-capacity-factor 1.0 --moe-min-capacity 4)

repeat() {  # repeat N X -> X X ... X (N times)
  local n=$1 x=$2 out=()
  for ((i = 0; i < n; i++)); do out+=("$x"); done
  echo "${out[@]}"
}

launch() {
  if [ -n "${HOSTFILE:-}" ]; then read_hostfile "$HOSTFILE"; fi
  local world=$((NNODES * GPUS_PER_NODE))
  local args=("${MODEL_ARGS[@]}" "${MOE_ARGS[@]+"${MOE_ARGS[@]}"}" "${KD_ARGS[@]+"${KD_ARGS[@]}"}" "${COMMON_ARGS[@]}")
  for a in "$@"; do
    if [ "$a" = "--dry-run" ]; then
      exec "$PYTHON" "$ROOT/pretrain_gpt_moe.py" "${args[@]}" --dry-run-world-size "$world" "$@"
    fi
  done
  # shellcheck disable=SC2086
  exec $TORCHRUN --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-megatron-moe-$NAME}" \
    "$ROOT/pretrain_gpt_moe.py" "${args[@]}" "$@"
}
