import pytest

from megatron.config.schema import OptimizerConfig
from megatron.optim.loss_scaler import DynamicLossScaler
from megatron.optim.lr_scheduler import LRScheduler, build_scheduler


def test_lr_warmup_then_cosine_to_min():
    s = LRScheduler(1.0, 0.1, warmup_samples=10, decay_samples=110, style="cosine")
    assert s.get_lr(0) == 0.0
    assert s.get_lr(5) == pytest.approx(0.5)
    assert s.get_lr(10) == pytest.approx(1.0)
    assert s.get_lr(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.get_lr(110) == pytest.approx(0.1)
    assert s.get_lr(500) == pytest.approx(0.1)


def test_lr_linear_constant_inverse_sqrt():
    assert LRScheduler(1.0, 0.0, 0, 100, "linear").get_lr(25) == pytest.approx(0.75)
    assert LRScheduler(1.0, 0.0, 10, 100, "constant").get_lr(90) == 1.0
    assert LRScheduler(1.0, 0.0, 4, 100, "inverse-square-root").get_lr(16) == pytest.approx(0.5)


def test_scheduler_units_tokens_iters_samples():
    cfg = OptimizerConfig(lr=1.0, lr_warmup_tokens=1024, lr_decay_tokens=10240)
    s = build_scheduler(cfg, seq_length=128, global_batch_size=4, train_samples=1000)
    assert (s.warmup_samples, s.decay_samples) == (8, 80)
    cfg = OptimizerConfig(lr=1.0, lr_warmup_iters=3, lr_decay_iters=10)
    s = build_scheduler(cfg, seq_length=128, global_batch_size=4, train_samples=1000)
    assert (s.warmup_samples, s.decay_samples) == (12, 40)


def test_dynamic_loss_scaler_hysteresis_and_growth():
    s = DynamicLossScaler(initial_scale=1024, min_scale=1, growth_interval=3, hysteresis=2)
    s.update(True)
    assert s.scale == 1024  # hysteresis absorbs the first overflow
    s.update(True)
    assert s.scale == 512
    for _ in range(3):
        s.update(False)
    assert s.scale == 1024
    for _ in range(20):
        s.update(True)
    assert s.scale == 1  # floor
    sd = s.state_dict()
    t = DynamicLossScaler()
    t.load_state_dict(sd)
    assert t.scale == 1


def _run_length(argv):
    from megatron.training.arguments import parse_args
    from megatron.training.schedule import BatchSchedule, train_schedule

    cfg = parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
                      "--lr", "1e-3", "--global-batch-size", "8", "--micro-batch-size", "2", "--mock-data", "--vocab-size", "128"] + argv)
    return train_schedule(cfg, BatchSchedule(cfg.train, 1))


def test_train_tokens_with_train_iters_stops_at_the_first_bound():
    # 8 samples x 16 tokens = 128 tokens per iteration
    assert _run_length(["--train-iters", "10", "--train-tokens", "500"]) == (4, 32)  # tokens first: ceil(500/128)
    assert _run_length(["--train-iters", "3", "--train-tokens", "500"]) == (3, 24)   # iterations first
    assert _run_length(["--train-iters", "10"]) == (10, 80)
    assert _run_length(["--train-tokens", "500"]) == (4, 32)
    assert _run_length(["--train-samples", "40", "--train-tokens", "500"]) == (4, 32)
    assert _run_length(["--train-samples", "16", "--train-tokens", "500"]) == (2, 16)
