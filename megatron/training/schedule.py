"""The batch schedule (``--rampup-batch-size``), the run length and the micro-batch stream."""
from __future__ import annotations

import math

import numpy as np


class BatchSchedule:
    """Global batch size as a function of consumed samples (``--rampup-batch-size``)."""

    def __init__(self, train_cfg, dp_size: int):
        self.gbs, self.mbs, self.dp = train_cfg.global_batch_size, train_cfg.micro_batch_size, dp_size
        self.rampup = train_cfg.rampup_batch_size

    def global_batch(self, consumed: int) -> int:
        if not self.rampup:
            return self.gbs
        start, incr, ramp_samples = self.rampup
        steps = max((self.gbs - start) // max(incr, 1), 1)
        per_step = ramp_samples / steps
        return min(self.gbs, start + int(consumed / per_step) * incr) if consumed < ramp_samples else self.gbs

    def num_micro_batches(self, consumed: int) -> int:
        return self.global_batch(consumed) // (self.mbs * self.dp)


def train_schedule(cfg, schedule: BatchSchedule) -> tuple[int, int]:
    """(train iterations, train samples) from --train-iters / --train-samples / --train-tokens.

    With --train-tokens next to --train-iters or --train-samples, training stops at whichever bound
    is reached first (as upstream Megatron-DeepSpeed's loop checks both after every step)."""
    t = cfg.train
    token_samples = None if t.train_tokens is None else int(math.ceil(t.train_tokens / cfg.model.seq_length))
    if t.train_iters is not None:  # no batch ramp-up with --train-iters: a fixed global batch
        iters = t.train_iters
        if token_samples is not None:
            iters = min(iters, -(-token_samples // t.global_batch_size))
        return iters, iters * t.global_batch_size
    samples = min(s for s in (t.train_samples, token_samples) if s is not None)
    iters, consumed = 0, 0
    while consumed < samples:
        consumed += schedule.global_batch(consumed)
        iters += 1
    return iters, consumed


class MicroBatchIterator:
    """Serves this DP rank's micro-batches: micro-step m of the global stream takes samples
    [start + m * mbs * dp + r * mbs, + mbs). Resumes exactly from ``consumed_samples``."""

    def __init__(self, dataset, consumed_samples: int, mbs: int, dp_rank: int, dp_size: int):
        self.dataset, self.mbs, self.dp_rank, self.dp_size = dataset, mbs, dp_rank, dp_size
        self.position = consumed_samples

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        start = self.position + self.dp_rank * self.mbs
        n = len(self.dataset)
        batch = np.stack([self.dataset[(start + j) % n] for j in range(self.mbs)])  # [mbs, seq + 1]
        self.position += self.mbs * self.dp_size
        return batch
