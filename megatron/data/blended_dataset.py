"""Weighted blend of datasets (``--data-path 0.3 A 0.7 B``), deterministic and vectorised.

Sample k of dataset d is placed at the ideal time (k + 0.5) / w_d; merging all datasets by that
time gives the same proportions as Megatron's greedy error-minimising helper, in numpy.
"""
from __future__ import annotations

import numpy as np


def blend_indices(weights, size: int):
    weights = np.asarray(weights, dtype=np.float64)
    counts = np.ceil(weights * size).astype(np.int64) + 1
    times = np.concatenate([(np.arange(n) + 0.5) / w if w > 0 else np.full(0, np.inf) for n, w in zip(counts, weights)])
    which = np.concatenate([np.full(n if w > 0 else 0, d, dtype=np.int64) for d, (n, w) in enumerate(zip(counts, weights))])
    rank = np.concatenate([np.arange(n if w > 0 else 0, dtype=np.int64) for n, w in zip(counts, weights)])
    order = np.argsort(times, kind="stable")[:size]
    return which[order], rank[order]


class BlendedDataset:
    def __init__(self, datasets, weights, size: int):
        self.datasets = datasets
        self.dataset_index, self.dataset_sample_index = blend_indices(weights, size)
        for d, ds in enumerate(datasets):
            used = self.dataset_sample_index[self.dataset_index == d]
            if len(used) and used.max() >= len(ds):
                raise ValueError(f"blend needs {used.max() + 1} samples from dataset {d}, which has {len(ds)}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int):
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]
