"""Weighted blend of datasets (``--data-path 0.3 A 0.7 B``), deterministic and vectorised.

Sample k of dataset d is placed at the ideal time (k + 0.5) / w_d; merging all datasets by that
time gives the same proportions as Megatron's greedy error-minimising helper, in numpy.

The merge is an argsort over all samples (O(size log size) time, a few int64/float64 arrays of that
size), so with a ``cache_dir`` the two index arrays are cached like GPTDataset's (``index_cache``:
int32 or smaller ``.npy`` files, memory-mapped, built by one rank), keyed by the weights and size.
"""
from __future__ import annotations

import hashlib
import os

import numpy as np

from megatron.data import index_cache

BLEND_NAMES = ("dataset_index", "dataset_sample_index", "dataset_counts")


def blend_indices(weights, size: int):
    weights = np.asarray(weights, dtype=np.float64)
    counts = np.ceil(weights * size).astype(np.int64) + 1
    times = np.concatenate([(np.arange(n) + 0.5) / w if w > 0 else np.full(0, np.inf) for n, w in zip(counts, weights)])
    which = np.concatenate([np.full(n if w > 0 else 0, d, dtype=np.int64) for d, (n, w) in enumerate(zip(counts, weights))])
    rank = np.concatenate([np.arange(n if w > 0 else 0, dtype=np.int64) for n, w in zip(counts, weights)])
    order = np.argsort(times, kind="stable")[:size]
    return which[order], rank[order]


def _build_blend(weights, size: int) -> dict:
    which, rank = blend_indices(weights, size)
    counts = np.bincount(which, minlength=len(weights)).astype(np.int64)
    # Each dataset's samples are taken in order, so dataset d uses samples 0 .. counts[d] - 1.
    return {"dataset_index": which.astype(np.int16 if len(weights) <= np.iinfo(np.int16).max else np.int32),
            "dataset_sample_index": rank.astype(index_cache.int_dtype(rank.max() if len(rank) else 0)),
            "dataset_counts": counts}


class BlendedDataset:
    def __init__(self, datasets, weights, size: int, cache_dir: str | None = None):
        self.datasets = datasets
        path = None
        if cache_dir:
            key = hashlib.md5(f"{[float(w) for w in weights]}|{size}|v1".encode()).hexdigest()[:16]
            path = os.path.join(cache_dir, f"blend_{len(weights)}ds_{size}ns_{key}_blendmap")
        arrays = index_cache.cached(path, BLEND_NAMES, lambda: _build_blend(weights, size),
                                    lambda a: a["dataset_index"].shape == (size,) == a["dataset_sample_index"].shape,
                                    what=f"the blend index of {len(weights)} datasets")
        self.dataset_index, self.dataset_sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
        for d, ds in enumerate(datasets):
            used = int(arrays["dataset_counts"][d])
            if used > len(ds):
                raise ValueError(f"blend needs {used} samples from dataset {d}, which has {len(ds)}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int):
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
