"""``--moe-health``: warn (or stop) when a router collapses or an expert dies, before the loss shows it.

Each log interval the MoE load summary (``megatron.model.moe.metrics``: tokens per expert summed
over the interval and the data-parallel ranks) is handed to :class:`MoEHealthMonitor`, which keeps,
per MoE layer, since which iteration each expert has received no token and since which iteration the
busiest expert has taken more than ``--moe-collapse-share`` of the layer's assignments. Once either
lasts ``--moe-health-window`` iterations it says so, once per episode:

- ``WARNING: MoE layer 3: expert 5 has received no token for 200 iterations (dead expert)``;
- ``WARNING: MoE layer 3 collapsed: expert 0 has taken 97% of the tokens for 200 iterations``.

``--moe-health warn`` (the default) prints the warnings, ``stop`` makes the first one a TrainingFault
(exit 3, the tracker keeps naming the last checkpoint), ``off`` checks nothing. The figures themselves
(tokens per expert min / p50 / max over the mean, dead experts, router entropy, top-expert share) are
always in the MoE log line, TensorBoard and wandb. The granularity is the log interval.
"""
from __future__ import annotations

from megatron.errors import TrainingFault

LEVELS = ("off", "warn", "stop")


class MoEHealthMonitor:
    """Per-layer dead-expert and collapse tracking over log intervals (the same on every rank: its input is
    reduced over data parallelism)."""

    def __init__(self, level: str = "warn", window: int = 100, collapse_share: float = 0.9):
        self.level, self.window, self.collapse_share = level, window, collapse_share
        self.last_seen: dict[int, list[int]] = {}  # layer -> iteration each expert last got a token
        self.collapsed_since: dict[int, int | None] = {}  # layer -> first iteration of the current collapse
        self.reported: set = set()  # (kind, layer, expert) episodes already reported

    @property
    def warns(self) -> bool:
        return self.level in ("warn", "stop")

    def update(self, iteration: int, start: int, summary: list) -> list[str]:
        """Feed the interval (iterations ``start + 1 .. iteration``) summary; returns the warnings it raises (and
        with level ``stop`` raises a TrainingFault on the first one)."""
        if not self.warns:
            return []
        lines = []
        for s in summary:
            counts = s.counts.tolist()
            seen = self.last_seen.setdefault(s.layer, [start] * len(counts))
            for e, c in enumerate(counts):
                if c > 0:
                    seen[e] = iteration
                    self.reported.discard(("dead", s.layer, e))
                elif iteration - seen[e] >= self.window and ("dead", s.layer, e) not in self.reported:
                    self.reported.add(("dead", s.layer, e))
                    lines.append(f"WARNING: MoE layer {s.layer}: expert {e} has received no token for "
                                 f"{iteration - seen[e]} iterations (dead expert)")
            total = sum(counts)
            share = max(counts) / total if total > 0 else 0.0
            if share > self.collapse_share and len(counts) > 1:
                since = self.collapsed_since.get(s.layer)
                since = start if since is None else since
                self.collapsed_since[s.layer] = since
                if iteration - since >= self.window and ("collapse", s.layer, 0) not in self.reported:
                    self.reported.add(("collapse", s.layer, 0))
                    top = counts.index(max(counts))
                    lines.append(f"WARNING: MoE layer {s.layer} collapsed: expert {top} has taken {100 * share:.0f}% "
                                 f"of the tokens for {iteration - since} iterations (--moe-collapse-share "
                                 f"{self.collapse_share})")
            else:
                self.collapsed_since[s.layer] = None
                self.reported.discard(("collapse", s.layer, 0))
        if lines and self.level == "stop":
            raise TrainingFault(f"iteration {iteration}: {lines[0][len('WARNING: '):]}; stopping (--moe-health stop): "
                                f"the last checkpoint is kept; lower the learning rate, raise --moe-loss-coeff or "
                                f"check the router")
        return lines
