"""Checkpoints that are never lost to a forgotten flag or a stray file: a run that does not resume from
--save may not replace what is there, a tracker that is not a file is an error, start-up clean-up removes
only names it writes, common.pt's counters are checked, and the start-up file-size check covers the real
files. Each case: exit status 2, one line, and the save directory byte for byte unchanged."""
import os
import shutil

import pytest
import torch

import pretrain_gpt_moe
from megatron.checkpoint.layout import TRACKER
from megatron.errors import UserError
from megatron.training.arguments import parse_args
from megatron.training.preflight import checkpoint_bytes
from tests.runs import mock_args
from tests.test_faults import snapshot

BASE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--num-experts", "4"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A save directory holding iterations 2 and 4 (the tracker names 4)."""
    ck = str(tmp_path_factory.mktemp("saved") / "ck")
    pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "4", "--save", ck, "--save-interval", "2"]))
    return ck


def refused(argv, needle, ck):
    before = snapshot(ck)
    with pytest.raises(UserError) as e:
        pretrain_gpt_moe.main(argv)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert e.value.exit_code == 2
    assert snapshot(ck) == before  # nothing written, moved or deleted


def copy(saved, tmp_path):
    ck = str(tmp_path / "ck")
    shutil.copytree(saved, ck, symlinks=True)
    return ck


def test_a_run_that_does_not_resume_may_not_replace_existing_checkpoints(saved, tmp_path):
    ck = copy(saved, tmp_path)
    argv = mock_args(BASE + ["--train-iters", "4", "--save", ck])
    refused(argv, f"--save {ck} already holds checkpoints (iterations 2, 4) and this run does not resume", ck)
    other = copy(saved, tmp_path / "other")  # --load elsewhere is not a resume of --save either
    refused(argv + ["--load", other], "pass --load", ck)
    out = pretrain_gpt_moe.main(argv + ["--overwrite-checkpoints"])  # on purpose: allowed
    assert out["iteration"] == 4
    assert pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "6", "--save", ck, "--load", ck]))["iteration"] == 6


def test_checkpoints_without_their_tracker_are_not_overwritten_by_a_resume(saved, tmp_path):
    ck = copy(saved, tmp_path)
    os.remove(os.path.join(ck, TRACKER))
    refused(mock_args(BASE + ["--train-iters", "4", "--save", ck, "--load", ck]),
            f"holds checkpoints (iterations 2, 4) but no {TRACKER}", ck)


@pytest.mark.parametrize("kind", ["directory", "dangling symlink", "symlink loop"])
def test_a_tracker_that_is_not_a_regular_file_is_one_line(saved, tmp_path, kind):
    ck = copy(saved, tmp_path)
    tracker = os.path.join(ck, TRACKER)
    os.remove(tracker)
    if kind == "directory":
        os.mkdir(tracker)
    elif kind == "dangling symlink":
        os.symlink(os.path.join(ck, "nowhere"), tracker)
    else:
        os.symlink(tracker, tracker)
    refused(mock_args(BASE + ["--train-iters", "6", "--save", ck, "--load", ck]), "not the tracker file", ck)
    refused(mock_args(BASE + ["--train-iters", "6", "--load", ck]), "not the tracker file", ck)


def test_start_up_clean_up_removes_only_the_names_it_writes(saved, tmp_path):
    ck = copy(saved, tmp_path)
    mine = os.path.join(ck, TRACKER + ".tmp4242")  # what a killed tracker write leaves
    theirs = os.path.join(ck, TRACKER + ".tmp-notes.txt")  # a user's file
    for path in (mine, theirs):
        open(path, "w").write("x")
    pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "5", "--save", ck, "--load", ck]))
    assert not os.path.exists(mine) and open(theirs).read() == "x"


@pytest.mark.parametrize("field,value,needle", [
    ("iteration", 7, "says iteration 7 (its 'iteration' field) but lies in the folder of iteration 4"),
    ("iteration", -1, "has iteration -1"),
    ("consumed_samples", -8, "has consumed_samples -8"),
    ("tokens_trained", 1.5, "has tokens_trained 1.5"),
])
def test_common_counters_are_checked(saved, tmp_path, field, value, needle):
    ck = copy(saved, tmp_path)
    common_file = os.path.join(ck, "iter_0000004", "common.pt")
    common = torch.load(common_file, weights_only=True)
    common[field] = value
    torch.save(common, common_file)
    refused(mock_args(BASE + ["--train-iters", "6", "--save", ck, "--load", ck]), needle, ck)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_the_start_up_file_size_estimate_covers_the_real_largest_file(tmp_path, fmt):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + ["--train-iters", "1", "--save", ck, "--ckpt-format", fmt])
    pretrain_gpt_moe.main(argv)
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(ck) for f in files]
    total, largest = checkpoint_bytes(parse_args(argv).model, True, sharded_over=1 if fmt == "torch_dist" else None)
    assert max(sizes) <= largest <= 1.3 * max(sizes), (max(sizes), largest)
    assert sum(sizes) <= total * 1.05


def test_adam_state_of_the_wrong_shape_is_one_line(tmp_path):
    """A cut exp_avg in format 1's optim_dense.pt: one line naming the file and the fix at load (was a traceback
    inside torch's Adam at the first step)."""
    ck = str(tmp_path / "ck")
    pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "2", "--save", ck, "--ckpt-format", "torch"]))
    optim_file = os.path.join(ck, "iter_0000002", "optim_dense.pt")
    optim = torch.load(optim_file, weights_only=True)
    name = next(iter(optim))
    optim[name]["exp_avg"] = optim[name]["exp_avg"].reshape(-1)[:3].clone()
    torch.save(optim, optim_file)
    refused(mock_args(BASE + ["--train-iters", "4", "--save", ck, "--load", ck, "--ckpt-format", "torch"]),
            f"optim_dense.pt holds Adam exp_avg of shape (3,) for {name}", ck)
