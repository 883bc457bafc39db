"""Megatron's log line grammar (``key: value |``) and TensorBoard scalars with Megatron's names."""
from __future__ import annotations

import datetime
import math
import sys

from megatron.errors import UserError, check_writable_dir


def print_rank0(ps, *args, **kwargs) -> None:
    if ps is None or ps.is_main:
        print(*args, **kwargs, flush=True)


def fmt_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def iteration_line(iteration: int, train_iters: int, fields: list[tuple[str, str]]) -> str:
    head = f" iteration {iteration:8d}/{train_iters:8d} |"
    return head + "".join(f" {k}: {v} |" for k, v in fields)


def validation_line(iteration: int, split: str, values: dict) -> str:
    label = "validation" if split == "valid" else "test"
    body = f" {label} loss at iteration {iteration} |"
    for k, v in values.items():
        body += f" {k} value: {v:.6E} |"
        if k == "lm loss":
            body += f" {k} PPL: {math.exp(min(v, 20)):.6E} |"
    return body


TENSORBOARD_TODO = "give a directory for the event files (it is created if missing)"


def check_tensorboard_dir(log_dir: str, ps) -> None:
    """``--tensorboard-dir``: a directory rank 0 can create and write, checked before the first step (the
    writer would raise deep inside tensorboard); the verdict is shared so that every rank stops alike."""
    message = None
    if ps.is_main:
        try:
            check_writable_dir("--tensorboard-dir", log_dir, TENSORBOARD_TODO)
        except UserError as e:
            message = str(e)
    if getattr(ps, "distributed", False):
        from megatron.parallel.collectives import agree_on_error

        agree_on_error(message, ps)
    elif message:
        raise UserError(message)


class TensorBoard:
    """A SummaryWriter on rank 0 only (no-op elsewhere or without --tensorboard-dir)."""

    def __init__(self, log_dir, ps, max_queue: int = 1000):
        self.writer = None
        if log_dir:
            check_tensorboard_dir(log_dir, ps)
        if log_dir and ps.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover
                print("WARNING: tensorboard is not installed; --tensorboard-dir ignored", file=sys.stderr)
                return
            self.writer = SummaryWriter(log_dir=log_dir, max_queue=max_queue)  # --tensorboard-queue-size

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def histogram(self, name: str, values, step: int) -> None:
        if self.writer is not None:
            self.writer.add_histogram(name, values, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
