"""Train / valid / test datasets from ``--data-path`` and ``--split``."""
from __future__ import annotations

import math

import numpy as np

from megatron.data.blended_dataset import BlendedDataset
from megatron.data.gpt_dataset import GPTDataset, MockGPTDataset
from megatron.data.indexed_dataset import IndexedDataset
from megatron.data.validate import validate_dataset
from megatron.errors import UserError

SPLIT_NAMES = ("train", "valid", "test")


def split_documents(num_docs: int, fractions) -> list[np.ndarray]:
    """Megatron's contiguous split of document ids by fractions (rounded, last bound = num_docs)."""
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * float(num_docs))))
    diff = bounds[-1] - num_docs
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i in range(3)]


def build_datasets(data_cfg, seq_length: int, seed: int, num_samples: list[int], vocab_size: int = 0):
    """Returns [train, valid, test]; an entry is None where its split is empty or no samples are asked."""
    if data_cfg.mock_data:
        return [MockGPTDataset(n, max(num_samples[i], 1), seq_length, vocab_size, seed) if num_samples[i] > 0 else None
                for i, n in enumerate(SPLIT_NAMES)]
    fractions = data_cfg.split_fractions()
    weights = [w for w, _ in data_cfg.data_path]
    if not all(math.isfinite(w) for w in weights):
        raise UserError(f"--data-path weights {weights} include NaN or infinity: give finite weights (0.3 A 0.7 B)")
    per_prefix = []
    for weight, prefix in data_cfg.data_path:
        indexed = IndexedDataset(prefix)
        if vocab_size:
            validate_dataset(indexed, vocab_size, data_cfg.data_cache_path)
        per_prefix.append((weight, indexed, split_documents(len(indexed.sizes), fractions)))
    out = []
    for i, name in enumerate(SPLIT_NAMES):
        n = num_samples[i]
        if n <= 0:
            out.append(None)
            continue
        parts, weights = [], []
        for weight, indexed, splits in per_prefix:
            docs = splits[i]
            if len(docs) == 0 or weight == 0:
                continue
            if int(np.asarray(indexed.sizes)[docs].sum()) <= seq_length:
                raise UserError(f"--data-path {indexed.prefix}: the {name} split has too few tokens for --seq-length "
                                f"{seq_length}; use more data or change --split")
            want = n if len(per_prefix) == 1 else int(math.ceil(n * weight * 1.005)) + 1
            parts.append(GPTDataset(name, indexed, docs, want, seq_length, seed, data_cfg.data_cache_path))
            weights.append(weight)
        if not parts:
            out.append(None)
        elif len(parts) == 1:
            out.append(parts[0])
        else:
            out.append(BlendedDataset(parts, weights, n))
    return out
