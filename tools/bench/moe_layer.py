#!/usr/bin/env python3
"""fwd+bwd time of one MoE layer divided by the dense FFN of the same shape, side by side in one run.

Contenders: our layer (index dispatch + batched experts), and an upstream-style layer (one-hot
[S, E, C] einsum dispatch + a Python loop over deep-copied experts, as DeepSpeed's MOELayer does).

    python tools/bench/moe_layer.py --hidden 512 --tokens 4096 --experts 8 32 128
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.config import MoEConfig  # noqa: E402
from megatron.model.moe.capacity import expert_capacity  # noqa: E402
from megatron.model.moe.layer import MoELayer  # noqa: E402
from megatron.model.transformer import MLP  # noqa: E402
from tools.bench.common import interleaved_median  # noqa: E402


class UpstreamStyleMoE(nn.Module):
    """DeepSpeed's MOELayer shape of computation: one-hot dispatch/combine einsums, experts in a loop."""

    def __init__(self, H, F_, E, cf=1.0, min_cap=4):
        super().__init__()
        self.wg = nn.Linear(H, E, bias=False)
        self.experts = nn.ModuleList([copy.deepcopy(MLP(H, F_)) for _ in range(E)])
        self.E, self.cf, self.min_cap = E, cf, min_cap

    def forward(self, x):  # x [S, H]
        S = x.shape[0]
        probs = torch.softmax(self.wg(x).float(), -1)  # [S, E]
        idx = probs.argmax(-1)
        C = expert_capacity(S, self.E, self.cf, self.min_cap)
        mask = F.one_hot(idx, self.E).float()  # [S, E]
        loc = (torch.cumsum(mask, 0) - 1) * mask
        mask = mask * (loc < C)
        gates = (probs * mask).sum(-1)  # [S]
        loc_sc = F.one_hot(loc.sum(-1).long().clamp(max=C - 1), C).float()  # [S, C]
        combine = gates[:, None, None] * mask[:, :, None] * loc_sc[:, None, :]  # [S, E, C]
        dispatch = combine.bool().to(x.dtype)
        buf = torch.einsum("sec,sm->ecm", dispatch, x)  # [E, C, H]
        out = torch.stack([e(buf[i]) for i, e in enumerate(self.experts)])  # loop over experts
        return torch.einsum("sec,ecm->sm", combine.to(x.dtype), out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    H, F_ = a.hidden, 4 * a.hidden
    torch.manual_seed(0)
    x = torch.randn(1, a.tokens, H)
    print(f"# MoE layer fwd+bwd / dense FFN fwd+bwd, H={H}, F={F_}, S={a.tokens}, top-1, cf 1.0, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| experts | dense FFN (ms) | ours (ms) | ours / dense | ours no-drop / dense | upstream-style / dense |")
    print("|---|---|---|---|---|---|")
    dense = MLP(H, F_)
    for E in a.experts:
        ours = MoELayer(MoEConfig(num_experts=[E]), H, F_, E, layer_number=1)
        ours.experts.init_weights(0, 1, 0.02, 0.02)
        nodrop = MoELayer(MoEConfig(num_experts=[E], token_dropping=False), H, F_, E, layer_number=1)
        nodrop.load_state_dict(ours.state_dict())
        up = UpstreamStyleMoE(H, F_, E)

        def step(fn):
            def run():
                xi = x.clone().requires_grad_()
                y = fn(xi)
                y = y[0] if isinstance(y, tuple) else y
                y.float().sum().backward()
            return run

        t = interleaved_median({
            "dense": step(lambda z: dense(z)), "ours": step(lambda z: ours(z)),
            "nodrop": step(lambda z: nodrop(z)), "up": step(lambda z: up(z[0])),
        }, repeats=a.repeats)
        print(f"| {E} | {1e3 * t['dense']:.1f} | {1e3 * t['ours']:.1f} | {t['ours'] / t['dense']:.2f} | "
              f"{t['nodrop'] / t['dense']:.2f} | {t['up'] / t['dense']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
