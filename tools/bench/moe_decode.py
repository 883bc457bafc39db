#!/usr/bin/env python3
"""Decoding cost of MoE against dense: one layer call with a few tokens, then whole-model greedy decoding.

    python tools/bench/moe_decode.py [--quick] [--threads N]

Contenders, interleaved in one process, eval mode, no token dropping, under ``torch.no_grad()``:
the dense MLP; the MoE layer's small-batch path (megatron/model/moe/small_batch.py: route, then one
``addmm`` pair per chosen expert on views of its weights), which the layer takes for calls of up to
``MAX_ASSIGNMENTS`` assignments; and the layer's dispatched path (plan, dispatch, grouped experts,
combine; ``MoELayer.small_batch = False``), which it takes for everything larger. Their outputs are
checked equal first; the layer table times the small-batch path directly, also past the limit (marked
"not used": the layer takes the dispatched path there). Layer shapes: H=256, F=1024, E=8, top-1 and
top-2, S = 1 to 64 tokens (a decode step of S rows). Whole model: tools/bench/generation.py's 6-layer models (MoE-8 every other layer),
greedy decoding with a KV cache of one prompt and of a batch of 16 prompts.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.config.schema import MoEConfig  # noqa: E402
from megatron.model.moe.layer import MoELayer  # noqa: E402
from megatron.model.moe.small_batch import MAX_ASSIGNMENTS, small_batch_forward  # noqa: E402
from megatron.model.transformer import MLP  # noqa: E402
from tools.bench.common import interleaved_median  # noqa: E402


def set_small_batch(model_or_layer, on: bool):
    layers = model_or_layer.moe_layers() if hasattr(model_or_layer, "moe_layers") else [model_or_layer]
    for layer in layers:
        layer.small_batch = on
    return model_or_layer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=200, help="layer calls per timed repeat")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tokens", default="1,8,16,32,64", help="tokens per layer call")
    p.add_argument("--quick", action="store_true", help="3 repeats of 50 calls, 32 new tokens")
    p.add_argument("--layer-only", action="store_true", help="skip the whole-model decoding")
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
    print("| tokens | top-k | dense MLP (us) | small-batch path (us) | small / dense | dispatched path (us) | "
          "dispatched / dense |\n|---|---|---|---|---|---|---|")
    for k in (1, 2):
        fast = MoELayer(MoEConfig(num_experts=[E], topk=k, token_dropping=False), H, F_, E, layer_number=1).eval()
        fast.experts.init_weights(0, 1, 0.02, 0.02)
        slow = set_small_batch(MoELayer(MoEConfig(num_experts=[E], topk=k, token_dropping=False), H, F_, E,
                                        layer_number=1).eval(), False)
        slow.load_state_dict(fast.state_dict())
        for S in (int(s) for s in a.tokens.split(",")):
            x = torch.randn(S, 1, H)
            with torch.no_grad():
                torch.testing.assert_close(fast(x)[0], slow(x)[0], rtol=1e-5, atol=1e-6)

            def many(fn):
                def run():
                    with torch.no_grad():
                        for _ in range(a.calls):
                            fn(x)
                return run

            direct = (lambda z: small_batch_forward(fast, z.reshape(S, H), None))  # past the limit too
            t = interleaved_median({"dense": many(dense), "fast": many(direct), "slow": many(slow)}, repeats=a.repeats)
            us = {n: 1e6 * v / a.calls for n, v in t.items()}
            used = "" if S * k <= MAX_ASSIGNMENTS else " (not used)"
            print(f"| {S} | {k} | {us['dense']:.0f} | {us['fast']:.0f}{used} | **{us['fast'] / us['dense']:.2f}** | "
                  f"{us['slow']:.0f} | {us['slow'] / us['dense']:.2f} |", flush=True)
    if not a.layer_only:
        whole_model(a)


def whole_model(a):
    """Greedy decoding tokens/s of tools/bench/generation.py's models: dense, MoE-8, MoE-8 without the small-batch path."""
    from megatron.inference.generate import generate, generate_greedy_batch
    from tools.bench.generation import build

    new = 32 if a.quick else 128
    models = {"dense": build(False), "moe": build(True), "moe-dispatched": set_small_batch(build(True), False)}
    prompt = list(range(100, 132))
    batch = [list(range(100 + i, 120 + 2 * i)) for i in range(16)]
    assert generate(models["moe"], prompt, 8) == generate(models["moe-dispatched"], prompt, 8)
    assert generate_greedy_batch(models["moe"], batch, 4) == generate_greedy_batch(models["moe-dispatched"], batch, 4)
    labels = (("dense", "dense"), ("moe", "MoE-8 (small-batch path)"), ("moe-dispatched", "MoE-8, dispatched path"))
    for title, run, n_tok in (
            ("1 prompt of 32 tokens", lambda m: lambda: generate(m, prompt, new), new),
            ("16 prompts of 20-35 tokens batched", lambda m: lambda: generate_greedy_batch(m, batch, new), 16 * new)):
        t = interleaved_median({n: run(m) for n, m in models.items()}, repeats=a.repeats)
        print(f"\n# whole model (6 layers, H=256, MoE-8 every other layer, top-1), {title}: {new} greedy tokens "
              f"each, KV cache (prefill included)")
        print("| model | tokens/s | time / dense |\n|---|---|---|")
        for n, label in labels:
            print(f"| {label} | {n_tok / t[n]:.1f} | **{t[n] / t['dense']:.2f}** |", flush=True)


if __name__ == "__main__":
    main()
