"""Experts stored stacked ([E, H, F], [E, F, H] + biases) and run as one batched matmul.

GeLU experts (w1 [E, H, F]) or SwiGLU ones (``gated``: w1 [E, H, 2F], the gate columns then the up columns,
silu(gate) * up: Megatron-LM's ``--swiglu`` fc1 layout, and transformers' fused ``gate_up_proj`` [E, 2F, H]
transposed, see ``hf_layouts.py``); with or without biases (``bias=False``: ``--disable-bias-linear``, b1 and
b2 are then None).

Each expert's weights are streams of their own (``megatron.model.init_rng``), named by (layer, weight,
global expert id), so the weights do not depend on how experts are laid out across ranks and a rank
fills only the experts it holds.

Gradient-accumulation fusion (Megatron-LM's name for it): in training, :meth:`StackedExperts.run`
(the MoE layer's entry), on the padded [E, C, H] path and on the grouped no-drop path (CPU), writes the
experts' weight gradients straight into ``.grad`` (in place when a gradient is already there, e.g.
from an earlier micro-batch; a fresh tensor when it is None) instead of returning a new [E, H, F]
tensor that autograd then adds. The weights are not inputs of the autograd graph on that path, so
autograd's per-parameter hooks do not see them; whoever needs to know when an expert gradient is
complete (the overlapped gradient reduce) installs a callback with
:meth:`StackedExperts.set_grad_ready_callback`. The fused path runs only where it computes what
autograd would: grad enabled, the input requiring grad, and no autocast (the input and the weights
in one dtype). Otherwise (bf16/fp16 autocast, ``fuse_wgrad=False``, a direct ``forward()`` /
``forward_grouped()`` call) autograd accumulates as usual and the parameters' hooks fire. Because
the weights are outside the graph there, ``torch.autograd.grad`` with respect to them through the
MoE layer needs ``fuse_wgrad=False``; ``.backward()`` is what the fusion serves. The autograd
functions are in :mod:`megatron.model.moe.expert_grads`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn as nn

from megatron.model import init_rng
from megatron.model.moe.expert_grads import (
    FusedWgradExperts,
    FusedWgradGroupedExperts,
    activation,
    bmm_bias,
    grouped_bias,
)
from megatron.model.param_tags import mark_expert


def expert_stream_name(layer_number: int, weight: str, global_expert: int) -> str:
    """The layout-independent name of one expert's weight stream (``init_rng``)."""
    return f"layers.{layer_number}.mlp.experts.{weight}[{global_expert}]"


class StackedExperts(nn.Module):
    """``num_local`` MLP experts H -> F -> H (GeLU, or SwiGLU when ``gated``; biases unless ``bias=False``);
    global ids start at ``first_expert``."""

    @staticmethod
    def num_parameters(hidden_size: int, ffn_hidden_size: int, gated: bool = False, bias: bool = True) -> int:
        """Parameters of one expert."""
        f1 = 2 * ffn_hidden_size if gated else ffn_hidden_size
        return hidden_size * f1 + ffn_hidden_size * hidden_size + ((f1 + hidden_size) if bias else 0)

    def __init__(self, num_local: int, hidden_size: int, ffn_hidden_size: int, first_expert: int = 0,
                 fuse_wgrad: bool = True, gated: bool = False, bias: bool = True):
        super().__init__()
        self.num_local, self.first_expert = num_local, first_expert
        self.gated, self.ffn_hidden_size = gated, ffn_hidden_size
        self.fuse_wgrad = fuse_wgrad  # accumulate weight gradients in place (module docstring); False: autograd
        self._grad_ready: Optional[Callable[[nn.Parameter], None]] = None
        f1 = 2 * ffn_hidden_size if gated else ffn_hidden_size  # SwiGLU: gate and up columns
        self.w1 = nn.Parameter(torch.empty(num_local, hidden_size, f1))  # [E, H, F] or [E, H, 2F]
        self.register_parameter("b1", nn.Parameter(torch.zeros(num_local, f1)) if bias else None)  # [E, F1]
        self.w2 = nn.Parameter(torch.empty(num_local, ffn_hidden_size, hidden_size))  # [E, F, H]
        self.register_parameter("b2", nn.Parameter(torch.zeros(num_local, hidden_size)) if bias else None)  # [E, H]
        self._mark_expert_parameters()

    def _mark_expert_parameters(self) -> None:
        for p in self.parameters(recurse=False):
            mark_expert(p)  # read by grad sync, the optimizer groups and checkpointing

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._mark_expert_parameters()  # moving off the meta device replaces the Parameter objects
        return out

    def set_grad_ready_callback(self, fn: Optional[Callable[[nn.Parameter], None]]) -> None:
        """``fn(param)`` is called once a fused backward has written ``param.grad`` (None: no callback).

        It stands in for the post-accumulate-grad hooks that autograd does not run on the fused path.
        """
        self._grad_ready = fn

    def _fused_applies(self, buf: torch.Tensor) -> bool:
        return (torch.is_grad_enabled() and buf.requires_grad
                and not torch.is_autocast_enabled(buf.device.type)
                and all(p.dtype == buf.dtype for p in self.parameters(recurse=False)))

    def notify_grad_ready(self, p: nn.Parameter) -> None:
        """A fused backward finished ``p.grad``: tell the installed callback, if any."""
        if self._grad_ready is not None:
            self._grad_ready(p)

    @torch.no_grad()
    def init_weights(self, seed: int, layer_number: int, std: float, out_std: float) -> None:
        """w1 ~ N(0, std), w2 ~ N(0, out_std) (the MLP's output layer), biases 0; each local expert in place
        from its own stream (seed, layer, weight, global expert id)."""
        for i in range(self.num_local):
            g = self.first_expert + i
            init_rng.normal_(self.w1[i], seed, expert_stream_name(layer_number, "w1", g), std)
            init_rng.normal_(self.w2[i], seed, expert_stream_name(layer_number, "w2", g), out_std)
        for b in (self.b1, self.b2):
            if b is not None:
                b.zero_()

    def run(self, batch) -> torch.Tensor:
        """An ExpertBatch from a dispatcher -> the experts' output in the same layout (the MoE layer's
        path: weight gradients fused into ``.grad`` where the module docstring says so)."""
        if batch.counts is None:
            return self.forward(batch.tokens, fused=self.fuse_wgrad)  # [E_l, C, H]
        return self.forward_grouped(batch.tokens, batch.counts, fused=self.fuse_wgrad)  # [N_l, H]

    def forward(self, buf: torch.Tensor, fused: bool = False) -> torch.Tensor:
        # buf: [E, C, H] (one row block per local expert, zero-padded to capacity) -> [E, C, H]
        # fused: accumulate the weight gradients in place where that is exact (module docstring); by default
        # a direct call keeps plain autograd semantics (torch.autograd.grad on the weights works).
        if fused and self._fused_applies(buf):
            return FusedWgradExperts.apply(buf, self)
        b1, b2 = self._biases(buf.dtype)
        h = bmm_bias(b1, buf, self.w1.to(buf.dtype))  # [E, C, F1]
        h = activation(h, self.gated)  # [E, C, F]
        return bmm_bias(b2, h, self.w2.to(buf.dtype))  # [E, C, H]

    def _biases(self, dtype: torch.dtype):
        return tuple(None if b is None else b.to(dtype) for b in (self.b1, self.b2))

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert ``e`` alone on rows x [n, H] (in the compute dtype), on views of its weights -> [n, H]
        (the small-batch decode path)."""
        dt = x.dtype
        w1, w2 = self.w1[e].to(dt), self.w2[e].to(dt)
        h = x @ w1 if self.b1 is None else torch.addmm(self.b1[e].to(dt), x, w1)  # [n, F1]
        h = activation(h, self.gated)  # [n, F]
        return h @ w2 if self.b2 is None else torch.addmm(self.b2[e].to(dt), h, w2)  # [n, H]

    def forward_grouped(self, x: torch.Tensor, counts: torch.Tensor, kernel: str | None = None,
                        fused: bool = False) -> torch.Tensor:
        # x: [N, H] sorted by expert, counts: [E] -> [N, H]; no padding to a capacity.
        # kernel: "grouped_mm" (torch._grouped_mm: work proportional to the rows) or "padded" (pad every
        # expert to the largest count + one batched matmul: work proportional to E x the largest count).
        # GPU, and CPU training with the fused weight gradients: grouped_mm. CPU otherwise: padded when the
        # load is even (it measured ~2x faster than autograd's _grouped_mm for equal work), grouped_mm when
        # most padded rows would be empty (decoding: 1 token, 1 expert).
        # fused: as in forward(), for both kernels, on CPU (on GPU this path keeps autograd's accumulation).
        x = x.to(compute_dtype(x))  # torch._grouped_mm is outside autocast: follow --bf16 / --fp16 here
        fused = fused and self._fused_applies(x) and not x.is_cuda  # fused grouped_mm: measured on CPU only
        cap = None
        if kernel is None:
            if not hasattr(torch, "_grouped_mm"):
                kernel = "padded"
            elif x.is_cuda or fused:  # fused on CPU: 0.76-0.94x the padded kernel's time at E = 8-128
                kernel = "grouped_mm"
            else:
                cap = int(counts.max()) if counts.numel() else 0
                kernel = "padded" if self.num_local * cap <= 2 * x.shape[0] else "grouped_mm"
        if kernel == "padded" or not hasattr(torch, "_grouped_mm"):
            return self._grouped_by_padding(x, counts, cap, fused)
        offs = torch.cumsum(counts, 0).to(torch.int32)  # [E] end offset of each expert's rows
        expert_of_row = torch.repeat_interleave(torch.arange(self.num_local, device=x.device), counts)  # [N]
        if fused:
            return FusedWgradGroupedExperts.apply(x, counts, offs, expert_of_row, self)
        w1, w2 = self.w1.to(x.dtype), self.w2.to(x.dtype)
        b1, b2 = self._biases(x.dtype)
        h = grouped_bias(b1, x, w1, offs, expert_of_row)  # [N, F1]
        h = activation(h, self.gated)  # [N, F]
        return grouped_bias(b2, h, w2, offs, expert_of_row)  # [N, H]

    def _grouped_by_padding(self, x: torch.Tensor, counts: torch.Tensor, cap=None, fused: bool = False) -> torch.Tensor:
        """Fallback: pad each expert's rows to the largest count (``cap``) and run the batched path."""
        E, H = self.num_local, x.shape[-1]
        if cap is None:
            cap = int(counts.max()) if counts.numel() else 0
        start = torch.cumsum(counts, 0) - counts
        expert_of_row = torch.repeat_interleave(torch.arange(E, device=x.device), counts)  # [N]
        pos = torch.arange(x.shape[0], device=x.device) - start[expert_of_row]
        slot = expert_of_row * cap + pos  # [N]
        buf = x.new_zeros(E * cap, H).index_copy(0, slot, x).view(E, cap, H)  # [E, C, H]
        return self.forward(buf, fused).reshape(E * cap, H).index_select(0, slot)  # [N, H]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device (--bf16 / --fp16), else x's own dtype."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def init_std_for_output(std: float, num_layers: int) -> float:
    return std / math.sqrt(2.0 * num_layers)
