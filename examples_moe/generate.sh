#!/usr/bin/env bash
# Text generation from a checkpoint (dense or MoE) with a KV cache.
#   bash examples_moe/generate.sh CKPT "prompt" [flags, e.g. --temperature 0.8 --top-p 0.9 --max-new-tokens 100]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
if [ $# -lt 2 ]; then echo "usage: $0 CKPT PROMPT [flags]" >&2; exit 2; fi
ckpt=$1 prompt=$2
shift 2
exec "${PYTHON:-python3}" "$ROOT/tools/generate_text.py" --load "$ckpt" --prompt "$prompt" "$@"
