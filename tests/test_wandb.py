"""--wandb-* (Megatron-LM's names): the sink writes an offline run with the scalars and the
per-expert load; a missing package or a lone --wandb-exp-name is a one-line error."""
import glob
import os
import time

import pytest

from megatron.config.schema import LoggingConfig
from megatron.errors import UserError
from megatron.parallel.state import ParallelState


def test_offline_run_files_hold_the_scalars(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from megatron.training.wandb_sink import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = LoggingConfig(wandb_project="moe", wandb_exp_name="tiny", wandb_save_dir=str(tmp_path / "wb"))
    sink = WandbSink(cfg, ParallelState(), config={"num_layers": 2})
    for it in (1, 2, 3):
        sink.scalar("lm loss", 5.0 - it, it)
        sink.histogram("moe/layer1/tokens-per-expert", [10 * it, 3, 7, 12], it)
    sink.close()
    runs = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    (log,) = glob.glob(os.path.join(runs[0], "*.wandb"))  # the run's record log, for `wandb sync`
    for _ in range(100):  # wandb's service process may still be writing it when finish() returns
        data = open(log, "rb").read()
        if data.count(b"lm loss") >= 3 and b"moe/layer1/tokens-per-expert" in data:
            break
        time.sleep(0.2)
    assert data.count(b"lm loss") >= 3 and b"moe/layer1/tokens-per-expert" in data


def test_no_sink_off_rank_0_or_without_project(tmp_path):
    from megatron.training.wandb_sink import WandbSink

    assert WandbSink(LoggingConfig(), ParallelState()).run is None
    assert WandbSink(LoggingConfig(wandb_project="p"), ParallelState(rank=1, world_size=2)).run is None


def test_wandb_flag_errors(monkeypatch):
    from megatron.training.arguments import parse_args
    from tests.runs import mock_args

    with pytest.raises(UserError, match="--wandb-exp-name / --wandb-save-dir need --wandb-project"):
        parse_args(mock_args(["--train-iters", "1", "--wandb-exp-name", "x"]))
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="--wandb-project needs the wandb package: pip install wandb"):
        parse_args(mock_args(["--train-iters", "1", "--wandb-project", "p"]))


def test_training_writes_the_tensorboard_scalars_to_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import pretrain_gpt_moe
    from tests.runs import mock_args

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pretrain_gpt_moe.main(mock_args(["--train-iters", "2", "--num-experts", "4", "--wandb-project", "moe",
                                     "--wandb-save-dir", str(tmp_path / "wb"), "--tensorboard-dir", str(tmp_path / "tb")]))
    (log,) = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*" / "*.wandb"))
    for _ in range(100):
        data = open(log, "rb").read()
        if b"tokens-per-expert" in data:
            break
        time.sleep(0.2)
    for tag in (b"lm loss", b"learning-rate", b"grad-norm", b"tokens-per-expert"):
        assert tag in data, tag
