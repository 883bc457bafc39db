"""What a training script's loss function hands the :class:`~megatron.training.trainer.Trainer`.

Megatron's hook style: ``forward_step(data_iterator, model)`` returns ``(output, loss_fn)`` and the
trainer calls ``loss_fn(output)``. That call returns a :class:`StepOutput`: the loss to backpropagate,
the scalars to log, and the MoE layers' statistics (load, drops) for the MoE log line and TensorBoard.
A plain ``(loss, logs)`` tuple is accepted too (a hook without MoE statistics); :func:`as_step_output`
reads either.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

import torch

from megatron.model.moe.metrics import MoEStats


@dataclass(frozen=True)
class StepOutput:
    """One micro-batch's loss, its logged terms and the MoE layers' stats."""

    loss: torch.Tensor  # [] the loss to backpropagate (in the graph)
    logs: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [] detached scalar, averaged when logged
    moe_stats: list[MoEStats] = field(default_factory=list)  # one per MoE layer, in layer order


def as_step_output(result: Union[StepOutput, tuple]) -> StepOutput:
    """A loss function's result as a :class:`StepOutput`: itself, or a plain ``(loss, logs)`` tuple (no MoE stats)."""
    if isinstance(result, StepOutput):
        return result
    loss, logs = result
    return StepOutput(loss, dict(logs))
