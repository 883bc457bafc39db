"""The catalogue of user mistakes: each gives a one-line error naming the flag or file, exit status 2."""
import os
import subprocess
import sys

import pytest

import pretrain_gpt_moe
from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.errors import UserError
from tests.conftest import ROOT
from tests.runs import mock_args

BASE = ["--train-iters", "1", "--micro-batch-size", "2", "--global-batch-size", "2"]


def tiny_data(tmp_path):
    prefix = str(tmp_path / "d_text_document")
    b = IndexedDatasetBuilder(prefix)
    for i in range(20):
        b.add_document(list(range(i, i + 30)))
    b.finalize()
    return prefix


def real(tmp_path, extra):
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--lr", "1e-3", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
            "--data-path", tiny_data(tmp_path)] + BASE + extra


CATALOGUE = [
    ("heads", lambda t: mock_args(BASE + ["--num-attention-heads", "5"]), "--num-attention-heads"),
    ("gbs", lambda t: mock_args(["--train-iters", "1", "--micro-batch-size", "3", "--global-batch-size", "4"]), "--global-batch-size"),
    ("seq>pos", lambda t: mock_args(BASE + ["--max-position-embeddings", "8"]), "--max-position-embeddings"),
    ("missing bin", lambda t: real(t, []) + ["--data-path", str(t / "nope")], "preprocess_data"),
    ("vocab file", lambda t: mock_args(BASE + ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(t / "v.json"),
                                                "--merge-file", str(t / "m.txt")]), "--vocab-file"),
    ("data-path weights", lambda t: real(t, []) + ["--data-path", "0.3", "A", "B"], "--data-path"),
    ("data-path weight nan", lambda t: real(t, []) + ["--data-path", "x", "A", "0.5", "B"], "--data-path"),
    ("split", lambda t: real(t, ["--split", "98,a,0"]), "--split"),
    ("fp16+bf16", lambda t: mock_args(BASE + ["--fp16", "--bf16"]), "--fp16 and --bf16"),
    ("no lr", lambda t: [a for a in mock_args(BASE) if a not in ("--lr", "3e-3")], "--lr"),
    ("pipeline parallel, one process", lambda t: mock_args(BASE + ["--pipeline-model-parallel-size", "2"]),
     "--pipeline-model-parallel-size"),
    ("pipeline parallel with ZeRO-2", lambda t: mock_args(BASE + ["--pipeline-model-parallel-size", "2", "--zero-stage",
                                                                  "2"]), "--zero-stage 2 does not combine with --pipeline"),
    ("zero-stage 4", lambda t: mock_args(BASE + ["--zero-stage", "4"]), "--zero-stage"),
    ("overlap with zero-stage 2", lambda t: mock_args(BASE + ["--zero-stage", "2", "--overlap-grad-reduce"]),
     "--overlap-grad-reduce does not combine with --zero-stage 2"),
    ("num-experts list", lambda t: mock_args(BASE + ["--num-experts", "4", "8", "8"]), "--num-experts"),
    ("ep divides experts", lambda t: mock_args(BASE + ["--num-experts", "6", "--moe-expert-parallel-size", "4"]), "--moe-expert-parallel-size"),
    ("ep divides dp", lambda t: mock_args(BASE + ["--num-experts", "4", "--moe-expert-parallel-size", "2"]), "data-parallel size"),
    ("topk > experts", lambda t: mock_args(BASE + ["--num-experts", "2", "--topk", "3"]), "--topk"),
    ("rsample top2", lambda t: mock_args(BASE + ["--num-experts", "4", "--topk", "2", "--moe-noisy-gate-policy", "RSample"]), "RSample"),
    ("no train length", lambda t: mock_args(["--micro-batch-size", "2"]), "--train-iters"),
    ("unknown flag", lambda t: mock_args(BASE + ["--no-such-flag"]), "--no-such-flag"),
    ("tokenizer type", lambda t: real(t, ["--tokenizer-type", "WordPiece"]), "--tokenizer-type"),
    ("load missing dir", lambda t: mock_args(BASE + ["--load", str(t / "nowhere")]), "--load"),
    ("tp", lambda t: mock_args(BASE + ["--tensor-model-parallel-size", "2"]), "--tensor-model-parallel-size"),
    ("mlp type", lambda t: mock_args(BASE + ["--num-experts", "4", "--mlp-type", "pyramid"]), "--mlp-type"),
]


@pytest.mark.parametrize("name,argv_fn,needle", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_user_error_catalogue(tmp_path, name, argv_fn, needle):
    with pytest.raises(UserError) as e:
        pretrain_gpt_moe.main(argv_fn(tmp_path))
    msg = str(e.value)
    assert needle in msg and "\n" not in msg


def test_architecture_mismatch_on_load_and_nothing_overwritten(tmp_path):
    ck = str(tmp_path / "ck")
    pretrain_gpt_moe.main(mock_args(BASE + ["--save", ck]))
    before = {f: os.path.getmtime(os.path.join(ck, "iter_0000001", f)) for f in os.listdir(os.path.join(ck, "iter_0000001"))}
    with pytest.raises(UserError, match="hidden_size: checkpoint 32 vs flags 64"):
        pretrain_gpt_moe.main(mock_args(BASE + ["--load", ck, "--save", ck, "--hidden-size", "64"]))
    after = {f: os.path.getmtime(os.path.join(ck, "iter_0000001", f)) for f in os.listdir(os.path.join(ck, "iter_0000001"))}
    assert before == after


def test_corrupt_index_file(tmp_path):
    argv = real(tmp_path, [])
    with open(str(tmp_path / "d_text_document.idx"), "r+b") as f:
        f.truncate(40)
    with pytest.raises(UserError, match="truncated or corrupt"):
        pretrain_gpt_moe.main(argv)


def test_entry_point_exit_status_and_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py")] + mock_args(BASE + ["--pipeline-model-parallel-size", "2"]),
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.startswith("error: world size 1 is not divisible by --tensor-model-parallel-size × "
                               "--pipeline-model-parallel-size") and r.stderr.count("\n") == 1
