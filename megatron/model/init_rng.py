"""Layout-independent, shard-local initialisation: normals addressed by their position in the full tensor.

Why: ``megatron.parallel.apply.build_model`` builds the model on the meta device, applies tensor and
expert parallelism there, gives each rank storage for its own shard only, and then initialises it.
A rank never holds the full model (a 1.3B model's TP=4 shard is a quarter of it), yet a model built
at TP=2 or EP=2 must hold exactly the slices of the TP=1 / EP=1 model of the same seed. So the value
of each element is a pure function of (seed, the parameter's layout-independent name, the element's
row-major flat position in the FULL tensor); experts are streams of their own, named with their global
expert id, so an expert's weights do not depend on which rank holds it.

Scheme (:func:`normal_`):

- stream: Philox4x64-10 (numpy's ``np.random.Philox``), key = the first 128 bits of
  BLAKE2b(``"megatron-init/{seed}/{name}"``). Philox is counter-based: raw 64-bit output ``r`` is lane
  ``r % 4`` of block (counter) ``r // 4``, so a run of the stream that starts anywhere is produced by
  setting the counter, at a cost proportional to the run alone (no prefix is generated);
- element ``j`` of the full tensor is one of the two Box-Muller normals of raw output ``j // 2``:
  ``u1 = (high 32 bits + 1) / 2^32`` in (0, 1], ``theta = 2 pi (low 32 bits) / 2^32``,
  ``z = sqrt(-2 ln u1) * (cos theta if j is even else sin theta)``, then ``value = z * std`` rounded once
  to the parameter's dtype. Tails reach |z| <= sqrt(64 ln 2) ~ 6.66;
- the transform uses only operations IEEE 754 rounds exactly, in numpy float64 (+, -, *, /, sqrt,
  frexp, integer arithmetic and integer -> float conversion; ``np.sqrt`` is the hardware's, correctly
  rounded, unlike ``torch.sqrt``, which may go through MKL's VML): ln by the atanh series after an
  exact frexp reduction; sin / cos as a 512-entry table angle (integer rounding, exact) plus a short
  Taylor polynomial in |t| <= pi/512 (errors ~1e-10 absolute at most, far below float32's resolution).
  Library ``log`` / ``cos`` (numpy's or torch's) are avoided on purpose: their SIMD body and scalar
  tail may differ in the last bit, which would make a value depend on where a block starts, i.e. on
  the layout. One fixed sequence of exactly rounded operations per element: a shard holds the very
  bits of the full tensor's slice (tests/test_shard_local_build.py), on any IEEE machine (the table
  comes from Python's ``math.sin`` / ``math.cos``, the platform's libm);
- a shard (a tensor-parallel ``index_select`` of the full tensor along one dim) is a list of
  contiguous runs of the full tensor: the column-parallel qkv (rows of this rank's heads) a few runs
  of rows, fc1 / the vocab-parallel embedding one run, a row-parallel weight (columns) one run per
  row. Runs are cut and batched into blocks of ~``BLOCK`` raw outputs, each transformed with one set
  of vectorised numpy operations (single-threaded, cache-sized) and copied into the parameter (on
  its device), so the cost is about the shard's size and the host memory beyond the parameter itself
  is a block's temporaries (about a megabyte).

The values differ from the earlier scheme (one ``torch.Generator`` drawn in module order for dense
parameters, one per (seed, layer, expert) for experts, ``Tensor.normal_``): the same seed gives a
different (equally distributed) model than before this module existed.
"""
from __future__ import annotations

import hashlib
import math
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

BLOCK = 1 << 13  # raw 64-bit outputs (2 values each) transformed per vectorised step: its arrays stay in cache

_C = math.sqrt(0.5)
_LN2 = math.log(2.0)
# -2 ln u1 = -2 (e - 1/2) ln 2 - 4 atanh(s) with u1 = m 2^e (frexp), s = (m - c) / (m + c), c = sqrt(1/2):
# |s| <= 0.1716, atanh s = s (1 + s^2/3 + s^4/5 + ...); 7 terms leave < 1e-12
_RAD2_COEFS = [-4.0 / (2 * k + 1) for k in range(7)]
_TABLE = 512  # angles 2 pi j / 512; theta = table angle + t, |t| <= pi / 512
_TAB_SIN = np.array([math.sin(2 * math.pi * j / _TABLE) for j in range(_TABLE)])
_TAB_COS = np.array([math.cos(2 * math.pi * j / _TABLE) for j in range(_TABLE)])
_ANGLE_UNIT = 2 * math.pi / 2**32  # radians per step of the low 32 bits
_NUMPY_DTYPES = (torch.float32, torch.float64)  # written in place through numpy; others via a float64 block


def stream_key(seed: int, name: str) -> np.ndarray:
    """The Philox key (2 x uint64) of parameter ``name``'s stream under ``seed``."""
    digest = hashlib.blake2b(f"megatron-init/{int(seed)}/{name}".encode(), digest_size=16).digest()
    return np.frombuffer(digest, dtype=np.uint64).copy()


def box_muller(raw: np.ndarray, scale: float = 1.0, out: Optional[np.ndarray] = None) -> np.ndarray:
    """raw [n] uint64 -> ``scale`` x [2n] standard normals (cos, sin of each raw interleaved), in float64 or
    written (rounded once) into ``out`` [2n] of any float dtype. Bit-exact on any split of ``raw`` into
    blocks: only exactly rounded numpy operations, one fixed sequence per element."""
    n = raw.size
    w = raw.view(np.uint32).reshape(n, 2)
    lo, hi = (w[:, 0], w[:, 1]) if sys.byteorder == "little" else (w[:, 1], w[:, 0])
    # radius sqrt(-2 ln u1), u1 = (hi + 1) / 2^32 in (0, 1]
    m = hi.astype(np.float64)
    m += 1.0
    m, e = np.frexp(m)  # hi + 1 = m 2^e, m in [1/2, 1): exact
    s = m - _C
    m += _C
    s /= m
    s2 = s * s
    p = np.multiply(s2, _RAD2_COEFS[-1])
    for c in reversed(_RAD2_COEFS[1:-1]):
        p += c
        p *= s2
    p += _RAD2_COEFS[0]
    p *= s  # -4 atanh(s)
    rad = e.astype(np.float64)
    rad -= 32.5  # u1 = (m / c) 2^(e - 32 - 1/2)
    rad *= -2.0 * _LN2
    rad += p
    np.sqrt(rad, out=rad)
    rad *= scale
    # angle theta = 2 pi lo / 2^32 = 2 pi j / 512 + t: j the nearest table angle (integer arithmetic, exact)
    j = lo + np.uint32(1 << 22)
    j >>= np.uint32(23)  # 0..512
    t = (lo.view(np.int32) - (j << np.uint32(23)).view(np.int32)).astype(np.float64)  # int32 wraps: [-2^22, 2^22)
    j &= np.uint32(_TABLE - 1)
    t *= _ANGLE_UNIT
    t2 = t * t
    cos_t = t2 * (1.0 / 24.0)  # 1 - t^2/2 + t^4/24 (next term < 1e-16)
    cos_t -= 0.5
    cos_t *= t2
    cos_t += 1.0
    sin_t = t2 * (1.0 / 120.0)  # t - t^3/6 + t^5/120
    sin_t -= 1.0 / 6.0
    sin_t *= t2
    sin_t += 1.0
    sin_t *= t
    sin_j, cos_j = _TAB_SIN.take(j), _TAB_COS.take(j)
    cos_th = cos_j * cos_t  # cos(theta) = cos_j cos_t - sin_j sin_t
    cos_th -= sin_j * sin_t
    sin_j *= cos_t  # sin(theta) = sin_j cos_t + cos_j sin_t
    cos_j *= sin_t
    sin_j += cos_j
    out = np.empty(2 * n) if out is None else out
    np.multiply(cos_th, rad, out=out[0::2])  # float64 product, rounded once into out's dtype
    np.multiply(sin_j, rad, out=out[1::2])
    return out


def shard_runs(full_shape: Sequence[int], dim: Optional[int] = None,
               index: Optional[torch.Tensor] = None) -> tuple[np.ndarray, np.ndarray]:
    """The contiguous runs (starts, lengths in elements, int64) of the full tensor's row-major flat order that
    ``full.index_select(dim, index).reshape(-1)`` reads, in that order (``dim`` None: the whole tensor)."""
    numel = math.prod(full_shape)
    if dim is None:
        return np.array([0], np.int64), np.array([numel], np.int64)
    outer, n, inner = math.prod(full_shape[:dim]), full_shape[dim], math.prod(full_shape[dim + 1:])
    idx = np.asarray(torch.as_tensor(index).cpu(), dtype=np.int64)
    if idx.size == 0 or numel == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cut = np.flatnonzero(np.diff(idx) != 1) + 1  # a new segment where the indices stop counting up by one
    seg_first = np.concatenate([[0], cut])
    seg_len = np.diff(np.concatenate([seg_first, [idx.size]]))
    starts = (np.arange(outer, dtype=np.int64)[:, None] * (n * inner) + idx[seg_first][None, :] * inner).reshape(-1)
    return starts, np.tile(seg_len * inner, outer)


def _pieces(starts: np.ndarray, lengths: np.ndarray, max_raw: int):
    """Runs -> (first raw output, raw count, values to skip, values to keep), each at most ``max_raw`` raws."""
    for s, n in zip(starts.tolist(), lengths.tolist()):
        end = s + n
        while s < end:
            r0 = s // 2
            r1 = min((end + 1) // 2, r0 + max_raw)
            stop = min(end, 2 * r1)
            yield r0, r1 - r0, s - 2 * r0, stop - s
            s = stop


class _Stream:
    """Raw outputs of one Philox stream from any position (the counter set, nothing before it generated)."""

    def __init__(self, key: np.ndarray):
        self.bg = np.random.Philox(key=key)
        self.state = self.bg.state

    def raw(self, first: int, count: int) -> np.ndarray:
        block, lane = divmod(first, 4)
        self.state["state"]["counter"][:] = (block, 0, 0, 0)
        self.state["buffer_pos"] = 4  # the next output starts block ``block``
        self.bg.state = self.state
        return self.bg.random_raw(count + lane)[lane:]


def _blocks(starts: np.ndarray, lengths: np.ndarray):
    """Runs -> blocks of pieces (first raw, raw count, values to skip, values to keep), ~``BLOCK`` raws each,
    with the position of the block's first value in the shard."""
    block, nraw, pos = [], 0, 0
    for piece in _pieces(starts, lengths, BLOCK):
        block.append(piece)
        nraw += piece[1]
        if nraw >= BLOCK:
            yield pos, block
            pos += sum(p[3] for p in block)
            block, nraw = [], 0
    if block:
        yield pos, block


def _workers() -> int:
    """Threads for one tensor's blocks: torch's intra-op count, at most 8 (the GIL is held between numpy calls)."""
    return max(1, min(8, torch.get_num_threads()))


@torch.no_grad()
def normal_(t: torch.Tensor, seed: int, name: str, std: float, full_shape: Optional[Sequence[int]] = None,
            dim: Optional[int] = None, index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fill ``t`` with ``std * z`` of stream (seed, name), each element's z taken at its flat position in the
    full tensor: ``t`` is ``full.index_select(dim, index)`` of a tensor of ``full_shape`` (default: ``t`` is
    the full tensor). Generated on the host block by block (blocks on ``torch.get_num_threads()`` threads:
    numpy releases the GIL; each block writes its own slice), copied into ``t`` on its device."""
    if t.device.type == "meta" or t.numel() == 0:
        return t
    full_shape = tuple(t.shape) if full_shape is None else tuple(full_shape)
    starts, lengths = shard_runs(full_shape, dim, index)
    if int(lengths.sum()) != t.numel():
        raise ValueError(f"{name}: a shard of {tuple(full_shape)} along dim {dim} has {int(lengths.sum())} "
                         f"elements, the tensor {t.numel()}")
    flat = t.detach().view(-1) if t.is_contiguous() else torch.empty(t.numel(), dtype=t.dtype, device=t.device)
    host = flat.numpy() if flat.device.type == "cpu" and flat.dtype in _NUMPY_DTYPES else None  # written in place
    key = stream_key(seed, name)
    local = threading.local()

    def fill(job):
        pos, block = job
        if getattr(local, "stream", None) is None:
            local.stream = _Stream(key)  # one Philox state per thread
        raw = [local.stream.raw(r0, count) for r0, count, _, _ in block]
        raw = np.concatenate(raw) if len(raw) > 1 else raw[0]
        n = sum(keep for _, _, _, keep in block)
        if not any(skip or keep != 2 * count for _, count, skip, keep in block):  # even runs: every value is used
            if host is not None:
                box_muller(raw, std, host[pos:pos + n])
            else:
                flat[pos:pos + n].copy_(torch.from_numpy(box_muller(raw, std)).to(t.dtype))
            return
        z = box_muller(raw, std)  # a run starts or ends at an odd position: drop the values outside it
        first = np.cumsum([0] + [2 * c for _, c, _, _ in block[:-1]]) + np.array([sk for _, _, sk, _ in block])
        keep = np.array([k for _, _, _, k in block], np.int64)
        idx = np.repeat(first - np.cumsum(np.concatenate([[0], keep[:-1]])), keep) + np.arange(n)
        if host is not None:
            host[pos:pos + n] = z[idx]
        else:
            flat[pos:pos + n].copy_(torch.from_numpy(z[idx]).to(t.dtype))

    jobs = _blocks(starts, lengths)
    workers = min(_workers(), -(-t.numel() // (2 * BLOCK)))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(fill, jobs):
                pass
    else:
        for job in jobs:
            fill(job)
    if not t.is_contiguous():
        t.copy_(flat.view(t.shape))
    return t
