#!/usr/bin/env python3
"""Train a small SentencePiece (BPE, byte fallback) model on text or jsonl files.

    python tools/train_tokenizer.py --input ../shared/data/corpus/wikitext-2-raw/train.txt \\
        --model-prefix wt2_8k --vocab-size 8000
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

from megatron.errors import UserError, run_cli
from megatron.tokenizer.sentencepiece_tokenizer import train_sentencepiece


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".txt files, or .jsonl with --json-key")
    p.add_argument("--json-key", default="text")
    p.add_argument("--model-prefix", required=True)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    args = p.parse_args(argv)
    inputs, tmp = [], None
    for path in args.input:
        if not os.path.isfile(path):
            raise UserError(f"--input {path}: no such file")
        if path.endswith(".jsonl"):
            tmp = tmp or tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")
            with open(path, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        tmp.write(json.loads(line)[args.json_key] + "\n")
        else:
            inputs.append(path)
    if tmp is not None:
        tmp.close()
        inputs.append(tmp.name)
    try:
        model = train_sentencepiece(inputs, args.model_prefix, args.vocab_size, args.model_type)
    finally:
        if tmp is not None:
            os.unlink(tmp.name)
    print(f"wrote {model} (vocab {args.vocab_size})")
    return 0


if __name__ == "__main__":
    run_cli(main)
