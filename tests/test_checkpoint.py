import os
import shutil

import pytest
import torch

import pretrain_gpt_moe
from megatron.checkpoint.dcp_reader import SafeReader
from megatron.checkpoint.formats import FORMATS, SAVED_FORMAT, format_of
from megatron.checkpoint.layout import TRACKER
from megatron.checkpoint.weights_only import write_weights_checkpoint
from megatron.errors import UserError
from megatron.inference.load import load_model
from tests.runs import mock_args

BASE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--num-experts", "4"]


def test_exact_resume_single_process(tmp_path):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + ["--train-iters", "6", "--moe-train-capacity-factor", "0.5"])
    full = pretrain_gpt_moe.main(argv)["losses"]
    pretrain_gpt_moe.main(argv + ["--save", ck, "--exit-interval", "2"])
    pretrain_gpt_moe.main(argv + ["--load", ck, "--save", ck, "--exit-interval", "4"])
    resumed = pretrain_gpt_moe.main(argv + ["--load", ck])["losses"]
    assert resumed == full[4:]
    assert open(os.path.join(ck, TRACKER)).read() == "4"


def test_sharded_checkpoint_layout(tmp_path):
    ck = str(tmp_path / "ck")
    pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "2", "--save", ck]))
    d = os.path.join(ck, "iter_0000002")
    assert sorted(os.listdir(d)) == ["common.pt", "rng", "shards"]
    assert sorted(os.listdir(os.path.join(d, "shards"))) == [".metadata", "__0_0.distcp"]
    for f in ("common.pt", os.path.join("rng", "rank_00000.pt")):
        torch.load(os.path.join(d, f), weights_only=True)
    index = SafeReader(os.path.join(d, "shards")).read_metadata().state_dict_metadata
    assert tuple(index["model.layers.1.mlp.experts.w1"].size)[0] == 4  # the expert stack at its full size
    assert {"optim.layers.1.mlp.experts.w1.exp_avg", "optim.layers.1.mlp.experts.w1.exp_avg_sq",
            "optim.word_embeddings.weight.step"} <= set(index)
    info = FORMATS[2].describe_files(d)
    assert info["shard_files"] == 1 and info["optimizer_state"] and info["bytes"] > 0


def test_full_tensor_checkpoint_layout_and_safe_loading(tmp_path):
    ck = str(tmp_path / "ck")
    pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "2", "--save", ck, "--ckpt-format", "torch"]))
    d = os.path.join(ck, "iter_0000002")
    assert sorted(os.listdir(d)) == ["common.pt", "experts", "model_dense.pt", "optim_dense.pt", "rng"]
    for root, _, files in os.walk(d):
        for f in files:  # every file loads without unpickling arbitrary objects
            torch.load(os.path.join(root, f), weights_only=True)
    common = torch.load(os.path.join(d, "common.pt"), weights_only=True)
    assert common["iteration"] == 2 and common["consumed_samples"] == 8
    blob = torch.load(os.path.join(d, "experts", "layer_001_expert_0002.pt"), weights_only=True)
    assert set(blob) >= {"w1", "b1", "w2", "b2", "optim.w1.exp_avg", "optim.w1.exp_avg_sq"}


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + ["--train-iters", "4"])
    pretrain_gpt_moe.main(argv + ["--save", ck, "--exit-interval", "2"])
    # a save killed half way leaves only its temporary directory behind
    partial = os.path.join(ck, ".iter_0000004.tmp")
    shutil.copytree(os.path.join(ck, "iter_0000002"), partial)
    os.remove(os.path.join(partial, "shards", "__0_0.distcp"))
    assert open(os.path.join(ck, TRACKER)).read() == "2"
    out = pretrain_gpt_moe.main(argv + ["--load", ck, "--save", ck])
    assert out["iteration"] == 4 and not os.path.exists(partial)
    assert open(os.path.join(ck, TRACKER)).read() == "4"


def test_finetune_and_no_load_optim(tmp_path):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + ["--train-iters", "2"])
    pretrain_gpt_moe.main(argv + ["--save", ck])
    out = pretrain_gpt_moe.main(argv + ["--load", ck, "--finetune"])
    assert len(out["losses"]) == 2  # iteration reset to 0: trains 2 more
    out = pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "3"]) + ["--load", ck, "--no-load-optim"])
    assert len(out["losses"]) == 1


def test_unknown_format_is_a_one_line_error_naming_file_and_field(tmp_path):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + ["--train-iters", "2"])
    pretrain_gpt_moe.main(argv + ["--save", ck])
    common_file = os.path.join(ck, "iter_0000002", "common.pt")
    common = torch.load(common_file, weights_only=True)
    assert common["format"] == SAVED_FORMAT.VERSION == 2 and FORMATS[2] is SAVED_FORMAT
    common["format"] = 99
    torch.save(common, common_file)
    for load in (lambda: pretrain_gpt_moe.main(argv + ["--load", ck]), lambda: load_model(ck, "cpu")):
        with pytest.raises(UserError) as e:
            load()
        message = str(e.value)
        assert common_file in message and "'format'" in message and "99" in message and "\n" not in message, message
    assert format_of({}, "common.pt") is FORMATS[1]  # no field: the only layout written before format 2
    with pytest.raises(UserError, match="format '1'"):
        format_of({"format": "1"}, "common.pt")


def test_weights_only_checkpoint_loads_with_the_same_weights(tmp_path):
    ck, out = str(tmp_path / "ck"), str(tmp_path / "weights")
    pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "2", "--save", ck]))
    lm = load_model(ck, "cpu")
    path = write_weights_checkpoint(out, lm.model, lm.config, iteration=2, consumed_samples=8)
    assert path == os.path.join(out, "iter_0000002") and open(os.path.join(out, TRACKER)).read() == "2"
    assert sorted(os.listdir(path)) == ["common.pt", "shards"]
    again = load_model(out, "cpu")
    for (n, a), (_, b) in zip(lm.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), n
