import pretrain_gpt_moe
from tests.runs import mock_args

BASE = ["--micro-batch-size", "2", "--global-batch-size", "2", "--num-experts", "4"]


def test_fp16_dynamic_loss_scaling_skips_overflowing_steps():
    out = pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "14", "--fp16", "--initial-loss-scale", str(2.0**24),
                                                  "--hysteresis", "1", "--loss-scale-window", "1000"]))
    assert out["skipped"] >= 1  # 2^24 overflows fp16 gradients
    assert out["loss_scale"] < 2.0**24  # and the scale backed off
    assert out["skipped"] < 14 and len(out["losses"]) == 14


def test_bf16_trains():
    out = pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "3", "--bf16"]))
    assert out["skipped"] == 0 and len(out["losses"]) == 3
    assert all(l == l for l in out["losses"])  # no NaN
