"""The sparse MoE families: ``MixtralForCausalLM`` (mixtral), ``Qwen2MoeForCausalLM`` (qwen2_moe: a sigmoid-gated
shared expert, q/k/v biases, dense layers by ``mlp_only_layers`` / ``decoder_sparse_step``),
``Qwen3MoeForCausalLM`` (qwen3_moe: per-head q/k RMSNorm, ``norm_topk_prob``) and ``OlmoeForCausalLM`` (olmoe).

Each extends its dense Llama-style family (attention, norms, RoPE, dense layers) with the MoE layers: router,
stacked SwiGLU experts and the shared expert, mapped as in :mod:`megatron.model.moe.hf_layouts`; the routing
flags come from :func:`~megatron.model.moe.hf_layouts.moe_options_from_hf_config` (no token dropping, the
transformers load-balancing coefficient x k as ``--moe-aux-loss-coeff``).

Expert weights: transformers' checkpoints (and ``save_pretrained``, which writes the original layout) store
one Linear per expert: ``experts.{e}.gate_proj / up_proj / down_proj`` (Mixtral: ``block_sparse_moe.experts.{e}
.w1 / w3 / w2``); a directory with transformers 5's fused in-memory tensors (``experts.gate_up_proj`` /
``experts.down_proj``) is read too. The export writes the per-expert layout, which every transformers version
loads.

OLMoE normalises q and k over the whole projection (``q_norm`` [hidden], ``k_norm`` [kv heads x head dim]),
not per head as ``--qk-layernorm`` does; the two differ unless there is one head, so its import needs the
model's ``--qk-layernorm-full`` (ModelConfig.qk_layernorm_full) and is refused by name where the model lacks it
(``OlmoeFamily.unsupported``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.config.moe import MoEConfig
from megatron.config.schema import ModelConfig
from megatron.errors import UserError
from megatron.hf.families.base import Field, Rule, anything, cat_rows, equals, same
from megatron.hf.families.llama import LlamaFamily, Qwen2Family, Qwen3Family
from megatron.model.moe import hf_layouts


def _none(v) -> bool:
    return v is None


def _positive_int(v) -> bool:
    return isinstance(v, int) and v > 0


MOE_FIELDS = {"num_experts_per_tok": Field(_positive_int, "a positive integer"), "output_router_logits": anything(),
              "router_aux_loss_coef": anything()}


def per_expert_w1(ours: str, gate: list, up: list) -> Rule:
    """Our experts.w1 [E, H, 2F] from per-expert gate_proj / up_proj [F, H] (names ``gate``, ``up``)."""
    import torch

    E = len(gate)

    def join(ts):  # [E, 2F, H] (gate rows, then up) -> [E, H, 2F]
        return torch.stack([torch.cat([g, u], dim=0) for g, u in zip(ts[:E], ts[E:])]).transpose(1, 2).contiguous()

    def split(w1):
        g, u = w1.transpose(1, 2).chunk(2, dim=1)  # [E, F, H] each
        return [t.clone() for t in g] + [t.clone() for t in u]

    return Rule(ours, tuple(gate) + tuple(up), join, split)


def per_expert_w2(ours: str, down: list) -> Rule:
    """Our experts.w2 [E, F, H] from per-expert down_proj [H, F]."""
    import torch

    return Rule(ours, tuple(down), lambda ts: torch.stack(list(ts)).transpose(1, 2).contiguous(),
                lambda w2: [t.t().clone() for t in w2])


def fused_rule(ours: str, theirs: str) -> Rule:
    """Our w1 / w2 from transformers 5's fused gate_up_proj [E, 2F, H] / down_proj [E, H, F]: the transpose."""
    return Rule(ours, (theirs,), lambda ts: ts[0].transpose(1, 2).contiguous(),
                lambda t: [t.transpose(1, 2).contiguous()])


class MoEFamilyMixin:
    """What the four sparse families share; mixed in before their dense family."""

    block = "mlp"  # the MoE block's name in the stored checkpoint (Mixtral: block_sparse_moe)
    expert_names = ("gate_proj", "up_proj", "down_proj")  # Mixtral: w1, w3, w2
    shared_prefix = None  # Qwen2-MoE: "shared_expert."
    norm_topk_default = False  # transformers' norm_topk_prob default (Mixtral: always renormalised)

    def moe_fields(self) -> dict:
        return dict(MOE_FIELDS)

    def moe_config(self, hf: dict, src: str) -> MoEConfig:
        try:
            kw = hf_layouts.moe_options_from_hf_config(hf)
        except UserError as e:
            raise UserError(f"--load {src}: {e}") from None
        return MoEConfig(**kw)

    def model_config(self, hf: dict, vocab_size: int) -> ModelConfig:
        cfg = super().model_config(hf, vocab_size)
        cfg.moe = self.moe_config(hf, "config.json")
        return cfg

    # ---- weights

    def rules_for_state(self, cfg: ModelConfig, hf_vocab: int, state: dict) -> list:
        fused = any(n.endswith("experts.gate_up_proj") for n in state)
        return self.rules(cfg, hf_vocab, fused=fused)

    def rules(self, cfg: ModelConfig, hf_vocab: int, fused: bool = False) -> list:
        self._fused = fused  # read by mlp_rules during this call (families are stateless otherwise)
        try:
            return super().rules(cfg, hf_vocab)
        finally:
            self._fused = False

    def mlp_rules(self, cfg: ModelConfig, i: int, moe: bool) -> list:
        if not moe:
            return super().mlp_rules(cfg, i, False)
        ours = f"layers.{i}.mlp."
        E = cfg.moe.experts_per_layer(cfg.num_layers)[i]
        if getattr(self, "_fused", False):
            theirs = f"model.layers.{i}.mlp."
            out = [same(ours + "router.wg.weight", theirs + "gate.weight"),
                   fused_rule(ours + "experts.w1", theirs + "experts.gate_up_proj"),
                   fused_rule(ours + "experts.w2", theirs + "experts.down_proj")]
        else:
            theirs = f"model.layers.{i}.{self.block}."
            g, u, d = self.expert_names
            names = {k: [f"{theirs}experts.{e}.{k}.weight" for e in range(E)] for k in (g, u, d)}
            out = [same(ours + "router.wg.weight", theirs + "gate.weight"),
                   per_expert_w1(ours + "experts.w1", names[g], names[u]),
                   per_expert_w2(ours + "experts.w2", names[d])]
        if cfg.moe.shared_expert_intermediate_size:
            theirs = f"model.layers.{i}.mlp."
            s, I = theirs + self.shared_prefix, cfg.moe.shared_expert_intermediate_size
            out += [cat_rows(ours + "shared_experts.fc1.weight", (s + "gate_proj.weight", s + "up_proj.weight"),
                             [I, I]),
                    same(ours + "shared_experts.fc2.weight", s + "down_proj.weight")]
            if cfg.moe.shared_expert_gate:
                out.append(same(ours + "shared_experts.gate.weight", theirs + "shared_expert_gate.weight"))
        return out

    # ---- export

    def moe_refusal(self, cfg: ModelConfig) -> list:
        """(bad, what) pairs: MoE settings this family's transformers class does not compute."""
        m = cfg.moe
        counts = [e for i, e in enumerate(m.experts_per_layer(cfg.num_layers)) if m.is_moe_layer(i, e)]
        norm = m.router_norm_topk_prob if m.router_norm_topk_prob is not None else not m.router_pre_softmax
        return [(not m.enabled or not counts, "no MoE layers"), (len(set(counts)) > 1, "per-layer expert counts"),
                (m.mlp_type != "standard", "Residual-MoE"), (m.router_score_function != "softmax", "sigmoid scores"),
                (m.router_num_groups is not None, "group-limited routing"),
                (m.router_enable_expert_bias, "an expert bias"),
                (m.router_topk_scaling_factor not in (None, 1.0), "a top-k scaling factor"),
                (m.router_type not in ("megatron", "topk"), f"the {m.router_type} router"),
                (m.router_type == "topk" and m.topk != 2, "the DeepSpeed router at top-k != 2"),
                (m.router_pre_softmax and norm, "pre-softmax with renormalised top-k"),
                (norm != self.norm_topk_default and not self.norm_topk_configurable,
                 "un-renormalised top-k (--moe-router-pre-softmax)" if not norm else "renormalised top-k")]

    norm_topk_configurable = True

    def export_refusal(self, cfg: ModelConfig) -> Optional[str]:
        if not cfg.moe.enabled:
            return "no MoE layers"
        dense = super().export_refusal(dataclasses.replace(cfg, moe=MoEConfig()))
        found = [dense] if dense else []
        found += [what for bad, what in self.moe_refusal(cfg) if bad]
        return ", ".join(found) if found else None

    def moe_hf_config(self, cfg: ModelConfig) -> dict:
        m = cfg.moe
        counts = [e for i, e in enumerate(m.experts_per_layer(cfg.num_layers)) if m.is_moe_layer(i, e)]
        norm = m.router_norm_topk_prob if m.router_norm_topk_prob is not None else not m.router_pre_softmax
        return {"num_experts_per_tok": m.topk, "router_aux_loss_coef": m.loss_coeff / m.topk,
                "output_router_logits": False, "num_experts": counts[0], "norm_topk_prob": bool(norm)}

    def moe_width(self, cfg: ModelConfig) -> int:
        return cfg.moe.moe_ffn_hidden_size or cfg.ffn_hidden_size


class MixtralFamily(MoEFamilyMixin, LlamaFamily):
    model_type = "mixtral"
    architecture = "MixtralForCausalLM"
    block = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")
    norm_topk_default = True
    norm_topk_configurable = False

    def fields(self) -> dict:
        f = super().fields()
        for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
            f.pop(key)
        f.update(self.moe_fields())
        f.update({"num_local_experts": Field(_positive_int, "a positive integer"),
                  "router_jitter_noise": equals(0, 0.0, None),
                  "sliding_window": Field(_none, "sliding-window attention is not implemented: set it to null")})
        return f

    def export_refusal(self, cfg: ModelConfig) -> Optional[str]:
        refusal = super().export_refusal(cfg)
        m = cfg.moe
        extra = [what for bad, what in [
            (m.shared_expert_intermediate_size is not None, "shared experts"),
            (cfg.moe.enabled and not all(m.is_moe_layer(i, e) for i, e in enumerate(m.experts_per_layer(cfg.num_layers))),
             "dense layers"), (cfg.add_bias_linear or cfg.add_qkv_bias, "biases")] if bad]
        return ", ".join([refusal] * bool(refusal) + extra) or None

    def hf_config(self, cfg: ModelConfig, vocab_size: int, eod: int) -> dict:
        out = super().hf_config(cfg, vocab_size, eod)
        for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
            out.pop(key, None)
        moe = self.moe_hf_config(cfg)
        moe["num_local_experts"] = moe.pop("num_experts")
        moe.pop("norm_topk_prob")
        out.update(moe, intermediate_size=self.moe_width(cfg), sliding_window=None, router_jitter_noise=0.0)
        return out


class Qwen2MoeFamily(MoEFamilyMixin, Qwen2Family):
    model_type = "qwen2_moe"
    architecture = "Qwen2MoeForCausalLM"
    shared_prefix = "shared_expert."

    def fields(self) -> dict:
        f = super().fields()
        f.update(self.moe_fields())
        f.update({"num_experts": Field(_positive_int, "a positive integer"), "norm_topk_prob": anything(),
                  "moe_intermediate_size": anything(), "decoder_sparse_step": Field(_positive_int, "an integer >= 1"),
                  "mlp_only_layers": anything(), "qkv_bias": anything(),
                  "shared_expert_intermediate_size": Field(_positive_int, "a shared expert (> 0): transformers "
                                                                          "always builds one")})
        return f

    def model_config(self, hf: dict, vocab_size: int) -> ModelConfig:
        cfg = super().model_config(hf, vocab_size)
        cfg.add_qkv_bias = bool(hf.get("qkv_bias", True))
        return cfg

    def export_refusal(self, cfg: ModelConfig) -> Optional[str]:
        m = cfg.moe
        found = [what for bad, what in [
            (not m.shared_expert_intermediate_size or not m.shared_expert_gate, "a gated shared expert"),
            (cfg.add_bias_linear, "biases outside q/k/v")] if bad]
        # q/k/v biases or none (qkv_bias): the dense Qwen2 check wants them, so ask it with them on
        probe = dataclasses.replace(cfg, add_qkv_bias=True)
        refusal = MoEFamilyMixin.export_refusal(self, probe)
        return ", ".join([refusal] * bool(refusal) + found) or None

    def hf_config(self, cfg: ModelConfig, vocab_size: int, eod: int) -> dict:
        out = super().hf_config(cfg, vocab_size, eod)
        m = cfg.moe
        pattern = [m.is_moe_layer(i, e) for i, e in enumerate(m.experts_per_layer(cfg.num_layers))]
        out.update(self.moe_hf_config(cfg), moe_intermediate_size=self.moe_width(cfg), decoder_sparse_step=1,
                   mlp_only_layers=[i for i, s in enumerate(pattern) if not s], qkv_bias=cfg.add_qkv_bias,
                   shared_expert_intermediate_size=m.shared_expert_intermediate_size)
        return out


class Qwen3MoeFamily(MoEFamilyMixin, Qwen3Family):
    model_type = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"

    def fields(self) -> dict:
        f = super().fields()
        f.update(self.moe_fields())
        f.update({"num_experts": Field(_positive_int, "a positive integer"),
                  "num_local_experts": Field(_positive_int, "a positive integer"), "norm_topk_prob": anything(),
                  "moe_intermediate_size": anything(), "decoder_sparse_step": Field(_positive_int, "an integer >= 1"),
                  "mlp_only_layers": anything()})
        return f

    def export_refusal(self, cfg: ModelConfig) -> Optional[str]:
        refusal = super().export_refusal(cfg)
        extra = "shared experts" if cfg.moe.shared_expert_intermediate_size else None
        return ", ".join(x for x in (refusal, extra) if x) or None

    def hf_config(self, cfg: ModelConfig, vocab_size: int, eod: int) -> dict:
        out = super().hf_config(cfg, vocab_size, eod)
        m = cfg.moe
        pattern = [m.is_moe_layer(i, e) for i, e in enumerate(m.experts_per_layer(cfg.num_layers))]
        out.update(self.moe_hf_config(cfg), moe_intermediate_size=self.moe_width(cfg), decoder_sparse_step=1,
                   mlp_only_layers=[i for i, s in enumerate(pattern) if not s])
        return out


class OlmoeFamily(MoEFamilyMixin, LlamaFamily):
    model_type = "olmoe"
    architecture = "OlmoeForCausalLM"

    def fields(self) -> dict:
        f = super().fields()
        for key in ("mlp_bias", "pretraining_tp"):
            f.pop(key)
        f.update(self.moe_fields())
        f.update({"num_experts": Field(_positive_int, "a positive integer"), "norm_topk_prob": anything(),
                  "attention_bias": equals(False), "clip_qkv": Field(_none, "q/k/v clipping is not implemented")})
        return f

    qk_norm = True
    qk_norm_full = True

    def model_config(self, hf: dict, vocab_size: int) -> ModelConfig:
        cfg = super().model_config(hf, vocab_size)
        cfg.qk_layernorm_full = True  # q_norm [nh x hd], k_norm [ng x hd] over the whole projections
        return cfg

    def export_refusal(self, cfg: ModelConfig) -> Optional[str]:
        refusal = super().export_refusal(cfg)
        extra = [what for bad, what in [
            (cfg.moe.shared_expert_intermediate_size is not None, "shared experts"),
            (cfg.moe.enabled and not all(cfg.moe.is_moe_layer(i, e)
                                         for i, e in enumerate(cfg.moe.experts_per_layer(cfg.num_layers))),
             "dense layers"), (cfg.add_bias_linear or cfg.add_qkv_bias, "biases")] if bad]
        return ", ".join([refusal] * bool(refusal) + extra) or None

    def hf_config(self, cfg: ModelConfig, vocab_size: int, eod: int) -> dict:
        out = super().hf_config(cfg, vocab_size, eod)
        for key in ("mlp_bias", "pretraining_tp"):
            out.pop(key, None)
        out.update(self.moe_hf_config(cfg), intermediate_size=self.moe_width(cfg), clip_qkv=None)
        return out
