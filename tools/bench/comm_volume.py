#!/usr/bin/env python3
"""Communication volume per training step of each parallel layout, measured on gloo (CPU).

    python tools/bench/comm_volume.py [--procs 4]

Runs two training steps of one model (8 layers, hidden 256, 8 experts every other layer, seq 128,
global batch 8) under each layout in ``--procs`` real processes, counting the bytes rank 0 hands to
each collective (all-reduce, all-to-all, all-gather), and prints a markdown table per step.
Counters wrap torch.distributed in the worker processes only.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

MODEL = ["--num-layers", "8", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "128",
         "--mock-data", "--vocab-size", "8192", "--lr", "1e-4", "--micro-batch-size", "2", "--global-batch-size", "8",
         "--train-iters", "2", "--eval-iters", "0", "--log-interval", "1000", "--num-experts", "8",
         "--moe-train-capacity-factor", "1.0", "--use-cpu"]
LAYOUTS = {
    "DP 4": [],
    "DP 4, EP 2": ["--moe-expert-parallel-size", "2"],
    "DP 4, EP 4": ["--moe-expert-parallel-size", "4"],
    "DP 4, EP 4, ZeRO-1": ["--moe-expert-parallel-size", "4", "--use-distributed-optimizer"],
    "TP 2 x DP 2": ["--tensor-model-parallel-size", "2"],
    "TP 2 x DP 2, EP 2": ["--tensor-model-parallel-size", "2", "--moe-expert-parallel-size", "2"],
    "TP 2 x DP 2, EP 2, no TP token split": ["--tensor-model-parallel-size", "2", "--moe-expert-parallel-size", "2",
                                             "--disable-moe-tp-token-split"],
    "TP 2 x DP 2, EP 2, ZeRO-1": ["--tensor-model-parallel-size", "2", "--moe-expert-parallel-size", "2",
                                  "--use-distributed-optimizer"],
    "TP 4": ["--tensor-model-parallel-size", "4"],
}


def _count(rank, argv):
    import torch.distributed as dist

    import pretrain_gpt_moe

    counts = defaultdict(int)

    def wrap(name, nbytes):
        orig = getattr(dist, name)

        def f(*a, **k):
            if k.get("group") is not None and dist.get_world_size(k["group"]) == 1:
                return orig(*a, **k)
            counts[name] += nbytes(*a, **k)
            return orig(*a, **k)
        setattr(dist, name, f)

    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    wrap("all_reduce", lambda t, *a, **k: size(t))
    wrap("all_to_all_single", lambda out, inp, *a, **k: size(inp))
    wrap("all_gather", lambda outs, t, *a, **k: size(t))
    pretrain_gpt_moe.main(argv)
    return dict(counts)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=4)
    a = p.parse_args()
    import tempfile

    from tests.dist_utils import run_distributed

    print("| layout | all-reduce MB/step | all-to-all MB/step | all-gather MB/step | total MB/step |")
    print("|---|---|---|---|---|")
    for name, extra in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as d:
            res = run_distributed(_count, a.procs, d, MODEL + extra, timeout=900)[0]
        mb = {k: v / 2 / 1e6 for k, v in res.items()}  # two steps
        ar, a2a, ag = mb.get("all_reduce", 0.0), mb.get("all_to_all_single", 0.0), mb.get("all_gather", 0.0)
        print(f"| {name} | {ar:.1f} | {a2a:.1f} | {ag:.1f} | {ar + a2a + ag:.1f} |", flush=True)


if __name__ == "__main__":
    main()
