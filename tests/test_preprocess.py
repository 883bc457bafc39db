"""tools/preprocess_data.py and tools/merge_datasets.py: bad inputs, streaming in bounded memory, shards."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron.data.indexed_dataset import IndexedDataset
from megatron.errors import UserError
from tests.conftest import ROOT, require_shared
from tools import merge_datasets, preprocess_data

NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1000000000"]


def run(tmp_path, inp, extra=(), prefix="out"):
    return preprocess_data.main(["--input", str(inp), "--output-prefix", str(tmp_path / prefix), "--quiet"] + NULL
                                + list(extra))


def existing_output(tmp_path):
    """A dataset already at the output prefix: a failing run must leave it byte-identical."""
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "1 2 3"}) + "\n")
    run(tmp_path, good)
    return {p: open(tmp_path / p, "rb").read() for p in ("out_text_document.bin", "out_text_document.idx")}


@pytest.mark.parametrize("name,content,message", [
    ("latin1.txt", "caf\u00e9 1 2\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9\); convert it first"),
    ("num.jsonl", b'{"text": 12}\n', r"num.jsonl:1: key 'text' holds a int, not a string"),
    ("null.jsonl", b'{"text": "1"}\n{"text": null}\n', r"null.jsonl:2: key 'text' holds a null, not a string"),
    ("list.jsonl", b'[1, 2]\n', r"list.jsonl:1: a JSON list, not an object"),
    ("empty.jsonl", b"", r"no text found \(0 documents, 0 tokens\); nothing written"),
    ("blank.txt", b"\n\n  \n", r"no text found"),
    ("emptytext.jsonl", b'{"text": ""}\n', r"no text found \(1 documents, 0 tokens\)"),
])
def test_bad_input_is_one_line_and_overwrites_nothing(tmp_path, name, content, message):
    before = existing_output(tmp_path)
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises(UserError, match=message):
        run(tmp_path, bad)
    for p, data in before.items():
        assert open(tmp_path / p, "rb").read() == data
    assert sorted(os.listdir(tmp_path)) == sorted(["good.jsonl", name] + list(before))  # no temp file left


def test_json_keys_cannot_leave_the_output_directory(tmp_path):
    inp = tmp_path / "a.jsonl"
    inp.write_text(json.dumps({"../x": "1 2"}) + "\n")
    with pytest.raises(UserError, match=r"--json-keys '\.\./x': .*without '/'"):
        run(tmp_path, inp, ["--json-keys", "../x"])
    r = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(inp), "--output-prefix",
                        str(tmp_path / "o"), "--json-keys", "../x"] + NULL, cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: --json-keys")
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl"] and not os.path.exists(tmp_path.parent / "x_document.bin")


def test_shards_merge_into_the_single_output_and_fast_equals_python(tmp_path):
    src = require_shared("corpus", "gutenberg", "valid.txt")
    text = tmp_path / "g.txt"
    with open(src, encoding="utf-8") as f:
        text.write_text(f.read(300_000), encoding="utf-8")
    gpt2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", require_shared("gpt2", "gpt2-vocab.json"),
            "--merge-file", require_shared("gpt2", "gpt2-merges.txt"), "--append-eod", "--workers", "2", "--quiet"]
    args = ["--input", str(text)] + gpt2
    preprocess_data.main(args + ["--output-prefix", str(tmp_path / "one")])
    (tmp_path / "shards").mkdir()
    preprocess_data.main(args + ["--output-prefix", str(tmp_path / "shards" / "g"), "--max-shard-size", "0.1"])
    assert len([p for p in os.listdir(tmp_path / "shards") if p.endswith(".idx")]) == 3
    merge_datasets.main(["--input", str(tmp_path / "shards"), "--output-prefix", str(tmp_path / "merged")])
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"one_text_document{ext}", "rb").read() == open(tmp_path / f"merged{ext}", "rb").read()
    env = dict(os.environ, MEGATRON_PYTHON_BPE="1")  # the pure-Python BPE writes the same bytes
    subprocess.run([sys.executable, "tools/preprocess_data.py", "--output-prefix", str(tmp_path / "py")] + args,
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    for ext in (".bin", ".idx"):
        assert open(tmp_path / f"one_text_document{ext}", "rb").read() == open(tmp_path / f"py_text_document{ext}", "rb").read()
    ds = IndexedDataset(str(tmp_path / "merged"))
    assert ds.num_documents > 100 and int(ds.sizes.sum()) > 50_000


def peak_rss_mb(tmp_path, inp, workers):
    code = ("import resource, sys; sys.argv = ['preprocess_data.py'] + sys.argv[1:]; "
            "from tools import preprocess_data; preprocess_data.main(); "
            "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    r = subprocess.run([sys.executable, "-c", code, "--input", str(inp), "--output-prefix", str(tmp_path / inp.stem),
                        "--workers", str(workers), "--quiet"] + NULL, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return float(r.stdout.split("RSS")[-1])


def test_input_larger_than_the_memory_it_may_use_streams(tmp_path):
    """A 40 MB input is processed with the same peak memory (within 15 MB) as a 2 MB one: streamed, not read."""
    para = " ".join(str(100000000 + i) for i in range(200)) + "\n\n"  # one 2 KB document
    small, big = tmp_path / "small.txt", tmp_path / "big.txt"
    small.write_text(para * 1000)
    with open(big, "w") as f:
        for _ in range(20):
            f.write(para * 1000)
    for workers in (1, 2):
        growth = peak_rss_mb(tmp_path, big, workers) - peak_rss_mb(tmp_path, small, workers)
        assert growth < 15, f"peak memory grew by {growth:.0f} MB for 38 MB more input (workers {workers})"
    ds = IndexedDataset(str(tmp_path / "big_text_document"))
    assert ds.num_documents == 20_000 and int(ds.sizes.sum()) == 4_000_000
    assert int(np.asarray(ds[0])[0]) == 100000000
