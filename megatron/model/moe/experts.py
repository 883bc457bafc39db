"""Experts stored stacked ([E, H, F], [E, F, H] + biases) and run as one batched matmul.

Each expert is initialised from its own generator keyed by (seed, layer, global expert id), so
the weights do not depend on how experts are laid out across ranks.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from megatron.parallel.param_tags import mark_expert


def expert_generator(seed: int, layer_number: int, global_expert: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + layer_number * 10_007 + global_expert * 101 + 17) % (2**63))


class StackedExperts(nn.Module):
    """``num_local`` GeLU MLP experts H -> F -> H; global ids start at ``first_expert``."""

    def __init__(self, num_local: int, hidden_size: int, ffn_hidden_size: int, first_expert: int = 0):
        super().__init__()
        self.num_local, self.first_expert = num_local, first_expert
        self.w1 = nn.Parameter(torch.empty(num_local, hidden_size, ffn_hidden_size))  # [E, H, F]
        self.b1 = nn.Parameter(torch.zeros(num_local, ffn_hidden_size))  # [E, F]
        self.w2 = nn.Parameter(torch.empty(num_local, ffn_hidden_size, hidden_size))  # [E, F, H]
        self.b2 = nn.Parameter(torch.zeros(num_local, hidden_size))  # [E, H]
        self._mark_expert_parameters()

    def _mark_expert_parameters(self) -> None:
        for p in self.parameters(recurse=False):
            mark_expert(p)  # read by grad sync, the optimizer groups and checkpointing

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._mark_expert_parameters()  # moving off the meta device replaces the Parameter objects
        return out

    @torch.no_grad()
    def init_weights(self, seed: int, layer_number: int, std: float, out_std: float) -> None:
        for i in range(self.num_local):
            g = expert_generator(seed, layer_number, self.first_expert + i)
            w1 = torch.empty(self.w1.shape[1:]).normal_(0.0, std, generator=g)
            w2 = torch.empty(self.w2.shape[1:]).normal_(0.0, out_std, generator=g)
            self.w1[i].copy_(w1)
            self.w2[i].copy_(w2)
        self.b1.zero_()
        self.b2.zero_()

    def run(self, batch) -> torch.Tensor:
        """An ExpertBatch from a dispatcher -> the experts' output in the same layout."""
        if batch.counts is None:
            return self(batch.tokens)  # [E_l, C, H]
        return self.forward_grouped(batch.tokens, batch.counts)  # [N_l, H]

    def forward(self, buf: torch.Tensor) -> torch.Tensor:
        # buf: [E, C, H] (one row block per local expert, zero-padded to capacity) -> [E, C, H]
        h = torch.baddbmm(self.b1[:, None, :].to(buf.dtype), buf, self.w1.to(buf.dtype))  # [E, C, F]
        h = F.gelu(h)
        return torch.baddbmm(self.b2[:, None, :].to(buf.dtype), h, self.w2.to(buf.dtype))  # [E, C, H]

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor, kernel: str | None = None) -> torch.Tensor:
        # x: [N, H] sorted by expert, counts: [E] -> [N, H]; no padding to a capacity.
        # kernel: "grouped_mm" (torch._grouped_mm: work proportional to the rows) or "padded" (pad every
        # expert to the largest count + one batched matmul: work proportional to E x the largest count).
        # GPU: grouped_mm. CPU: padded when the load is even (it measured ~2x faster than _grouped_mm for
        # equal work), grouped_mm when most padded rows would be empty (decoding: 1 token, 1 expert).
        x = x.to(compute_dtype(x))  # torch._grouped_mm is outside autocast: follow --bf16 / --fp16 here
        cap = None
        if kernel is None:
            if not hasattr(torch, "_grouped_mm"):
                kernel = "padded"
            elif x.is_cuda:
                kernel = "grouped_mm"
            else:
                cap = int(counts.max()) if counts.numel() else 0
                kernel = "padded" if self.num_local * cap <= 2 * x.shape[0] else "grouped_mm"
        if kernel == "padded" or not hasattr(torch, "_grouped_mm"):
            return self._grouped_by_padding(x, counts, cap)
        offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end offset of each expert's rows
        expert_of_row = torch.repeat_interleave(torch.arange(self.num_local, device=x.device), counts)  # [N]
        w1, w2 = self.w1.to(x.dtype), self.w2.to(x.dtype)
        h = _grouped_mm(x, w1, offs) + self.b1.to(x.dtype).index_select(0, expert_of_row)  # [N, F]
        h = F.gelu(h)
        return _grouped_mm(h, w2, offs) + self.b2.to(x.dtype).index_select(0, expert_of_row)  # [N, H]

    def _grouped_by_padding(self, x: torch.Tensor, counts: torch.Tensor, cap=None) -> torch.Tensor:
        """Fallback: pad each expert's rows to the largest count (``cap``) and run the batched path."""
        E, H = self.num_local, x.shape[-1]
        if cap is None:
            cap = int(counts.max()) if counts.numel() else 0
        start = torch.cumsum(counts, 0) - counts
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts)  # [N]
        pos = torch.arange(x.shape[0], device=x.device) - start[expert_of_row]
        slot = expert_of_row * cap + pos  # [N]
        buf = x.new_zeros(E * cap, H).index_copy(0, slot, x).view(E, cap, H)  # [E, C, H]
        return self.forward(buf).reshape(E * cap, H).index_select(0, slot)  # [N, H]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device (--bf16 / --fp16), else x's own dtype."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm; its CPU backward needs a contiguous incoming gradient."""
    y = torch._grouped_mm(x.contiguous(), w, offs=offs)
    if y.requires_grad:
        y.register_hook(lambda g: g.contiguous())
    return y


def init_std_for_output(std: float, num_layers: int) -> float:
    return std / math.sqrt(2.0 * num_layers)
