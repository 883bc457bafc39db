"""A pipeline rank's share of the GPT model, and the forward of each of its stages.

:func:`keep_stage_parts` prunes a GPTModel (built on the meta device, before it gets storage) to the
parts pipeline rank ``p`` runs: the layers of its stages, the embeddings (word, and learned positions
if any) when it holds the first stage, the final layer norm and the output layer when it holds the
last: a tied copy of the word embeddings, or with --untie-embeddings-and-output-weights its own
``output_layer.weight`` (then no copy of the word embeddings, and nothing to sum between the stages).
Parameter names do not change (``layers.<global index>...`` in a ModuleDict, ``word_embeddings.weight``),
so checkpoints, initialisation (by name and position) and the optimizer see the same names at every
pipeline layout. The last stage's copy of the word embeddings is tagged
(``param_tags.mark_pipeline_tied_copy``): its gradient is summed with the first stage's over the
embedding group (as Megatron does) and it is counted once in the gradient norm.

:class:`StageForward` is the ``nn.Module`` a ``torch.distributed.pipelining.PipelineStage`` runs for
one stage: tokens [B, T] (first stage) or hidden states [B, T, H] in, hidden states [B, T, H] out (the
last stage's output goes to the loss function of :mod:`.runner`, before the final layer norm). Each MoE
layer's aux loss rides on the hidden states (``attach_aux_loss``), so its gradient flows on the stage
that computed it with the main loss's scale.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from megatron.config.pipeline_layout import PipelineLayout
from megatron.model.moe.aux_loss import attach_aux_loss, moe_loss
from megatron.model.param_tags import mark_pipeline_tied_copy


def keep_stage_parts(model: nn.Module, layout: PipelineLayout, pp_rank: int) -> None:
    """Prune ``model`` (a GPTModel) in place to pipeline rank ``pp_rank``'s stages (a no-op at PP = 1)."""
    if layout.pp == 1:
        return
    stages = layout.stages_of(pp_rank)
    first, last = 0 in stages, layout.num_stages - 1 in stages
    kept = layout.layers_of(pp_rank)
    layers = model.layer_modules()
    model.layers = nn.ModuleDict({str(i): layers[i] for i in kept})
    untied = model.cfg.untie_embeddings_and_output_weights
    if not first:
        model.position_embeddings = None
        model.embedding_dropout = None
        if not last or untied:
            model.word_embeddings = None
    if not last:
        model.final_layernorm = None
        if untied:
            model.output_layer = None
    if last and not first and not untied:
        for p in model.word_embeddings.parameters():
            mark_pipeline_tied_copy(p)


class StageForward(nn.Module):
    """The forward of stage ``stage`` over the pruned model (which it does not register: the model's
    parameters keep their names). ``record(stats)`` receives each MoE layer's stats."""

    def __init__(self, model: nn.Module, layout: PipelineLayout, stage: int, moe_cfg,
                 record: Callable, grad_scale: Callable[[], float]):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule
        self.stage, self.is_first, self.is_last = stage, stage == 0, stage == layout.num_stages - 1
        self.layer_ids = list(range(*layout.chunks[stage]))
        self.moe_cfg, self.record, self.grad_scale = moe_cfg, record, grad_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        T = x.shape[1]
        positions = torch.arange(T, device=x.device)[None, :]  # [1, T]
        if self.is_first:  # x: tokens [B, T]
            h = m.embed(x, positions)  # [B, T, H]
        else:
            h = x  # [B, T, H]
        rope = m.rotary(positions)  # RoPE cos / sin tables, or None
        for i in self.layer_ids:
            h, stats = m.run_layer(m.layers[str(i)], h, rope=rope)
            if stats is not None:
                aux = moe_loss([stats], self.moe_cfg)  # [] in the graph
                self.record(stats, aux)
                if torch.is_grad_enabled() and aux.requires_grad:
                    h = attach_aux_loss(h, aux, self.grad_scale())
        return h  # [B, T, H]
