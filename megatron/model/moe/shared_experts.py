"""Shared experts: a dense MLP that every token of an MoE layer goes through, added to the routed output
(DeepSeek-V2/V3's shared experts, Qwen2-MoE's shared expert; ``--moe-shared-expert-intermediate-size``).

GeLU, or SwiGLU (``gated``: ``fc1`` [2S, H] = the gate rows then the up rows, silu(gate) * up, as the dense
MLP's layout); biases unless ``bias=False``. ``gate`` (``--moe-shared-expert-gate``, Qwen2-MoE): the
output is scaled by sigmoid(x @ ``gate.weight``^T), ``gate.weight`` [1, H]. Its parameters are dense ones
(replicated over expert parallelism, like the router), named ``shared_experts.fc1 / fc2 / gate``;
``fc2`` is an output layer (its init std / sqrt(2 L)).

Shapes: S tokens, H hidden, I the shared width.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from megatron.model.moe.expert_grads import activation
from megatron.model.param_tags import mark_output_layer


class SharedExpertMLP(nn.Module):
    @staticmethod
    def num_parameters(hidden_size: int, size: int, gated: bool = False, bias: bool = True, gate: bool = False) -> int:
        f1 = 2 * size if gated else size
        return hidden_size * f1 + size * hidden_size + ((f1 + hidden_size) if bias else 0) + (hidden_size if gate else 0)

    def __init__(self, hidden_size: int, size: int, gated: bool = False, bias: bool = True, gate: bool = False):
        super().__init__()
        self.gated = gated
        self.fc1 = nn.Linear(hidden_size, 2 * size if gated else size, bias=bias)  # [I, H] or [2I, H]
        self.fc2 = nn.Linear(size, hidden_size, bias=bias)  # [H, I]
        mark_output_layer(self.fc2)
        self.gate = nn.Linear(hidden_size, 1, bias=False) if gate else None  # [1, H]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [S, H] -> [S, H]
        y = self.fc2(activation(self.fc1(x), self.gated))  # [S, I or 2I] -> [S, I] -> [S, H]
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y  # [S, 1] * [S, H]
        return y
