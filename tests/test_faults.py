"""The fault catalogue of the training side: each bad input is one line naming its cause, exit status 2,
and every file already saved is byte-identical afterwards.

Each case prepares its fault in a fresh copy of a real checkpoint (``ck``) and a real indexed dataset,
runs ``pretrain_gpt_moe.main`` in-process the way the entry point does (a UserError's ``exit_code`` is the
process status; ``test_errors.test_entry_point_exit_status_and_one_line`` proves that mapping through a
real process) and compares the checkpoint directory's bytes before and after.
"""
import hashlib
import os
import pickle
import shutil
import struct

import numpy as np
import pytest
import torch

import pretrain_gpt_moe
from megatron.checkpoint.layout import TRACKER
from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.errors import UserError
from tests.runs import mock_args

BASE = ["--micro-batch-size", "2", "--global-batch-size", "2", "--num-experts", "4"]
SAMPLES = ["--micro-batch-size", "2", "--global-batch-size", "4", "--num-experts", "4", "--train-samples", "8"]
IT1 = "iter_0000001"


class Exploit:
    """A pickle that would run a shell command when unpickled without ``weights_only``."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/megatron_moe_test_pwned",))


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A checkpoint in the full-tensor format (1), whose files the catalogue damages one by one; the sharded
    format's faults start from :func:`sharded`."""
    ck = str(tmp_path_factory.mktemp("golden") / "ck")
    pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "1", "--save", ck, "--ckpt-format", "torch"]))
    return ck


def snapshot(root):
    """Every file's hash (and every symbolic link's target) under ``root``, by relative path."""
    out = {}
    for d, dirs, files in os.walk(root):
        for f in files + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = (os.readlink(p) if os.path.islink(p) else
                                             hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


def run_main(argv):
    """(exit status, message) as the entry point would report them."""
    try:
        pretrain_gpt_moe.main(argv)
    except UserError as e:
        return e.exit_code, str(e)
    return 0, ""


# ---------------------------------------------------------------------------------------------- data


def make_data(t, docs=None, dtype=np.int32, name="d"):
    prefix = str(t / f"{name}_text_document")
    b = IndexedDatasetBuilder(prefix, dtype=dtype)
    for doc in docs if docs is not None else [list(range(i, i + 30)) for i in range(20)]:
        b.add_document(doc)
    b.finalize()
    return prefix


def data_args(t, ck, prefix, extra=()):
    return ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16", "--lr", "1e-3",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "128", "--data-path", prefix, "--train-iters", "2",
            "--micro-batch-size", "2", "--global-batch-size", "2", "--save", str(t / "data_ck"),  # not the golden one
            "--data-cache-path", str(t / "cache")] \
        + list(extra)


def blend(t, ck, wa, wb):
    """--data-path WA A WB B (the last --data-path on the command line wins)."""
    return data_args(t, ck, make_data(t)) + ["--data-path", wa, make_data(t, name="a"), wb, make_data(t, name="b")]


def patch_idx(prefix, fn):
    """fn(sizes, pointers, doc_idx) edits the index arrays in place; the file is rewritten."""
    path = prefix + ".idx"
    raw = bytearray(open(path, "rb").read())
    n, d = struct.unpack("<Q", raw[18:26])[0], struct.unpack("<Q", raw[26:34])[0]
    sizes = np.frombuffer(raw, np.int32, n, 34).copy()
    pointers = np.frombuffer(raw, np.int64, n, 34 + 4 * n).copy()
    doc_idx = np.frombuffer(raw, np.int64, d, 34 + 12 * n).copy()
    fn(sizes, pointers, doc_idx)
    raw[34:34 + 4 * n] = sizes.tobytes()
    raw[34 + 4 * n:34 + 12 * n] = pointers.tobytes()
    raw[34 + 12 * n:] = doc_idx.tobytes()
    open(path, "wb").write(bytes(raw))


def pointer_past_end(t, ck):
    p = make_data(t)
    patch_idx(p, lambda s, ptr, d: ptr.__setitem__(-1, ptr[-1] + 4000))
    return data_args(t, ck, p)


def negative_pointer(t, ck):
    p = make_data(t)
    patch_idx(p, lambda s, ptr, d: ptr.__setitem__(3, -8))
    return data_args(t, ck, p)


def doc_index_corrupt(t, ck):
    p = make_data(t)
    patch_idx(p, lambda s, ptr, d: d.__setitem__(2, 0))
    return data_args(t, ck, p)


def append_to_bin(t, ck):
    p = make_data(t)
    with open(p + ".bin", "ab") as f:
        f.write(b"\0" * 8)
    return data_args(t, ck, p)


def bad_magic(t, ck):
    p = make_data(t)
    with open(p + ".idx", "r+b") as f:
        f.write(b"NOTINDEX!")
    return data_args(t, ck, p)


def truncated_idx(t, ck):
    p = make_data(t)
    with open(p + ".idx", "r+b") as f:
        f.truncate(60)
    return data_args(t, ck, p)


def missing_bin(t, ck):
    p = make_data(t)
    os.remove(p + ".bin")
    return data_args(t, ck, p)


# ---------------------------------------------------------------------------------------------- checkpoints


def load_args(ck, extra=()):
    return mock_args(BASE + ["--train-iters", "2", "--load", ck, "--save", ck] + list(extra))


def write_tracker(ck, data: bytes):
    open(os.path.join(ck, TRACKER), "wb").write(data)
    return load_args(ck)


def replace_file(ck, rel, obj):
    torch.save(obj, os.path.join(ck, IT1, rel))
    return load_args(ck)


def edit_blob(ck, rel, fn):
    path = os.path.join(ck, IT1, rel)
    blob = torch.load(path, weights_only=True)
    fn(blob)
    torch.save(blob, path)
    return load_args(ck)


def truncate_file(ck, rel, size):
    with open(os.path.join(ck, IT1, rel), "r+b") as f:
        f.truncate(size)
    return load_args(ck)


def aux_free_checkpoint(ck):
    """The golden run's layout trained with the aux-loss-free router instead, loaded with the default top-k one."""
    shutil.rmtree(ck)
    pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "1", "--save", ck, "--moe-router-type", "aux_free"]))
    return load_args(ck)


def foreign_common(ck):
    return replace_file(ck, "common.pt", {"iteration": 1, "model": {"w": torch.zeros(2)}})


EXPERT = os.path.join("experts", "layer_001_expert_0002.pt")
SHARD, INDEX = os.path.join("shards", "__0_0.distcp"), os.path.join("shards", ".metadata")


def sharded(ck, damage):
    """The golden run saved in the sharded format (2) instead, then ``damage(iteration folder)``."""
    shutil.rmtree(ck)
    pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "1", "--save", ck]))
    damage(os.path.join(ck, IT1))
    return load_args(ck)


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def write_bytes(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)

CATALOGUE = [
    # batch arithmetic and run length
    ("gbs 0", lambda t, ck: mock_args(["--micro-batch-size", "2", "--global-batch-size", "0", "--train-iters", "2",
                                       "--save", ck]), "--global-batch-size must be >= 1"),
    ("gbs negative", lambda t, ck: mock_args(["--micro-batch-size", "2", "--global-batch-size", "-4", "--train-iters", "2",
                                              "--save", ck]), "--global-batch-size must be >= 1"),
    ("mbs 0", lambda t, ck: mock_args(["--micro-batch-size", "0", "--train-iters", "2", "--save", ck]), "--micro-batch-size"),
    ("train-iters negative", lambda t, ck: mock_args(BASE + ["--train-iters", "-3", "--save", ck]), "--train-iters"),
    ("train-samples negative", lambda t, ck: mock_args(BASE + ["--train-samples", "-3", "--save", ck]), "--train-samples"),
    ("ramp-up zero increment", lambda t, ck: mock_args(SAMPLES + ["--rampup-batch-size", "2", "0", "4", "--save", ck]),
     "the increment must be >= 1"),
    ("ramp-up zero start", lambda t, ck: mock_args(SAMPLES + ["--rampup-batch-size", "0", "2", "4", "--save", ck]),
     "the start batch size must be >= 1"),
    ("ramp-up negative samples", lambda t, ck: mock_args(SAMPLES + ["--rampup-batch-size", "2", "2", "-4", "--save", ck]),
     "ramp-up samples must be >= 0"),
    ("ramp-up start > gbs", lambda t, ck: mock_args(SAMPLES + ["--rampup-batch-size", "8", "2", "4", "--save", ck]),
     "exceeds --global-batch-size"),
    ("ramp-up with train-iters", lambda t, ck: mock_args(BASE + ["--train-iters", "2", "--rampup-batch-size", "2", "2", "4"]),
     "--rampup-batch-size needs --train-samples"),
    ("max-skipped negative", lambda t, ck: mock_args(BASE + ["--train-iters", "2", "--max-skipped-iterations", "-1"]),
     "--max-skipped-iterations"),
    ("save-interval 0", lambda t, ck: mock_args(BASE + ["--train-iters", "2", "--save", ck, "--save-interval", "0"]),
     "--save-interval"),
    ("log-interval 0", lambda t, ck: mock_args(BASE + ["--train-iters", "2", "--log-interval", "0"]), "--log-interval"),
    ("seed 2^70", lambda t, ck: mock_args(BASE + ["--train-iters", "2", "--seed", str(2**70)]),
     f"--seed {2**70}: must be an integer in [0, 2^32)"),  # was numpy's ValueError traceback at model build
    ("seed negative", lambda t, ck: mock_args(BASE + ["--train-iters", "2", "--seed", "-5"]),
     "--seed -5: must be an integer in [0, 2^32)"),
    # data
    ("blend weight nan", lambda t, ck: blend(t, ck, "nan", "0.5"), "NaN or infinity"),
    ("blend weight inf", lambda t, ck: blend(t, ck, "inf", "0.5"), "NaN or infinity"),
    ("blend weights zero", lambda t, ck: blend(t, ck, "0", "0"), "sum to 0"),
    ("idx pointer past bin", pointer_past_end, "outside"),
    ("idx negative pointer", negative_pointer, "outside"),
    ("idx document index", doc_index_corrupt, "document index"),
    ("bin longer than index", append_to_bin, "its index describes"),
    ("idx bad magic", bad_magic, "bad header"),
    ("idx truncated", truncated_idx, "truncated or corrupt"),
    ("bin missing", missing_bin, "not found"),
    ("token id >= vocab", lambda t, ck: data_args(t, ck, make_data(t, [list(range(100, 130)) + [200]] * 20)),
     "token id 200"),
    ("negative token id", lambda t, ck: data_args(t, ck, make_data(t, [list(range(30)) + [-1]] * 20)), "token id -1"),
    ("empty train split", lambda t, ck: data_args(t, ck, make_data(t), ["--split", "0,50,50"]),
     "leaves no training documents"),
    ("split too small", lambda t, ck: data_args(t, ck, make_data(t, [[1, 2, 3]] * 4)), "too few tokens"),
    # --save
    ("save is a file", lambda t, ck: mock_args(BASE + ["--train-iters", "2", "--save", os.path.join(ck, TRACKER)]),
     "this is a file"),
    ("save under a file", lambda t, ck: mock_args(BASE + ["--train-iters", "2", "--save", os.path.join(ck, TRACKER, "x")]),
     "cannot create the directory"),
    # --load
    ("load dir missing", lambda t, ck: mock_args(BASE + ["--train-iters", "2", "--load", str(t / "nowhere")]),
     "no such directory"),
    ("finetune from missing dir", lambda t, ck: mock_args(BASE + ["--train-iters", "2", "--finetune", "--load",
                                                                 str(t / "nowhere"), "--save", ck]), "no such directory"),
    ("tracker not utf-8", lambda t, ck: write_tracker(ck, b"\xff\xfe1\x00"), "not UTF-8"),
    ("tracker latin-1", lambda t, ck: write_tracker(ck, "1é".encode("latin-1")), "not UTF-8"),
    ("tracker not a number", lambda t, ck: write_tracker(ck, b"one"), "not an iteration number"),
    ("tracker names missing dir", lambda t, ck: write_tracker(ck, b"7"), "names iteration 7"),
    ("foreign common.pt", lambda t, ck: foreign_common(ck), "not a checkpoint of this framework"),
    ("common.pt a tensor", lambda t, ck: replace_file(ck, "common.pt", torch.zeros(3)), "not a checkpoint of this framework"),
    ("malicious common.pt", lambda t, ck: replace_file(ck, "common.pt", {"x": Exploit()}), "refused as unsafe"),
    ("malicious expert", lambda t, ck: replace_file(ck, EXPERT, {"w1": Exploit()}), "refused as unsafe"),
    ("truncated dense weights", lambda t, ck: truncate_file(ck, "model_dense.pt", 100), "is corrupt"),
    ("missing dense weights", lambda t, ck: os.remove(os.path.join(ck, IT1, "model_dense.pt")) or load_args(ck),
     "is incomplete"),
    ("expert of broadcastable shape", lambda t, ck: edit_blob(ck, EXPERT, lambda b: b.__setitem__("w1", b["w1"][:1])),
     "holds (1,"),
    ("expert tensor missing", lambda t, ck: edit_blob(ck, EXPERT, lambda b: b.pop("b2")), "holds nothing for b2"),
    ("dense tensor wrong shape", lambda t, ck: edit_blob(ck, "model_dense.pt", lambda b: b.__setitem__(
        "word_embeddings.weight", b["word_embeddings.weight"][:, :16])), "has shape"),
    ("dense tensor missing", lambda t, ck: edit_blob(ck, "model_dense.pt", lambda b: b.pop(sorted(b)[0])),
     "is missing from"),
    ("sharded: truncated shard", lambda t, ck: sharded(ck, lambda d: truncate(os.path.join(d, SHARD), 1000)),
     "the checkpoint is damaged"),
    ("sharded: missing shard", lambda t, ck: sharded(ck, lambda d: os.remove(os.path.join(d, SHARD))),
     "the checkpoint is damaged"),
    ("sharded: missing index", lambda t, ck: sharded(ck, lambda d: os.remove(os.path.join(d, INDEX))),
     "the checkpoint is incomplete"),
    ("sharded: garbage index", lambda t, ck: sharded(ck, lambda d: write_bytes(os.path.join(d, INDEX), b"\x80\x04junk")),
     "refused as unsafe or unreadable"),
    ("sharded: malicious index", lambda t, ck: sharded(ck, lambda d: write_bytes(
        os.path.join(d, INDEX), pickle.dumps(Exploit()))), "refused as unsafe"),
    ("architecture differs", lambda t, ck: load_args(ck, ["--hidden-size", "64"]), "architecture differs"),
    ("experts differ", lambda t, ck: load_args(ck, ["--num-experts", "8"]), "experts_per_layer"),
    ("router topk loaded as aux_free", lambda t, ck: load_args(ck, ["--moe-router-type", "aux_free"]),
     "trained with --moe-router-type topk but the flags say --moe-router-type aux_free"),
    ("router aux_free loaded as topk", lambda t, ck: aux_free_checkpoint(ck),
     "trained with --moe-router-type aux_free but the flags say --moe-router-type topk"),
]


@pytest.mark.parametrize("name,prepare,needle", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_fault_catalogue(tmp_path, golden, name, prepare, needle):
    ck = str(tmp_path / "ck")
    shutil.copytree(golden, ck)
    argv = prepare(tmp_path, ck)
    before = snapshot(ck)
    status, message = run_main(argv)
    assert status == 2, (status, message)
    assert needle in message and "\n" not in message, message
    assert snapshot(ck) == before  # nothing saved, moved or deleted
    assert not os.path.exists("/tmp/megatron_moe_test_pwned")


def test_catalogue_size():
    assert len(CATALOGUE) >= 40
