#!/usr/bin/env bash
# Zero-shot evaluation of checkpoints on the paper's six tasks (lm-eval 0.4, local task files).
#   bash examples_moe/eval_zeroshot.sh CKPT [CKPT ...] [-- extra flags, e.g. --limit 100]
# Environment: EVAL_DATA_DIR (../shared/data/eval), TASKS (lambada,piqa,boolq,race,triviaqa,webqs),
#              MICRO_BATCH_SIZE (8), RESULTS (eval_results.json), PYTHON (python3)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ckpts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do ckpts+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
if [ ${#ckpts[@]} -eq 0 ]; then echo "usage: $0 CKPT [CKPT ...] [-- flags]" >&2; exit 2; fi
exec "${PYTHON:-python3}" "$ROOT/tools/eval_harness.py" --load "${ckpts[@]}" \
  --eval-data-dir "${EVAL_DATA_DIR:-$ROOT/../shared/data/eval}" \
  --task-list "${TASKS:-lambada,piqa,boolq,race,triviaqa,webqs}" \
  --micro-batch-size "${MICRO_BATCH_SIZE:-8}" --results-path "${RESULTS:-eval_results.json}" "$@"
