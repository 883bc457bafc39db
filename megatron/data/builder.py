"""Train / valid / test datasets from ``--data-path`` and ``--split``."""
from __future__ import annotations

import math
import os

import numpy as np

from megatron.data.blended_dataset import BlendedDataset
from megatron.data.gpt_dataset import GPTDataset, MockGPTDataset
from megatron.data.indexed_dataset import IndexedDataset
from megatron.data.validate import validate_dataset
from megatron.errors import UserError, check_writable_dir

SPLIT_NAMES = ("train", "valid", "test")
CACHE_TODO = "give a writable directory for the dataset index cache, or leave the flag out to cache beside the data"


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
    if data_cfg.data_cache_path:
        check_writable_dir("--data-cache-path", data_cfg.data_cache_path, CACHE_TODO)
    separate = data_cfg.split_data_paths()
    if separate:
        # One file list per set, each read whole (Megatron-LM's --train/valid/test-data-path).
        per_split = []
        for i, pairs in enumerate(separate):
            flag = f"--{SPLIT_NAMES[i]}-data-path"
            per_split.append([(w, indexed, np.arange(len(indexed.sizes), dtype=np.int64))
                              for w, indexed in _open_all(pairs, flag, vocab_size, data_cfg)])
    else:
        fractions = data_cfg.split_fractions()
        opened = _open_all(data_cfg.data_path, "--data-path", vocab_size, data_cfg)
        per_prefix = [(w, indexed, split_documents(len(indexed.sizes), fractions)) for w, indexed in opened]
        per_split = [[(w, indexed, splits[i]) for w, indexed, splits in per_prefix] for i in range(3)]
    out = []
    for i, name in enumerate(SPLIT_NAMES):
        n = num_samples[i]
        if n <= 0:
            out.append(None)
            continue
        per_prefix = per_split[i]
        parts, weights = [], []
        for weight, indexed, docs in per_prefix:
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
            out.append(BlendedDataset(parts, weights, n, _blend_cache_dir(data_cfg, per_prefix)))
    return out


def _blend_cache_dir(data_cfg, per_prefix) -> str:
    """Where the blend's indices are cached: --data-cache-path, else beside the first dataset."""
    return data_cfg.data_cache_path or os.path.dirname(os.path.abspath(per_prefix[0][1].prefix))


def _open_all(pairs, flag: str, vocab_size: int, data_cfg) -> list[tuple[float, IndexedDataset]]:
    weights = [w for w, _ in pairs]
    if not all(math.isfinite(w) for w in weights):
        raise UserError(f"{flag} weights {weights} include NaN or infinity: give finite weights (0.3 A 0.7 B)")
    opened = []
    for weight, prefix in pairs:
        indexed = IndexedDataset(prefix)
        if vocab_size:
            validate_dataset(indexed, vocab_size, data_cfg.data_cache_path)
        opened.append((weight, indexed))
    return opened
