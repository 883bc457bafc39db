"""GPTDataset / BlendedDataset index maps: same values as the original algorithm, int32, memory-mapped,
built once across ranks, rebuilt when stale."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch.distributed as dist

from megatron.config.schema import DataConfig
from megatron.data import index_cache
from megatron.data.blended_dataset import BlendedDataset, blend_indices
from megatron.data.builder import build_datasets
from megatron.data.gpt_dataset import GPTDataset, build_indices
from megatron.data.indexed_dataset import IndexedDataset
from megatron.errors import UserError
from tests.conftest import ROOT
from tests.dist_utils import run_distributed
from tests.test_data import make_dataset


def old_build_indices(sizes, documents, num_samples, seq_length, seed):
    """The original int64 algorithm (the oracle): the new one must give the same values."""
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


def test_same_indices_as_the_original_algorithm():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(60):
        n = int(rng.integers(1, 300))
        sizes = rng.integers(0, 60, size=n).astype(np.int32)  # empty documents included
        docs = np.arange(int(rng.integers(0, n)), n, dtype=np.int64)
        if sizes[docs].sum() <= 1:
            continue
        seq, want, seed = int(rng.integers(1, 40)), int(rng.integers(1, 600)), int(rng.integers(0, 1000))
        old = old_build_indices(sizes, docs, want, seq, seed)
        new = build_indices(sizes, docs, want, seq, seed, chunk_docs=int(rng.integers(1, 64)))  # many chunks
        for o, a in zip(old, new):
            assert np.array_equal(o, a)
            assert a.dtype == np.int32
        assert len(new[2]) >= want
        checked += 1
    assert checked > 40


def test_int64_only_where_values_do_not_fit():
    assert index_cache.int_dtype(2**31 - 1) == np.int32
    assert index_cache.int_dtype(2**31) == np.int64


def test_indices_are_memory_mapped_int32_and_a_stale_cache_is_rebuilt(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(0, 1000, size=rng.integers(3, 40)).tolist() for _ in range(50)]
    ds = make_dataset(str(tmp_path / "d"), docs)
    before = index_cache.builds
    a = GPTDataset("train", ds, np.arange(50), num_samples=40, seq_length=16, seed=5)
    b = GPTDataset("train", ds, np.arange(50), num_samples=40, seq_length=16, seed=5)
    assert index_cache.builds == before + 1  # the second one mapped the cache
    for arr in (a.doc_idx, a.sample_idx, a.shuffle_idx, b.doc_idx, b.sample_idx, b.shuffle_idx):
        assert isinstance(arr, np.memmap) and arr.dtype == np.int32 and not arr.flags.writeable
    assert sorted(os.listdir(a.cache_path)) == ["doc_idx.npy", "sample_idx.npy", "shuffle_idx.npy"]
    expected = old_build_indices(np.asarray(ds.sizes), np.arange(50), 40, 16, 5)
    for o, arr in zip(expected, (b.doc_idx, b.sample_idx, b.shuffle_idx)):
        assert np.array_equal(o, arr)
    # a truncated file (a crash, a full disk) is detected and rebuilt
    path = os.path.join(a.cache_path, "sample_idx.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 8)
    c = GPTDataset("train", ds, np.arange(50), num_samples=40, seq_length=16, seed=5)
    assert index_cache.builds == before + 2
    assert np.array_equal(c.sample_idx, expected[1]) and isinstance(c.sample_idx, np.memmap)
    # a missing array too
    os.remove(os.path.join(a.cache_path, "shuffle_idx.npy"))
    d = GPTDataset("train", ds, np.arange(50), num_samples=40, seq_length=16, seed=5)
    assert index_cache.builds == before + 3 and np.array_equal(d.shuffle_idx, expected[2])
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # no temporary left behind


def test_read_only_cache_dir_keeps_indices_in_memory(tmp_path, monkeypatch):
    ds = make_dataset(str(tmp_path / "d"), [[1, 2, 3, 4, 5]] * 10)
    monkeypatch.setattr(index_cache, "save", lambda path, arrays: False)
    a = GPTDataset("train", ds, np.arange(10), num_samples=5, seq_length=4, seed=1)
    assert not isinstance(a.shuffle_idx, np.memmap) and len(a) >= 5


def test_blend_indices_cached_and_unchanged(tmp_path):
    which, rank = blend_indices([0.25, 0.75], 500)
    sizes = [1000, 1000]
    datasets = [list(range(n)) for n in sizes]
    before = index_cache.builds
    a = BlendedDataset(datasets, [0.25, 0.75], 500, str(tmp_path))
    b = BlendedDataset(datasets, [0.25, 0.75], 500, str(tmp_path))
    assert index_cache.builds == before + 1
    assert isinstance(b.dataset_index, np.memmap) and isinstance(b.dataset_sample_index, np.memmap)
    assert np.array_equal(a.dataset_index, which) and np.array_equal(b.dataset_sample_index, rank)
    with pytest.raises(ValueError, match="blend needs"):
        BlendedDataset([list(range(10)), list(range(1000))], [0.25, 0.75], 500, str(tmp_path))


def _build_in_two_ranks(rank, prefix, other, cache_dir):
    dist.init_process_group("gloo")
    try:
        ds = IndexedDataset(prefix)
        cfg = DataConfig(data_path=[(0.5, prefix), (0.5, other)], split="90,10,0", tokenizer_type="NullTokenizer",
                         data_cache_path=cache_dir)
        train, _, _ = build_datasets(cfg, seq_length=8, seed=3, num_samples=[300, 20, 0])
        single = GPTDataset("x", ds, np.arange(20), num_samples=30, seq_length=8, seed=3, cache_dir=cache_dir)
        samples = [train[i].tolist() for i in range(len(train))] + [single[i].tolist() for i in range(len(single))]
        mapped = all(isinstance(a, np.memmap) for a in (single.doc_idx, single.shuffle_idx, train.dataset_index))
        return {"builds": index_cache.builds, "samples": samples, "mapped": mapped}
    finally:
        dist.destroy_process_group()


def test_built_once_across_ranks(tmp_path):
    prefix, other = str(tmp_path / "d"), str(tmp_path / "e")
    rng = np.random.default_rng(2)
    for p in (prefix, other):
        make_dataset(p, [rng.integers(0, 100, size=rng.integers(3, 30)).tolist() for _ in range(40)])
    out = run_distributed(_build_in_two_ranks, 2, str(tmp_path / "run"), prefix, other, str(tmp_path / "cache"))
    # rank 0 built the 2 x 2 split index maps, the blends of train and valid and the single dataset: 7
    assert out[0]["builds"] == 7 and out[1]["builds"] == 0
    assert out[0]["samples"] == out[1]["samples"]
    assert out[0]["mapped"] and out[1]["mapped"]


def _fail_on_rank0(rank, cache_dir):
    dist.init_process_group("gloo")
    try:
        def build():
            if rank == 0:
                raise MemoryError("no room")
            return {"a": np.arange(3)}
        try:
            index_cache.cached(os.path.join(cache_dir, "entry"), ("a",), build)
        except UserError as e:
            return str(e)
        return "no error"
    finally:
        dist.destroy_process_group()


def test_a_failed_build_is_one_error_on_every_rank(tmp_path):
    out = run_distributed(_fail_on_rank0, 2, str(tmp_path / "run"), str(tmp_path / "cache"), timeout=120)
    assert out[0] == out[1] and "rank 0" in out[0] and "MemoryError: no room" in out[0]


def test_bench_runs_at_toy_size(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench", "dataset_index.py"), "--tokens", "2e7",
                          "--old", "--dir", str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| this repo |" in res.stdout and "| original (int64, .npz) |" in res.stdout
