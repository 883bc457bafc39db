"""MoE health: router entropy, tokens per expert (min / p50 / max), dead experts and the top expert's share
in the log line and the sinks, and --moe-health warning about (or stopping on) a layer that collapses or an
expert that dies — tested with a router forced to collapse (an aux-loss-free router whose bias sends every
token to expert 0)."""
import math
from functools import partial

import pytest
import torch

import pretrain_gpt_moe
from megatron.errors import TrainingFault
from megatron.model.moe.metrics import MoEStats, accumulate, format_moe_line, router_entropy, summarize
from megatron.model.moe.routers.aux_free import AuxLossFreeRouter
from megatron.training.arguments import parse_args
from megatron.training.moe_health import MoEHealthMonitor
from megatron.training.trainer import pretrain
from tests.runs import mock_args
from tests.test_timers_tb import Recorder


def test_router_entropy_is_one_when_uniform_and_zero_when_certain():
    assert float(router_entropy(torch.full((5, 4), 0.25))) == pytest.approx(1.0)
    assert float(router_entropy(torch.eye(4)[[0, 1, 2]])) == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    assert float(router_entropy(p)) == pytest.approx(math.log(2) / math.log(4))


def test_summary_reports_percentiles_dead_experts_share_and_entropy():
    stats = MoEStats(1, torch.tensor(0.0), torch.tensor(0.0), torch.tensor([10.0, 0.0, 0.0, 30.0]), torch.tensor(0.0),
                     torch.tensor(40.0), entropy=torch.tensor(0.5))
    s, = summarize(accumulate([], [stats]), lambda t: None)
    assert s.tokens_per_expert == pytest.approx((0.0, 0.5, 3.0))  # over the mean (10): min, median, max
    assert s.dead == 2 and s.top_share == pytest.approx(0.75) and s.entropy == pytest.approx(0.5)
    sc = s.scalars()
    assert sc["moe/layer1/dead-experts"] == 2 and sc["moe/layer1/router-entropy"] == pytest.approx(0.5)
    assert sc["moe/layer1/tokens-per-expert-max"] == pytest.approx(3.0)
    assert "tok/exp 0.00/0.50/3.00 dead 2 H 0.50" in format_moe_line([s])


def _summary(counts, layer=1):
    st = MoEStats(layer, torch.tensor(0.0), torch.tensor(0.0), torch.tensor(counts), torch.tensor(0.0),
                  torch.tensor(float(sum(counts))))
    return summarize(accumulate([], [st]), lambda t: None)


def test_monitor_warns_once_per_episode_after_the_window():
    mon = MoEHealthMonitor("warn", window=20, collapse_share=0.9)
    assert mon.update(10, 0, _summary([95.0, 5.0, 0.0, 0.0])) == []  # 10 iterations: not yet
    lines = mon.update(20, 10, _summary([95.0, 5.0, 0.0, 0.0]))
    assert any("MoE layer 1 collapsed: expert 0 has taken 95% of the tokens for 20 iterations" in x for x in lines)
    assert sum("dead expert" in x for x in lines) == 2  # experts 2 and 3
    assert mon.update(30, 20, _summary([95.0, 5.0, 0.0, 0.0])) == []  # the same episodes: said once
    assert mon.update(40, 30, _summary([30.0, 30.0, 20.0, 20.0])) == []  # recovered
    assert mon.update(50, 40, _summary([99.0, 1.0, 0.0, 0.0])) == []  # a new episode needs its own window
    later = mon.update(60, 50, _summary([99.0, 1.0, 0.0, 0.0]))
    assert any("collapsed: expert 0 has taken 99% of the tokens for 20 iterations" in x for x in later)
    with pytest.raises(TrainingFault, match="--moe-health stop"):
        MoEHealthMonitor("stop", window=1).update(5, 0, _summary([100.0, 0.0]))
    assert MoEHealthMonitor("off", window=1).update(5, 0, _summary([100.0, 0.0])) == []


def collapsed_provider(cfg, ps):
    """The GPT model whose aux-loss-free routers send every token to expert 0 (a bias no gate can beat)."""
    model = pretrain_gpt_moe.model_provider(cfg, ps)
    init = model.init_weights

    def init_weights(seed):
        init(seed)
        for m in model.modules():
            if isinstance(m, AuxLossFreeRouter):
                m.expert_bias.data.zero_()
                m.expert_bias.data[0] = 10.0

    model.init_weights = init_weights
    return model


def run_collapsed(extra, capsys):
    argv = mock_args(["--micro-batch-size", "2", "--global-batch-size", "4", "--num-experts", "4", "--train-iters",
                      "6", "--moe-router-type", "aux_free", "--moe-router-bias-update-rate", "0",
                      "--moe-health-window", "3"] + extra)
    cfg = parse_args(argv)
    rec = Recorder()
    pretrain(pretrain_gpt_moe.train_valid_test_datasets_provider, collapsed_provider,
             partial(pretrain_gpt_moe.forward_step, cfg), cfg=cfg, sinks=[rec])
    return rec.values, capsys.readouterr().out


def test_a_collapsed_router_is_reported_and_can_stop_the_run(capsys):
    values, out = run_collapsed([], capsys)
    assert "WARNING: MoE layer 1 collapsed: expert 0 has taken 100% of the tokens for 3 iterations" in out
    assert "WARNING: MoE layer 1: expert 3 has received no token for 3 iterations (dead expert)" in out
    assert out.count("MoE layer 1 collapsed") == 1  # once per episode
    assert values[("moe/layer1/top-expert-share", 6)] == 1.0 and values[("moe/layer1/dead-experts", 6)] == 3
    assert values[("moe/layer1/tokens-per-expert-max", 6)] == pytest.approx(4.0)
    assert 0.0 <= values[("moe/layer1/router-entropy", 6)] <= 1.0
    assert " dead 3 " in out
    with pytest.raises(TrainingFault, match=r"iteration 3: MoE layer 1.*--moe-health stop"):
        run_collapsed(["--moe-health", "stop"], capsys)
    values, out = run_collapsed(["--moe-health", "off"], capsys)
    assert "WARNING: MoE" not in out and ("moe/layer1/dead-experts", 6) in values
