"""MoE statistics: what each MoE layer reports per forward, and their accumulation for the log line and TensorBoard.

The load statistics (cv, max/mean) are computed per forward (one micro-batch on one rank: the
unit a capacity acts on) and averaged over the forwards of the log interval, so a line that shows
a high drop fraction also shows the imbalance that caused it. The per-expert counts summed over the
interval (all ranks) are kept for the histogram.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


def load_cv_and_peak(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """counts [E] -> (std / mean, max / mean) of the load, 0 when nothing was routed."""
    c = counts.double()
    mean = c.mean()
    safe = mean.clamp_min(1e-12)
    zero = torch.zeros_like(mean)
    return torch.where(mean > 0, c.std(unbiased=False) / safe, zero), torch.where(mean > 0, c.max() / safe, zero)


@dataclass
class MoEStats:
    """One MoE layer's report for one forward."""

    layer: int  # layer number (0-based index of the transformer layer)
    aux_loss: torch.Tensor  # [] load-balancing loss (in the graph)
    z_loss: torch.Tensor  # [] router z-loss (in the graph)
    counts: torch.Tensor  # [E] fp32 demand per expert before dropping
    dropped: torch.Tensor  # [] fp32 assignments dropped for lack of capacity
    assignments: torch.Tensor  # [] fp32 assignments made (tokens x k)


@dataclass
class MoELoad:
    """One layer's statistics summed over the forwards of a step or log interval (one rank)."""

    layer: int
    counts: torch.Tensor  # [E] float64 summed demand
    sums: torch.Tensor = field(default=None)  # [5] float64: dropped, assignments, sum cv, sum max/mean, forwards

    @classmethod
    def of(cls, s: "MoEStats | MoELoad") -> "MoELoad":
        if isinstance(s, MoELoad):
            return cls(s.layer, s.counts.clone(), s.sums.clone())
        cv, peak = load_cv_and_peak(s.counts)
        one = torch.ones((), dtype=torch.float64, device=s.counts.device)
        sums = torch.stack([s.dropped.double(), s.assignments.double(), cv, peak, one])
        return cls(s.layer, s.counts.detach().double().clone(), sums)

    def add(self, s: "MoEStats | MoELoad") -> None:
        other = MoELoad.of(s)
        self.counts += other.counts
        self.sums += other.sums


def accumulate(acc: list, stats: list) -> list:
    """Add one forward's (or one step's) per-layer stats to ``acc`` (a list of MoELoad, empty at first)."""
    if not acc:
        return [MoELoad.of(s) for s in stats]
    for a, s in zip(acc, stats):
        a.add(s)
    return acc


@dataclass
class MoELoadSummary:
    layer: int
    counts: torch.Tensor  # [E] summed over the interval and the data-parallel ranks
    drop: float  # dropped / assigned
    cv: float  # mean over forwards of each forward's load cv
    max_over_mean: float  # mean over forwards of each forward's max / mean load

    def scalars(self) -> dict:
        """TensorBoard scalars of this layer."""
        p = f"moe/layer{self.layer}/"
        return {p + "drop-fraction": self.drop, p + "load-cv": self.cv, p + "load-max-over-mean": self.max_over_mean}


def summarize(acc: list, all_reduce_sum: Callable[[torch.Tensor], None]) -> list[MoELoadSummary]:
    """Sum ``acc`` over the data-parallel ranks with ``all_reduce_sum`` (in place) and summarize each layer."""
    out = []
    for a in acc:
        counts, sums = a.counts.clone(), a.sums.clone()
        all_reduce_sum(counts)
        all_reduce_sum(sums)
        dropped, assigned, cv_sum, peak_sum, n = sums.tolist()
        n = max(n, 1.0)
        out.append(MoELoadSummary(layer=a.layer, counts=counts.cpu(), drop=dropped / max(assigned, 1.0),
                                  cv=cv_sum / n, max_over_mean=peak_sum / n))
    return out


def format_moe_line(summary: list[MoELoadSummary]) -> str:
    parts = [f"L{s.layer}: cv {s.cv:.2f} max/mean {s.max_over_mean:.2f} drop {100 * s.drop:.1f}%" for s in summary]
    return " moe load | " + " | ".join(parts) + " |"
