#!/usr/bin/env python3
"""Training tokens/s and MFU, measured side by side in one run:

  1. our dense GPT vs Hugging Face transformers' GPT2LMHeadModel of the same shape (fp32 and bf16
     autocast), same optimizer (AdamW), same batch;
  2. our base + MoE-E (top-1, every other layer) vs the same dense base (same active parameters);
  3. preprocessing throughput (MB/s) of tools/preprocess_data.py with GPT-2 BPE, if the shared data is present.

    python tools/bench/train_throughput.py            # transformers is a bench-only dependency
    python tools/bench/train_throughput.py --quick --profile   # 2 repeats, and the top of the profile

fp32, plus bf16 autocast where this machine runs bf16 fast (megatron.planning.precision_probe); --dtypes overrides.
"ours dense, unfused loss" is our model with the logits materialised and F.cross_entropy on them: the
fused output cross-entropy's gain, measured side by side. "unfused expert grads" is the MoE model with the
experts' gradient-accumulation fusion off (autograd allocates and adds each expert weight gradient).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from megatron.config.schema import ModelConfig, MoEConfig  # noqa: E402
from megatron.model.gpt_model import GPTModel  # noqa: E402
from megatron.planning.model_stats import flops_per_token  # noqa: E402
from megatron.planning.precision_probe import bf16_is_fast  # noqa: E402
from tools.bench.common import interleaved_median  # noqa: E402


class UnfusedLossGPT(GPTModel):
    """Our model with the logits materialised and F.cross_entropy on them (the path before the fused loss)."""

    def _fused_output_loss(self) -> bool:
        return False


def profile_step(fn, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=44)


def ours(cfg, cls=GPTModel):
    m = cls(cfg)
    m.init_weights(0)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True)
    return m, opt


def hf(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    c = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.hidden_size,
                   n_layer=cfg.num_layers, n_head=cfg.num_attention_heads, n_inner=cfg.ffn_hidden_size,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa")
    m = GPT2LMHeadModel(c)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True)
    return m, opt


def step_fn(kind, model, opt, tokens, dtype, micro_batches: int = 1):
    """One optimizer step over ``tokens`` split into ``micro_batches`` accumulated micro-batches."""
    def step():
        opt.zero_grad(set_to_none=True)
        for mb in tokens.chunk(micro_batches):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                if kind == "hf":
                    loss = model(input_ids=mb, labels=mb).loss
                else:
                    per_tok, stats = model(mb[:, :-1], mb[:, 1:])
                    loss = per_tok.mean()
                    if stats:
                        loss = loss + 0.01 * sum(s.aux_loss for s in stats)
            (loss / micro_batches).backward()
        opt.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--micro-batches", type=int, default=1, help="gradient accumulation: the batch split into this "
                   "many micro-batches per optimizer step")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=None,
                   help="default: fp32, and bf16 where this machine runs it fast (megatron.planning.precision_probe)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="2 repeats, no preprocessing step")
    p.add_argument("--compile", action="store_true", help="add our dense model under torch.compile as a contender")
    p.add_argument("--profile", action="store_true", help="print the top of a torch.profiler table for ours and HF")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats = 2
    if a.threads:
        torch.set_num_threads(a.threads)
    bf16_fast, why = bf16_is_fast("cpu")
    if a.dtypes is None:
        a.dtypes = ["fp32", "bf16"] if bf16_fast else ["fp32"]
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    base = dict(num_layers=a.layers, hidden_size=a.hidden, num_attention_heads=a.heads, seq_length=a.seq,
                vocab_size=a.vocab, hidden_dropout=0.0, attention_dropout=0.0)
    dense_cfg = ModelConfig(**base)
    moe_cfg = ModelConfig(**base, moe=MoEConfig(num_experts=[a.experts], train_capacity_factor=1.0))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
    ntok = a.batch * a.seq
    print(f"# L={a.layers} H={a.hidden} heads={a.heads} seq={a.seq} batch={a.batch} ({a.micro_batches} micro-batches) "
          f"vocab={a.vocab}, MoE-{a.experts}; "
          f"{torch.get_num_threads()} threads; torch {torch.__version__}; bf16: {why}")
    print("| contender | dtype | ms / step | tokens/s | MFU vs measured matmul peak | ratio |")
    print("|---|---|---|---|---|---|")
    for name in a.dtypes:
        dt = dtypes[name]
        mm = torch.randn(512, 512).to(dt)
        fns, fpt = {}, {}
        m1, o1 = ours(dense_cfg)
        fns["ours dense"] = step_fn("ours", m1, o1, tokens, dt, a.micro_batches)
        fpt["ours dense"] = flops_per_token(dense_cfg)
        m0, o0 = ours(dense_cfg, UnfusedLossGPT)
        fns["ours dense, unfused loss"] = step_fn("ours", m0, o0, tokens, dt, a.micro_batches)
        fpt["ours dense, unfused loss"] = flops_per_token(dense_cfg)
        if a.compile:
            mc, oc = ours(dense_cfg)
            fns["ours dense, torch.compile"] = step_fn("ours", torch.compile(mc), oc, tokens, dt, a.micro_batches)
            fpt["ours dense, torch.compile"] = flops_per_token(dense_cfg)
        try:
            m2, o2 = hf(dense_cfg)
            fns["HF GPT2LMHeadModel"] = step_fn("hf", m2, o2, tokens[:, :-1], dt, a.micro_batches)
            fpt["HF GPT2LMHeadModel"] = flops_per_token(dense_cfg)
        except ImportError:
            print("(transformers not installed: pip install transformers)")
        m3, o3 = ours(moe_cfg)
        fns[f"ours MoE-{a.experts}"] = step_fn("ours", m3, o3, tokens, dt, a.micro_batches)
        fpt[f"ours MoE-{a.experts}"] = flops_per_token(moe_cfg)
        m4, o4 = ours(moe_cfg)
        for layer in m4.moe_layers():
            layer.experts.fuse_wgrad = False
        fns[f"ours MoE-{a.experts}, unfused expert grads"] = step_fn("ours", m4, o4, tokens, dt, a.micro_batches)
        fpt[f"ours MoE-{a.experts}, unfused expert grads"] = flops_per_token(moe_cfg)
        if a.profile:
            for k in ("ours dense", "HF GPT2LMHeadModel"):
                if k in fns:
                    print(f"\n### profile: {k}, {name}, one step after warm-up (self CPU time)\n```")
                    print(profile_step(fns[k]))
                    print("```\n")
        fns["matmul peak"] = lambda: [mm @ mm for _ in range(8)]  # timed among the steps, as loaded as they are
        t = interleaved_median(fns, repeats=a.repeats)
        peak = 2 * 512**3 * 8 / t.pop("matmul peak")
        for k, sec in t.items():
            ref = "ours dense" if k.startswith("ours MoE") else "HF GPT2LMHeadModel"
            ratio = f"**{t[ref] / sec:.2f}x** vs {ref}" if ref in t and k != ref else ""
            print(f"| {k} | {name} | {1e3 * sec:.0f} | {ntok / sec:,.0f} | {100 * fpt[k] * ntok / sec / peak:.1f}% | {ratio} |",
                  flush=True)
    data = os.path.join(ROOT, "..", "shared", "data")
    if os.path.isdir(data) and not a.quick:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.time()
            r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input",
                                os.path.join(data, "corpus", "wikitext-2-raw", "train.txt"), "--output-prefix", f"{d}/wt",
                                "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", os.path.join(data, "gpt2", "gpt2-vocab.json"),
                                "--merge-file", os.path.join(data, "gpt2", "gpt2-merges.txt"), "--append-eod",
                                "--workers", "2", "--quiet"], capture_output=True, text=True)
            print(f"\npreprocessing WikiText-2 train (10.9 MB, GPT-2 BPE, 2 workers): {r.stdout.strip()} "
                  f"[wall {time.time() - t0:.1f} s]")


if __name__ == "__main__":
    main()
