#!/usr/bin/env python3
"""Decoding cost of one MoE layer call (a few tokens, eval mode, no dropping) against the dense MLP.

    python tools/bench/moe_decode.py [--quick]

Contenders, interleaved in one process: the dense MLP, our MoELayer (route, plan, gather, experts, combine,
statistics), and a PROTOTYPE of a proposed small-batch path for megatron/model/moe/layer.py: when a call
holds only a few assignments (decoding), index the chosen experts' weights directly (``w1[e]`` views, one
matmul per chosen expert) and skip the sort/plan/combine machinery and the training-only
losses (aux and z loss) — the same numbers (checked here) at a fraction of the per-call overhead.
Shapes: H=256, F=1024, E=8, top-1 and top-2; S = 1 and 8 tokens (a batch of 8 decoded together).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.config import MoEConfig  # noqa: E402
from megatron.model.moe.layer import MoELayer  # noqa: E402
from megatron.model.transformer import MLP  # noqa: E402
from tools.bench.common import interleaved_median  # noqa: E402


def small_batch_moe(layer: MoELayer, hidden: torch.Tensor) -> torch.Tensor:
    """PROTOTYPE: hidden [B, T, H] -> [B, T, H] for eval calls with few tokens (no residual MoE, no EP)."""
    B, T, H = hidden.shape
    x = hidden.reshape(B * T, H)  # [S, H]
    probs = torch.softmax(F.linear(x.float(), layer.router.wg.weight.float()), dim=-1)  # [S, E]
    weights, experts = torch.topk(probs, layer.topk, dim=-1)  # [S, k]
    if layer.topk > 1:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    ex = layer.experts
    y = torch.zeros(B * T, H, dtype=torch.float32, device=x.device)  # [S, H]
    for e in experts.unique().tolist():  # a handful of experts: plain views of their weights, no copies
        rows, choice = (experts == e).nonzero(as_tuple=True)  # assignments to expert e
        h = F.gelu(torch.addmm(ex.b1[e], x[rows], ex.w1[e]))  # [n, F]
        out = torch.addmm(ex.b2[e], h, ex.w2[e])  # [n, H]
        y.index_add_(0, rows, out.float() * weights[rows, choice][:, None])
    return y.to(hidden.dtype).reshape(B, T, H)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=200, help="layer calls per timed repeat")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="3 repeats of 50 calls")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.calls = 3, 50
    if a.threads:
        torch.set_num_threads(a.threads)
    H, F_, E = 256, 1024, 8
    torch.manual_seed(0)
    dense = MLP(H, F_).eval()
    print(f"# one layer call in eval mode, H={H}, F={F_}, E={E}, {a.calls} calls per repeat; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| tokens | top-k | dense MLP (us) | ours (us) | ours / dense | prototype (us) | prototype / dense |")
    print("|---|---|---|---|---|---|---|")
    for k in (1, 2):
        layer = MoELayer(MoEConfig(num_experts=[E], topk=k, token_dropping=False), H, F_, E, layer_number=1).eval()
        layer.experts.init_weights(0, 1, 0.02, 0.02)
        for S in (1, 8):
            x = torch.randn(S, 1, H)
            with torch.no_grad():
                torch.testing.assert_close(small_batch_moe(layer, x), layer(x)[0], rtol=1e-5, atol=1e-6)

            def many(fn):
                def run():
                    with torch.no_grad():
                        for _ in range(a.calls):
                            fn(x)
                return run

            t = interleaved_median({"dense": many(dense), "ours": many(layer),
                                    "proto": many(lambda z: small_batch_moe(layer, z))}, repeats=a.repeats)
            us = {n: 1e6 * v / a.calls for n, v in t.items()}
            print(f"| {S} | {k} | {us['dense']:.0f} | {us['ours']:.0f} | **{us['ours'] / us['dense']:.2f}** | "
                  f"{us['proto']:.0f} | **{us['proto'] / us['dense']:.2f}** |", flush=True)
    whole_model(a)


def whole_model(a):
    """Greedy decoding tokens/s of tools/bench/generation.py's models, with the prototype swapped into MoE-8."""
    from tools.bench.generation import build
    from megatron.text_generation import generate

    new = 32 if a.quick else 128
    dense, moe, proto = build(False), build(True), build(True)
    for layer in proto.moe_layers():
        layer.forward = (lambda lay: lambda h, token_mask=None: (small_batch_moe(lay, h), None))(layer)
    prompt = list(range(100, 132))
    assert generate(proto, prompt, 8, use_cache=True) == generate(moe, prompt, 8, use_cache=True)
    t = interleaved_median({n: (lambda m: lambda: generate(m, prompt, new, use_cache=True))(m)
                            for n, m in (("dense", dense), ("moe", moe), ("proto", proto))}, repeats=a.repeats)
    print(f"\n# whole model (6 layers, H=256, MoE-8 every other layer), {new} greedy tokens after 32, KV cache")
    print("| model | tokens/s | time / dense |\n|---|---|---|")
    for n, label in (("dense", "dense"), ("moe", "MoE-8, ours"), ("proto", "MoE-8, prototype small-batch path")):
        print(f"| {label} | {new / t[n]:.1f} | **{t[n] / t['dense']:.2f}** |", flush=True)


if __name__ == "__main__":
    main()
