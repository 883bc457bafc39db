#!/usr/bin/env python3
"""MFU on one GPU of a 350M dense GPT and the same with 8 / 32 experts every other layer, one command.

    python tools/bench/gpu.py                  # on a CUDA machine: bf16, fused AdamW, the table below
    python tools/bench/gpu.py --quick          # 3 timed steps each
    python tools/bench/gpu.py --smoke          # a tiny run of the same code on CPU (what CI exercises)

The 350M shape is GPT-3 Medium's (H=1024, 16 heads, seq 2048, vocab 50304). A "slice" keeps ``--layers``
of its 24 layers (default 8) so that 32 experts (plus their fp32 Adam state) fit in one GPU's memory;
per-token FLOPs and MFU are those of the slice. Training steps are fwd + bwd + AdamW (fused), bf16
autocast, top-1 gating with capacity factor 1.0; times are medians of interleaved steps after warm-up,
MFU is against the GPU's dense bf16 peak (megatron.planning.model_stats.KNOWN_PEAK_TFLOPS).

Prints a markdown table naming the device; exits with one line (status 0) where CUDA is absent.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.config.schema import ModelConfig, MoEConfig  # noqa: E402
from megatron.model.gpt_model import GPTModel  # noqa: E402
from megatron.planning.model_stats import count_parameters, device_peak_tflops, flops_per_token  # noqa: E402


def build(shape: dict, experts: int, device, fused: bool):
    moe = MoEConfig(num_experts=[experts], train_capacity_factor=1.0) if experts > 1 else MoEConfig()
    cfg = ModelConfig(**shape, hidden_dropout=0.0, attention_dropout=0.0, moe=moe)
    model = GPTModel(cfg).to(device)
    model.init_weights(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if fused else {"foreach": True}))
    return cfg, model, opt


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8, help="layers of the 24-layer 350M model kept in the slice")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--experts", type=int, nargs="+", default=[1, 8, 32], help="1 = dense")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="3 timed steps")
    p.add_argument("--smoke", action="store_true", help="a tiny shape on CPU: checks the script, measures nothing")
    a = p.parse_args(argv)
    if a.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        shape = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128)
        a.micro_batch, a.steps, a.experts = 2, 2, [1, 4]
    elif not torch.cuda.is_available():
        print("tools/bench/gpu.py: no CUDA device here; run it on a GPU machine (or --smoke to check the script)")
        return None
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
        shape = dict(num_layers=a.layers, hidden_size=1024, num_attention_heads=16, seq_length=2048, vocab_size=50304)
    steps = 3 if a.quick else a.steps
    peak = device_peak_tflops(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    print(f"# {name}; torch {torch.__version__}; {shape}; micro-batch {a.micro_batch}; "
          f"{'bf16 autocast' if dtype == torch.bfloat16 else 'fp32'}; peak {peak} TFLOP/s")
    print("| model | params (total / active) | ms / step | tokens/s | TFLOP/s | MFU | peak memory GiB |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for E in a.experts:
        cfg, model, opt = build(shape, E, device, fused=device.type == "cuda")
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.vocab_size, (a.micro_batch, cfg.seq_length + 1), generator=g).to(device)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                loss, stats = model(tokens[:, :-1], tokens[:, 1:])
                loss = loss.mean() + 0.01 * sum((s.aux_loss for s in stats), torch.zeros((), device=device))
            loss.backward()
            opt.step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(2):
            step()
        times = []
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        ntok = a.micro_batch * cfg.seq_length
        tflops = flops_per_token(cfg) * ntok / sec / 1e12
        mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        c = count_parameters(cfg)
        label = "dense" if E == 1 else f"MoE-{E}"
        mfu = f"{100 * tflops / peak:.1f}%" if peak else "-"
        print(f"| {label} | {c.total / 1e6:.0f}M / {c.active / 1e6:.0f}M | {1e3 * sec:.0f} | {ntok / sec:,.0f} | "
              f"{tflops:.1f} | {mfu} | {mem:.1f} |", flush=True)
        rows[label] = {"sec": sec, "tflops": tflops}
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()
