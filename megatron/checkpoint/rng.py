"""The random number generator states a checkpoint stores per rank, as tensors and plain values.

Python's, NumPy's and torch's CPU generator (and CUDA's when it is in use) are captured by
:func:`rng_state` in a form ``torch.load(weights_only=True)`` accepts, and restored by
:func:`set_rng_state`, so a resumed run draws the same numbers the uninterrupted run would have.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """This process's generator states."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generator states :func:`rng_state` captured."""
    random.setstate(_tuplify(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x
