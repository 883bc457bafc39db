"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p; stop strings.

Shapes: B = 1 (one prompt at a time), T prompt length, V vocabulary.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron.model.kv_cache import left_padded_positions

GREEDY_BELOW = 1e-5  # a temperature under this samples greedily (as vLLM): logits / 1e-40 overflow to inf


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """logits [V] with everything outside the top-k / nucleus set to -inf. The most likely token is always kept
    (a ``top_p`` too small to reach, 1e-300 for instance, keeps just that one)."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching top_p
        drop[0] = False  # top_p below float32's smallest value compares as 0: keep the top token regardless
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 0.0,
                 generator: Optional[torch.Generator] = None) -> int:
    """One token id from next-token logits [V]: argmax when ``temperature`` is below ``GREEDY_BELOW`` (0 included),
    else a draw from the temperature-scaled, top-k / nucleus-filtered distribution using ``generator``."""
    if not temperature >= GREEDY_BELOW:  # NaN too
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits.float() / temperature, top_k, top_p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 0.0, eod: Optional[int] = None, use_cache: bool = True,
             stop: Optional[Callable[[list[int]], bool]] = None, generator: Optional[torch.Generator] = None,
             max_length: Optional[int] = None) -> list[int]:
    """New token ids after ``prompt``. temperature 0 = greedy. Stops at ``eod``, when ``stop(new_ids)``
    is true, after ``max_new_tokens``, or at the model's ``max_length`` (max position embeddings)."""
    device = next(model.parameters()).device
    max_length = max_length or model.cfg.max_position_embeddings
    prompt = list(prompt)[-max_length:]
    out: list[int] = []
    cache = model.new_cache() if use_cache else None  # positions count on from what it holds
    tokens = torch.tensor([prompt], device=device)  # [1, T]
    while len(out) < max_new_tokens and len(prompt) + len(out) < max_length:
        logits = model.decode(tokens, cache).logits  # [1, 1, V]
        token = sample_token(logits[0, -1].float(), temperature, top_k, top_p, generator)
        out.append(token)
        if token == eod or (stop is not None and stop(out)):
            break
        if use_cache:
            tokens = torch.tensor([[token]], device=device)  # [1, 1]
        else:
            tokens = torch.tensor([prompt + out], device=device)
    return out


@torch.no_grad()
def generate_greedy_batch(model, prompts: list[list[int]], max_new_tokens: int, *, eod: Optional[int] = None,
                          stop: Optional[Callable[[list[int]], bool]] = None,
                          max_length: Optional[int] = None) -> list[list[int]]:
    """Greedy continuations of several prompts at once: left-padded, one KV cache, padding masked out of
    attention and MoE routing, positions counted per row. Each row equals ``generate(model, prompt, ...)``."""
    device = next(model.parameters()).device
    max_length = max_length or model.cfg.max_position_embeddings
    prompts = [list(p)[-max_length:] for p in prompts]
    B, L = len(prompts), max(len(p) for p in prompts)
    tokens = torch.zeros(B, L, dtype=torch.long, device=device)
    valid = torch.zeros(B, L, dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        tokens[i, L - len(p):] = torch.tensor(p, dtype=torch.long)
        valid[i, L - len(p):] = True
    positions = left_padded_positions(valid)  # [B, L]
    cache = model.new_cache()
    logits = model.decode(tokens, cache, positions, token_mask=valid).logits  # [B, 1, V] (left-padded: last is real)
    outs: list[list[int]] = [[] for _ in range(B)]
    done = [len(p) >= max_length for p in prompts]
    next_pos = positions[:, -1:] + 1  # [B, 1]
    for _ in range(max_new_tokens):
        nxt = logits[:, -1].float().argmax(dim=-1)  # [B]
        for i in range(B):
            if done[i]:
                continue
            t = int(nxt[i])
            outs[i].append(t)
            if t == eod or (stop is not None and stop(outs[i])) or len(prompts[i]) + len(outs[i]) >= max_length:
                done[i] = True
        if all(done):
            break
        logits = model.decode(nxt[:, None], cache, next_pos.clamp(max=max_length - 1)).logits  # [B, 1, V]
        next_pos = next_pos + 1
    return outs
