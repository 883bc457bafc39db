"""Checks of an indexed dataset before compute is spent: index bounds and token ids.

``IndexedDataset`` already checks the header and that the ``.bin`` size matches the sizes in the
index; this module checks what a corrupt or mismatched pair can still get wrong:

* every sequence lies inside ``.bin`` (pointer >= 0, pointer + size * itemsize <= file size) and
  the document index is non-decreasing from 0 to the sequence count;
* every token id lies in [0, vocabulary size): a larger id would index past the embedding table
  (an opaque device-side assert on GPU).

The token scan reads the whole ``.bin`` once in chunks; its result (the largest and smallest id)
is cached beside the GPT index maps, keyed by the file's size and modification time.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from megatron.errors import UserError

CHUNK_TOKENS = 1 << 24


def check_index_bounds(indexed) -> None:
    """Every sequence inside ``.bin``; the document index well-formed."""
    bin_file = indexed.prefix + ".bin"
    idx_file = indexed.prefix + ".idx"
    nbytes = os.path.getsize(bin_file)
    sizes = np.asarray(indexed.sizes).astype(np.int64)
    pointers = np.asarray(indexed.pointers)
    if len(sizes) and sizes.min() < 0:
        i = int(np.argmin(sizes))
        raise UserError(f"{idx_file}: sequence {i} has negative length {int(sizes[i])}; the index is corrupt: "
                        f"re-run tools/preprocess_data.py")
    ends = pointers + sizes * indexed.dtype.itemsize
    bad = np.nonzero((pointers < 0) | (ends > nbytes))[0]
    if len(bad):
        i = int(bad[0])
        raise UserError(f"{idx_file}: sequence {i} points to bytes [{int(pointers[i])}, {int(ends[i])}) outside "
                        f"{bin_file} ({nbytes} bytes); the index does not belong to this .bin: "
                        f"re-run tools/preprocess_data.py")
    doc_idx = np.asarray(indexed.doc_idx)
    if len(doc_idx) == 0 or doc_idx[0] != 0 or doc_idx[-1] != len(sizes) or (np.diff(doc_idx) < 0).any():
        raise UserError(f"{idx_file}: the document index is not a non-decreasing list from 0 to {len(sizes)}; "
                        f"the index is corrupt: re-run tools/preprocess_data.py")


def token_range(indexed, cache_dir: str | None = None) -> tuple[int, int]:
    """(smallest, largest) token id in ``.bin`` (0, -1 when it is empty); cached on disk when possible."""
    bin_file = indexed.prefix + ".bin"
    st = os.stat(bin_file)
    key = hashlib.md5(f"{os.path.abspath(bin_file)}|{st.st_size}|{st.st_mtime_ns}|v1".encode()).hexdigest()[:16]
    cache_dir = cache_dir or os.path.dirname(os.path.abspath(indexed.prefix))
    cache = os.path.join(cache_dir, f"{os.path.basename(indexed.prefix)}_token_range_{key}.txt")
    try:
        lo, hi = (int(v) for v in open(cache).read().split())
        return lo, hi
    except (OSError, ValueError):
        pass
    data = indexed.bin
    lo, hi = 0, -1
    if len(data):
        lo, hi = int(data[0]), int(data[0])
        for start in range(0, len(data), CHUNK_TOKENS):
            chunk = np.asarray(data[start:start + CHUNK_TOKENS])
            lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    try:
        tmp = f"{cache}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{lo} {hi}\n")
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only data directory: scan again next time
    return lo, hi


def check_token_ids(indexed, vocab_size: int, cache_dir: str | None = None) -> None:
    lo, hi = token_range(indexed, cache_dir)
    if hi < lo:
        return
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        where = int(np.argmax(np.asarray(indexed.bin) == bad))
        raise UserError(f"--data-path {indexed.prefix}: token id {bad} (at token {where} of {indexed.prefix}.bin) is "
                        f"outside the vocabulary [0, {vocab_size}); the data was made with another "
                        f"tokenizer: re-run tools/preprocess_data.py with this one, or pass the tokenizer it was made with")


def validate_dataset(indexed, vocab_size: int, cache_dir: str | None = None) -> None:
    check_index_bounds(indexed)
    check_token_ids(indexed, vocab_size, cache_dir)
