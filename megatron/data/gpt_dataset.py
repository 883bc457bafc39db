"""GPT samples of seq_length+1 tokens cut across document boundaries (Megatron's GPTDataset).

Three numpy indices, cached beside the data and rebuilt when stale:
  doc_idx     [epochs * docs]  document order: each epoch is a shuffled copy of the split's documents
  sample_idx  [samples, 2]     (position in doc_idx, token offset) where each sample starts
  shuffle_idx [samples]        the order in which samples are served
Everything is a pure function of (documents, sizes, seq_length, seed): deterministic on every rank.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from megatron.data.indexed_dataset import IndexedDataset


def build_indices(sizes: np.ndarray, documents: np.ndarray, num_samples: int, seq_length: int, seed: int):
    rng = np.random.RandomState(seed)
    doc_sizes = sizes[documents].astype(np.int64)
    tokens_per_epoch = int(doc_sizes.sum())
    if tokens_per_epoch <= 1:
        raise ValueError("split has no tokens")
    num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    doc_idx = np.concatenate([rng.permutation(documents) for _ in range(num_epochs)]).astype(np.int64)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    cum = np.cumsum(sizes[doc_idx].astype(np.int64))  # [epochs*docs] tokens up to and including each doc
    starts = np.arange(total_samples, dtype=np.int64) * seq_length
    pos = np.searchsorted(cum, starts, side="right")
    offset = starts - (cum[pos] - sizes[doc_idx[pos]])
    sample_idx = np.stack([pos, offset], axis=1).astype(np.int64)  # [samples, 2]
    shuffle_idx = rng.permutation(total_samples).astype(np.int64)
    return doc_idx, sample_idx, shuffle_idx


class GPTDataset:
    def __init__(self, name: str, indexed: IndexedDataset, documents: np.ndarray, num_samples: int,
                 seq_length: int, seed: int, cache_dir: str | None = None):
        self.name, self.indexed, self.seq_length = name, indexed, seq_length
        sizes = np.asarray(indexed.sizes)
        key = hashlib.md5(
            f"{name}|{documents[0] if len(documents) else 0}-{len(documents)}|{num_samples}|{seq_length}|{seed}|"
            f"{os.path.getsize(indexed.prefix + '.bin')}|{os.path.getmtime(indexed.prefix + '.idx')}|v1".encode()
        ).hexdigest()[:16]
        cache_dir = cache_dir or os.path.dirname(os.path.abspath(indexed.prefix))
        base = os.path.join(cache_dir, f"{os.path.basename(indexed.prefix)}_{name}_{num_samples}ns_{seq_length}sl_{seed}s_{key}")
        path = base + "_indexmap.npz"
        loaded = None
        if os.path.isfile(path):
            try:
                with np.load(path) as z:
                    loaded = (z["doc_idx"], z["sample_idx"], z["shuffle_idx"])
            except (OSError, ValueError, KeyError):
                loaded = None  # stale or partial cache: rebuild
        if loaded is None:
            loaded = build_indices(sizes, documents, num_samples, seq_length, seed)
            try:
                os.makedirs(cache_dir, exist_ok=True)
                tmp = f"{base}.tmp{os.getpid()}.npz"
                np.savez(tmp, doc_idx=loaded[0], sample_idx=loaded[1], shuffle_idx=loaded[2])
                os.replace(tmp, path)  # atomic: concurrent ranks write identical content
            except OSError:
                pass  # read-only data dir: keep the indices in memory
        self.doc_idx, self.sample_idx, self.shuffle_idx = loaded

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
