"""Megatron's learning-rate schedule, counted in samples (iterations and tokens are converted).

A token-based schedule (``--lr-warmup-tokens`` / ``--lr-decay-tokens``) advances by the tokens
actually trained, divided by ``--seq-length``: with a sequence-length curriculum a short step moves
it less than a full-length one; without one this equals the samples consumed.
"""
from __future__ import annotations

import math


class LRScheduler:
    def __init__(self, max_lr: float, min_lr: float, warmup_samples: int, decay_samples: int, style: str,
                 token_seq_length: int | None = None):
        self.max_lr, self.min_lr, self.style = max_lr, min_lr, style
        self.warmup_samples, self.decay_samples = int(warmup_samples), max(int(decay_samples), 1)
        self.token_seq_length = token_seq_length  # set: the schedule counts tokens trained / this length
        self.num_samples = self.num_tokens = 0

    def progress(self) -> float:
        """Where the schedule stands, in samples (tokens trained / seq length for a token-based one)."""
        if self.token_seq_length:
            return self.num_tokens / self.token_seq_length
        return self.num_samples

    def reset(self) -> None:
        self.num_samples = self.num_tokens = 0

    def get_lr(self, num_samples=None) -> float:
        n = self.progress() if num_samples is None else num_samples
        if self.warmup_samples > 0 and n <= self.warmup_samples:
            return self.max_lr * n / self.warmup_samples
        if self.style == "constant":
            return self.max_lr
        if self.style == "inverse-square-root":
            w, n = max(self.warmup_samples, 1), max(n, 1)
            return max(self.min_lr, self.max_lr * math.sqrt(w) / math.sqrt(n))
        if n > self.decay_samples:
            return self.min_lr
        span = max(self.decay_samples - self.warmup_samples, 1)
        ratio = (n - self.warmup_samples) / span
        coeff = 1.0 - ratio if self.style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def step(self, increment: int, optimizer, tokens: int | None = None) -> float:
        """Advance by ``increment`` samples holding ``tokens`` trained tokens (default: full length)."""
        self.num_samples += increment
        if self.token_seq_length:
            self.num_tokens += increment * self.token_seq_length if tokens is None else tokens
        lr = self.get_lr()
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def apply(self, optimizer) -> float:
        lr = self.get_lr()
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"num_samples": self.num_samples, "num_tokens": self.num_tokens, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_samples": self.warmup_samples, "decay_samples": self.decay_samples, "style": self.style}

    def load_state_dict(self, sd: dict) -> None:
        self.num_samples = int(sd["num_samples"])
        self.num_tokens = int(sd.get("num_tokens", self.num_samples * (self.token_seq_length or 0)))


def build_scheduler(opt_cfg, seq_length: int, global_batch_size: int, train_samples: int) -> LRScheduler:
    """Warmup/decay from iterations, samples or tokens (all converted to samples)."""
    tokens_to_samples = lambda t: int(math.ceil(t / seq_length))  # noqa: E731
    if opt_cfg.lr_decay_tokens is not None:
        decay = tokens_to_samples(opt_cfg.lr_decay_tokens)
    elif opt_cfg.lr_decay_samples is not None:
        decay = opt_cfg.lr_decay_samples
    elif opt_cfg.lr_decay_iters is not None:
        decay = opt_cfg.lr_decay_iters * global_batch_size
    else:
        decay = train_samples
    if opt_cfg.lr_warmup_tokens is not None:
        warmup = tokens_to_samples(opt_cfg.lr_warmup_tokens)
    elif opt_cfg.lr_warmup_fraction is not None:
        warmup = int(opt_cfg.lr_warmup_fraction * decay)
    elif opt_cfg.lr_warmup_samples:
        warmup = opt_cfg.lr_warmup_samples
    else:
        warmup = opt_cfg.lr_warmup_iters * global_batch_size
    by_tokens = opt_cfg.lr_decay_tokens is not None or opt_cfg.lr_warmup_tokens is not None
    return LRScheduler(opt_cfg.lr, opt_cfg.min_lr, warmup, decay, opt_cfg.lr_decay_style,
                       token_seq_length=seq_length if by_tokens else None)
