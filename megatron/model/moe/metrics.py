"""MoE statistics: what each MoE layer reports per forward, and their accumulation for the log line and TensorBoard.

The load statistics (cv, max/mean) are computed per forward (one micro-batch on one rank: the
unit a capacity acts on) and averaged over the forwards of the log interval, so a line that shows
a high drop fraction also shows the imbalance that caused it. The per-expert counts summed over the
interval (all ranks) are kept for the histogram, and give the health figures: tokens per expert at
the minimum / median / maximum (over the mean), the experts that got no token at all ("dead"), and
the busiest expert's share. The router entropy (mean over tokens of the entropy of the gate
distribution, over log E: 1 = uniform, 0 = every token certain of one expert) is averaged over the
forwards; a router collapsing onto few experts shows here before the loss does.
"""
from __future__ import annotations

import math
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
    entropy: torch.Tensor | None = None  # [] fp32 normalised router entropy of this forward (router_entropy)


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """probs [S, E] (rows sum to 1) -> [] mean over tokens of -sum_e p log p, over log E (in [0, 1])."""
    E = probs.shape[-1]
    if E < 2 or probs.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=probs.device)
    p = probs.detach().float()
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # [S]
    return h.mean() / math.log(E)


@dataclass
class MoELoad:
    """One layer's statistics summed over the forwards of a step or log interval (one rank)."""

    layer: int
    counts: torch.Tensor  # [E] float64 summed demand
    # [7] float64: dropped, assignments, sum cv, sum max/mean, forwards, sum entropy, forwards with an entropy
    sums: torch.Tensor = field(default=None)

    @classmethod
    def of(cls, s: "MoEStats | MoELoad") -> "MoELoad":
        if isinstance(s, MoELoad):
            return cls(s.layer, s.counts.clone(), s.sums.clone())
        cv, peak = load_cv_and_peak(s.counts)
        one = torch.ones((), dtype=torch.float64, device=s.counts.device)
        entropy = getattr(s, "entropy", None)
        h, has_h = (entropy.detach().double(), one) if entropy is not None else (one * 0, one * 0)
        sums = torch.stack([s.dropped.double(), s.assignments.double(), cv, peak, one, h, has_h])
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
    entropy: float | None = None  # mean router entropy over forwards (normalised), None when not measured

    @property
    def tokens_per_expert(self) -> tuple[float, float, float]:
        """(min, median, max) of the interval's tokens per expert, over their mean (1 = perfectly balanced)."""
        c = self.counts.double()
        mean = float(c.mean()) if c.numel() else 0.0
        if mean <= 0:
            return 0.0, 0.0, 0.0
        return float(c.min()) / mean, float(torch.quantile(c, 0.5)) / mean, float(c.max()) / mean

    @property
    def dead(self) -> int:
        """Experts that got no token in the interval (on any rank)."""
        return int((self.counts == 0).sum()) if float(self.counts.sum()) > 0 else 0

    @property
    def top_share(self) -> float:
        """The busiest expert's share of the interval's assignments (1 / E when balanced, 1 when collapsed)."""
        total = float(self.counts.sum())
        return float(self.counts.max()) / total if total > 0 else 0.0

    def scalars(self) -> dict:
        """TensorBoard (and wandb) scalars of this layer."""
        p = f"moe/layer{self.layer}/"
        lo, mid, hi = self.tokens_per_expert
        out = {p + "drop-fraction": self.drop, p + "load-cv": self.cv, p + "load-max-over-mean": self.max_over_mean,
               p + "tokens-per-expert-min": lo, p + "tokens-per-expert-p50": mid, p + "tokens-per-expert-max": hi,
               p + "dead-experts": float(self.dead), p + "top-expert-share": self.top_share}
        if self.entropy is not None:
            out[p + "router-entropy"] = self.entropy
        return out


def summarize(acc: list, all_reduce_sum: Callable[[torch.Tensor], None]) -> list[MoELoadSummary]:
    """Sum ``acc`` over the data-parallel ranks with ``all_reduce_sum`` (in place) and summarize each layer."""
    out = []
    for a in acc:
        counts, sums = a.counts.clone(), a.sums.clone()
        all_reduce_sum(counts)
        all_reduce_sum(sums)
        dropped, assigned, cv_sum, peak_sum, n, h_sum, h_n = sums.tolist()
        n = max(n, 1.0)
        out.append(MoELoadSummary(layer=a.layer, counts=counts.cpu(), drop=dropped / max(assigned, 1.0),
                                  cv=cv_sum / n, max_over_mean=peak_sum / n,
                                  entropy=h_sum / h_n if h_n > 0 else None))
    return out


def format_moe_line(summary: list[MoELoadSummary]) -> str:
    """`` moe load | L1: cv 0.23 max/mean 1.31 drop 9.4% tok/exp 0.61/0.98/1.31 dead 0 H 0.97 | ...``"""
    parts = []
    for s in summary:
        lo, mid, hi = s.tokens_per_expert
        h = f" H {s.entropy:.2f}" if s.entropy is not None else ""
        parts.append(f"L{s.layer}: cv {s.cv:.2f} max/mean {s.max_over_mean:.2f} drop {100 * s.drop:.1f}% "
                     f"tok/exp {lo:.2f}/{mid:.2f}/{hi:.2f} dead {s.dead}{h}")
    return " moe load | " + " | ".join(parts) + " |"
