#!/usr/bin/env python3
"""Tokenize text into Megatron's indexed format: ``<output-prefix>_<key>_document.{bin,idx}``.

Inputs (``--input``, one or more files or globs):
  * ``.jsonl`` / ``.json``: one JSON object per line; each ``--json-keys`` field is one document.
  * any other file is plain text; ``--text-document`` chooses the document boundary:
      ``blank-line`` (default) one document per block separated by one or more empty lines,
      ``file``       one document per file,
      ``line``       one document per non-empty line.

Example::

    python tools/preprocess_data.py --input corpus.jsonl --json-keys text --output-prefix data/corpus \\
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \\
        --append-eod --workers 2
"""
from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype  # noqa: E402
from megatron.errors import UserError, run_cli  # noqa: E402
from megatron.tokenizer import build_tokenizer  # noqa: E402

_TOKENIZER = None
_ARGS = None


def _init_worker(args):
    global _TOKENIZER, _ARGS
    _ARGS = args
    _TOKENIZER = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model, args.vocab_size)


def _encode(item):
    """item: (doc dict key -> text, nbytes) -> (key -> ids, nbytes)."""
    texts, nbytes = item
    out = {}
    for key, text in texts.items():
        ids = _TOKENIZER.tokenize(text) if text else []
        if ids and _ARGS.append_eod:
            ids.append(_TOKENIZER.eod)
        out[key] = ids
    return out, nbytes


def iter_documents(paths, json_keys, text_document):
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"--input {path}:{lineno}: not valid JSON ({e.msg}); give one JSON object per line")
                    missing = [k for k in json_keys if k not in obj]
                    if missing:
                        raise UserError(f"--input {path}:{lineno}: no key {missing[0]!r}; set --json-keys to the text field")
                    yield {k: obj[k] for k in json_keys}, len(line.encode("utf-8"))
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if text_document == "file":
                yield {json_keys[0]: text}, len(text.encode("utf-8"))
            elif text_document == "line":
                for line in text.splitlines():
                    if line.strip():
                        yield {json_keys[0]: line}, len(line.encode("utf-8")) + 1
            else:
                block = []
                for line in text.splitlines(keepends=True):
                    if line.strip():
                        block.append(line)
                    elif block:
                        doc = "".join(block)
                        block = []
                        yield {json_keys[0]: doc}, len(doc.encode("utf-8"))
                if block:
                    doc = "".join(block)
                    yield {json_keys[0]: doc}, len(doc.encode("utf-8"))


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True)
    p.add_argument("--json-keys", nargs="+", default=["text"])
    p.add_argument("--text-document", choices=["blank-line", "file", "line"], default="blank-line")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer-type", required=True)
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--tokenizer-model")
    p.add_argument("--vocab-size", type=int)
    p.add_argument("--append-eod", action="store_true")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-interval", type=int, default=1000)
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = get_args(argv)
    paths = []
    for pattern in args.input:
        found = sorted(glob.glob(pattern))
        if not found:
            raise UserError(f"--input {pattern}: no such file")
        paths.extend(found)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model, args.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise UserError(f"--output-prefix {args.output_prefix}: directory {out_dir} does not exist; create it first")
    builders = {k: IndexedDatasetBuilder(f"{args.output_prefix}_{k}_document", best_dtype(tokenizer.vocab_size))
                for k in args.json_keys}
    docs = iter_documents(paths, args.json_keys, args.text_document)
    t0 = time.time()
    total_bytes = total_tokens = n_docs = 0
    if args.workers > 1:
        pool = multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=(args,))
        results = pool.imap(_encode, docs, chunksize=32)
    else:
        _init_worker(args)
        pool, results = None, map(_encode, docs)
    try:
        for encoded, nbytes in results:
            for key, ids in encoded.items():
                if ids:
                    builders[key].add_document(ids)
                    total_tokens += len(ids)
            n_docs += 1
            total_bytes += nbytes
            if not args.quiet and n_docs % args.log_interval == 0:
                dt = time.time() - t0
                print(f"\rprocessed {n_docs} documents | {total_bytes / 1e6:.1f} MB | {total_bytes / 1e6 / dt:.2f} MB/s | "
                      f"{total_tokens / dt:,.0f} tokens/s", end="", file=sys.stderr, flush=True)
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        for b in builders.values():
            b.abort()
        raise
    if pool is not None:
        pool.close()
        pool.join()
    for b in builders.values():
        b.finalize()
    dt = max(time.time() - t0, 1e-9)
    if not args.quiet:
        print(file=sys.stderr)
    print(f"done: {n_docs} documents, {total_tokens} tokens, {total_bytes / 1e6:.2f} MB in {dt:.1f} s "
          f"({total_bytes / 1e6 / dt:.2f} MB/s) -> {args.output_prefix}_{args.json_keys[0]}_document.bin/.idx")
    return 0


if __name__ == "__main__":
    run_cli(main)
