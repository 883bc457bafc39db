#!/usr/bin/env python3
"""fwd+bwd time of one MoE layer against the dense FFN, DeepSpeed's own MoE layer and the memory floor.

    python tools/bench/moe_layer.py                 # S=2048, H=256, F=1024, E = 8 32 128, 5 repeats
    python tools/bench/moe_layer.py --quick         # 2 repeats, E = 8 32
    python tools/bench/moe_layer.py --grads none    # .grad set to None before each fwd+bwd (or: zero)
    pip install -r tools/bench/requirements.txt     # DeepSpeed (CPU build), bench-only; skipped when absent

Contenders, interleaved in one process (median of the repeats): the dense FFN (H -> F -> H, the same
FLOPs per token as top-1), our MoELayer (top-1, capacity factor 1.0, min capacity 4; its experts write their
weight gradients into ``.grad`` in place), the same layer with that fusion off (``fuse_wgrad=False``: autograd
allocates each weight gradient and adds it), ours without token dropping, ``deepspeed.moe.layer.MoE``
(ep_size 1, world size 1 on gloo, the same gate settings), and our layer's expert computation alone ("expert
matmuls": the same fused expert function on tokens already laid out [E, C, H], no routing, dispatch or combine)
— what torch's batched matmul kernels take for the experts' FLOPs at C = S / E rows each.

Gradients: by default each contender's ``.grad`` is kept across repeats, so every backward accumulates into
an existing gradient (a training step's later micro-batches); ``--grads none`` sets them to None before each
repeat (a step's first micro-batch when the trainer frees gradients, as ours does); ``--grads zero`` zeroes
them in place (persistent gradient buffers, as Megatron-LM keeps them).

The floor: the layer must stream its expert weights twice (forward, backward) and read-modify-write
their gradients (accumulated across repeats), 4 x W bytes with W = E x 2 x H x F x 4; at this machine's
copy bandwidth (measured in the same run) that takes ``traffic`` seconds. No implementation can beat
max(dense FFN time, traffic); the table gives ours as a multiple of that.

Precision: fp32, plus bf16 autocast where bf16 is fast on this machine (megatron.planning.precision_probe);
``--dtypes`` overrides.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.config.schema import MoEConfig  # noqa: E402
from megatron.model.moe.layer import MoELayer  # noqa: E402
from megatron.model.transformer import MLP  # noqa: E402
from megatron.planning.precision_probe import bf16_is_fast  # noqa: E402
from tools.bench.common import interleaved_median  # noqa: E402


def copy_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Bytes moved per second by a large out-of-cache copy (read + write), best of ``repeats``."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def deepspeed_moe(H: int, F_: int, E: int):
    """DeepSpeed's own MoE layer, or (None, reason) where DeepSpeed is not installed."""
    try:
        import torch.distributed as dist
        from deepspeed.moe.layer import MoE
    except ImportError as e:
        return None, f"DeepSpeed not installed ({e.name}): pip install -r tools/bench/requirements.txt"
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/rendezvous", rank=0, world_size=1)
    return MoE(H, MLP(H, F_), num_experts=E, ep_size=1, k=1, capacity_factor=1.0, eval_capacity_factor=1.0,
               min_capacity=4, drop_tokens=True), ""


class ExpertsOnly(nn.Module):
    """Our layer's experts on tokens already laid out one block per expert: [1, S, H] -> [E, S/E, H] -> back."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, x):
        E = self.experts.w1.shape[0]
        buf = x.reshape(E, -1, x.shape[-1])  # [E, C, H], C = S / E (capacity factor 1.0)
        return self.experts.forward(buf, fused=self.experts.fuse_wgrad).reshape(x.shape)


def fwd_bwd(fn, x, dtype, grads: str):
    def run():
        if grads != "accumulate":
            fn.zero_grad(set_to_none=grads == "none")
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            y = fn(xi)
        y = y[0] if isinstance(y, tuple) else y
        y.float().sum().backward()
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="default: fp32, and bf16 where this machine runs it fast")
    p.add_argument("--grads", choices=["accumulate", "none", "zero"], default="accumulate",
                   help="accumulate: keep .grad across repeats (default); none: set it to None before each; "
                        "zero: zero it in place before each")
    p.add_argument("--quick", action="store_true", help="2 repeats, E = 8 32")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.experts = 2, [e for e in a.experts if e <= 32]
    if a.threads:
        torch.set_num_threads(a.threads)
    bf16_fast, why = bf16_is_fast("cpu")
    if a.dtypes is None:
        a.dtypes = ["fp32", "bf16"] if bf16_fast else ["fp32"]
    H, F_, S = a.hidden, 4 * a.hidden, a.tokens
    torch.manual_seed(0)
    x = torch.randn(1, S, H)
    bw = copy_bandwidth()
    print(f"# MoE layer fwd+bwd, H={H}, F={F_}, S={S}, top-1, capacity factor 1.0; {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s; grads: {a.grads}; bf16: {why}")
    dense = MLP(H, F_)
    for dname in a.dtypes:
        dtype = torch.bfloat16 if dname == "bf16" else torch.float32
        print(f"\n| {dname} | dense FFN (ms) | weight traffic (ms) | ours (ms) | ours / floor | ours / dense | "
              "ours / ours unfused | ours no-drop / dense | DeepSpeed / dense | ours / DeepSpeed | "
              "expert matmuls (ms) | expert matmuls / floor |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for E in a.experts:
            ours = MoELayer(MoEConfig(num_experts=[E]), H, F_, E, layer_number=1)
            ours.experts.init_weights(0, 1, 0.02, 0.02)
            unfused = MoELayer(MoEConfig(num_experts=[E]), H, F_, E, layer_number=1)
            unfused.load_state_dict(ours.state_dict())
            unfused.experts.fuse_wgrad = False
            nodrop = MoELayer(MoEConfig(num_experts=[E], token_dropping=False), H, F_, E, layer_number=1)
            nodrop.load_state_dict(ours.state_dict())
            only = copy.deepcopy(ours.experts)
            fns = {"dense": fwd_bwd(dense, x, dtype, a.grads), "ours": fwd_bwd(ours, x, dtype, a.grads),
                   "matmuls": fwd_bwd(ExpertsOnly(only), x, dtype, a.grads),
                   "unfused": fwd_bwd(unfused, x, dtype, a.grads), "nodrop": fwd_bwd(nodrop, x, dtype, a.grads)}
            ds, reason = deepspeed_moe(H, F_, E)
            if ds is not None:
                fns["ds"] = fwd_bwd(ds, x, dtype, a.grads)
            t = interleaved_median(fns, repeats=a.repeats)
            expert_bytes = E * 2 * H * F_ * 4
            traffic = 4 * expert_bytes / bw
            floor = max(t["dense"], traffic)
            ds_cols = (f"{t['ds'] / t['dense']:.2f} | **{t['ours'] / t['ds']:.2f}**" if "ds" in t else "- | -")
            print(f"| E={E} | {1e3 * t['dense']:.1f} | {1e3 * traffic:.1f} | {1e3 * t['ours']:.1f} | "
                  f"**{t['ours'] / floor:.2f}** | {t['ours'] / t['dense']:.2f} | {t['ours'] / t['unfused']:.2f} | "
                  f"{t['nodrop'] / t['dense']:.2f} | {ds_cols} | {1e3 * t['matmuls']:.1f} | "
                  f"{t['matmuls'] / floor:.2f} |", flush=True)
            if ds is None:
                print(f"(DeepSpeed column skipped: {reason})")
            del ours, unfused, nodrop, ds, fns, only


if __name__ == "__main__":
    main()
