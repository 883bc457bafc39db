"""Divergence before NaN: a loss or gradient-norm spike (relative to the running mean of accepted steps)
skips the step and blocks saves while it lasts; a run of spikes stops the run with exit 3 and the tracker
on the last checkpoint. Real runs through the entry point (``--lr 10 --adam-eps 1e-45`` takes the loss
from 4.8 to 1174 in one step), and the guard's arithmetic alone."""
import os
import subprocess
import sys

import pytest

import pretrain_gpt_moe
from megatron.checkpoint.layout import TRACKER
from megatron.errors import TrainingFault
from megatron.training.guard import SpikeGuard
from tests.conftest import ROOT
from tests.runs import mock_args

BASE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--num-experts", "4"]
DIVERGE = ["--lr", "10", "--adam-eps", "1e-45"]


def test_spikes_are_measured_against_accepted_steps_only():
    g = SpikeGuard(loss_factor=3.0, grad_factor=50.0, warmup=2, max_spikes=2)
    for it, (loss, norm) in enumerate([(6.0, 1.0), (5.0, 2.0)], 1):
        assert g.check(loss, norm) is None  # warm-up
        g.after_step(it, loss, norm, None, False)
    assert g.check(16.0, 1.0) is None  # under 3x the running mean (5.9)
    assert "lm loss 1366 is" in g.check(1366.0, 1.0) and "--loss-spike-factor 3" in g.check(1366.0, 1.0)
    assert "grad norm 1e+38" in g.check(5.0, 1e38)
    w = g.after_step(3, 1366.0, 1.0, g.check(1366.0, 1.0), True)
    assert w.startswith("WARNING: iteration 3: lm loss 1366") and "(1 in a row)" in w
    assert g.loss_mean == pytest.approx(0.9 * 6.0 + 0.1 * 5.0)  # the spike did not enter the mean
    g.after_step(4, 1366.0, 1.0, "spike", True)
    with pytest.raises(TrainingFault, match="3 spikes in a row, more than --max-spike-iterations 2"):
        g.after_step(5, 1366.0, 1.0, "spike", True)
    off = SpikeGuard(0.0, 0.0, 0, 1)
    off.after_step(1, 1.0, 1.0, None, False)
    assert off.check(1e9, 1e9) is None


def test_a_diverging_run_stops_with_exit_3_and_the_tracker_before_the_spikes(tmp_path):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + DIVERGE + ["--train-iters", "20", "--save", ck, "--save-interval", "1"])
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py")] + argv, capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert r.returncode == 3, r.stderr[-2000:]
    assert r.stderr.count("\n") == 1 and "spikes in a row, more than --max-spike-iterations 5" in r.stderr, r.stderr
    assert "WARNING: iteration 3: lm loss" in r.stdout and "(5 in a row)" in r.stdout
    assert "> not saving at iteration 3" in r.stdout
    assert open(os.path.join(ck, TRACKER)).read() == "2"  # the last step before the spikes


def test_the_guard_does_not_touch_a_healthy_run_and_can_be_disabled():
    argv = mock_args(BASE + ["--train-iters", "8"])
    guarded = pretrain_gpt_moe.main(argv)
    off = pretrain_gpt_moe.main(argv + ["--loss-spike-factor", "0", "--grad-norm-spike-factor", "0"])
    assert guarded["losses"] == off["losses"] and guarded["skipped"] == 0
    diverged = pretrain_gpt_moe.main(mock_args(BASE + DIVERGE + ["--train-iters", "6", "--loss-spike-factor", "0",
                                                                 "--grad-norm-spike-factor", "0"]))
    assert max(diverged["losses"]) > 100  # what the guard stops: off, the run "succeeds" on diverged weights
