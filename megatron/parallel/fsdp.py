"""ZeRO-3 through PyTorch FSDP2 (``--use-torch-fsdp2``, or ``--zero-stage 3`` / the DeepSpeed JSON's stage 3).

``apply_fsdp2`` runs after ``build_model`` (TP module swaps, the EP dispatchers) and before the optimizer is
built. It shards every trainable parameter along dim 0 with ``torch.distributed.fsdp.fully_shard``:

- expert parameters (``param_tags.is_expert``: the stacked [E_l, ...] tensors of a ``StackedExperts``
  module) over the rank's expert-data-parallel group of the layer's EP degree (``ps.expert_groups(layer.ep_size)``:
  the ranks holding the same experts; PR-MoE layers with fewer experts than EP run at a lower degree),
  one FSDP unit per experts module, entered through ``run`` (the MoE layer's call) as well as ``forward``;
  their gradients are reduce-scattered as a sum divided by the full DP size (the all-to-all already summed
  the EP group's contributions), as ``grad_sync.allreduce_gradients`` does;
- dense parameters over the data-parallel group (``ps.dp_group``, same TP rank): one unit per transformer
  layer (``model.layers``), the rest (embeddings, final norm) in the root unit; averaged over DP.
  Under tensor parallelism FSDP2 shards the TP-local tensors, so a rank holds 1 / (TP x DP) of a TP-split
  weight.

The device meshes are built from the existing process groups (``DeviceMesh.from_group``), so FSDP2 runs
over exactly the groups the rest of the code uses. Frozen parameters (``requires_grad=False``: the
aux-loss-free router's bias, updated from outside after each step) are left out of FSDP
(``ignored_params``) and stay whole on every rank. Parameters become DTensors (``Shard(0)``); the tags of
``param_tags`` are copied onto them. Each micro-batch's backward reduce-scatters into the sharded
``.grad`` (accumulated over micro-batches), so the data-parallel gradient reducer has nothing left to do
(:class:`FSDPGradReducer`); the optimizer is torch AdamW on the shards; ``grad_sync.global_grad_norm``
sums the shards' squares over the sharding groups. Parameters stay fp32 (no ``MixedPrecisionPolicy``):
``--bf16`` / ``--fp16`` autocast as without FSDP.

Outside a module's forward (or registered forward method) its parameters are shards: the MoE layers'
small-batch evaluation path, which reads the expert weights directly, is switched off.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from megatron.errors import UserError
from megatron.model.moe.layer import MoELayer
from megatron.model.param_tags import is_expert
from megatron.parallel.grad_sync import GradReducer

# methods through which a module is entered besides forward: FSDP2 all-gathers its parameters around them
ROOT_METHODS = ("distill", "logits", "decode")  # GPTModel's entry points other than forward


def group_mesh(group, ps) -> DeviceMesh:
    """A 1-D DeviceMesh over an existing process group (``ps.dp_group`` or ``ps.edp_group``)."""
    return DeviceMesh.from_group(group, ps.device.type)


def _own_params(module: torch.nn.Module) -> list:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


def _expert_units(model: torch.nn.Module) -> list:
    """Modules whose own trainable parameters are expert parameters (StackedExperts)."""
    units = []
    for name, m in model.named_modules():
        own = _own_params(m)
        kinds = {is_expert(p) for p in own}
        if len(kinds) > 1:
            raise UserError(f"--use-torch-fsdp2: module {name or 'the model'} holds expert and dense parameters "
                            f"together; FSDP2 shards the two over different groups, so they must be in separate modules")
        if kinds == {True}:
            units.append(m)
    return units


def _enter_by_tensors(module: torch.nn.Module, method: str) -> None:
    """Make ``module.method(batch)`` (``batch`` a dataclass of tensors: the dispatcher's ExpertBatch) an FSDP2
    forward method that sees the batch's tensors: FSDP2 hooks its post-backward (the gradients' reduce-scatter,
    then the reshard) onto the inputs' gradients, and finds no tensor inside a dataclass; without this, every
    experts unit would stay gathered until the end of the backward."""
    if not hasattr(module, method):
        return
    original = getattr(module, method)
    entry = f"_fsdp_{method}_fields"

    def by_fields(batch_type, *fields):
        return original(batch_type(*fields))

    setattr(module, entry, by_fields)
    register_fsdp_forward_method(module, entry)
    wrapped = getattr(module, entry)

    def by_batch(batch):
        if not dataclasses.is_dataclass(batch):
            return wrapped(lambda x: x, batch)
        return wrapped(type(batch), *(getattr(batch, f.name) for f in dataclasses.fields(batch)))

    setattr(module, method, by_batch)


def apply_fsdp2(model: torch.nn.Module, ps, reshard_after_forward: bool = True) -> torch.nn.Module:
    """Shard ``model`` in place with FSDP2 (dense over DP, experts over EDP); returns it.

    One process: nothing to shard, the model is returned unchanged (plain AdamW on whole tensors is the same).
    """
    if not ps.distributed:
        return model
    tags = {name: dict(p.__dict__) for name, p in model.named_parameters()}
    ignored = {p for p in model.parameters() if not p.requires_grad}
    dense_mesh = group_mesh(ps.dp_group, ps)
    degree = {id(m.experts): m.ep_size for m in model.modules() if isinstance(m, MoELayer)}  # per-layer EP
    expert_meshes = {}
    for m in _expert_units(model):
        g = ps.expert_groups(degree.get(id(m), ps.ep_size))
        if g.ep_size not in expert_meshes:
            expert_meshes[g.ep_size] = group_mesh(g.edp_group, ps)
        fully_shard(m, mesh=expert_meshes[g.ep_size], reshard_after_forward=reshard_after_forward,
                    ignored_params=ignored)
        if ps.dp_size != g.edp_size:
            m.set_gradient_divide_factor(float(ps.dp_size))  # sum over EDP / DP, as the all-reduce path
            if g.edp_size > 1 and dist.get_backend(g.edp_group) != "nccl":
                # the factor's PREMUL_SUM is NCCL's: SUM, then divide (not on one rank: FSDP2 divides there
                # without a reduction, and would divide a second time)
                m.set_force_sum_reduction_for_comms(True)
        _enter_by_tensors(m, "run")
    for layer in getattr(model, "layers", []):
        fully_shard(layer, mesh=dense_mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=dense_mesh, reshard_after_forward=False, ignored_params=ignored)  # needed again first
    # the root's per-token loss is a view ([B*T] -> [B, T]); its parameters stay gathered until the backward, and
    # the loss is only reduced out of place, so FSDP2's warning about in-place ops on a view does not apply
    warnings.filterwarnings("ignore", message=rf"FSDP2-wrapped module \({type(model).__name__}\) returned")
    for method in ROOT_METHODS:
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    model.set_reduce_scatter_unused_params(True)  # a gradient never produced counts as zero on every rank
    for name, p in model.named_parameters():  # fully_shard made new Parameter objects: keep the tags
        for key, value in tags.get(name, {}).items():
            if not hasattr(p, key):
                setattr(p, key, value)
    for m in model.modules():
        if hasattr(m, "small_batch"):
            m.small_batch = False  # the MoE small-batch path reads expert weights outside run()
    return model


def is_fsdp2(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


class FSDPGradReducer(GradReducer):
    """FSDP2 reduce-scatters the gradients during the backward; afterwards every trainable parameter gets a
    (zero) gradient if it has none, as ``allreduce_gradients`` gives, so AdamW steps the same parameters."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def finish(self) -> None:
        for p in self.model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
