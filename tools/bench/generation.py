#!/usr/bin/env python3
"""Generation tokens/s with and without the KV cache, and evaluation (loglikelihood) examples/s.

    python tools/bench/generation.py [--repeats 3]

Models: 6 layers, hidden 256, 8 heads, vocab 8192 (random weights; speed only), dense and with 8
experts every other layer (no token dropping, as at evaluation). Generation: a 32-token prompt, 128
new tokens, greedy. Evaluation: 256 synthetic loglikelihood requests (context 16-200 tokens, 1-5
continuation tokens) through the lm-eval model class, micro-batch 1 vs 16 (length-sorted, padded to
each batch's longest); 32 greedy generate_until requests (10-60 token prompts, 16 new tokens), one at
a time vs left-padded batches of 8. Timings are interleaved medians; ratios are from the same run.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from megatron.config.schema import ModelConfig, MoEConfig  # noqa: E402
from megatron.inference.generate import generate  # noqa: E402
from megatron.model.gpt_model import GPTModel  # noqa: E402
from tools.bench.common import interleaved_median  # noqa: E402


def build(moe: bool) -> GPTModel:
    cfg = ModelConfig(num_layers=6, hidden_size=256, num_attention_heads=8, vocab_size=8192, seq_length=512,
                      hidden_dropout=0.0, attention_dropout=0.0,
                      moe=MoEConfig(num_experts=[8] if moe else [1], token_dropping=False))
    m = GPTModel(cfg)
    m.init_weights(1)
    return m.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    torch.manual_seed(0)
    prompt = list(range(100, 132))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | tokens/s with KV cache | without | speed-up |\n|---|---|---|---|")
    models = {"dense": build(False), "MoE-8": build(True)}
    for name, m in models.items():
        t = interleaved_median({"cache": lambda: generate(m, prompt, 128, use_cache=True),
                                "nocache": lambda: generate(m, prompt, 128, use_cache=False)}, repeats=a.repeats)
        print(f"| {name} | {128 / t['cache']:.1f} | {128 / t['nocache']:.1f} | {t['nocache'] / t['cache']:.2f}x |",
              flush=True)

    from types import SimpleNamespace

    from megatron.evaluation.harness_model import MegatronMoELM
    from megatron.tokenizer.null_tokenizer import NullTokenizer

    rng = random.Random(0)
    reqs = [(("", ""), [rng.randrange(8000) for _ in range(rng.randint(16, 200))],
             [rng.randrange(8000) for _ in range(rng.randint(1, 5))]) for _ in range(256)]
    gen_reqs = [SimpleNamespace(args=(" ".join(str(rng.randrange(8000)) for _ in range(rng.randint(10, 60))),
                                      {"until": ["\n"], "max_gen_toks": 16})) for _ in range(32)]

    def compare(title: str, unit: str, n: int, big: int, run) -> None:
        """Micro-batch 1 against ``big`` for every model: ``run(lm)`` processes the n requests."""
        print(f"\n| model | {title}, micro-batch 1 | micro-batch {big} | speed-up |\n|---|---|---|---|")
        for name, m in models.items():
            loaded = SimpleNamespace(model=m, tokenizer=NullTokenizer(8192), cfg=m.cfg, iteration=0)
            lms = {b: MegatronMoELM(loaded=loaded, micro_batch_size=b) for b in (1, big)}
            t = interleaved_median({b: (lambda lm=lm: run(lm)) for b, lm in lms.items()}, repeats=a.repeats, warmup=0)
            print(f"| {name} | {n / t[1]:.1f} {unit} | {n / t[big]:.1f} {unit} | {t[1] / t[big]:.2f}x |", flush=True)

    compare("loglikelihood", "examples/s", len(reqs), 16, lambda lm: lm._loglikelihood_tokens(reqs, disable_tqdm=True))
    compare("generate_until", "requests/s", len(gen_reqs), 8, lambda lm: lm.generate_until(gen_reqs, disable_tqdm=True))

if __name__ == "__main__":
    main()
