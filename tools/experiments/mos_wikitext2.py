#!/usr/bin/env python3
"""MoS experiment (issue 4): a PR-MoE teacher, then two smaller students, on WikiText-2.

    python tools/experiments/mos_wikitext2.py --out exp_mos [--iters 600] [--teacher-iters 800]

Trains (1) a 6-layer PR-MoE teacher (Residual-MoE, experts 4 4 8), then for the same iterations
(2) a 4-layer student (experts 4 8) with staged KD from the teacher (MoS, KD stopped at 70%) and
(3) the same student without KD. Prints the three final validation losses, writes the validation
curves to OUT/curves.csv and a plot to OUT/curves.svg. Not run in CI (about an hour on 2 cores).
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys

from plotting import svg_plot  # tools/experiments/plotting.py (this script's folder is on sys.path)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("MEGATRON_MOE_DATA", os.path.join(ROOT, "..", "shared", "data"))


def run(cmd):
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def prepare(out):
    wt2 = os.path.join(DATA, "corpus", "wikitext-2-raw", "train.txt")
    if not os.path.isfile(wt2):
        sys.exit(f"error: {wt2} not found: point $MEGATRON_MOE_DATA at the shared data folder")
    py = sys.executable
    if not os.path.isfile(os.path.join(out, "sp.model")):
        run([py, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", wt2, "--model-prefix",
             os.path.join(out, "sp"), "--vocab-size", "8000"])
    if not os.path.isfile(os.path.join(out, "wt2_text_document.idx")):
        run([py, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", wt2, "--output-prefix",
             os.path.join(out, "wt2"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
             os.path.join(out, "sp.model"), "--append-eod", "--workers", "2", "--quiet"])


def precision_flags():
    """bf16 only where this machine runs it fast: the rule training's start-up warning uses."""
    sys.path.insert(0, ROOT)
    from megatron.planning.precision_probe import preferred_precision

    return ["--bf16"] if preferred_precision() == "bf16" else []


def common(out, iters):
    return precision_flags() + ["--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
            "--micro-batch-size", "16", "--global-batch-size", "32", "--train-iters", str(iters),
            "--lr", "2e-3", "--min-lr", "2e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "20",
            "--adam-beta2", "0.95", "--weight-decay", "0.1", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--moe-loss-coeff", "0.01", "--moe-min-capacity", "4", "--expert-interval", "2", "--mlp-type", "residual",
            "--data-path", os.path.join(out, "wt2_text_document"), "--split", "95,5,0",
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", os.path.join(out, "sp.model"),
            "--log-interval", "50", "--eval-interval", "50", "--eval-iters", "10", "--seed", "1234"]


def train(out, name, iters, extra):
    d = os.path.join(out, name)
    if not os.path.isfile(os.path.join(d, "checkpoints", "latest_checkpointed_iteration.txt")):
        run([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py")] + common(out, iters) + extra +
            ["--save", os.path.join(d, "checkpoints"), "--tensorboard-dir", os.path.join(d, "tb")])
    return read_curve(os.path.join(d, "tb"))


def read_curve(tb):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb)
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("lm loss validation")]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="exp_mos")
    p.add_argument("--iters", type=int, default=600)
    p.add_argument("--teacher-iters", type=int, default=800)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    prepare(a.out)
    stop = a.iters * 7 // 10
    teacher_ck = os.path.join(a.out, "teacher", "checkpoints")
    curves = {
        "teacher (6 layers, 4 4 8)": train(a.out, "teacher", a.teacher_iters, ["--num-layers", "6", "--num-experts", "4", "4", "8"]),
        "MoS student (4 layers, 4 8)": train(a.out, "student_mos", a.iters, [
            "--num-layers", "4", "--num-experts", "4", "8", "--mos", "--load-teacher", teacher_ck,
            "--kd-alpha-ce", "1", "--kd-beta-ce", "1", "--kd-temp", "1.0", "--kd-stop-iters", str(stop)]),
        "student, no KD": train(a.out, "student_nokd", a.iters, ["--num-layers", "4", "--num-experts", "4", "8"]),
    }
    with open(os.path.join(a.out, "curves.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "iteration", "valid_lm_loss"])
        for name, c in curves.items():
            for step, v in c:
                w.writerow([name, step, f"{v:.5f}"])
    svg_plot(curves, os.path.join(a.out, "curves.svg"), f"WikiText-2: MoS (KD stopped at {stop}) vs no KD")
    print("\n| run | final validation lm loss | PPL |\n|---|---|---|")
    import math

    for name, c in curves.items():
        print(f"| {name} | {c[-1][1]:.4f} | {math.exp(c[-1][1]):.1f} |")


if __name__ == "__main__":
    main()
