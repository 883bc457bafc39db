"""Sequence-length curriculum learning, as DeepSpeed's legacy ``curriculum_learning`` block defines it.

A step's difficulty is the sequence length it trains on. It starts at ``min_difficulty`` and grows
to ``max_difficulty`` (the model's ``--seq-length``) by one of three schedules:

* ``fixed_linear``: ``min + (max - min) * step / total_curriculum_step``, rounded down to a
  multiple of ``difficulty_step`` (8 keeps fp16 matmuls on tensor-core shapes);
* ``fixed_root``: the same with ``(step / total_curriculum_step) ** (1 / root_degree)``;
* ``fixed_discrete``: ``difficulty[i]`` up to step ``max_step[i]``, the last entry afterwards.

Step numbers are 1-based (the step being trained), as DeepSpeed's engine computes them. Each
batch of token blocks ``[mbs, seq + 1]`` is cut to ``[mbs, L + 1]`` so tokens, labels, loss mask
and positions stay aligned; the tokens trained are counted from the truncated length, which is
what token-based learning-rate schedules and ``--train-tokens`` see. The scheduler's state is two
integers, saved in the checkpoint so a resumed run continues at the same length.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megatron.config.curriculum import CurriculumConfig


class SeqLenCurriculum:
    """The current sequence length for each step, and the batch cut to it."""

    def __init__(self, cfg: CurriculumConfig):
        self.cfg = cfg
        self.current = cfg.min_difficulty
        self.last_step = 0

    def difficulty(self, step: int) -> int:
        """The sequence length of 1-based step ``step`` (no state change)."""
        c = self.cfg
        if c.schedule_type == "fixed_discrete":
            for d, limit in zip(c.difficulty, c.max_step):
                if step <= limit:
                    return d
            return c.difficulty[-1]
        degree = 1.0 if c.schedule_type == "fixed_linear" else float(c.root_degree)
        frac = (step / c.total_curriculum_step) ** (1.0 / degree)
        d = math.floor(frac * (c.max_difficulty - c.min_difficulty) + c.min_difficulty)
        d -= d % c.difficulty_step
        return max(1, min(d, c.max_difficulty))

    def update(self, step: int) -> int:
        """Advance to 1-based step ``step``; the length stays at the maximum once reached."""
        if self.current < self.cfg.max_difficulty:
            self.current = self.difficulty(step)
        self.last_step = step
        return self.current

    def state_dict(self) -> dict:
        return {"current": int(self.current), "last_step": int(self.last_step)}

    def load_state_dict(self, state: dict) -> None:
        self.current, self.last_step = int(state["current"]), int(state["last_step"])


def truncate_block(block: torch.Tensor, seq_len: int) -> torch.Tensor:
    """A token block [mbs, S + 1] cut to [mbs, seq_len + 1] (tokens = [:, :-1], labels = [:, 1:])."""
    return block[:, : seq_len + 1].contiguous()


def truncate_batch(seq_len: int, tokens: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor,
                   position_ids: Optional[torch.Tensor] = None):
    """tokens, labels, loss mask [mbs, S] (and position ids) cut to their first ``seq_len`` positions."""
    out = [t[:, :seq_len].contiguous() for t in (tokens, labels, loss_mask)]
    if position_ids is not None:
        out.append(position_ids[..., :seq_len].contiguous())
    return tuple(out)


def tokens_trained(samples: int, seq_len: int) -> int:
    """Tokens one step trains: every sample contributes its (possibly truncated) length."""
    return samples * seq_len


def build_curriculum(cfg) -> Optional[SeqLenCurriculum]:
    """The run's curriculum from ``--deepspeed_config`` (None when absent or disabled)."""
    ds = cfg.deepspeed.read()
    if ds is None or ds.curriculum is None:
        return None
    ds.curriculum.check_seq_length(cfg.model.seq_length, f"--deepspeed_config {ds.path}")
    return SeqLenCurriculum(ds.curriculum)


class TruncatingIterator:
    """Wraps a micro-batch iterator of token blocks [mbs, S + 1]: each block comes out cut to
    [mbs, seq_len + 1], so the batch hook's tokens, labels, loss mask and positions (all derived from
    the block) have the current length. ``seq_len`` is set once per step by the training loop."""

    def __init__(self, inner, seq_len: int):
        self.inner, self.seq_len = inner, seq_len

    def __iter__(self):
        return self

    def __next__(self):
        block = next(self.inner)
        return block[:, : self.seq_len + 1] if block.shape[1] > self.seq_len + 1 else block


def iterations_for_tokens(curriculum: SeqLenCurriculum, global_batch, train_tokens: int,
                          max_iters: Optional[int] = None, max_samples: Optional[int] = None) -> tuple[int, int]:
    """(iterations, samples) until ``train_tokens`` tokens are trained under the curriculum, or earlier at
    ``max_iters`` iterations / ``max_samples`` samples (upstream stops at the first bound reached).

    ``global_batch(consumed)`` is the global batch size after ``consumed`` samples."""
    probe = SeqLenCurriculum(curriculum.cfg)
    iters = consumed = tokens = 0
    while tokens < train_tokens and (max_iters is None or iters < max_iters) \
            and (max_samples is None or consumed < max_samples):
        batch = global_batch(consumed)
        iters += 1
        tokens += tokens_trained(batch, probe.update(iters))
        consumed += batch
    return iters, consumed
