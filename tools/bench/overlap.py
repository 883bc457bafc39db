#!/usr/bin/env python3
"""Training step time with and without --overlap-grad-reduce (2 gloo processes, data parallel).

    python tools/bench/overlap.py [--repeats 3]

8 layers, hidden 256, 8 experts every other layer, seq 128, micro-batch 4, global batch 8 (one
micro-batch per step: all reductions can hide behind that backward), 12 steps, the first 2 not
timed. Runs alternate between the two settings; medians of the per-run mean step time.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

ARGS = ["--num-layers", "8", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "128",
        "--mock-data", "--vocab-size", "8192", "--lr", "1e-4", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--train-iters", "12", "--eval-iters", "0", "--log-interval", "1000", "--num-experts", "8", "--use-cpu"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from tests.dist_utils import run_distributed
    from tools.bench.common import mean_train_step_seconds

    res = {"blocking": [], "overlap": []}
    for _ in range(a.repeats):
        for name, extra in (("blocking", []), ("overlap", ["--overlap-grad-reduce"])):
            with tempfile.TemporaryDirectory() as d:
                res[name].append(run_distributed(mean_train_step_seconds, 2, d, ARGS + extra, timeout=900)[0])
    b, o = statistics.median(res["blocking"]), statistics.median(res["overlap"])
    print(f"| setting | step time (ms) |\n|---|---|\n| blocking all-reduce | {1000 * b:.1f} |\n"
          f"| --overlap-grad-reduce | {1000 * o:.1f} |\n\nblocking / overlap = {b / o:.2f}x")


if __name__ == "__main__":
    main()
