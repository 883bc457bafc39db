#!/usr/bin/env python3
"""GPTDataset index build and load: time and memory at pretraining scale, on a synthetic dataset.

    python tools/bench/dataset_index.py --tokens 300e9 --seq-length 2048 --dir /tmp/idxbench \\
        [--old] [--mcore-python /tmp/mcore/bin/python]

Writes ``<dir>/synth.idx`` (random document sizes summing to --tokens, Megatron MMIDIDX layout) and
a sparse ``synth.bin`` of the right size (``truncate``: index building reads only the sizes), then
asks for one epoch of samples. Each measurement runs in a fresh child process:

* build: the first GPTDataset (index build + save), wall time and peak RSS above the RSS before it
  (``ru_maxrss`` against ``VmRSS`` of /proc/self/status);
* load: a second GPTDataset on the saved cache, wall time and the VmRSS increase;
* ``--old``: the original int64 algorithm (build + ``np.savez`` + full ``np.load``), for comparison;
* ``--mcore-python``: megatron-core's build (``_build_document_index``, ``helpers.build_sample_idx``,
  ``_build_shuffle_index``, ``np.save``; then ``np.load(mmap_mode="r")``), run with that interpreter
  from outside the checkout (our ``megatron`` package would shadow ``megatron.core``).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vm_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_synthetic(prefix: str, tokens: int, mean_doc: int, seed: int = 0, chunk: int = 1 << 24) -> int:
    """``prefix.idx`` with document sizes ~ uniform[1, 2 * mean_doc) summing to ``tokens``; sparse ``prefix.bin``."""
    rng = np.random.default_rng(seed)
    n = max(1, tokens // mean_doc)
    sizes = rng.integers(1, 2 * mean_doc, size=n, dtype=np.int32)
    total = int(sizes.sum(dtype=np.int64))
    # adjust to the exact token count, spread over the documents
    diff = tokens - total
    step = int(np.sign(diff))
    while diff:
        k = min(abs(diff), n)
        room = sizes[:k] + step >= 1
        sizes[:k][room] += step
        diff -= step * int(room.sum())
    with open(prefix + ".idx", "wb") as f:
        f.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", n)
                + struct.pack("<Q", n + 1))
        f.write(sizes.tobytes())
        offset = 0
        for s in range(0, n, chunk):  # byte pointers (uint16 tokens), streamed
            part = sizes[s:s + chunk].astype(np.int64)
            ptr = np.cumsum(part) - part + offset
            offset += int(part.sum())
            f.write((ptr * 2).tobytes())
        for s in range(0, n + 1, chunk):
            f.write(np.arange(s, min(s + chunk, n + 1), dtype=np.int64).tobytes())
    with open(prefix + ".bin", "wb") as f:
        f.truncate(tokens * 2)
    return n


OLD = '''
def old_build_indices(sizes, documents, num_samples, seq_length, seed):
    rng = np.random.RandomState(seed)
    doc_sizes = sizes[documents].astype(np.int64)
    tokens_per_epoch = int(doc_sizes.sum())
    num_epochs = max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))
    doc_idx = np.concatenate([rng.permutation(documents) for _ in range(num_epochs)]).astype(np.int64)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    cum = np.cumsum(sizes[doc_idx].astype(np.int64))
    starts = np.arange(total_samples, dtype=np.int64) * seq_length
    pos = np.searchsorted(cum, starts, side="right")
    offset = starts - (cum[pos] - sizes[doc_idx[pos]])
    sample_idx = np.stack([pos, offset], axis=1).astype(np.int64)
    shuffle_idx = rng.permutation(total_samples).astype(np.int64)
    return doc_idx, sample_idx, shuffle_idx
'''

MCORE = '''
from megatron.core.datasets import helpers
from megatron.core.datasets.gpt_dataset import _build_document_index, _build_shuffle_index
def mcore_build(sizes, n, num_samples, seq, seed, out):
    indices = np.arange(n, dtype=np.int32)
    tokens = int(sizes[indices].sum(dtype=np.int64))
    epochs = max(1, -(-(num_samples * seq + 1) // tokens))
    assert epochs == 1, "the bench asks for one epoch"
    rng = np.random.RandomState(seed)
    doc = _build_document_index(indices, epochs, rng, False)
    lengths = sizes.copy() if len(doc) * 2 > len(sizes) else sizes
    sample = helpers.build_sample_idx(lengths, doc, seq, epochs, tokens, True, 1)
    shuffle = _build_shuffle_index(sample.shape[0] - 1, sample.shape[0] - 1, rng)
    os.makedirs(out, exist_ok=True)
    for name, a in (("document_index", doc), ("sample_index", sample), ("shuffle_index", shuffle)):
        np.save(os.path.join(out, name + ".npy"), a, allow_pickle=True)
    return len(sample) - 1
def mcore_load(out):
    return [np.load(os.path.join(out, n + ".npy"), mmap_mode="r", allow_pickle=True)
            for n in ("document_index", "sample_index", "shuffle_index")]
'''

CHILD = '''
import json, os, resource, sys, time
import numpy as np
def vm_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("VmRSS:"))
def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
mode, prefix, cache, num_samples, seq, seed = {args!r}
n = int(np.memmap(prefix + ".idx", dtype="<u8", mode="r", offset=18, shape=(1,))[0])
sizes = np.memmap(prefix + ".idx", dtype=np.int32, mode="r", offset=34, shape=(n,))
if mode.startswith("new"):
    sys.path.insert(0, {root!r})
    from megatron.data.gpt_dataset import GPTDataset
    from megatron.data.indexed_dataset import IndexedDataset
    ds = IndexedDataset(prefix)
    docs = np.arange(n, dtype=np.int64)
elif mode.startswith("old"):
{old}
else:
{mcore}
rss0 = vm_rss_mb(); t0 = time.perf_counter()
if mode == "new-build" or mode == "new-load":
    g = GPTDataset("train", ds, docs, num_samples, seq, seed, cache_dir=cache)
    samples = len(g)
elif mode == "old-build":
    d, s, sh = old_build_indices(sizes, np.arange(n, dtype=np.int64), num_samples, seq, seed)
    np.savez(os.path.join(cache, "old.npz"), doc_idx=d, sample_idx=s, shuffle_idx=sh)
    samples = len(sh)
elif mode == "old-load":
    with np.load(os.path.join(cache, "old.npz")) as z:
        d, s, sh = z["doc_idx"], z["sample_idx"], z["shuffle_idx"]
    samples = len(sh)
elif mode == "mcore-build":
    samples = mcore_build(sizes, n, num_samples, seq, seed, os.path.join(cache, "mcore"))
else:
    d, s, sh = mcore_load(os.path.join(cache, "mcore")); samples = len(sh)
dt = time.perf_counter() - t0
rss1 = vm_rss_mb()
print(json.dumps(dict(mode=mode, seconds=dt, peak_mb=peak_rss_mb() - rss0, rss_increase_mb=rss1 - rss0,
                      samples=int(samples))))
'''


def indent(code: str) -> str:
    return "\n".join("    " + line for line in code.strip().splitlines())


def run_child(python: str, mode: str, prefix: str, cache: str, num_samples: int, seq: int, seed: int,
              cwd: str) -> dict:
    code = CHILD.format(root=ROOT, args=(mode, prefix, cache, num_samples, seq, seed), old=indent(OLD),
                        mcore=indent(MCORE))
    out = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=float, default=10e9)
    p.add_argument("--mean-doc-tokens", type=int, default=1840)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed at the end)")
    p.add_argument("--old", action="store_true", help="also time the original int64 / .npz algorithm")
    p.add_argument("--mcore-python", default=None, help="a python with megatron-core installed")
    a = p.parse_args(argv)
    work = a.dir or tempfile.mkdtemp(prefix="idxbench")
    os.makedirs(work, exist_ok=True)
    prefix = os.path.join(work, "synth")
    tokens = int(a.tokens)
    t0 = time.perf_counter()
    docs = write_synthetic(prefix, tokens, a.mean_doc_tokens)
    num_samples = (tokens - 1) // a.seq_length
    print(f"synthetic .idx: {docs:,} documents, {tokens:,} tokens, {num_samples:,} samples at seq {a.seq_length} "
          f"({time.perf_counter() - t0:.0f} s to write)", flush=True)
    rows = []
    runs = [("this repo", sys.executable, "new", ROOT)]
    if a.old:
        runs.append(("original (int64, .npz)", sys.executable, "old", ROOT))
    if a.mcore_python:
        runs.append(("megatron-core 0.16.1", a.mcore_python, "mcore", tempfile.gettempdir()))
    try:
        for label, python, mode, cwd in runs:
            cache = os.path.join(work, f"cache_{mode}")
            shutil.rmtree(cache, ignore_errors=True)
            os.makedirs(cache)
            b = run_child(python, f"{mode}-build", prefix, cache, num_samples, a.seq_length, a.seed, cwd)
            ld = run_child(python, f"{mode}-load", prefix, cache, num_samples, a.seq_length, a.seed, cwd)
            size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(cache) for f in fs)
            rows.append((label, b["seconds"], b["peak_mb"], size / 2**20, ld["seconds"], ld["rss_increase_mb"]))
            print(f"  {label}: {json.dumps(b)} {json.dumps(ld)}", flush=True)
    finally:
        if a.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| implementation | build s | build peak RSS +MB | cache MB | load s | load RSS +MB |")
    print("|---|---|---|---|---|---|")
    for label, bs, bp, mb, ls, lr in rows:
        print(f"| {label} | {bs:.1f} | {bp:,.0f} | {mb:,.0f} | {ls:.2f} | {lr:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
