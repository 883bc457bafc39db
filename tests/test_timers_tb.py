"""Per-phase timers (DeepSpeed JSON ``wall_clock_breakdown``, ``--log-timers-to-tensorboard``), Adam state
statistics (``--log-optimizer-states-to-tensorboard``) equal at any layout, and the dry run's ZeRO-2 plan."""
import json
import math
import re
from functools import partial
from types import SimpleNamespace

import pytest
import torch

import pretrain_gpt_moe
from megatron.training.arguments import parse_args
from megatron.training.metrics import MetricsSink
from megatron.training.optimizer_stats import optimizer_state_stats
from megatron.training.timers import Timers
from megatron.training.trainer import pretrain
from tests.dist_utils import run_distributed
from tests.runs import mock_args

RUN = ["--num-experts", "2", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2"]
TIMER_TAGS = ["forward-backward-time", "forward-compute-time", "backward-compute-time", "batch-generator-time",
              "grads-all-reduce-time", "optimizer-time"]
STAT_TAGS = [f"optimizer/{q}_{s}" for q in ("variance", "variance_sqrt", "momentum", "weight")
             for s in ("l2", "l1", "abs_max")]


def scalars(tb_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def ds_json(tmp_path, **fields) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2, **fields}))
    return str(path)


def test_wall_clock_breakdown_prints_the_timers_on_the_log_line_only(tmp_path, capsys):
    tb = tmp_path / "tb"
    pretrain_gpt_moe.main(mock_args(RUN + ["--deepspeed", "--deepspeed_config", ds_json(tmp_path, wall_clock_breakdown=True),
                                           "--tensorboard-dir", str(tb)]))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("time (ms) | ")]
    assert len(lines) == 2, lines  # --log-interval 1, two iterations
    times = dict(re.findall(r"([\w-]+): ([\d.]+)", lines[-1]))
    assert list(times) == [t[: -len("-time")] for t in TIMER_TAGS]
    t = {k: float(v) for k, v in times.items()}
    assert t["forward-backward"] >= t["forward-compute"] + t["backward-compute"] - 0.02  # nested, 2 decimals printed
    assert t["forward-compute"] >= t["batch-generator"] > 0 and t["optimizer"] > 0
    tags = scalars(tb)
    assert not [k for k in tags if k.endswith("-time") and k != "iteration-time"] and "optimizer/weight_l2" not in tags


def test_timers_and_optimizer_states_are_written_to_tensorboard(tmp_path, capsys):
    tb = tmp_path / "tb"
    pretrain_gpt_moe.main(mock_args(RUN + ["--tensorboard-dir", str(tb), "--log-timers-to-tensorboard",
                                           "--log-optimizer-states-to-tensorboard"]))
    assert "time (ms) |" not in capsys.readouterr().out  # the console line is wall_clock_breakdown's
    tags = scalars(tb)
    for tag in TIMER_TAGS + STAT_TAGS:
        assert [s for s, _ in tags[tag]] == [1, 2], (tag, tags.get(tag))
    fb, fc, bc, bg = (dict(tags[k])[2] for k in TIMER_TAGS[:4])
    assert fb >= fc + bc and fc >= bg > 0 and dict(tags["iteration-time"])[2] >= fb
    assert "all-to-all-time" not in tags  # no expert parallelism, no exchange
    s = {k: dict(tags[k])[2] for k in STAT_TAGS}
    assert s["optimizer/variance_sqrt_l1"] > 0 and s["optimizer/weight_l2"] > 1
    assert s["optimizer/variance_abs_max"] == pytest.approx(s["optimizer/variance_sqrt_abs_max"] ** 2, rel=1e-5)
    assert s["optimizer/variance_sqrt_l2"] == pytest.approx(math.sqrt(s["optimizer/variance_l1"]), rel=1e-5)


def test_optimizer_state_stats_are_the_norms_of_torch_adamw_state():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for _ in range(2):
        model(torch.randn(4, 5)).square().sum().backward()
        opt.step()
    got = optimizer_state_stats(opt, model, SimpleNamespace(distributed=False))
    params = list(model.parameters())
    flat = {"variance": torch.cat([opt.state[p]["exp_avg_sq"].flatten() for p in params]).double(),
            "momentum": torch.cat([opt.state[p]["exp_avg"].flatten() for p in params]).double(),
            "weight": torch.cat([p.detach().flatten() for p in params]).double()}
    flat["variance_sqrt"] = flat["variance"].sqrt()
    for q, t in flat.items():
        assert got[f"optimizer/{q}_l2"] == pytest.approx(float(t.norm()), rel=1e-12)
        assert got[f"optimizer/{q}_l1"] == pytest.approx(float(t.abs().sum()), rel=1e-12)
        assert got[f"optimizer/{q}_abs_max"] == pytest.approx(float(t.abs().max()), rel=1e-12)


class Recorder(MetricsSink):
    """Every scalar at full precision (TensorBoard stores float32)."""

    def __init__(self):
        self.values = {}

    def scalar(self, name, value, step):
        self.values[(name, step)] = float(value)


def recorded_run(rank, argv):
    cfg = parse_args(argv)
    rec = Recorder()
    pretrain(pretrain_gpt_moe.train_valid_test_datasets_provider, pretrain_gpt_moe.model_provider,
             partial(pretrain_gpt_moe.forward_step, cfg), cfg=cfg, sinks=[rec])
    return rec.values


# no dropout, no token dropped: DP=1 and DP=2 train the same model
EQUAL = ["--hidden-dropout", "0", "--attention-dropout", "0", "--num-experts", "2", "--moe-train-capacity-factor", "8",
         "--moe-eval-capacity-factor", "8", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
         "--log-optimizer-states-to-tensorboard", "--log-timers-to-tensorboard", "--eval-iters", "0"]


def test_optimizer_states_equal_unsharded_under_zero1_fsdp2_dp2_expert_and_tensor_parallel(tmp_path):
    one = recorded_run(0, mock_args(EQUAL))  # DP=1, torch AdamW
    zero1 = run_distributed(recorded_run, 2, str(tmp_path / "z1"), mock_args(EQUAL + ["--zero-stage", "1"]))
    ep = run_distributed(recorded_run, 2, str(tmp_path / "ep"), mock_args(EQUAL + ["--zero-stage", "1",
                                                                                 "--moe-expert-parallel-size", "2"]))
    tp = run_distributed(recorded_run, 2, str(tmp_path / "tp"), mock_args(EQUAL + ["--zero-stage", "1",
                                                                                 "--tensor-model-parallel-size", "2"]))
    fsdp = run_distributed(recorded_run, 2, str(tmp_path / "fsdp"), mock_args(EQUAL + ["--use-torch-fsdp2"]))
    keys = [(tag, step) for tag in STAT_TAGS for step in (1, 2, 3)]
    for run in (*zero1, *ep, *tp, *fsdp):
        for k in keys:
            assert run[k] == pytest.approx(one[k], rel=1e-6), (k, run[k], one[k])
    # the expert-parallel exchange is timed: a part of the forward and backward, never more
    for r in ep:
        a2a = [r[("all-to-all-time", s)] for s in (1, 2, 3)]
        assert all(0 < a < r[("forward-backward-time", s)] for a, s in zip(a2a, (1, 2, 3)))
    assert ("all-to-all-time", 1) not in zero1[0]


def test_disabled_timers_cost_nothing_and_enabled_ones_add_up():
    off = Timers(enabled=False)
    with off("x"):
        pass
    assert off.names() == [] and off.elapsed(["x"]) == {"x": 0.0}
    on = Timers()
    for _ in range(3):
        with on("x"):
            sum(range(10000))
    assert on.used("x") and on("x").count == 3
    total = on.elapsed(["x"])["x"]
    assert total > 0 and on.elapsed(["x"])["x"] == 0.0 and not on.used("x")
    with pytest.raises(RuntimeError, match="started twice"):
        with on("y"):
            on("y").start()


def test_dry_run_zero2_shards_the_gradients(capsys):
    base = ["--dry-run", "--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "4", "--seq-length", "128",
            "--num-experts", "8", "--micro-batch-size", "2", "--global-batch-size", "16", "--train-iters", "10",
            "--lr", "1e-3", "--vocab-size", "1000", "--tokenizer-type", "NullTokenizer", "--dry-run-world-size", "4"]
    z1 = pretrain_gpt_moe.main(base + ["--zero-stage", "1"])
    z2 = pretrain_gpt_moe.main(base + ["--zero-stage", "2"])
    plan = z2["memory"]
    assert plan["dp"] == 4 and plan["edp"] == 4
    assert plan["grads_sharded"] == pytest.approx(plan["grads"] / 4, abs=1)  # over the 4 data-parallel ranks
    assert z1["memory_total"] - z2["memory_total"] == plan["grads"] - plan["grads_sharded"]
    assert "(sharded optimizer and gradients;" in capsys.readouterr().out
