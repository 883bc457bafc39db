"""One metrics logger for training: Megatron's console lines plus pluggable sinks (TensorBoard, ...).

A sink receives every scalar / histogram / text; adding a backend (e.g. wandb) is one
:class:`MetricsSink` subclass passed to :class:`MetricsLogger`. The MoE expert-load statistics
are handled in one place, :meth:`MetricsLogger.log_moe`.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict

import torch
import torch.distributed as dist

from megatron.model.moe.metrics import accumulate as accumulate_moe
from megatron.model.moe.metrics import format_moe_line
from megatron.model.moe.metrics import summarize as summarize_moe
from megatron.parallel.collectives import all_reduce_sum
from megatron.training.logging_utils import TensorBoard, fmt_eta, iteration_line, print_rank0, validation_line
from megatron.training.moe_health import MoEHealthMonitor
from megatron.training.timers import PHASES


class MetricsSink:
    """Receives the logged values (rank 0 only sees calls that matter; sinks may ignore the rest)."""

    def scalar(self, name: str, value: float, step: int) -> None:
        pass

    def histogram(self, name: str, values, step: int) -> None:
        pass

    def text(self, name: str, text: str, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardSink(MetricsSink):
    """``--tensorboard-dir``: a SummaryWriter on rank 0 buffering ``max_queue`` events (``--tensorboard-queue-size``)."""

    def __init__(self, log_dir, ps, max_queue: int = 1000):
        self.tb = TensorBoard(log_dir, ps, max_queue)

    def scalar(self, name, value, step):
        self.tb.scalar(name, value, step)

    def histogram(self, name, values, step):
        self.tb.histogram(name, values, step)

    def text(self, name, text, step):
        if self.tb.writer is not None:
            self.tb.writer.add_text(name, text, step)

    def close(self):
        self.tb.close()


# ----------------------------------------------------------------------------------------------
# MoE expert-load statistics (per-step accumulation, reduction over DP, the console line)


def moe_summary(moe_acc: list, ps, model=None) -> list:
    """Per-layer MoE load over the log interval, summed over the DP ranks (see megatron/model/moe/metrics.py)."""
    return summarize_moe(moe_acc, lambda t: all_reduce_sum(t, ps, ps.dp_group))


# ----------------------------------------------------------------------------------------------


class MetricsLogger:
    """Accumulates per-step figures over ``--log-interval`` and writes them to the console and the sinks."""

    def __init__(self, ps, sinks: list[MetricsSink], train_iters: int, seq_length: int, peak_tflops, flops_per_token,
                 health: MoEHealthMonitor | None = None):
        self.ps, self.sinks, self.train_iters, self.seq_length = ps, sinks, train_iters, seq_length
        self.peak, self.fpt = peak_tflops, flops_per_token
        self.health = health
        self._reset()

    def _reset(self) -> None:
        self.sums: dict = defaultdict(float)
        self.counts: dict = defaultdict(int)
        self.moe: list = []
        self.iters = self.tokens = 0
        self.t0 = time.time()

    def console(self, line: str) -> None:
        print_rank0(self.ps, line)

    def scalar(self, name: str, value: float, step: int) -> None:
        for s in self.sinks:
            s.scalar(name, value, step)

    def text(self, name: str, text: str, step: int) -> None:
        for s in self.sinks:
            s.text(name, text, step)

    def record_step(self, logs: dict, moe_stats: list, batch: int, seq_len: int | None = None) -> None:
        for k, v in logs.items():
            self.sums[k] += v
            self.counts[k] += 1
        self.moe = accumulate_moe(self.moe, moe_stats) if moe_stats else self.moe
        self.iters += 1
        self.tokens += batch * (seq_len or self.seq_length)

    def log_interval(self, iteration: int, consumed: int, batch: int, lr: float, loss_scale: float, grad_norm: float,
                     skipped_total: int, model, extra_fields=()) -> None:
        """Megatron's iteration line and the interval's scalars; then start a new interval."""
        dt = time.time() - self.t0
        per_iter = dt / max(self.iters, 1)
        tps = self.tokens / max(dt, 1e-9)
        fields = [("consumed samples", f"{consumed:12d}"), ("elapsed time per iteration (ms)", f"{1000 * per_iter:.1f}"),
                  ("learning rate", f"{lr:.3E}"), ("global batch size", f"{batch:5d}"),
                  *extra_fields]
        for k in sorted(self.sums):
            fields.append((k, f"{self.sums[k] / self.counts[k]:.6E}"))
        fields += [("loss scale", f"{loss_scale:.1f}"), ("grad norm", f"{grad_norm:.3f}"),
                   ("number of skipped iterations", f"{skipped_total:3d}"), ("tokens per second", f"{tps:.1f}")]
        if self.peak:
            fields.append(("MFU (%)", f"{100 * self.fpt * tps / (self.peak * 1e12 * self.ps.world_size):.2f}"))
        fields.append(("ETA", fmt_eta(per_iter * (self.train_iters - iteration))))
        self.console(iteration_line(iteration, self.train_iters, fields))
        self.scalar("learning-rate", lr, iteration)
        self.scalar("batch-size", batch, iteration)
        for k in self.sums:
            self.scalar(k, self.sums[k] / self.counts[k], iteration)
        self.scalar("loss-scale", loss_scale, iteration)
        self.scalar("grad-norm", grad_norm, iteration)
        self.scalar("iteration-time", per_iter, iteration)
        self.scalar("tokens-per-second", tps, iteration)
        self.log_moe(iteration, model, iteration - self.iters)
        self._reset()

    def log_moe(self, iteration: int, model, start: int | None = None) -> None:
        """The interval's expert load (iterations ``start + 1 .. iteration``): one console line, per-layer scalars /
        histograms, and the health monitor's warnings (``--moe-health``)."""
        if not self.moe:
            return
        summary = moe_summary(self.moe, self.ps, model)
        self.console(format_moe_line(summary))
        if self.health is not None:
            for line in self.health.update(iteration, iteration - 1 if start is None else start, summary):
                self.console(line)
        for s in summary:
            for tag, value in s.scalars().items():
                self.scalar(tag, value, iteration)
            for sink in self.sinks:
                sink.histogram(f"moe/layer{s.layer}/tokens-per-expert", s.counts, iteration)

    def log_timers(self, iteration: int, timers, steps: int, console: bool, tensorboard: bool) -> None:
        """The interval's per-phase times, per iteration and of the slowest rank (collective): the console
        line ``time (ms) | forward-backward: ... | ...`` and / or the scalars ``<phase>-time`` (seconds)."""
        seconds = timers.elapsed(PHASES, reset=False)
        vec = torch.tensor([seconds[n] for n in PHASES] + [float(timers.used(n)) for n in PHASES], dtype=torch.float64)
        timers.elapsed(timers.names())  # start the next interval
        if self.ps.distributed:
            vec = vec.to(self.ps.device)
            dist.all_reduce(vec, op=dist.ReduceOp.MAX, group=self.ps.world_group)
        vals = vec.tolist()
        per_step = {n: vals[i] / max(steps, 1) for i, n in enumerate(PHASES) if vals[len(PHASES) + i] > 0}
        if console:
            self.console("time (ms) | " + " | ".join(f"{n}: {1000 * t:.2f}" for n, t in per_step.items()))
        if tensorboard:
            for n, t in per_step.items():
                self.scalar(f"{n}-time", t, iteration)

    def log_eval(self, iteration: int, split: str, vals: dict) -> None:
        line = validation_line(iteration, split, {k: v for k, v in vals.items() if k in ("lm loss", "moe loss")})
        self.console("-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        tag = "validation" if split == "valid" else "test"
        if "lm loss" in vals:
            self.scalar(f"lm loss {tag}", vals["lm loss"], iteration)
            self.scalar(f"lm loss {tag} ppl", math.exp(min(vals["lm loss"], 20)), iteration)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
