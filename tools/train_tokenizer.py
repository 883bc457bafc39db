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
    if args.vocab_size < 1:
        raise UserError(f"--vocab-size must be >= 1 (got {args.vocab_size})")
    out_dir = os.path.dirname(os.path.abspath(args.model_prefix))
    if not os.path.basename(args.model_prefix) or os.path.isdir(args.model_prefix):
        raise UserError(f"--model-prefix {args.model_prefix!r} names a directory, not a file stem: give DIR/NAME "
                        f"(the files are NAME.model and NAME.vocab)")
    if not os.path.isdir(out_dir):
        raise UserError(f"--model-prefix {args.model_prefix}: directory {out_dir} does not exist; create it first")
    for path in args.input:
        if not os.path.isfile(path):
            raise UserError(f"--input {path}: no such file")
    inputs, tmp = [], None
    try:
        for path in args.input:
            if path.endswith(".jsonl"):
                tmp = tmp or tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8")
                for text in _jsonl_texts(path, args.json_key):
                    tmp.write(text + "\n")
            else:
                _check_text(path)
                inputs.append(path)
        if tmp is not None:
            tmp.close()
            inputs.append(tmp.name)
        if not any(_has_text(path) for path in inputs):
            raise UserError(f"--input {' '.join(args.input)}: no text found; give files with some text "
                            f"(and --json-key naming the text field of .jsonl files)")
        model = train_sentencepiece(inputs, args.model_prefix, args.vocab_size, args.model_type)
    finally:
        if tmp is not None:
            tmp.close()
            os.unlink(tmp.name)
    print(f"wrote {model} (vocab {args.vocab_size})")
    return 0


def _jsonl_texts(path: str, key: str):
    """The ``key`` field of each line of a jsonl file; a broken line is one error naming the file and line."""
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"--input {path}:{n}: not valid JSON ({e.msg}); give one JSON object per line") \
                        from None
                if not isinstance(obj, dict) or key not in obj:
                    what = f"no key {key!r}" if isinstance(obj, dict) else f"a JSON {type(obj).__name__}, not an object"
                    raise UserError(f"--input {path}:{n}: {what}; set --json-key to the text field")
                if not isinstance(obj[key], str):
                    raise UserError(f"--input {path}:{n}: key {key!r} holds a {type(obj[key]).__name__}, not a string; "
                                    f"fix the line or choose another --json-key")
                try:
                    obj[key].encode("utf-8")
                except UnicodeEncodeError:
                    raise UserError(f"--input {path}:{n}: key {key!r} holds a lone surrogate, which is not Unicode "
                                    f"text; fix or remove the line") from None
                yield obj[key]
        except UnicodeDecodeError as e:
            raise UserError(f"--input {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); convert it first") \
                from None


def _check_text(path: str) -> None:
    """A plain-text input must be UTF-8 (SentencePiece would stop with a C++ check failure)."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"--input {path} line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x}); convert it "
                                f"first, e.g. iconv -f latin1 -t utf-8 {path}") from None


def _has_text(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        return any(line.strip() for line in f)


if __name__ == "__main__":
    run_cli(main)
