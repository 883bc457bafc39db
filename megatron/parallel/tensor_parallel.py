"""Megatron-style tensor parallelism applied from outside the model.

``apply_tensor_parallel(model, ps)`` swaps modules of a built GPTModel for tensor-parallel ones
holding this rank's shard, and the model code stays free of collectives. ``build_model`` applies it
on the meta device (nothing is copied; each rank then gets storage for its shard alone and
``init_weights`` fills it by full-tensor position, ``megatron.model.init_rng``), so a model built at
TP=1 and at TP=T starts from the same weights; on a model with values the swap copies the shard out:

- attention: ``qkv`` column-parallel by heads (the q rows of this rank's query heads, the k and v rows
  of its key/value groups: grouped-query attention splits the groups, --num-query-groups % TP == 0),
  ``proj`` row-parallel (its input columns; output all-reduced, bias added once); the per-head q/k
  norms (--qk-layernorm) are replicated and sum their gradient over TP (each rank norms its own heads);
- dense MLP: ``fc1`` column-parallel (SwiGLU: this rank's gate rows and the same up rows), ``fc2``
  row-parallel; no-bias linears (--disable-bias-linear) stay bias-free;
- word embedding: vocab-parallel rows (lookup masked to this rank's range, then all-reduced); the
  output layer (tied, or its own untied weight split by vocabulary rows like the embedding) gives
  [B, T, V/T] logits; the cross-entropy is vocab-parallel (max, sum-exp and
  target logit all-reduced), so full logits exist only when asked for (generation, KD);
- replicated on every TP rank: layer norms, position embeddings, row-parallel biases, and the MoE
  layers (router, experts, Residual-MoE MLP): every TP rank runs the MoE layer on the same tokens
  and its all-to-all runs among ranks of the same TP rank (parallelism-coordinated communication).
  Replicated parameters get identical gradients on every TP rank (their inputs are identical and
  the column-parallel entry all-reduces its input gradient), so they need no TP reduction.

Sequence parallelism (``--sequence-parallel``, Korthikanti et al. 2022, Megatron-LM's): between the
column- and row-parallel ops the residual stream is cut along the sequence, [B, T/TP, H] per rank, so the
layer norms, dropouts, residual adds and the MoE layers run on 1/TP of the tokens. The embedding's output
is split after the position embeddings (``SequenceSplit``: backward all-gathers), a column-parallel op
all-gathers its input along T (backward: reduce-scatter of the gradient), a row-parallel op
reduce-scatters its output (backward: all-gather), and the output layer all-gathers before the
vocab-parallel projection. The MoE layer routes its shard's tokens (its experts' gradients are summed over
TP with the expert-DP reduction, as with the TP token split, which sequence parallelism replaces); its
balancing losses are its shard's, weighted 1/TP (``TokenDispatcher.loss_share``). Parameters replicated
over TP but fed by one shard (norms, row-parallel biases, router, shared and Residual-MoE parts) are tagged
``sequence_parallel``: their gradients are summed over TP after the backward
(``grad_sync.sum_sequence_parallel_grads``).

Each sharded parameter carries ``tp_dim`` and ``tp_indices`` (the full-tensor indices held by each
TP rank along that dim), which checkpointing uses to save full tensors and reload any TP layout, and
this rank (``param_tags.tp_local_layout``), which the initialisation uses. The swapped-in modules keep
the output-layer tag of the Linear they replace (its smaller init std).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megatron.errors import UserError
from megatron.model.fused import RMSNorm
from megatron.model.gpt_model import mask_vocab_padding
from megatron.model.moe.layer import MoELayer
from megatron.model.param_tags import (
    is_expert,
    is_output_layer,
    is_tp_sharded,
    mark_output_layer,
    mark_sequence_parallel,
    mark_tp_shard,
)
from megatron.model.transformer import DenseMLPBlock
from megatron.parallel.collectives import (
    copy_to_tp,
    gather_from_tp,
    gather_sequence,
    reduce_from_tp,
    reduce_scatter_sequence,
    split_to_tp,
)


def _shard(param: torch.Tensor, dim: int, indices: list[torch.Tensor], rank: int) -> nn.Parameter:
    """This rank's shard (on the meta device: its shape only, no copy)."""
    if param.device.type == "meta":
        shape = list(param.shape)
        shape[dim] = len(indices[rank])
        p = nn.Parameter(torch.empty(shape, dtype=param.dtype, device="meta"), requires_grad=param.requires_grad)
    else:
        p = nn.Parameter(param.detach().index_select(dim, indices[rank].to(param.device)).clone(),
                         requires_grad=param.requires_grad)
    mark_tp_shard(p, dim, indices, rank)
    return p


def _keep_output_tag(new: nn.Module, old: nn.Module) -> None:
    if is_output_layer(old):
        mark_output_layer(new)


def _blocks(n: int, size: int) -> list[torch.Tensor]:
    step = n // size
    return [torch.arange(r * step, (r + 1) * step) for r in range(size)]


def _enter_tp(x, ps_like):
    """The input of a column-parallel op: Megatron's f, or under sequence parallelism the all-gather of the
    [B, T/TP, ...] shards along T."""
    if ps_like.sequence_parallel:
        return gather_sequence(x, 1, ps_like.group, ps_like.rank, ps_like.size)
    return copy_to_tp(x, ps_like.group)


class ColumnParallelLinear(nn.Module):
    def __init__(self, linear: nn.Linear, indices: list[torch.Tensor], ps):
        super().__init__()
        self.group, self.rank, self.size = ps.tp_group, ps.tp_rank, ps.tp_size
        self.sequence_parallel = getattr(ps, "sequence_parallel", False)
        self.weight = _shard(linear.weight, 0, indices, ps.tp_rank)  # [out/T, in]
        self.bias = _shard(linear.bias, 0, indices, ps.tp_rank) if linear.bias is not None else None  # [out/T]
        _keep_output_tag(self, linear)

    def forward(self, x):
        return F.linear(_enter_tp(x, self), self.weight, self.bias)  # [B, T, out/T]


class RowParallelLinear(nn.Module):
    def __init__(self, linear: nn.Linear, indices: list[torch.Tensor], ps):
        super().__init__()
        self.group, self.rank, self.size = ps.tp_group, ps.tp_rank, ps.tp_size
        self.sequence_parallel = getattr(ps, "sequence_parallel", False)
        self.weight = _shard(linear.weight, 1, indices, ps.tp_rank)  # [out, in/T]
        # replicated, added after the reduction
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        _keep_output_tag(self, linear)

    def forward(self, x):
        if self.sequence_parallel:  # [B, T, out] partial -> [B, T/TP, out] of the sum
            y = reduce_scatter_sequence(F.linear(x, self.weight), 1, self.group, self.rank, self.size)
        else:
            y = reduce_from_tp(F.linear(x, self.weight), self.group)
        return y + self.bias if self.bias is not None else y


class SequenceSplit(nn.Module):
    """Sequence parallelism's entry: [B, T, H] (identical on every TP rank) -> this rank's [B, T/TP, H];
    backward all-gathers the gradient (the embeddings get it whole)."""

    def __init__(self, ps):
        super().__init__()
        self.group, self.rank, self.size = ps.tp_group, ps.tp_rank, ps.tp_size

    def forward(self, x):
        return split_to_tp(x, 1, self.group, self.rank, self.size)


class CopyToTP(nn.Module):
    """Megatron's f as a module: identity forward, the gradient summed over the TP group backward (an input every
    rank's heads share, e.g. MLA's rotary key)."""

    def __init__(self, ps):
        super().__init__()
        self.group = ps.tp_group

    def forward(self, x):
        return copy_to_tp(x, self.group)


def _shard_attention(att, ps) -> None:
    """Self-attention split by heads: qkv column-parallel (this rank's q heads, then its key/value groups), proj
    row-parallel, per-head q/k norms replicated with their gradients summed over TP."""
    T = ps.tp_size
    nh, ng, hd = att.num_heads, att.num_kv_heads, att.head_dim
    if ng % T:
        raise UserError(f"--num-query-groups {ng} is not divisible by --tensor-model-parallel-size {T}")
    if getattr(att, "qk_norm_full", False) and att.q_layernorm is not None:
        raise UserError(f"--qk-layernorm-full normalises q and k over all heads, which "
                        f"--tensor-model-parallel-size {T} splits: use expert / data / pipeline parallelism (TP 1)")
    q_rows, kv_rows = nh * hd, ng * hd
    # this rank's q rows (its heads), then its k and v rows (its key/value groups)
    qkv_idx = [torch.cat([q, q_rows + kv, q_rows + kv_rows + kv])
               for q, kv in zip(_blocks(q_rows, T), _blocks(kv_rows, T))]
    att.qkv = ColumnParallelLinear(att.qkv, qkv_idx, ps)
    att.proj = RowParallelLinear(att.proj, _blocks(q_rows, T), ps)
    att.num_heads //= T
    att.num_kv_heads //= T
    if att.q_layernorm is not None:
        att.q_layernorm, att.k_layernorm = _head_norm(att.q_layernorm, ps), _head_norm(att.k_layernorm, ps)


def _shard_mla(att, ps) -> None:
    """Multi-latent attention split by heads: q (or q_up) and kv_up column-parallel (each head's rows are
    contiguous), proj row-parallel; the down projections and latent norms are replicated, their gradients
    complete on every rank (the column-parallel inputs and the shared rotary key sum theirs over TP)."""
    T, nh = ps.tp_size, att.num_heads
    if nh % T:
        raise UserError(f"--num-attention-heads {nh} is not divisible by --tensor-model-parallel-size {T}")
    q_rows = nh * (att.qk_head_dim + att.qk_pos_emb_head_dim)
    if att.q_lora_rank is None:
        att.linear_q_proj = ColumnParallelLinear(att.linear_q_proj, _blocks(q_rows, T), ps)
    else:
        att.linear_q_up_proj = ColumnParallelLinear(att.linear_q_up_proj, _blocks(q_rows, T), ps)
    att.linear_kv_up_proj = ColumnParallelLinear(att.linear_kv_up_proj,
                                                 _blocks(nh * (att.qk_head_dim + att.v_head_dim), T), ps)
    att.proj = RowParallelLinear(att.proj, _blocks(nh * att.v_head_dim, T), ps)
    att.shared_rope_key = CopyToTP(ps)
    att.num_heads //= T


class TPRMSNorm(RMSNorm):
    """A per-head RMSNorm (q/k norm) replicated over TP ranks that each norm their own heads: the weight's
    gradient is summed over TP (Megatron's f on the weight). Same parameter name and values."""

    def __init__(self, old: nn.Module, ps):
        nn.Module.__init__(self)
        self.weight, self.eps, self.group = old.weight, old.eps, ps.tp_group

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return copy_to_tp(self.weight, self.group) * y.to(x.dtype)


class TPLayerNorm(nn.LayerNorm):
    """:class:`TPRMSNorm` for a LayerNorm q/k norm (weight and bias gradients summed over TP)."""

    def __init__(self, old: nn.Module, ps):
        nn.Module.__init__(self)
        self.normalized_shape, self.eps, self.elementwise_affine = tuple(old.weight.shape), old.eps, True
        self.weight, self.bias, self.group = old.weight, old.bias, ps.tp_group

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, copy_to_tp(self.weight, self.group),
                            copy_to_tp(self.bias, self.group), self.eps)


def _head_norm(old: nn.Module, ps) -> nn.Module:
    return TPRMSNorm(old, ps) if isinstance(old, RMSNorm) else TPLayerNorm(old, ps)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, emb: nn.Embedding, ps):
        super().__init__()
        V = emb.weight.shape[0]
        indices = _blocks(V, ps.tp_size)
        self.group = ps.tp_group
        self.start, self.end = int(indices[ps.tp_rank][0]), int(indices[ps.tp_rank][-1]) + 1
        self.weight = _shard(emb.weight, 0, indices, ps.tp_rank)  # [V/T, H]

    def forward(self, tokens):
        outside = (tokens < self.start) | (tokens >= self.end)
        local = (tokens - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside[..., None], 0.0)
        return reduce_from_tp(out, self.group)


class VocabParallelOutputLayer(nn.Module):
    """[B, T, V/T] logits from this rank's rows of the output weight: the (tied) word embeddings' shard the
    model passes, or (``untied``: --untie-embeddings-and-output-weights) this module's own ``weight`` [V/T, H]."""

    def __init__(self, ps, untied: nn.Module = None, vocab_limit=None):
        super().__init__()
        self.group, self.rank, self.size = ps.tp_group, ps.tp_rank, ps.tp_size
        # sequence parallelism: the [B, T/TP, H] shards are gathered first
        self.sequence_parallel = getattr(ps, "sequence_parallel", False)
        self.vocab_limit = vocab_limit  # --true-vocab-size: the padding ids' logits are masked
        if untied is not None:
            self.weight = _shard(untied.weight, 0, _blocks(untied.weight.shape[0], ps.tp_size), ps.tp_rank)

    def forward(self, h, weight, gather: bool = True):
        logits = F.linear(_enter_tp(h, self), weight)  # [B, T, V/T]
        logits = mask_vocab_padding(logits, self.vocab_limit, self.rank * logits.shape[-1])
        return gather_from_tp(logits, -1, self.size * logits.shape[-1], self.group, self.rank, self.size) if gather else logits


class VocabParallelCrossEntropy(nn.Module):
    """Cross-entropy over [B, T, V/T] logits without gathering them (Megatron's)."""

    def __init__(self, ps, vocab_start: int):
        super().__init__()
        self.group, self.vocab_start = ps.tp_group, vocab_start

    def forward(self, logits, labels):
        logits = logits.float()  # [B, T, V/T]
        m = logits.detach().max(dim=-1, keepdim=True).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=self.group)
        shifted = logits - m
        Vl = logits.shape[-1]
        local = labels - self.vocab_start
        inside = (local >= 0) & (local < Vl)
        target = shifted.gather(-1, local.clamp(0, Vl - 1)[..., None]).squeeze(-1) * inside  # [B, T]
        target = reduce_from_tp(target, self.group)
        sum_exp = reduce_from_tp(shifted.exp().sum(dim=-1), self.group)  # [B, T]
        return torch.log(sum_exp) - target


def apply_tensor_parallel(model: nn.Module, ps) -> None:
    """Shard ``model`` (a GPTModel) in place for ``ps.tp_size`` ranks; a no-op at TP=1."""
    if ps.tp_size == 1:
        return
    T = ps.tp_size
    for layer in model.layer_modules():
        if hasattr(layer.attention, "qkv"):
            _shard_attention(layer.attention, ps)
        else:  # multi-latent attention (megatron/model/mla.py)
            _shard_mla(layer.attention, ps)
        if isinstance(layer.mlp, DenseMLPBlock):
            mlp = layer.mlp.mlp
            F_ = mlp.fc2.weight.shape[1]
            fc1_idx = [torch.cat([blk, F_ + blk]) for blk in _blocks(F_, T)] if mlp.swiglu else _blocks(F_, T)
            mlp.fc1 = ColumnParallelLinear(mlp.fc1, fc1_idx, ps)  # SwiGLU: [gate rows; up rows] of this rank
            mlp.fc2 = RowParallelLinear(mlp.fc2, _blocks(F_, T), ps)
    emb = VocabParallelEmbedding(model.word_embeddings, ps)
    model.word_embeddings = emb
    if getattr(ps, "sequence_parallel", False):
        _apply_sequence_parallel(model, ps)
    untied = model.output_layer if getattr(model.output_layer, "weight", None) is not None else None
    model.output_layer = VocabParallelOutputLayer(ps, untied, model.cfg.true_vocab_size)
    model.loss_fn = VocabParallelCrossEntropy(ps, emb.start)


def _apply_sequence_parallel(model: nn.Module, ps) -> None:
    """Split the residual stream after the embeddings and tag what each rank computes on its shard alone."""
    model.sequence_split = SequenceSplit(ps)
    shard_fed = [model.final_layernorm]
    for layer in model.layer_modules():
        shard_fed += [layer.input_layernorm, layer.post_attention_layernorm, layer.attention.proj]
        mlp = layer.mlp
        shard_fed += [mlp.mlp.fc2] if isinstance(mlp, DenseMLPBlock) else [mlp] if isinstance(mlp, MoELayer) else []
    for module in shard_fed:
        for p in module.parameters():
            if not is_tp_sharded(p) and not is_expert(p):  # a row-parallel weight, the experts: reduced already
                mark_sequence_parallel(p)


def gather_tp(t: torch.Tensor, p: torch.Tensor, ps) -> torch.Tensor:
    """The full tensor from every TP rank's shard ``t`` of parameter ``p`` (collective over ps.tp_group)."""
    parts = [torch.empty_like(t) for _ in range(ps.tp_size)]
    dist.all_gather(parts, t.contiguous(), group=ps.tp_group)
    full = t.new_empty(full_shape(p))
    for idx, part in zip(p.tp_indices, parts):
        full.index_copy_(p.tp_dim, idx.to(t.device), part)
    return full


def shard_tp(full: torch.Tensor, p: torch.Tensor, ps) -> torch.Tensor:
    """This rank's shard of the full tensor ``full`` of parameter ``p``."""
    return full.index_select(p.tp_dim, p.tp_indices[ps.tp_rank].to(full.device))


def full_shape(p: torch.Tensor) -> tuple:
    if not is_tp_sharded(p):
        return tuple(p.shape)
    shape = list(p.shape)
    shape[p.tp_dim] = sum(len(i) for i in p.tp_indices)
    return tuple(shape)
