"""GPT model: learned positions, pre-LN transformer, tied input/output embeddings, MoE per layer; the block
specification of ModelConfig makes it Llama-style instead (RoPE, RMSNorm, SwiGLU, GQA, qk-norm, no biases,
an untied output layer ``output_layer.weight`` [V, H]).

Entry points (one shared trunk): ``model(tokens, labels)`` = :meth:`GPTModel.forward`, the training
loss; :meth:`GPTModel.distill` (loss against labels and a teacher's logits); :meth:`GPTModel.logits`
(scoring); :meth:`GPTModel.decode` (generation with a :class:`~megatron.model.kv_cache.KVCache`).

Shapes: B batch, T sequence, H hidden, V padded vocabulary.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from megatron.model import init_rng
from megatron.model.cross_entropy import linear_cross_entropy
from megatron.model.fused import is_norm, norm
from megatron.model.kd_loss import cross_entropy_and_kd, linear_cross_entropy_kd
from megatron.model.kv_cache import KVCache, padding_attention_mask
from megatron.model.moe.experts import init_std_for_output
from megatron.model.moe.layer import MoELayer
from megatron.model.moe.metrics import MoEStats
from megatron.model.param_tags import is_output_layer, is_tp_sharded, tp_local_layout
from megatron.model.rope import RotaryTables
from megatron.model.transformer import DenseMLPBlock, TransformerLayer, mlp_from_config, rope_tables


class LossOutput(NamedTuple):
    """:meth:`GPTModel.forward` (training)."""

    loss: torch.Tensor  # [B, T] fp32 per-token cross-entropy
    moe_stats: list[MoEStats]  # one per MoE layer, in layer order


class DistillOutput(NamedTuple):
    """:meth:`GPTModel.distill`: the student's loss terms against labels and a teacher."""

    loss: torch.Tensor  # [B, T] fp32 per-token cross-entropy
    moe_stats: list[MoEStats]
    kd_loss: torch.Tensor  # [B, T] fp32 per-token T^2 * KL(teacher || student)


class LogitsOutput(NamedTuple):
    """:meth:`GPTModel.logits` (scoring) and :meth:`GPTModel.decode` (generation)."""

    logits: torch.Tensor  # [B, T, V] (decode: [B, 1, V] unless all_logits)
    moe_stats: list[MoEStats]


def mask_vocab_padding(logits: torch.Tensor, limit: Optional[int], start: int = 0) -> torch.Tensor:
    """logits [..., V'] of the vocabulary ids start .. start + V' - 1, with the ids >= ``limit`` (--true-vocab-size;
    None: no limit) set to the dtype's lowest value / 2: a softmax gives them 0 and nothing overflows."""
    if limit is None or start + logits.shape[-1] <= limit:
        return logits
    ids = torch.arange(start, start + logits.shape[-1], device=logits.device)  # [V']
    return logits.masked_fill(ids >= limit, torch.finfo(logits.dtype).min / 2)


class TiedOutputLayer(nn.Module):
    """Logits from the (tied) word-embedding matrix. Tensor parallelism swaps in a vocab-parallel one.
    ``vocab_limit`` (--true-vocab-size) masks the padding ids' logits."""

    vocab_limit: Optional[int] = None

    def forward(self, h: torch.Tensor, weight: torch.Tensor, gather: bool = True) -> torch.Tensor:
        return mask_vocab_padding(F.linear(h, weight), self.vocab_limit)  # [B, T, V]


class UntiedOutputLayer(TiedOutputLayer):
    """--untie-embeddings-and-output-weights: logits from a weight of its own, [V, H] (vocab-parallel under TP).
    The model passes it its own ``weight`` (see :meth:`GPTModel.output_weight`)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))


class CrossEntropy(nn.Module):
    """Per-token cross-entropy in fp32. Tensor parallelism swaps in the vocab-parallel one."""

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        B, T = labels.shape
        return F.cross_entropy(logits.float().view(B * T, -1), labels.reshape(-1), reduction="none").view(B, T)


class GPTModel(nn.Module):
    def __init__(self, cfg, ep_rank: int = 0, ep_size: int = 1):
        """``cfg``: ModelConfig. ``ep_rank/ep_size`` say which experts this rank holds (layout only)."""
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, H)
        # None with RoPE or --no-position-embedding
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, H) if cfg.learned_positions else None
        self.embedding_dropout = nn.Dropout(cfg.hidden_dropout)
        # sequence parallelism (megatron/parallel) swaps in the split of [B, T, H] into this rank's [B, T/TP, H]
        self.sequence_split = nn.Identity()
        layers = []
        for i, num_experts in enumerate(cfg.moe.experts_per_layer(cfg.num_layers)):
            if cfg.moe.is_moe_layer(i, num_experts):
                layer_ep = min(ep_size, num_experts)  # PR-MoE: fewer experts than EP ranks -> EP = E here
                mlp = MoELayer(cfg.moe, H, cfg.ffn_hidden_size, num_experts, layer_number=i,
                               ep_rank=ep_rank % layer_ep, ep_size=layer_ep,
                               dense_mlp_factory=lambda: mlp_from_config(cfg), gated=cfg.swiglu,
                               bias=cfg.add_bias_linear)
            else:
                mlp = DenseMLPBlock(H, cfg.ffn_hidden_size, swiglu=cfg.swiglu, bias=cfg.add_bias_linear)
            layers.append(TransformerLayer(cfg, i, mlp))
        self.layers = nn.ModuleList(layers)
        self.final_layernorm = norm(cfg.normalization, H, cfg.layernorm_epsilon)
        if cfg.untie_embeddings_and_output_weights:
            self.output_layer = UntiedOutputLayer(cfg.vocab_size, H)  # output_layer.weight [V, H]
        else:
            self.output_layer = TiedOutputLayer()  # no parameters of its own
        self.output_layer.vocab_limit = cfg.true_vocab_size
        self.loss_fn = CrossEntropy()

    def _fused_output_loss(self) -> bool:
        """The output projection and the loss fuse into one step unless tensor parallelism swapped them out."""
        return type(self.output_layer) in (TiedOutputLayer, UntiedOutputLayer) and type(self.loss_fn) is CrossEntropy

    def output_weight(self) -> torch.Tensor:
        """The output layer's weight [V, H] (this rank's rows under TP): its own when untied, else the word
        embeddings'."""
        if self.cfg.untie_embeddings_and_output_weights:
            return self.output_layer.weight
        return self.word_embeddings.weight

    def _fused_output_weight(self) -> torch.Tensor:
        """The fused loss's weight: without the padding rows under --true-vocab-size (masking their logits)."""
        w = self.output_weight()
        return w if self.cfg.true_vocab_size is None else w[: self.cfg.true_vocab_size]

    def layer_modules(self) -> list[TransformerLayer]:
        """The transformer layers this model holds, in order (a pipeline stage holds some, see
        ``megatron.parallel.pipeline``: its ``layers`` is then a ModuleDict keyed by global layer index)."""
        return list(self.layers.values()) if isinstance(self.layers, nn.ModuleDict) else list(self.layers)

    def moe_layers(self) -> list[MoELayer]:
        return [layer.mlp for layer in self.layer_modules() if isinstance(layer.mlp, MoELayer)]

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Megatron init: N(0, std) weights, output layers N(0, std / sqrt(2 L)), zero biases, unit norms.

        Shard-local and layout-independent (``megatron.model.init_rng``): every matrix (embeddings, the
        Linear layers and their tensor-parallel replacements, router gates, the Residual-MoE coefficient)
        takes its values by position in its full tensor from a stream named by (seed, parameter name), so
        it may run on a model already sharded by tensor parallelism (each rank fills its shard; nothing
        full is made) and a TP=T model holds the slices of the TP=1 one. Experts: per global expert id
        (:meth:`StackedExperts.init_weights`). Norms (LayerNorm, RMSNorm, the q/k norms): weight 1, bias 0;
        every other parameter (biases, the aux-free router's expert bias) and buffer (its pending load) starts
        at 0. The untied output layer (``output_layer.weight``) is a matrix like the word embeddings (std).
        """
        std = self.cfg.init_method_std
        out_std = init_std_for_output(std, self.cfg.num_layers)
        experts = set()
        for layer in self.moe_layers():
            layer.experts.init_weights(seed, layer.layer_number, std, out_std)
            experts.add(layer.experts)
        for module_name, module in self.named_modules():
            if module in experts:
                continue
            is_a_norm = is_norm(module)
            for name, p in module.named_parameters(prefix=module_name, recurse=False):
                if is_a_norm:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                elif name.rsplit(".", 1)[-1] == "weight" and p.dim() >= 2:
                    if is_tp_sharded(p) and tp_local_layout(p) is None:
                        raise ValueError(f"{name}: a tensor-parallel shard without its rank cannot be initialised")
                    layout = tp_local_layout(p) or ()
                    init_rng.normal_(p, seed, name, out_std if is_output_layer(module) else std, *layout)
                else:
                    p.zero_()
            for b in module.buffers(recurse=False):
                b.zero_()

    def new_cache(self) -> KVCache:
        """An empty KV cache for :meth:`decode` (one :class:`~megatron.model.kv_cache.LayerKV` per layer)."""
        return KVCache(len(self.layers))

    # ---- entry points; all run the same trunk (embeddings, layers) and tied output projection

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """Training: tokens, labels [B, T] -> per-token cross-entropy [B, T] fp32 and the MoE layers' stats."""
        h, stats = self._trunk(tokens)
        return LossOutput(self.head_loss(h, labels), stats)

    def distill(self, tokens: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                temperature: float) -> DistillOutput:
        """Distillation: tokens, labels [B, T], teacher_logits [B, T, V] -> per-token cross-entropy and
        T^2 * KL(teacher || student) at ``temperature``, [B, T] fp32 each, and the MoE layers' stats."""
        h, stats = self._trunk(tokens)
        ce, kd = self.head_distill(h, labels, teacher_logits, temperature)
        return DistillOutput(ce, stats, kd)

    def logits(self, tokens: torch.Tensor, token_mask: Optional[torch.Tensor] = None) -> LogitsOutput:
        """Scoring: tokens [B, T] -> logits [B, T, V]. ``token_mask`` [B, T] bool marks real tokens: padding
        is kept out of MoE routing and capacity, and out of attention where it precedes real tokens."""
        h, stats = self._trunk(tokens, token_mask=token_mask)
        return LogitsOutput(self._project(h), stats)

    def decode(self, tokens: torch.Tensor, cache: Optional[KVCache], position_ids: Optional[torch.Tensor] = None,
               token_mask: Optional[torch.Tensor] = None, all_logits: bool = False) -> LogitsOutput:
        """Generation: tokens [B, T] after what ``cache`` holds (appended to it; None: no cache) -> logits
        [B, 1, V] of the last position, or [B, T, V] with ``all_logits``.

        ``position_ids`` [B, T] (per-row positions of left-padded rows, see
        :func:`~megatron.model.kv_cache.left_padded_positions`); default: counting on from ``cache.length``.
        ``token_mask`` [B, T] bool marks real tokens (left padding); the cache remembers it.
        """
        h, stats = self._trunk(tokens, position_ids, token_mask, cache)
        if not all_logits:
            h = h[:, -1:]  # [B, 1, H]
        return LogitsOutput(self._project(h), stats)

    # ---- the head: final layer norm, tied output projection, loss (the last pipeline stage runs these alone)

    def head_loss(self, h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, H] before the final layer norm, labels [B, T] -> per-token cross-entropy [B, T] fp32."""
        h = self.final_layernorm(h)  # [B, T, H]
        if self._fused_output_loss():
            return linear_cross_entropy(h, self._fused_output_weight(), labels)  # no [B, T, V] kept
        logits = self.output_layer(h, self.output_weight(), gather=False)  # [B, T, V] (this rank's slice)
        return self.loss_fn(logits, labels)

    def head_distill(self, h: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [B, T, H], labels [B, T], teacher_logits [B, T, V] -> (cross-entropy, T^2 * KL), [B, T] fp32."""
        h = self.final_layernorm(h)  # [B, T, H]
        if self._fused_output_loss():
            w = self._fused_output_weight()  # [V', H]: the teacher's padding ids drop out of its softmax too
            return linear_cross_entropy_kd(h, w, labels, teacher_logits[..., : w.shape[0]], temperature)
        logits = self.output_layer(h, self.output_weight(), gather=True)  # [B, T, V]
        limit = self.cfg.true_vocab_size  # the padding ids drop out of both softmaxes, as in the fused path
        return cross_entropy_and_kd(logits[..., :limit], labels, teacher_logits[..., :limit], temperature)

    # ---- shared parts

    def embed(self, tokens: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """tokens, position_ids [B, T] / [1, T] -> [B, T, H] (word + learned position embeddings, dropout)."""
        h = self.word_embeddings(tokens)  # [B, T, H]
        if self.position_embeddings is not None:
            h = h + self.position_embeddings(position_ids)
        return self.embedding_dropout(self.sequence_split(h))

    def rotary(self, position_ids: torch.Tensor) -> Optional[RotaryTables]:
        """position_ids [B or 1, T] -> the RoPE cos / sin tables every layer shares (None without RoPE)."""
        if not self.cfg.rope:
            return None
        return rope_tables(self.cfg, position_ids)

    def run_layer(self, layer: TransformerLayer, h: torch.Tensor, token_mask=None, layer_cache=None, attn_mask=None,
                  rope: Optional[RotaryTables] = None):
        """One transformer layer, under activation checkpointing when --checkpoint-activations (training).
        ``rope``: :meth:`rotary` of the tokens' positions (None: positions 0.. after the layer's cache)."""
        if self.cfg.checkpoint_activations and self.training and torch.is_grad_enabled():
            return checkpoint(layer, h, token_mask, layer_cache, attn_mask, rope, use_reentrant=False)
        return layer(h, token_mask, layer_cache, attn_mask, rope)

    def _trunk(self, tokens: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
               token_mask: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None):
        """tokens [B, T] -> (hidden states [B, T, H] before the final layer norm, MoE stats per MoE layer)."""
        B, T = tokens.shape
        if position_ids is None:
            start = cache.length if cache is not None else 0
            position_ids = torch.arange(start, start + T, device=tokens.device)[None, :]  # [1, T]
        h = self.embed(tokens, position_ids)  # [B, T, H]
        rope = self.rotary(position_ids)  # cos / sin [B or 1, 1, T, rot] or None
        attn_mask = None  # [B, 1, T, L + T] bool or None (causal attention alone is exact)
        if token_mask is not None or cache is not None:
            attn_mask = padding_attention_mask(token_mask, cache, B, T, tokens.device)
        stats = []
        for i, layer in enumerate(self.layers):
            h, s = self.run_layer(layer, h, token_mask, cache[i] if cache is not None else None, attn_mask, rope)
            if s is not None:
                stats.append(s)
        return h, stats

    def _project(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, H] -> full-vocabulary logits [B, T, V] (final layer norm, output projection)."""
        return self.output_layer(self.final_layernorm(h), self.output_weight(), gather=True)
