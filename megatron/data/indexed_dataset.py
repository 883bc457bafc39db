"""Megatron's memory-mapped indexed dataset (``.bin`` tokens + ``.idx`` index), byte-compatible.

Index layout (little endian)::

    b"MMIDIDX\\x00\\x00"   magic (9 bytes)
    <Q  version = 1
    <B  dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16)
    <Q  sequence count N
    <Q  document count D (+1: the index starts with 0)
    int32[N]  sequence lengths (tokens)
    int64[N]  byte offsets of each sequence in the .bin file
    int64[D]  document index: sequence ids where documents start, starting with 0, ending with N
"""
from __future__ import annotations

import os
import struct

import numpy as np

from megatron.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
CODES = {np.dtype(v): k for k, v in DTYPES.items()}


def best_dtype(vocab_size: int):
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def index_path(prefix: str) -> str:
    return prefix + ".idx"


def data_path(prefix: str) -> str:
    return prefix + ".bin"


class IndexedDatasetBuilder:
    """Streams documents to ``prefix.bin`` and writes ``prefix.idx`` on :meth:`finalize`.

    Files are written under a temporary name and renamed at the end, so an interrupted
    preprocessing run never leaves a truncated dataset behind.
    """

    def __init__(self, prefix: str, dtype=np.int32):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self._tmp_bin = data_path(prefix) + f".tmp{os.getpid()}"
        self._bin = open(self._tmp_bin, "wb")
        self.sizes: list[int] = []
        self.doc_idx: list[int] = [0]

    def add_document(self, tokens, sentence_lengths=None) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        lengths = [len(arr)] if sentence_lengths is None else list(sentence_lengths)
        self._bin.write(arr.tobytes(order="C"))
        self.sizes.extend(lengths)
        self.doc_idx.append(len(self.sizes))

    def add_index(self, prefix: str, chunk_bytes: int = 64 << 20) -> None:
        """Append the whole dataset ``prefix`` (same dtype): its tokens streamed, its index shifted."""
        other = IndexedDataset(prefix)
        if other.dtype != self.dtype:
            raise UserError(f"{prefix}: token dtype {other.dtype} differs from {self.dtype} of the datasets before it; "
                            f"preprocess all parts with the same tokenizer")
        offset = len(self.sizes)
        self.sizes.extend(int(n) for n in other.sizes)
        self.doc_idx.extend(int(d) + offset for d in other.doc_idx[1:])
        with open(data_path(prefix), "rb") as f:
            while True:
                block = f.read(chunk_bytes)
                if not block:
                    break
                self._bin.write(block)

    def abort(self) -> None:
        """Drop the partial output (nothing at the final path is touched)."""
        self._bin.close()
        if os.path.exists(self._tmp_bin):
            os.remove(self._tmp_bin)

    def finalize(self) -> None:
        self._bin.close()
        sizes = np.asarray(self.sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        if len(sizes) > 1:
            pointers[1:] = np.cumsum(sizes[:-1].astype(np.int64)) * self.dtype.itemsize
        doc_idx = np.asarray(self.doc_idx, dtype=np.int64)
        tmp_idx = index_path(self.prefix) + f".tmp{os.getpid()}"
        with open(tmp_idx, "wb") as f:
            f.write(MAGIC)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", CODES[self.dtype]))
            f.write(struct.pack("<Q", len(sizes)))
            f.write(struct.pack("<Q", len(doc_idx)))
            f.write(sizes.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(doc_idx.tobytes(order="C"))
        os.replace(self._tmp_bin, data_path(self.prefix))
        os.replace(tmp_idx, index_path(self.prefix))


class IndexedDataset:
    """Read-only view of ``prefix.bin/.idx`` through numpy memory maps."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        idx_file, bin_file = index_path(prefix), data_path(prefix)
        for f in (idx_file, bin_file):
            if not os.path.isfile(f):
                raise UserError(f"--data-path {prefix}: {f} not found; run tools/preprocess_data.py to create it")
        with open(idx_file, "rb") as f:
            header = f.read(9 + 8 + 1 + 8 + 8)
        if len(header) < 34 or header[:9] != MAGIC:
            raise UserError(f"{idx_file} is not a Megatron MMIDIDX index (bad header); re-run tools/preprocess_data.py")
        version, = struct.unpack("<Q", header[9:17])
        code, = struct.unpack("<B", header[17:18])
        n_seq, = struct.unpack("<Q", header[18:26])
        n_doc, = struct.unpack("<Q", header[26:34])
        if version != 1 or code not in DTYPES:
            raise UserError(f"{idx_file}: unsupported index version {version} or dtype code {code}")
        self.dtype = np.dtype(DTYPES[code])
        expected = 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
        if os.path.getsize(idx_file) != expected:
            raise UserError(f"{idx_file} is truncated or corrupt (size {os.path.getsize(idx_file)}, expected {expected}); "
                            f"re-run tools/preprocess_data.py")
        buf = np.memmap(idx_file, mode="r", dtype=np.uint8)
        off = 34
        self.sizes = np.frombuffer(buf, dtype=np.int32, count=n_seq, offset=off)
        off += n_seq * 4
        self.pointers = np.frombuffer(buf, dtype=np.int64, count=n_seq, offset=off)
        off += n_seq * 8
        self.doc_idx = np.frombuffer(buf, dtype=np.int64, count=n_doc, offset=off)
        total = int(self.sizes.astype(np.int64).sum()) * self.dtype.itemsize
        if os.path.getsize(bin_file) != total:
            raise UserError(f"{bin_file} has {os.path.getsize(bin_file)} bytes but its index describes {total}; "
                            f"the pair is corrupt or mismatched: re-run tools/preprocess_data.py")
        self.bin = np.memmap(bin_file, mode="r", dtype=self.dtype) if total > 0 else np.zeros(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.doc_idx) - 1

    def get(self, idx: int, offset: int = 0, length=None) -> np.ndarray:
        start = int(self.pointers[idx]) // self.dtype.itemsize + offset
        size = int(self.sizes[idx]) - offset if length is None else length
        return np.asarray(self.bin[start:start + size])

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def document_sizes(self) -> np.ndarray:
        """Tokens per document (a document may span several sequences)."""
        cum = np.concatenate([[0], np.cumsum(self.sizes.astype(np.int64))])
        return cum[self.doc_idx[1:]] - cum[self.doc_idx[:-1]]
