#!/usr/bin/env python3
"""Generate text from a checkpoint (dense, MoE, PR-MoE, MoS; saved at any EP size).

    python tools/generate_text.py --load CKPT --prompt "The history of" [--prompt ...] \\
        [--prompt-file prompts.txt] [--max-new-tokens 64] [--temperature 0.8 --top-k 50 --top-p 0.9] \\
        [--no-kv-cache] [--seed 1] [--moe-eval-capacity-factor CF] [--batch-size 8]

Greedy when --temperature is 0 (the default); greedy prompts are decoded --batch-size at a time in
one left-padded KV cache. Prints each continuation and the tokens per second.
"""
from __future__ import annotations

import math
import os
import time

import torch

from megatron.checkpoint.stored_config import read_checkpoint_config
from megatron.errors import UserError, run_cli
from megatron.inference.devices import check_device
from megatron.inference.generate import generate, generate_greedy_batch
from megatron.inference.load import load_model
from megatron.tokenizer import registry as tokenizers
from megatron.training.arguments import argument_parser


def parse(argv=None):
    p = argument_parser(description=__doc__)
    p.add_argument("--load", required=True, help="checkpoint directory (the --save of training)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="one prompt per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole sequence each step (slower)")
    p.add_argument("--batch-size", type=int, default=8, help="greedy prompts decoded together (left-padded)")
    p.add_argument("--moe-eval-capacity-factor", type=float, default=None,
                   help="drop tokens at this capacity factor (default: no token is dropped)")
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--vocab-file"), p.add_argument("--merge-file"), p.add_argument("--tokenizer-model")
    a = p.parse_args(argv)
    if a.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if a.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if a.temperature < 0 or not (0.0 <= a.top_p <= 1.0) or a.top_k < 0:
        raise UserError("--temperature must be >= 0, --top-k >= 0 and --top-p in [0, 1]")
    if not math.isfinite(a.temperature) or 0 < a.temperature < MIN_TEMPERATURE:
        raise UserError(f"--temperature {a.temperature}: use 0 for greedy decoding or a finite value >= "
                        f"{MIN_TEMPERATURE} for sampling (the logits divided by a smaller one overflow)")
    if not 0 <= a.seed < 2**63:
        raise UserError(f"--seed must be in [0, 2^63) (got {a.seed})")
    cf = a.moe_eval_capacity_factor
    if cf is not None and not (math.isfinite(cf) and cf > 0):
        raise UserError(f"--moe-eval-capacity-factor must be > 0 (got {cf}); leave it out to drop no token")
    a.device = check_device(a.device)
    return a


MIN_TEMPERATURE = 1e-5  # as the server, where a smaller one samples greedily


def read_prompt_file(path: str) -> list:
    """Non-empty lines of a UTF-8 file; anything else is one line naming the file and line."""
    if not os.path.isfile(path):
        raise UserError(f"--prompt-file {path}: file not found")
    prompts = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"--prompt-file {path} line {n}: not UTF-8 text (byte 0x{raw[e.start]:02x}); give "
                                f"one UTF-8 prompt per line") from None
            if "\0" in line:
                raise UserError(f"--prompt-file {path} line {n}: holds a NUL byte (a binary file?); give one UTF-8 "
                                f"prompt per line")
            if line.strip():
                prompts.append(line.rstrip("\r\n"))
    return prompts


def main(argv=None) -> dict:
    a = parse(argv)
    prompts = list(a.prompt)
    if a.prompt_file:
        prompts += read_prompt_file(a.prompt_file)
    if not prompts:
        raise UserError("give at least one --prompt or a --prompt-file")
    _, common = read_checkpoint_config(a.load)
    tokenizers.check_overrides(common["config"]["data"].get("tokenizer_type"), vocab_file=a.vocab_file,
                               merge_file=a.merge_file, tokenizer_model=a.tokenizer_model)
    lm = load_model(a.load, a.device, a.moe_eval_capacity_factor, torch.bfloat16 if a.bf16 else None,
                    a.vocab_file, a.merge_file, a.tokenizer_model)
    tok = lm.tokenizer
    context = lm.cfg.max_position_embeddings
    encoded = []
    for i, prompt in enumerate(prompts):
        try:
            ids = tok.tokenize(prompt)
        except Exception as e:
            raise UserError(f"--prompt {i} cannot be tokenized by the checkpoint's tokenizer ({e})") from None
        if not ids:
            raise UserError(f"--prompt {i} is empty: give some text to continue")
        if len(ids) >= context:
            raise UserError(f"--prompt {i} is {len(ids)} tokens; the model's context of {context} (max position "
                            f"embeddings) leaves no room to generate: shorten it")
        if len(ids) + a.max_new_tokens > context:
            print(f"WARNING: --prompt {i} ({len(ids)} tokens) + --max-new-tokens {a.max_new_tokens} is past the "
                  f"context of {context}: it stops after {context - len(ids)} tokens", flush=True)
        encoded.append(ids)
    g = torch.Generator().manual_seed(a.seed)
    outputs, n_tokens, t0 = [], 0, time.perf_counter()
    batched = a.temperature == 0 and not a.no_kv_cache and a.batch_size > 1
    step = a.batch_size if batched else 1
    for start in range(0, len(prompts), step):
        chunk = prompts[start: start + step]
        if batched:  # greedy prompts share one left-padded KV cache
            rows = generate_greedy_batch(lm.model, encoded[start: start + step], a.max_new_tokens, eod=tok.eod)
        else:
            rows = [generate(lm.model, encoded[start], a.max_new_tokens, temperature=a.temperature,
                             top_k=a.top_k, top_p=a.top_p, eod=tok.eod, use_cache=not a.no_kv_cache, generator=g)]
        for prompt, ids in zip(chunk, rows):
            n_tokens += len(ids)
            text = tok.detokenize([i for i in ids if i != tok.eod])
            outputs.append(text)
            print(f"--- prompt: {prompt}\n{prompt}{text}", flush=True)
    dt = time.perf_counter() - t0
    print(f"> {n_tokens} tokens in {dt:.2f} s: {n_tokens / dt:.1f} tokens/s "
          f"({'no ' if a.no_kv_cache else ''}KV cache, iteration {lm.iteration} of {a.load})")
    return {"outputs": outputs, "tokens_per_second": n_tokens / dt}


if __name__ == "__main__":
    run_cli(lambda: main() and 0)
