"""The MoE layers' auxiliary losses: their weighted sum, and a way to back-propagate them without a loss.

``moe_loss(stats, moe_cfg)`` is the term every MoE layer adds to the training loss:
``--moe-loss-coeff`` x the load-balancing losses (+ ``--moe-z-loss-coeff`` x the router z-losses).

Under pipeline parallelism only the last stage computes the loss, but the aux losses of every stage's
MoE layers must reach it with the same scale. :func:`attach_aux_loss` (Megatron-LM's auto-scaler idea)
returns the hidden states unchanged and, in the backward, gives the attached loss the gradient
``grad_scale`` (the factor the main loss is multiplied by before its backward), so the aux loss's
gradients flow on the stage that computed it, exactly as if it had been added to the main loss.
"""
from __future__ import annotations

import torch


def moe_loss(stats, moe_cfg) -> torch.Tensor:
    """[] loss_coeff * sum of the layers' aux losses (+ z_loss_coeff * sum of their z-losses); in the graph."""
    loss = moe_cfg.loss_coeff * torch.stack([s.aux_loss for s in stats]).sum()
    if moe_cfg.z_loss_coeff > 0:
        loss = loss + moe_cfg.z_loss_coeff * torch.stack([s.z_loss for s in stats]).sum()
    return loss


class _AttachAuxLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, aux: torch.Tensor, grad_scale: float):
        ctx.save_for_backward(aux)
        ctx.grad_scale = grad_scale
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad_hidden: torch.Tensor):
        (aux,) = ctx.saved_tensors
        return grad_hidden, torch.full_like(aux, ctx.grad_scale), None


def attach_aux_loss(hidden: torch.Tensor, aux: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """``hidden`` [B, T, H] unchanged; its backward also back-propagates ``aux`` [] with gradient ``grad_scale``."""
    return _AttachAuxLoss.apply(hidden, aux, grad_scale)
