#!/usr/bin/env python3
"""fwd+bwd time of distillation's output step: fused (projection + cross-entropy + T^2 KL in one autograd step)
against the plain path (materialised logits, F.cross_entropy, log-softmaxes), with the LM-only fused
cross-entropy of a run without KD as the yardstick.

    python tools/bench/kd_loss.py                         # N = 4096 tokens, H = 128; V = 8192 and 50304
    python tools/bench/kd_loss.py --tokens 2048 --hidden 1024 --vocab 50304 --threads 16

Contenders, interleaved in one process (median of the repeats), each from the student's final hidden states
[N, H] and the tied output weight [V, H] to the gradients of both, the teacher's logits [N, V] given:
  plain       F.linear -> F.cross_entropy + kd_loss (what MoS ran before the fused step)
  fused KD    megatron.model.kd_loss.linear_cross_entropy_kd
  fused CE    megatron.model.cross_entropy.linear_cross_entropy (no teacher: the step of a run without KD)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.model.cross_entropy import linear_cross_entropy  # noqa: E402
from megatron.model.kd_loss import cross_entropy_and_kd, linear_cross_entropy_kd  # noqa: E402
from tools.bench.common import cpu_name, interleaved_median  # noqa: E402


def contenders(N: int, H: int, V: int, temperature: float) -> dict:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(1, N, H, generator=g).requires_grad_()
    w = (0.02 * torch.randn(V, H, generator=g)).requires_grad_()
    labels = torch.randint(0, V, (1, N), generator=g)
    teacher = torch.randn(1, N, V, generator=g)

    def plain():
        h.grad = w.grad = None
        ce, kl = cross_entropy_and_kd(F.linear(h, w), labels, teacher, temperature)
        (ce.sum() + kl.sum()).backward()

    def fused_kd():
        h.grad = w.grad = None
        ce, kl = linear_cross_entropy_kd(h, w, labels, teacher, temperature)
        (ce.sum() + kl.sum()).backward()

    def fused_ce():
        h.grad = w.grad = None
        linear_cross_entropy(h, w, labels).sum().backward()

    return {"plain": plain, "fused KD": fused_kd, "fused CE": fused_ce}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="N: micro-batch x sequence")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", default="8192,50304", help="comma-separated padded vocabulary sizes")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"# distillation output step fwd+bwd, N={a.tokens}, H={a.hidden}, T={a.temperature:g}, fp32; "
          f"{torch.get_num_threads()} threads, {cpu_name()}; median of {a.repeats}, interleaved")
    print("\n| V | plain (ms) | fused KD (ms) | fused CE, no KD (ms) | plain / fused KD | fused KD / fused CE |")
    print("|---|---|---|---|---|---|")
    for V in (int(v) for v in a.vocab.split(",")):
        t = interleaved_median(contenders(a.tokens, a.hidden, V, a.temperature), repeats=a.repeats)
        print(f"| {V} | {1e3 * t['plain']:.1f} | {1e3 * t['fused KD']:.1f} | {1e3 * t['fused CE']:.1f} | "
              f"{t['plain'] / t['fused KD']:.2f} | {t['fused KD'] / t['fused CE']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
