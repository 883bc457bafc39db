"""GPT samples of seq_length+1 tokens cut across document boundaries (Megatron's GPTDataset).

Three numpy indices, cached beside the data and rebuilt when stale:
  doc_idx     [epochs * docs]  document order: each epoch is a shuffled copy of the split's documents
  sample_idx  [samples, 2]     (position in doc_idx, token offset) where each sample starts
  shuffle_idx [samples]        the order in which samples are served
Everything is a pure function of (documents, sizes, seq_length, seed): deterministic on every rank.

Each array is int32 where its values fit (int64 otherwise) and is stored as its own ``.npy`` in
one cache entry (a directory ``<prefix>_<split>_..._indexmap``, see ``index_cache``), memory-
mapped read-only on load and built by one rank while the others wait.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from megatron.data import index_cache
from megatron.data.indexed_dataset import IndexedDataset

INDEX_NAMES = ("doc_idx", "sample_idx", "shuffle_idx")
CHUNK_DOCS = 1 << 20  # documents per step of the sample_idx computation (bounds its temporaries)


def build_indices(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int,
                  chunk_docs: int = CHUNK_DOCS):
    """(doc_idx, sample_idx, shuffle_idx), each int32 where its values fit.

    The same values as the original int64 algorithm (one ``RandomState(seed)``; one permutation of the
    documents per epoch, then one permutation of the samples: the same draws in the same order), built
    in place (no concatenation of epochs) and with sample_idx computed in chunks of documents: the
    samples starting in document j are those k with ``before_j <= k * seq_length < before_j + size_j``.
    """
    rng = np.random.RandomState(seed)
    documents = np.asarray(documents)
    n_docs = len(documents)
    tokens_per_epoch = int(sizes[documents].sum(dtype=np.int64))
    if tokens_per_epoch <= 1:
        raise ValueError("split has no tokens")
    num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    doc_idx = np.empty(num_epochs * n_docs, dtype=index_cache.int_dtype(documents.max() if n_docs else 0))
    for e in range(num_epochs):
        part = doc_idx[e * n_docs:(e + 1) * n_docs]
        part[:] = documents
        rng.shuffle(part)  # == rng.permutation(documents): the same draws whatever the dtype
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_idx = np.empty((total_samples, 2), dtype=index_cache.int_dtype(max(len(doc_idx), int(sizes.max()))))
    before, first = 0, 0  # tokens before the chunk; samples starting before the chunk
    for p0 in range(0, len(doc_idx), chunk_docs):
        sz = sizes[doc_idx[p0:p0 + chunk_docs]].astype(np.int64)
        ends = np.cumsum(sz)
        ends += before  # tokens up to and including each document
        chunk_end = int(ends[-1])
        upto = np.minimum(-(-ends // seq_length), total_samples)  # samples starting before each document's end
        n = int(upto[-1]) - first
        if n > 0:
            counts = np.diff(upto, prepend=first)
            local = np.repeat(np.arange(len(sz), dtype=np.int64), counts)
            ends -= sz  # now: tokens before each document
            sample_idx[first:first + n, 0] = local + p0
            sample_idx[first:first + n, 1] = np.arange(first, first + n, dtype=np.int64) * seq_length - ends[local]
            first += n
        before = chunk_end
        if first >= total_samples:
            break
    shuffle_idx = np.arange(total_samples, dtype=index_cache.int_dtype(max(total_samples - 1, 0)))
    rng.shuffle(shuffle_idx)  # == rng.permutation(total_samples)
    return doc_idx, sample_idx, shuffle_idx


def _consistent(a: dict) -> bool:
    return (a["doc_idx"].ndim == 1 and a["sample_idx"].ndim == 2 and a["sample_idx"].shape[1] == 2
            and a["shuffle_idx"].shape == (a["sample_idx"].shape[0],))


class GPTDataset:
    def __init__(self, name: str, indexed: IndexedDataset, documents: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, cache_dir: str | None = None):
        self.name, self.indexed, self.seq_length = name, indexed, seq_length
        sizes = np.asarray(indexed.sizes)
        key = hashlib.md5(
            f"{name}|{documents[0] if len(documents) else 0}-{len(documents)}|{num_samples}|{seq_length}|{seed}|"
            f"{os.path.getsize(indexed.prefix + '.bin')}|{os.path.getmtime(indexed.prefix + '.idx')}|v2".encode()
        ).hexdigest()[:16]
        cache_dir = cache_dir or os.path.dirname(os.path.abspath(indexed.prefix))
        base = os.path.join(cache_dir, f"{os.path.basename(indexed.prefix)}_{name}_{num_samples}ns_{seq_length}sl_{seed}s_{key}")
        self.cache_path = base + "_indexmap"  # a directory of .npy files
        try:
            os.makedirs(cache_dir, exist_ok=True)
        except OSError:
            pass  # read-only: index_cache keeps the indices in memory

        def build():
            return dict(zip(INDEX_NAMES, build_indices(sizes, documents, num_samples, seq_length, seed)))

        arrays = index_cache.cached(self.cache_path, INDEX_NAMES, build, _consistent,
                                    what=f"the {name} index map of {indexed.prefix}")
        self.doc_idx, self.sample_idx, self.shuffle_idx = (arrays[n] for n in INDEX_NAMES)

    def __len__(self) -> int:
        return len(self.shuffle_idx)

    def __getitem__(self, idx: int) -> np.ndarray:
        """seq_length + 1 tokens (int64)."""
        i = int(self.shuffle_idx[idx])
        pos, offset = (int(v) for v in self.sample_idx[i])
        need = self.seq_length + 1
        parts = []
        while need > 0:
            doc = int(self.doc_idx[pos])
            avail = int(self.indexed.sizes[doc]) - offset
            take = min(avail, need)
            parts.append(self.indexed.get(doc, offset, take))
            need -= take
            pos += 1
            offset = 0
        return np.concatenate(parts).astype(np.int64)


class MockGPTDataset:
    """Deterministic random tokens: a run with no files (smoke tests, benchmarks)."""

    def __init__(self, name: str, num_samples: int, seq_length: int, vocab_size: int, seed: int):
        self.num_samples, self.seq_length, self.vocab_size = num_samples, seq_length, vocab_size
        self.seed = seed + {"train": 0, "valid": 1, "test": 2}.get(name, 3) * 1_000_003

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, idx: int) -> np.ndarray:
        rng = np.random.default_rng(self.seed + idx)
        return rng.integers(0, self.vocab_size - 1, size=self.seq_length + 1, dtype=np.int64)
