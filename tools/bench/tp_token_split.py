#!/usr/bin/env python3
"""Training step time under tensor parallelism with the MoE token split (default) and without it
(``--disable-moe-tp-token-split``: every TP rank runs the experts on all routed tokens).

    python tools/bench/tp_token_split.py [--repeats 3] [--layers 4] [--hidden 256] [--seq 256]

TP = 2 on 2 gloo processes (one thread each), 8 experts on every other layer, top-1, capacity 1.0,
micro-batch 4, global batch 8 (two micro-batches a step), 8 steps, the first 2 not timed. Runs
alternate between the two settings; medians of the per-run mean step time. With the split each TP
rank computes half the expert rows and sends half the all-to-all; it adds one all-gather of the
experts' output per MoE layer and an all-reduce of the expert gradients over TP.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--iters", type=int, default=8)
    a = p.parse_args()
    from tests.dist_utils import run_distributed
    from tools.bench.common import cpu_name, mean_train_step_seconds

    args = ["--num-layers", str(a.layers), "--hidden-size", str(a.hidden), "--num-attention-heads", "4",
            "--seq-length", str(a.seq), "--mock-data", "--vocab-size", "4096", "--lr", "1e-4",
            "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters", str(a.iters), "--eval-iters", "0",
            "--log-interval", "1000", "--num-experts", "8", "--moe-train-capacity-factor", "1.0", "--use-cpu",
            "--tensor-model-parallel-size", "2"]
    settings = (("token split (default)", []), ("replicated experts", ["--disable-moe-tp-token-split"]))
    res = {name: [] for name, _ in settings}
    for r in range(a.repeats):
        for name, extra in (settings if r % 2 == 0 else settings[::-1]):
            with tempfile.TemporaryDirectory() as d:
                res[name].append(run_distributed(mean_train_step_seconds, 2, d, args + extra, timeout=900)[0])
    split, repl = (statistics.median(res[name]) for name, _ in settings)
    print(f"CPU: {cpu_name()}; TP 2 on 2 gloo processes, {a.layers} layers, hidden {a.hidden}, seq {a.seq}, "
          f"8 experts every other layer\n")
    print(f"| setting | step time (ms) |\n|---|---|\n| {settings[0][0]} | {1000 * split:.1f} |\n"
          f"| {settings[1][0]} | {1000 * repl:.1f} |\n\nreplicated / split = {repl / split:.2f}x")


if __name__ == "__main__":
    main()
