#!/usr/bin/env python3
"""Tokenize text into Megatron's indexed format: ``<output-prefix>_<key>_document.{bin,idx}``.

Inputs (``--input``, one or more files or globs):
  * ``.jsonl`` / ``.json``: one JSON object per line; each ``--json-keys`` field is one document.
  * any other file is plain text; ``--text-document`` chooses the document boundary:
      ``blank-line`` (default) one document per block separated by one or more empty lines,
      ``file``       one document per file,
      ``line``       one document per non-empty line.

Input is read as a stream (a line at a time, a bounded number of documents in flight between the workers),
so files of any size go through in bounded memory; ``--max-shard-size MB`` writes several shards that
``tools/merge_datasets.py`` merges. Input must be UTF-8; JSON fields must be strings.

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

import numpy as np

from megatron.data.indexed_dataset import IndexedDatasetBuilder, best_dtype
from megatron.data.output_checks import check_output_prefix, remove_temp_files, write_failed
from megatron.errors import UserError, run_cli
from megatron.tokenizer import build_tokenizer

_TOKENIZER = None
_ARGS = None
_DTYPE = None
BATCH = 256  # documents sent to a worker at once


def _init_worker(args):
    global _TOKENIZER, _ARGS, _DTYPE
    _ARGS = args
    _TOKENIZER = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model, args.vocab_size)
    _DTYPE = best_dtype(_TOKENIZER.vocab_size)


def _encode_batch(items):
    """[(doc dict key -> text, nbytes, where)] -> [(key -> token array, nbytes)]; arrays (not lists) travel back
    from the workers cheaply, and a tokenizer with ``tokenize_batch`` gets the whole batch at once. A text the
    tokenizer refuses (the NullTokenizer: a word, an id past --vocab-size) is one error naming its file and line."""
    keys = list(items[0][0]) if items else []
    by_key = {}
    for key in keys:
        texts = [texts[key] or "" for texts, _, _ in items]
        try:
            if hasattr(_TOKENIZER, "tokenize_batch"):
                ids = _TOKENIZER.tokenize_batch(texts)
            else:
                ids = [_TOKENIZER.tokenize(t) if t else [] for t in texts]
        except UserError as e:
            where = next((w for (_, _, w), t in zip(items, texts) if t and not _tokenizes(t)), None)
            raise UserError(f"--input {where or 'a document'} (key {key!r}): {e}") from None
        prefix = _TOKENIZER.document_prefix() if hasattr(_TOKENIZER, "document_prefix") else []
        if prefix:  # Llama2Tokenizer: every document starts with BOS
            ids = [prefix + list(x) if len(x) else x for x in ids]
        if _ARGS.append_eod:
            ids = [list(x) + [_TOKENIZER.eod] if len(x) else x for x in ids]
        by_key[key] = [np.asarray(x, dtype=_DTYPE) for x in ids]
    return [({k: by_key[k][i] for k in keys}, nbytes) for i, (_, nbytes, _) in enumerate(items)]


def _tokenizes(text) -> bool:
    try:
        _TOKENIZER.tokenize(text)
        return True
    except UserError:
        return False


def _json_documents(path, f, json_keys):
    for lineno, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--input {path}:{lineno}: not valid JSON ({e.msg}); give one JSON object per line") from None
        if not isinstance(obj, dict):
            raise UserError(f"--input {path}:{lineno}: a JSON {type(obj).__name__}, not an object; give one JSON "
                            f"object per line")
        missing = [k for k in json_keys if k not in obj]
        if missing:
            raise UserError(f"--input {path}:{lineno}: no key {missing[0]!r}; set --json-keys to the text field")
        bad = [k for k in json_keys if not isinstance(obj[k], str)]
        if bad:
            kind = "null" if obj[bad[0]] is None else type(obj[bad[0]]).__name__
            raise UserError(f"--input {path}:{lineno}: key {bad[0]!r} holds a {kind}, not a string; fix the line or "
                            f"choose another --json-keys field")
        for k in json_keys:
            try:
                obj[k].encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800": no character of any text
                raise UserError(f"--input {path}:{lineno}: key {k!r} holds a lone surrogate {ascii(e.object[e.start])} "
                                f"at character {e.start}, which is not Unicode text; fix or remove the line") from None
        yield {k: obj[k] for k in json_keys}, len(line.encode("utf-8")), f"{path}:{lineno}"


def _text_documents(path, f, key, text_document):
    """Plain text, read line by line (bounded memory except for --text-document file); each document with the
    file and line where it starts."""
    if text_document == "file":
        text = f.read()
        yield {key: text}, len(text.encode("utf-8")), path
    elif text_document == "line":
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield {key: line}, len(line.encode("utf-8")) + 1, f"{path}:{lineno}"
    else:
        block, start = [], 0
        for lineno, line in enumerate(f, 1):
            if line.strip():
                if not block:
                    start = lineno
                block.append(line)
            elif block:
                doc = "".join(block)
                block = []
                yield {key: doc}, len(doc.encode("utf-8")), f"{path}:{start}"
        if block:
            doc = "".join(block)
            yield {key: doc}, len(doc.encode("utf-8")), f"{path}:{start}"


def iter_documents(paths, json_keys, text_document):
    for path in paths:
        with open(path, encoding="utf-8", newline=None) as f:
            docs = (_json_documents(path, f, json_keys) if path.endswith((".jsonl", ".json"))
                    else _text_documents(path, f, json_keys[0], text_document))
            try:
                yield from docs
            except UnicodeDecodeError as e:
                raise UserError(f"--input {path}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); convert it first, "
                                f"e.g. iconv -f latin1 -t utf-8 {path}") from None


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
    p.add_argument("--max-shard-size", type=float, default=None, metavar="MB",
                   help="write shards PREFIX_shardNNNN_KEY_document.{bin,idx} of about this much input each "
                        "(tools/merge_datasets.py joins them into the single-file output, byte for byte)")
    return p.parse_args(argv)


def _check_args(args) -> None:
    for key in args.json_keys:
        if not key or any(c in key for c in "/\\\0") or key in (".", ".."):
            raise UserError(f"--json-keys {key!r}: a key names the output file PREFIX_KEY_document; use a plain "
                            f"field name without '/', '\\' or '..'")
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1 (got {args.workers})")
    if args.max_shard_size is not None and not args.max_shard_size > 0:
        raise UserError(f"--max-shard-size must be > 0 MB (got {args.max_shard_size})")
    check_output_prefix(args.output_prefix)



class ShardedWriter:
    """One IndexedDatasetBuilder per json key, cut into shards of about ``max_bytes`` of input when given."""

    def __init__(self, prefix, keys, dtype, max_bytes=None):
        self.prefix, self.keys, self.dtype, self.max_bytes = prefix, keys, dtype, max_bytes
        self.shard, self.shard_bytes, self.done, self.builders = 0, 0, [], None
        self._open()

    def _name(self, key):
        if self.max_bytes is None:
            return f"{self.prefix}_{key}_document"
        return f"{self.prefix}_shard{self.shard:04d}_{key}_document"

    def _open(self):
        self.builders = {k: IndexedDatasetBuilder(self._name(k), self.dtype) for k in self.keys}

    def add(self, encoded, nbytes):
        if self.max_bytes is not None and self.shard_bytes >= self.max_bytes:
            self.done.append(self.builders)
            self.shard, self.shard_bytes = self.shard + 1, 0
            self._open()
        for key, ids in encoded.items():
            if len(ids):
                self.builders[key].add_document(ids)
        self.shard_bytes += nbytes

    def abort(self):
        for builders in self.done + [self.builders]:
            for b in builders.values():
                try:
                    b.abort()
                except OSError:  # closing a file on a full disk: its data is dropped anyway
                    pass
        remove_temp_files(b.prefix for builders in self.done + [self.builders] for b in builders.values())

    def finalize(self):
        for builders in self.done + [self.builders]:
            for b in builders.values():
                b.finalize()
        return self.shard + 1


def _batches(docs, size):
    batch = []
    for d in docs:
        batch.append(d)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def encoded_documents(args, docs, pool):
    """Encoded documents in input order. With a pool, at most ``workers * 4`` batches of BATCH documents are in
    flight, so memory stays bounded however large the input (Pool.imap would read the whole input ahead)."""
    if pool is None:
        for batch in _batches(docs, BATCH):
            yield from _encode_batch(batch)
        return
    window = args.workers * 4
    pending = []
    for batch in _batches(docs, BATCH):
        pending.append(pool.apply_async(_encode_batch, (batch,)))
        if len(pending) >= window:
            yield from pending.pop(0).get()
    for r in pending:
        yield from r.get()


def main(argv=None) -> int:
    args = get_args(argv)
    _check_args(args)
    paths = []
    for pattern in args.input:
        found = sorted(glob.glob(pattern))
        if not found:
            raise UserError(f"--input {pattern}: no such file")
        for path in found:
            if os.path.isdir(path):
                raise UserError(f"--input {path} is a directory; give its files (e.g. {os.path.join(path, '*.jsonl')})")
        paths.extend(found)
    tokenizer = build_tokenizer(args.tokenizer_type, args.vocab_file, args.merge_file, args.tokenizer_model, args.vocab_size)
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(out_dir):
        raise UserError(f"--output-prefix {args.output_prefix}: directory {out_dir} does not exist; create it first")
    max_bytes = None if args.max_shard_size is None else int(args.max_shard_size * 1e6)
    try:
        writer = ShardedWriter(args.output_prefix, args.json_keys, best_dtype(tokenizer.vocab_size), max_bytes)
    except OSError as e:
        remove_temp_files(f"{args.output_prefix}_{shard}{k}_document" for k in args.json_keys
                          for shard in ("", "shard0000_"))
        raise write_failed(args.output_prefix, e) from None
    docs = iter_documents(paths, args.json_keys, args.text_document)
    t0 = time.time()
    total_bytes = total_tokens = n_docs = 0
    pool = None
    if args.workers > 1:
        pool = multiprocessing.Pool(args.workers, initializer=_init_worker, initargs=(args,))
    else:
        _init_worker(args)
    try:
        for encoded, nbytes in encoded_documents(args, docs, pool):
            writer.add(encoded, nbytes)
            total_tokens += sum(len(ids) for ids in encoded.values())
            n_docs += 1
            total_bytes += nbytes
            if not args.quiet and n_docs % args.log_interval == 0:
                dt = time.time() - t0
                print(f"\rprocessed {n_docs} documents | {total_bytes / 1e6:.1f} MB | {total_bytes / 1e6 / dt:.2f} MB/s | "
                      f"{total_tokens / dt:,.0f} tokens/s", end="", file=sys.stderr, flush=True)
        if total_tokens == 0:
            raise UserError(f"--input {' '.join(args.input)}: no text found ({n_docs} documents, 0 tokens); nothing "
                            f"written - check the files and --json-keys / --text-document")
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        shards = writer.finalize()
    except BaseException as e:
        if pool is not None:
            pool.terminate()
            pool.join()
        writer.abort()
        if isinstance(e, OSError):
            raise write_failed(args.output_prefix, e) from None
        raise
    dt = max(time.time() - t0, 1e-9)
    if not args.quiet:
        print(file=sys.stderr)
    where = (f"{args.output_prefix}_{args.json_keys[0]}_document.bin/.idx" if max_bytes is None else
             f"{shards} shards {args.output_prefix}_shardNNNN_{args.json_keys[0]}_document.bin/.idx")
    print(f"done: {n_docs} documents, {total_tokens} tokens, {total_bytes / 1e6:.2f} MB in {dt:.1f} s "
          f"({total_bytes / 1e6 / dt:.2f} MB/s) -> {where}")
    return 0


if __name__ == "__main__":
    run_cli(main)
