#!/usr/bin/env python3
"""The pipeline bubble on CPU: 1F1B, GPipe and interleaved 1F1B (v = 2) side by side.

    python tools/bench/pipeline.py [--pp 2,4] [--micro 1,2,4,8] [--repeats 3]
    python tools/bench/pipeline.py --quick      # a smoke run: P = 2, tiny model

P gloo processes (one thread each), one per pipeline stage: a dense GPT of 8 layers, hidden 256, seq 128,
micro-batch 1, vocabulary 128 (the head is negligible: the stages carry equal work), driven through the
trainer's ``PipelineRunner.forward_backward``. For each P and micro-batch count m = k * P (k from
--micro), every repeat runs one step of each schedule in turn (the order rotates), all ranks starting
together (barrier), and records

* measured: the wall time of the schedule's run (``PipelineRunner._run``: the m micro-batches through the
  pipeline, without the log / MoE-statistics reductions that follow), the slowest rank's;
* ideal: the time the busiest rank spends computing inside that same step (its stages' forward and
  backward of each micro-batch, and the loss on the last stage; not the waits for P2P messages): the
  step's cost if no stage ever waited. Measured in the same step, so a noisy machine slows both alike.

Bubble = 1 - ideal / measured (medians over the timed repeats; one warm-up step first). Theory:
(P - 1) / (m + P - 1) for 1F1B and GPipe, (P - 1) / (v * m + P - 1) for interleaved 1F1B with v virtual
stages per rank.

With more processes than cores (P = 4 on 2 cores) the ranks share cores: a rank waiting in the bubble
lends its core to a busy one, and the compute time of each rank is stretched by the sharing, so those
rows are indicative only (not the bubble that P devices would show).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B")
V = 2  # virtual stages per rank of the interleaved schedule


def _argv(o, P: int) -> list:
    return ["--num-layers", str(o["layers"]), "--hidden-size", str(o["hidden"]), "--num-attention-heads", "4",
            "--seq-length", str(o["seq"]), "--mock-data", "--vocab-size", "128", "--lr", "1e-4",
            "--micro-batch-size", str(o["mbs"]), "--global-batch-size", str(o["mbs"] * P), "--train-iters", "1",
            "--eval-iters", "0", "--log-interval", "1000", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--use-cpu", "--pipeline-model-parallel-size", str(P)]


class _Busy:
    """Seconds this process spends computing inside the schedule: its stages' ``forward_one_chunk`` /
    ``backward_one_chunk`` / ``backward_weight_one_chunk`` and the last stage's loss (not the waits for P2P
    messages, which the schedule does outside these calls)."""

    seconds = 0.0

    @classmethod
    def timed(cls, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                cls.seconds += time.perf_counter() - t0
        return wrapper


def _rank_main(rank: int, P: int, o: dict):
    """One process of the run: per (schedule, m), the medians over the timed steps of the step's wall time and of
    the busiest rank's compute time (rank 0 returns them)."""
    from functools import partial

    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.distributed.pipelining.stage import _PipelineStageBase

    import pretrain_gpt_moe as entry
    from megatron.parallel.state import destroy, initialize
    from megatron.training.arguments import parse_args
    from megatron.training.trainer import Trainer

    for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):  # this process only
        setattr(_PipelineStageBase, name, _Busy.timed(getattr(_PipelineStageBase, name)))
    base = _argv(o, P)
    extra = {"1F1B": [], "GPipe": ["--pipeline-schedule", "GPipe"],
             "Interleaved1F1B": ["--num-layers-per-virtual-pipeline-stage", str(o["layers"] // (V * P))]}
    cfgs = {k: parse_args(base + extra[k]) for k in SCHEDULES}
    ps = initialize(cfgs["1F1B"].parallel, 1)
    try:
        runners, walls = {}, {}
        for k, cfg in cfgs.items():
            t = Trainer(cfg, ps, entry.train_valid_test_datasets_provider, entry.model_provider,
                        partial(entry.forward_step, cfg))
            t.setup_model_and_optimizer()
            r = runners[k] = t.pipeline
            r._loss = _Busy.timed(r._loss)  # before the schedules are built: they take it as their loss_fn
            run = r._run

            def timed_run(*a, _run=run, **kw):  # the schedule's wall time, without forward_backward's reductions
                t0 = time.perf_counter()
                _run(*a, **kw)
                walls["last"] = time.perf_counter() - t0
            r._run = timed_run
        rng = np.random.default_rng(1234)
        blocks = [rng.integers(0, 128, size=(o["mbs"], o["seq"] + 1), dtype=np.int64) for _ in range(8)]

        def data():
            i = 0
            while True:
                yield blocks[i % len(blocks)]
                i += 1

        times = {}  # (schedule, m) -> (walls, busiest compute times)
        order = list(SCHEDULES)
        for k_micro in o["micro"]:
            m = k_micro * P
            for rep in range(o["warmup"] + o["repeats"]):
                order = order[1:] + order[:1]  # rotate: no schedule always runs first
                for k in order:
                    ps.barrier()
                    _Busy.seconds = 0.0
                    runners[k].forward_backward(data(), m, 1.0)
                    both = torch.tensor([walls["last"], _Busy.seconds], dtype=torch.float64)
                    dist.all_reduce(both, op=dist.ReduceOp.MAX)
                    if rep >= o["warmup"]:
                        w, b = times.setdefault((k, m), ([], []))
                        w.append(float(both[0]))
                        b.append(float(both[1]))
        return {key: (statistics.median(w), statistics.median(b)) for key, (w, b) in times.items()}
    finally:
        destroy(ps)


def theory(kind: str, P: int, m: int) -> float:
    return (P - 1) / ((V * m if kind == "Interleaved1F1B" else m) + P - 1)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", default="2,4", help="pipeline sizes P (comma-separated)")
    p.add_argument("--micro", default="1,2,4,8", help="micro-batches per step, as multiples of P")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (after one warm-up)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--mbs", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="smoke run: P = 2, m = 2 and 4, 4 layers, hidden 32, seq 16")
    a = p.parse_args()
    if a.quick:
        a.pp, a.micro, a.repeats, a.layers, a.hidden, a.seq, a.mbs = "2", "1,2", 1, 4, 32, 16, 1
    from tests.dist_utils import run_distributed
    from tools.bench.common import cpu_name

    pps = [int(x) for x in a.pp.split(",")]
    opts = {"layers": a.layers, "hidden": a.hidden, "seq": a.seq, "mbs": a.mbs, "repeats": a.repeats, "warmup": 1,
            "micro": [int(x) for x in a.micro.split(",")]}
    for P in pps:
        if a.layers % (V * P):
            p.error(f"--layers {a.layers} must be a multiple of {V} x P = {V * P} (interleaved, v = {V})")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPU: {cpu_name()}, {cores} cores available; {a.layers} layers, hidden {a.hidden}, seq {a.seq}, "
          f"micro-batch {a.mbs}, dense; one gloo process (one thread) per stage; medians of {a.repeats} steps "
          f"after a warm-up, the schedules in rotating order")
    print("ms = wall time of the pipeline schedule's run; ideal = the busiest rank's compute time in that step "
          "(shown for 1F1B); bubble = 1 - ideal / measured; theory = (P-1)/(m+P-1), interleaved (P-1)/(2m+P-1)\n")
    print("| P | m | ideal ms | 1F1B ms | 1F1B bubble | GPipe ms | GPipe bubble | interleaved v=2 ms "
          "| interleaved bubble | theory 1F1B/GPipe | theory interleaved |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for P in pps:
        with tempfile.TemporaryDirectory() as d:
            res = run_distributed(_rank_main, P, d, P, opts, timeout=1800)[0]
        for k_micro in opts["micro"]:
            m = k_micro * P
            cells = [f"{1000 * res[('1F1B', m)][1]:.0f}"]
            for k in SCHEDULES:
                measured, ideal = res[(k, m)]
                cells += [f"{1000 * measured:.0f}", f"{1 - ideal / measured:.2f}"]
            cells += [f"{theory('1F1B', P, m):.2f}", f"{theory('Interleaved1F1B', P, m):.2f}"]
            flag = " (oversubscribed)" if P > cores else ""
            print(f"| {P}{flag} | {m} | " + " | ".join(cells) + " |", flush=True)
    if any(P > cores for P in pps):
        print(f"\nP > {cores} cores: the processes share cores, so a rank waiting in the bubble lends its core to a "
              "busy one and each rank's compute is stretched by the sharing: those rows are indicative only, not the "
              "bubble of P devices")


if __name__ == "__main__":
    main()
