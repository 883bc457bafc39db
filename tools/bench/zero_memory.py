#!/usr/bin/env python3
"""Peak resident memory per rank of one training step: plain data parallel, ZeRO-1 and ZeRO-2 (2 gloo processes).

    python tools/bench/zero_memory.py [--modes plain zero1 zero2 plain-overlap zero1-overlap]
                                      [--layers 12 --hidden 1024 --vocab 50304]

A dense GPT (default: 12 layers, hidden 1024, vocabulary 50304: 203M parameters, fp32) at DP=2, micro-batch 1,
sequence 128, two steps driven as the trainer drives them (forward-backward; the gradient all-reduce —
``-overlap``: ``--overlap-grad-reduce``'s, launched during backward — or ZeRO-2's reduce-scatter; unscale / norm / clip / Adam step), then the optimizer state a checkpoint save
gathers (``state_by_param``). Before each phase the kernel's peak-RSS counter is reset (``5`` into
``/proc/self/clear_refs``), so each figure is the peak of that phase alone (VmHWM, GB = 1e9 bytes), the
larger of the two steps; ``start`` is the RSS once the model and optimizer are built. Rank 0's figures
(rank 1 writes no checkpoint: its ``save-gather`` is smaller).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

PHASES = ("start", "fwd-bwd", "grad-reduce", "optimizer-step", "save-gather")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024 / 1e9


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _worker(rank, mode, layers, hidden, vocab):
    import torch

    from megatron.config.schema import ParallelConfig
    from megatron.model.gpt_model import GPTModel
    from megatron.optim.build import build_optimizer, shards_gradients
    from megatron.parallel.grad_sync import allreduce_gradients, clip_gradients, global_grad_norm
    from megatron.parallel.overlapped_grad_reduce import OverlappedGradReducer
    from megatron.parallel.state import initialize
    from megatron.training.arguments import parse_args

    argv = ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", "16",
            "--seq-length", "128", "--max-position-embeddings", "128", "--mock-data", "--vocab-size", str(vocab),
            "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "2", "--lr", "1e-4",
            "--clip-grad", "1.0", "--use-cpu"]
    argv += {"plain": [], "zero1": ["--use-distributed-optimizer"], "zero2": ["--zero-stage", "2"]}[mode.split("-")[0]]
    cfg = parse_args(argv)
    ps = initialize(ParallelConfig(use_cpu=True), 1)
    model = GPTModel(cfg.model)
    model.init_weights(1)
    opt = build_optimizer(model, cfg.optimizer, ps.device, ps)
    sharded = shards_gradients(opt)
    overlap = OverlappedGradReducer(model, ps) if mode.endswith("-overlap") else None
    peaks = {k: 0.0 for k in PHASES}
    peaks["start"] = _status("VmRSS")
    n_params = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        for p in model.parameters():
            if p.grad is not None:
                p.grad.zero_()
        tokens = torch.randint(0, vocab, (1, 129), generator=g)
        _reset_peak()
        if overlap is not None:
            overlap.arm()
        per_token, _ = model(tokens[:, :-1], tokens[:, 1:])
        per_token.mean().backward()
        del per_token
        peaks["fwd-bwd"] = max(peaks["fwd-bwd"], _status("VmHWM"))
        _reset_peak()
        if sharded:
            opt.reduce_gradients()
        elif overlap is not None:
            overlap.finish()
        else:
            allreduce_gradients(model, ps)
        peaks["grad-reduce"] = max(peaks["grad-reduce"], _status("VmHWM"))
        _reset_peak()
        norm = opt.grad_norm() if sharded else global_grad_norm(model, ps)
        if sharded:
            opt.clip_gradients(cfg.optimizer.clip_grad, norm)
        else:
            clip_gradients(model, cfg.optimizer.clip_grad, norm)
        opt.step()
        peaks["optimizer-step"] = max(peaks["optimizer-step"], _status("VmHWM"))
    from megatron.checkpoint.optimizer_state import state_by_param

    _reset_peak()
    state = state_by_param(opt)
    peaks["save-gather"] = _status("VmHWM")
    del state
    return {"peaks": peaks, "params": n_params}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["plain", "zero1", "zero2"])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50304)
    a = p.parse_args()
    from tests.dist_utils import run_distributed

    rows = []
    for mode in a.modes:
        with tempfile.TemporaryDirectory() as d:
            r0, r1 = run_distributed(_worker, 2, d, mode, a.layers, a.hidden, a.vocab, timeout=1800)
        rows.append((mode, r0, r1))
        print(f"{mode}: rank 0 {r0['peaks']} rank 1 {r1['peaks']}", flush=True)
    print(f"\n{rows[0][1]['params'] / 1e6:.0f}M parameters, DP=2 (gloo), peak RSS of rank 0 per phase (GB)\n")
    print("| mode | " + " | ".join(PHASES) + " |\n|---|" + "---|" * len(PHASES))
    for mode, r0, _ in rows:
        print(f"| {mode} | " + " | ".join(f"{r0['peaks'][k]:.2f}" for k in PHASES) + " |")


if __name__ == "__main__":
    main()
