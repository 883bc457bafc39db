"""ZeRO-2 (``--zero-stage 2``) through the real entry point: equal to plain AdamW at DP=2, with and without
clipping; its checkpoints resume under plain AdamW at DP=1; the DeepSpeed JSON's stage 2; --tensorboard-queue-size.
(The one-line errors for --zero-stage 3 and --overlap-grad-reduce with 2 are in tests/test_errors.py.)"""
import glob
import os
import time

import torch

from megatron.optim.build import build_optimizer
from megatron.optim.zero2 import ShardedGradients
from megatron.parallel.state import ParallelState
from tests.dist_utils import run_distributed
from tests.runs import close, mock_args, train

# experts too, so that both sharded domains (dense over DP, experts over expert-DP) are exercised
BASE = ["--hidden-dropout", "0", "--attention-dropout", "0", "--num-experts", "2", "--moe-train-capacity-factor", "8",
        "--moe-eval-capacity-factor", "8", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6"]


def test_zero2_at_dp2_equals_plain_adam_and_resumes_at_dp1_plain(tmp_path):
    ck = str(tmp_path / "ck")
    base = BASE + ["--clip-grad", "0"]
    plain = run_distributed(train, 2, str(tmp_path / "a"), mock_args(base))[0]
    zero2 = run_distributed(train, 2, str(tmp_path / "b"), mock_args(base + [
        "--zero-stage", "2", "--save", ck, "--save-interval", "3", "--exit-interval", "3"]))
    close(zero2[0]["losses"], plain["losses"][:3])
    close(zero2[0]["grad_norms"], plain["grad_norms"][:3])
    assert zero2[0]["losses"] == zero2[1]["losses"]
    resumed = train(0, mock_args(base + ["--load", ck, "--no-load-rng"]))  # DP=1, torch AdamW
    close(resumed["losses"], plain["losses"][3:])


def test_zero2_clips_like_plain_adam(tmp_path):
    base = BASE + ["--clip-grad", "0.3", "--train-iters", "3"]
    plain = run_distributed(train, 2, str(tmp_path / "a"), mock_args(base))[0]
    zero2 = run_distributed(train, 2, str(tmp_path / "b"), mock_args(base + ["--zero-stage", "2"]))[0]
    assert max(plain["grad_norms"]) > 0.3  # clipping engaged
    close(zero2["grad_norms"], plain["grad_norms"])
    close(zero2["losses"], plain["losses"])


def test_tensorboard_queue_size_reaches_the_writer(tmp_path):
    from megatron.training.metrics import TensorBoardSink

    sizes = {}
    for queue in (2, 1000):
        sink = TensorBoardSink(str(tmp_path / str(queue)), ParallelState(), queue)
        (events,) = glob.glob(str(tmp_path / str(queue) / "events*"))
        start = os.path.getsize(events)
        for i in range(3):  # one more event than the small queue holds: it writes them out
            sink.scalar("x", float(i), i)
        deadline = time.time() + 60  # the writer thread may be slow to run on a loaded machine
        while queue == 2 and os.path.getsize(events) == start and time.time() < deadline:
            time.sleep(0.05)
        sizes[queue] = os.path.getsize(events) - start
        sink.close()
    assert sizes[2] > 0 and sizes[1000] == 0


def test_deepspeed_json_stage_2_selects_zero2(tmp_path):
    import json

    from megatron.training.arguments import parse_args

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                                "zero_optimization": {"stage": 2}}))
    cfg = parse_args(mock_args(["--train-iters", "2", "--deepspeed", "--deepspeed_config", str(path)]))
    assert cfg.optimizer.zero_stage == 2 and cfg.optimizer.use_distributed_optimizer
    opt = build_optimizer(torch.nn.Linear(4, 4), cfg.optimizer, torch.device("cpu"), ParallelState())
    assert isinstance(opt, ShardedGradients)  # the Trainer then drives opt.reduce_gradients() & co.
