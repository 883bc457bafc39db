import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from megatron.config.schema import DataConfig
from megatron.data.blended_dataset import blend_indices
from megatron.data.builder import build_datasets, split_documents
from megatron.data.gpt_dataset import GPTDataset
from megatron.data.indexed_dataset import MAGIC, IndexedDataset, IndexedDatasetBuilder
from megatron.errors import UserError
from tests.conftest import ROOT


def make_dataset(prefix, docs, dtype=np.uint16):
    b = IndexedDatasetBuilder(prefix, dtype)
    for d in docs:
        b.add_document(d)
    b.finalize()
    return IndexedDataset(prefix)


def test_indexed_roundtrip_and_megatron_header(tmp_path):
    docs = [[1, 2, 3], [4, 5], list(range(100, 110))]
    ds = make_dataset(str(tmp_path / "d"), docs)
    assert [ds[i].tolist() for i in range(3)] == docs
    assert ds.get(2, 3, 4).tolist() == [103, 104, 105, 106]
    raw = open(str(tmp_path / "d.idx"), "rb").read()
    assert raw[:9] == MAGIC
    assert struct.unpack("<Q", raw[9:17])[0] == 1 and raw[17] == 8  # version 1, uint16 code 8
    assert struct.unpack("<QQ", raw[18:34]) == (3, 4)  # 3 sequences, doc index [0, 1, 2, 3]
    assert ds.doc_idx.tolist() == [0, 1, 2, 3]
    assert ds.pointers.tolist() == [0, 6, 10]  # byte offsets


def test_corrupt_or_missing_files_are_user_errors(tmp_path):
    prefix = str(tmp_path / "d")
    make_dataset(prefix, [[1, 2, 3]])
    with open(prefix + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(UserError, match="corrupt or mismatched"):
        IndexedDataset(prefix)
    with open(prefix + ".idx", "r+b") as f:
        f.write(b"XXXX")
    with pytest.raises(UserError, match="not a Megatron MMIDIDX"):
        IndexedDataset(prefix)
    with pytest.raises(UserError, match="preprocess_data"):
        IndexedDataset(str(tmp_path / "missing"))


def test_gpt_samples_follow_the_document_stream_and_are_deterministic(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 1000, size=rng.integers(3, 40)).tolist() for _ in range(50)]
    ds = make_dataset(str(tmp_path / "d"), docs)
    a = GPTDataset("train", ds, np.arange(50), num_samples=40, seq_length=16, seed=5)
    b = GPTDataset("train", ds, np.arange(50), num_samples=40, seq_length=16, seed=5)  # loads the cache
    assert any(f.endswith("_indexmap") for f in os.listdir(tmp_path))
    stream = np.concatenate([docs[d] for d in a.doc_idx])
    for i in range(len(a)):
        s = a[i]
        assert len(s) == 17
        assert np.array_equal(s, b[i])
        j = a.shuffle_idx[i]
        assert np.array_equal(s, stream[j * 16: j * 16 + 17])
    c = GPTDataset("train", ds, np.arange(50), num_samples=40, seq_length=16, seed=6)
    assert not np.array_equal(a.shuffle_idx, c.shuffle_idx)


def test_split_documents():
    parts = split_documents(100, [0.98, 0.02, 0.0])
    assert [len(p) for p in parts] == [98, 2, 0]
    assert parts[1].tolist() == [98, 99]
    parts = split_documents(10, [1 / 3, 1 / 3, 1 / 3])
    assert sum(len(p) for p in parts) == 10


def test_blend_proportions():
    which, rank = blend_indices([0.3, 0.7], 1000)
    counts = np.bincount(which)
    assert abs(counts[0] - 300) <= 1 and abs(counts[1] - 700) <= 1
    for d in (0, 1):  # each dataset's samples are used in order, without repeats
        assert rank[which == d].tolist() == list(range(counts[d]))
    # any prefix is close to the weights (the greedy property)
    assert abs(np.bincount(which[:100], minlength=2)[0] - 30) <= 1


def test_blended_split_datasets(tmp_path):
    a = str(tmp_path / "a")
    b = str(tmp_path / "b")
    make_dataset(a, [[1] * 20 for _ in range(20)])
    make_dataset(b, [[2] * 20 for _ in range(20)])
    cfg = DataConfig(data_path=[(0.25, a), (0.75, b)], split="90,10,0", tokenizer_type="NullTokenizer")
    train, valid, test = build_datasets(cfg, seq_length=8, seed=1, num_samples=[200, 10, 0])
    firsts = [int(train[i][0]) for i in range(200)]
    assert abs(firsts.count(1) - 50) <= 1
    assert valid is not None and test is None


def test_separate_train_valid_files(tmp_path):
    """--train-data-path / --valid-data-path: each set is its own file, read whole (no --split)."""
    a, v = str(tmp_path / "a"), str(tmp_path / "v")
    make_dataset(a, [[1] * 20 for _ in range(10)])
    make_dataset(v, [[7] * 20 for _ in range(3)])
    cfg = DataConfig(train_data_path=[(1.0, a)], valid_data_path=[(1.0, v)], tokenizer_type="NullTokenizer")
    cfg.validate()
    train, valid, test = build_datasets(cfg, seq_length=8, seed=1, num_samples=[20, 5, 0])
    assert {int(t) for i in range(20) for t in train[i]} == {1}
    assert {int(t) for i in range(5) for t in valid[i]} == {7}
    assert test is None
    with pytest.raises(UserError, match="--data-path and --train-data-path"):
        DataConfig(data_path=[(1.0, a)], valid_data_path=[(1.0, v)], tokenizer_type="NullTokenizer").validate()
    with pytest.raises(UserError, match="need --train-data-path"):
        DataConfig(valid_data_path=[(1.0, v)], tokenizer_type="NullTokenizer").validate()


def test_preprocess_tool_jsonl_and_text(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps({"text": " ".join(str(i) for i in range(n, n + 5))}) for n in range(10)))
    out = str(tmp_path / "out")
    def cmd(inp, prefix):
        return [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", inp, "--output-prefix",
                prefix, "--tokenizer-type", "NullTokenizer", "--vocab-size", "100", "--append-eod", "--workers", "2"]

    r = subprocess.run(cmd(str(src), out), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "MB/s" in r.stdout
    ds = IndexedDataset(out + "_text_document")
    assert len(ds) == 10 and ds[3].tolist() == [3, 4, 5, 6, 7, 99]
    txt = tmp_path / "in.txt"
    txt.write_text("1 2\n3\n\n\n4 5\n\n6\n")
    assert subprocess.run(cmd(str(txt), out + "2"), capture_output=True).returncode == 0
    ds2 = IndexedDataset(out + "2_text_document")
    assert [ds2[i].tolist() for i in range(len(ds2))] == [[1, 2, 3, 99], [4, 5, 99], [6, 99]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "1"}\n{oops\n')
    r = subprocess.run(cmd(str(bad), out + "3"), capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "bad.jsonl:2" in r.stderr
