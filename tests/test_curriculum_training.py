"""The sequence-length curriculum inside training: truncated batches, token counting, exact resume."""
import json
import os

import torch

import pretrain_gpt_moe
from megatron.optim.lr_scheduler import build_scheduler
from megatron.training import pretrain
from megatron.training.arguments import parse_args
from megatron.training.metrics import MetricsSink
from tests.runs import mock_args

# --seq-length 16; fixed_linear from 4 to 16 over 6 steps in multiples of 4
LENGTHS = [4, 8, 8, 12, 12, 16, 16, 16]
BASE = ["--micro-batch-size", "1", "--global-batch-size", "2", "--num-experts", "2", "--lr-warmup-iters", "0"]


def ds_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"curriculum_learning": {
        "enabled": True, "curriculum_type": "seqlen", "min_difficulty": 4, "max_difficulty": 16,
        "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 6, "difficulty_step": 4}}}))
    return ["--deepspeed", "--deepspeed_config", str(path)]


class Recorder(MetricsSink):
    def __init__(self):
        self.values = {}

    def scalar(self, name, value, step):
        self.values.setdefault(name, []).append((step, value))


def run(argv):
    """Train through the real hooks, recording the scalars and each micro-batch's token shape."""
    cfg = parse_args(argv)
    shapes, rec = [], Recorder()

    def forward_step(data_iterator, model, **kw):
        block = next(data_iterator)
        shapes.append(tuple(block.shape))
        return pretrain_gpt_moe.forward_step(cfg, iter([block]), model, **kw)

    result = pretrain(pretrain_gpt_moe.train_valid_test_datasets_provider, pretrain_gpt_moe.model_provider,
                      forward_step, cfg=cfg, sinks=[rec])
    return cfg, result, shapes, rec.values


def test_each_step_trains_the_curriculum_length_and_counts_its_tokens(tmp_path):
    argv = mock_args(BASE + ds_config(tmp_path) + ["--train-iters", "8", "--lr-warmup-tokens", "40",
                                                   "--lr-decay-tokens", "400", "--eval-iters", "0"])
    cfg, result, shapes, values = run(argv)
    assert [v for _, v in values["curriculum-seqlen"]] == LENGTHS
    assert shapes == [(1, n + 1) for n in LENGTHS for _ in range(2)]  # tokens and labels: n each
    assert result["tokens_trained"] == 2 * sum(LENGTHS)
    # the token-based schedule advances by tokens trained / --seq-length, not by samples
    expected = build_scheduler(cfg.optimizer, 16, 2, 16)
    cumulative = [2 * sum(LENGTHS[: i + 1]) for i in range(8)]
    lrs = [v for _, v in values["learning-rate"]]
    assert lrs == [expected.get_lr(t / 16) for t in cumulative]
    assert lrs[0] == 3e-3 * 0.5 / 3  # 8 tokens = half a sample of a warm-up of ceil(40 / 16) = 3 samples


def test_train_tokens_counts_the_truncated_lengths(tmp_path):
    target = 2 * sum(LENGTHS[:4])  # 64 tokens: 2 steps at full length, 4 under the curriculum
    _, result, _, values = run(mock_args(BASE + ds_config(tmp_path) + ["--train-tokens", str(target),
                                                                       "--eval-iters", "0"]))
    assert result["iteration"] == 4 and result["tokens_trained"] == target
    _, bounded, _, _ = run(mock_args(BASE + ds_config(tmp_path) + ["--train-tokens", str(target), "--train-iters",
                                                                    "3", "--eval-iters", "0"]))
    assert bounded["iteration"] == 3  # the first bound reached stops the run, as upstream
    _, plain, _, _ = run(mock_args(BASE + ["--train-tokens", str(target), "--eval-iters", "0"]))
    assert plain["iteration"] == 2 and plain["tokens_trained"] == target


def test_resume_mid_curriculum_is_exact(tmp_path):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + ds_config(tmp_path) + ["--train-iters", "8", "--eval-iters", "0"])
    full = pretrain_gpt_moe.main(argv)["losses"]
    pretrain_gpt_moe.main(argv + ["--save", ck, "--exit-interval", "3"])
    common = torch.load(os.path.join(ck, "iter_0000003", "common.pt"), weights_only=True)
    assert common["curriculum"] == {"current": 8, "last_step": 3}
    assert common["tokens_trained"] == 2 * sum(LENGTHS[:3])
    resumed = pretrain_gpt_moe.main(argv + ["--load", ck])
    assert resumed["losses"] == full[3:]
    assert resumed["tokens_trained"] == 2 * sum(LENGTHS)
