#!/usr/bin/env bash
# Build the no-download demo data in DIR (default demo/): a corpus from text that ships with Python,
# a 4k SentencePiece tokenizer (DIR/spm.model) and DIR/corpus_text_document.{bin,idx}. Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT=${1:-demo}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
[ -f "$OUT/corpus.jsonl" ] || $PY "$ROOT/tools/make_demo_corpus.py" --output "$OUT/corpus.jsonl"
[ -f "$OUT/spm.model" ] || $PY "$ROOT/tools/train_tokenizer.py" --input "$OUT/corpus.jsonl" --model-prefix "$OUT/spm" --vocab-size 4096
[ -f "$OUT/corpus_text_document.idx" ] || $PY "$ROOT/tools/preprocess_data.py" --input "$OUT/corpus.jsonl" --json-keys text \
  --output-prefix "$OUT/corpus" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/spm.model" \
  --append-eod --workers 2 --quiet
