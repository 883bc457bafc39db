"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p; stop strings.

Shapes: B = 1 (one prompt at a time), T prompt length, V vocabulary.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """logits [V] with everything outside the top-k / nucleus set to -inf."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


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
    caches = [dict() for _ in model.layers] if use_cache else None
    tokens = torch.tensor([prompt], device=device)  # [1, T]
    offset = 0
    while len(out) < max_new_tokens and len(prompt) + len(out) < max_length:
        logits, _ = model(tokens, kv_caches=caches, position_offset=offset)  # [1, T, V]
        nxt = logits[0, -1].float()
        if temperature <= 0:
            token = int(torch.argmax(nxt))
        else:
            probs = torch.softmax(filter_logits(nxt / temperature, top_k, top_p), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        out.append(token)
        if token == eod or (stop is not None and stop(out)):
            break
        if use_cache:
            offset += tokens.shape[1]
            tokens = torch.tensor([[token]], device=device)
        else:
            tokens = torch.tensor([prompt + out], device=device)
    return out
