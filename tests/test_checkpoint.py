import os
import shutil

import torch

import pretrain_gpt_moe
from megatron.checkpoint.checkpointing import TRACKER
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


def test_checkpoint_layout_and_safe_loading(tmp_path):
    ck = str(tmp_path / "ck")
    pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "2", "--save", ck]))
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
    os.remove(os.path.join(partial, "model_dense.pt"))
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
