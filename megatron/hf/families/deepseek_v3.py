"""DeepSeek-V3 (``DeepseekV3ForCausalLM``, model_type ``deepseek_v3``): multi-latent attention, dense first layers
(``first_k_dense_replace``), MoE layers with sigmoid scores, group-limited routing (``n_group`` / ``topk_group``),
the aux-loss-free expert bias (``e_score_correction_bias`` = our ``router.expert_bias``), ``routed_scaling_factor``
and shared experts; RMSNorm, SwiGLU, RoPE (default type) on the MLA rotary part.

Weights (transformers 5 names; ours in megatron/model/mla.py and megatron/model/moe/hf_layouts.py)::

    self_attn.q_proj | q_a_proj, q_a_layernorm, q_b_proj   attention.linear_q_proj | linear_q_down_proj,
                                                           q_layernorm, linear_q_up_proj
    self_attn.kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj attention.linear_kv_down_proj, kv_layernorm,
                                                           linear_kv_up_proj
    self_attn.o_proj                                       attention.proj
    mlp.gate_proj / up_proj / down_proj (dense layers)     mlp.mlp.fc1 ([gate; up]) / fc2
    mlp.gate.weight, mlp.gate.e_score_correction_bias      mlp.router.wg.weight, mlp.router.expert_bias
    mlp.experts.gate_up_proj [E, 2F, H], down_proj [E,H,F] mlp.experts.w1 [E, H, 2F], w2 [E, F, H] (transposes)
    mlp.shared_experts.gate_proj / up_proj / down_proj     mlp.shared_experts.fc1 ([gate; up]) / fc2

Also read: DeepSeek's own per-expert files (``mlp.experts.{e}.gate_proj.weight`` ...), stacked on import. The
multi-token-prediction (MTP) module of the original checkpoints (``model.layers.{L}...``, layers past
``num_hidden_layers``) is skipped with a note: nothing here trains or runs it.

Where transformers and Megatron-LM differ we follow transformers: RoPE in DeepSeek's interleaved layout
(``rope_interleave=True``; a checkpoint with ``rope_interleave=False`` has its rotary rows permuted into that
layout on import, exactly), the latent norms' epsilon 1e-6, the router in fp32 with the bias for the choice only.
RoPE: the default one or YaRN (DeepSeek-V3's published ``rope_scaling``: yarn, factor 40, mscale 1, mscale_all_dim 1,
original 4096; our --rope-type yarn flags, transformers' attention-factor rule). Not implemented, refused by name:
other RoPE scalings, fp8 ``quantization_config`` (dequantise to bf16 first), ``attention_bias=True``,
``topk_method`` other than ``noaux_tc``.
"""
from __future__ import annotations

import re
import sys
from typing import Optional

import torch

from megatron.config.moe import MoEConfig
from megatron.config.schema import ModelConfig
from megatron.errors import UserError
from megatron.hf.families.base import HFFamily, Rule, anything, cat_rows, equals, same
from megatron.model.moe import hf_layouts

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


_YARN_FIELDS = {"rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
                "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "partial_rotary_factor"}


def _rope(hf: dict) -> tuple[float, Optional[dict], Optional[str]]:
    """(rope theta, our YaRN fields or None, why the RoPE variant is not supported or None) from either
    transformers layout: ``rope_parameters`` (v5) or ``rope_theta`` + ``rope_scaling`` (v4)."""
    params = hf.get("rope_parameters")
    if params is None:
        params = dict(hf.get("rope_scaling") or {}, rope_theta=hf.get("rope_theta", 10000.0))
    theta = float(params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    known = {"rope_type", "type", "rope_theta"} if kind == "default" else _YARN_FIELDS
    if kind not in ("default", "yarn"):
        return theta, None, f"rope type {kind!r} (the default RoPE and yarn are implemented)"
    extra = sorted(set(params) - known)
    if extra:
        return theta, None, f"rope_parameters field {extra[0]!r} (not implemented with {kind} RoPE)"
    if kind == "default":
        return theta, None, None
    for key, ok in (("attention_factor", None), ("truncate", True), ("partial_rotary_factor", 1.0)):
        if params.get(key, ok) not in (ok, None):
            return theta, None, f"rope_parameters {key}={params[key]!r} (yarn with {key} {ok} only)"
    orig = params.get("original_max_position_embeddings") or hf.get("max_position_embeddings")
    factor = params.get("factor") or hf["max_position_embeddings"] / orig
    return theta, dict(rope_type="yarn", rotary_scaling_factor=float(factor), original_max_position_embeddings=int(orig),
                       beta_fast=float(params.get("beta_fast") or 32), beta_slow=float(params.get("beta_slow") or 1),
                       mscale=float(params.get("mscale") or 0.0),
                       mscale_all_dim=float(params.get("mscale_all_dim") or 0.0)), None


def _interleave_rows(t: torch.Tensor, start: int, stride: int, n: int, d: int) -> torch.Tensor:
    """Rows [start + j stride, + d) for j < n, in transformers' rotate-half layout -> DeepSeek's interleaved one
    (row 2i <- i, 2i + 1 <- d/2 + i), so that the interleaved RoPE of ours equals transformers' plain one."""
    t = t.clone()
    perm = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).reshape(-1)  # [d]
    for j in range(n):
        rows = t[start + j * stride: start + j * stride + d]
        t[start + j * stride: start + j * stride + d] = rows[perm]
    return t


def _deinterleave_rows(t: torch.Tensor, start: int, stride: int, n: int, d: int) -> torch.Tensor:
    t = t.clone()
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    for j in range(n):
        rows = t[start + j * stride: start + j * stride + d]
        t[start + j * stride: start + j * stride + d] = rows[perm]
    return t


class DeepseekV3Family(HFFamily):
    model_type = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"

    def fields(self) -> dict:
        f = {k: anything() for k in (
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
            "num_attention_heads", "n_shared_experts", "n_routed_experts", "routed_scaling_factor", "kv_lora_rank",
            "q_lora_rank", "qk_rope_head_dim", "v_head_dim", "qk_nope_head_dim", "n_group", "topk_group",
            "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "max_position_embeddings",
            "rms_norm_eps", "tie_word_embeddings", "attention_dropout", "pretraining_tp", "output_router_logits",
            "rope_theta", "rope_scaling", "rope_parameters",  # checked by _rope
            "rope_interleave",  # False: rotary rows permuted on import
            "qk_head_dim", "head_dim", "num_key_value_heads",  # derived: checked in check_config
            "num_nextn_predict_layers", "num_mtp_layers",  # the MTP module: skipped
            "router_aux_loss_coef", "aux_loss_alpha", "seq_aux",  # training-only loss weights
            "ep_size", "auto_map")}  # DeepSeek's remote-code config: inference layout, the remote class
        f.update({"hidden_act": equals("silu"), "attention_bias": equals(False),
                  "topk_method": equals("noaux_tc"), "scoring_func": equals("sigmoid"), "moe_layer_freq": equals(1)})
        return f

    def check_config(self, hf: dict, src: str) -> None:
        super().check_config(hf, src)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank",
                    "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "max_position_embeddings"):
            if not isinstance(hf.get(key), int):
                raise UserError(f"--load {src}: config.json has no integer {key!r} (a deepseek_v3 config needs it)")
        if hf.get("rope_interleave", True) is False:
            self._plain_rope.add(src)
        else:
            self._plain_rope.discard(src)
        _, _, refusal = _rope(hf)
        if refusal:
            raise UserError(f"--load {src}: config.json {refusal} is not supported by the deepseek_v3 import")
        nh, dn, dr = hf["num_attention_heads"], hf["qk_nope_head_dim"], hf["qk_rope_head_dim"]
        derived = {"num_key_value_heads": (nh, None), "qk_head_dim": (dn + dr, None), "head_dim": (dr, None)}
        for key, ok in derived.items():
            if hf.get(key) not in ok:
                raise UserError(f"--load {src}: config.json {key}={hf[key]!r} is not supported by the deepseek_v3 "
                                f"import (MLA gives {ok[0]})")

    def model_config(self, hf: dict, vocab_size: int) -> ModelConfig:
        theta, yarn = _rope(hf)[:2]
        P = hf["max_position_embeddings"]
        moe = MoEConfig(**hf_layouts.moe_options_from_hf_config(hf))
        return ModelConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
            num_attention_heads=hf["num_attention_heads"], ffn_hidden_size=hf["intermediate_size"], seq_length=P,
            max_position_embeddings=P, vocab_size=vocab_size, init_method_std=hf.get("initializer_range", 0.02),
            layernorm_epsilon=hf.get("rms_norm_eps", 1e-6), hidden_dropout=0.0,
            attention_dropout=float(hf.get("attention_dropout") or 0.0), position_embedding_type="rope",
            add_position_embedding=False, rotary_base=theta, normalization="RMSNorm", swiglu=True,
            add_bias_linear=False, untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
            multi_latent_attention=True, q_lora_rank=hf.get("q_lora_rank"), kv_lora_rank=hf["kv_lora_rank"],
            qk_head_dim=hf["qk_nope_head_dim"], qk_pos_emb_head_dim=hf["qk_rope_head_dim"],
            v_head_dim=hf["v_head_dim"], moe=moe, **(yarn or {}))

    # ---- ours -> config.json

    def _first_dense(self, cfg: ModelConfig) -> Optional[int]:
        """first_k_dense_replace of ``cfg``'s layer pattern, or None if it is not "k dense, then all MoE"."""
        sparse = [cfg.moe.is_moe_layer(i, e) for i, e in enumerate(cfg.moe.experts_per_layer(cfg.num_layers))]
        k = sparse.index(True) if True in sparse else len(sparse)
        return k if all(sparse[k:]) else None

    def export_refusal(self, cfg: ModelConfig) -> Optional[str]:
        m = cfg.moe
        experts = sorted({e for i, e in enumerate(m.experts_per_layer(cfg.num_layers)) if m.is_moe_layer(i, e)})
        F = m.moe_ffn_hidden_size or cfg.ffn_hidden_size
        shared = m.shared_expert_intermediate_size
        wrong = [(not cfg.multi_latent_attention, "no multi-latent attention"), (not cfg.rope, "no RoPE"),
                 (cfg.normalization != "RMSNorm", "LayerNorm"), (not cfg.swiglu, "a GeLU MLP"),
                 (cfg.add_bias_linear or cfg.add_qkv_bias, "biases"),
                 (not m.enabled or not experts, "no MoE layers"), (len(experts) > 1, "MoE layers of several sizes"),
                 (self._first_dense(cfg) is None, "MoE layers not all after the dense ones"),
                 (m.mlp_type != "standard", f"--mlp-type {m.mlp_type}"),
                 (m.router_score_function != "sigmoid", "a softmax router"),
                 (not m.router_enable_expert_bias, "no expert bias"), (m.router_pre_softmax, "pre-softmax routing"),
                 (m.shared_expert_gate, "a gated shared expert"),
                 (m.router_num_groups is not None and m.router_group_topk is None, "groups without a group top-k"),
                 (bool(shared) and shared % F != 0, "a shared-expert width not a multiple of the expert width"),
                 (m.noisy_gate_policy is not None, "gate noise")]
        found = [what for bad, what in wrong if bad]
        return ", ".join(found) if found else None

    def hf_config(self, cfg: ModelConfig, vocab_size: int, eod: int) -> dict:
        m = cfg.moe
        experts = [e for i, e in enumerate(m.experts_per_layer(cfg.num_layers)) if m.is_moe_layer(i, e)]
        F = m.moe_ffn_hidden_size or cfg.ffn_hidden_size
        norm = m.router_norm_topk_prob if m.router_norm_topk_prob is not None else m.topk > 1
        return {
            "architectures": [self.architecture], "model_type": self.model_type, "vocab_size": vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size, "moe_intermediate_size": F,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_attention_heads,
            "n_shared_experts": (m.shared_expert_intermediate_size or 0) // F, "n_routed_experts": experts[0],
            "routed_scaling_factor": m.router_topk_scaling_factor or 1.0, "kv_lora_rank": cfg.kv_lora_rank,
            "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_pos_emb_head_dim,
            "v_head_dim": cfg.v_head_dim, "qk_nope_head_dim": cfg.qk_head_dim,
            "n_group": m.router_num_groups or 1, "topk_group": m.router_group_topk or 1,
            "num_experts_per_tok": m.topk, "first_k_dense_replace": self._first_dense(cfg), "norm_topk_prob": norm,
            "hidden_act": "silu", "max_position_embeddings": cfg.max_position_embeddings,
            "initializer_range": cfg.init_method_std, "rms_norm_eps": cfg.layernorm_epsilon,
            "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights,
            "rope_parameters": self.rope_parameters(cfg), "rope_interleave": True, "attention_bias": False,
            "attention_dropout": 0.0, "use_cache": True, "bos_token_id": eod, "eos_token_id": eod,
            "torch_dtype": "float32",
        }

    def rope_parameters(self, cfg: ModelConfig) -> dict:
        if cfg.rope_type != "yarn" or cfg.rotary_scaling_factor <= 1:
            return {"rope_type": "default", "rope_theta": cfg.rotary_base}
        return {"rope_type": "yarn", "rope_theta": cfg.rotary_base, "factor": cfg.rotary_scaling_factor,
                "original_max_position_embeddings": cfg.original_max_position_embeddings,
                "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "mscale": cfg.mscale,
                "mscale_all_dim": cfg.mscale_all_dim}

    # ---- weights

    def attention_rules(self, cfg: ModelConfig, i: int) -> list:
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        a, s = ours + "attention.", theirs + "self_attn."
        out = [same(ours + "input_layernorm.weight", theirs + "input_layernorm.weight"),
               same(ours + "post_attention_layernorm.weight", theirs + "post_attention_layernorm.weight"),
               same(a + "linear_kv_down_proj.weight", s + "kv_a_proj_with_mqa.weight"),
               same(a + "kv_layernorm.weight", s + "kv_a_layernorm.weight"),
               same(a + "linear_kv_up_proj.weight", s + "kv_b_proj.weight"),
               same(a + "proj.weight", s + "o_proj.weight")]
        if cfg.q_lora_rank is None:
            out.append(same(a + "linear_q_proj.weight", s + "q_proj.weight"))
        else:
            out += [same(a + "linear_q_down_proj.weight", s + "q_a_proj.weight"),
                    same(a + "q_layernorm.weight", s + "q_a_layernorm.weight"),
                    same(a + "linear_q_up_proj.weight", s + "q_b_proj.weight")]
        return out

    def mlp_rules(self, cfg: ModelConfig, i: int, moe: bool) -> list:
        if not moe:
            return super().mlp_rules(cfg, i, moe)
        ours, theirs = f"layers.{i}.mlp.", f"model.layers.{i}.mlp."

        def t12(ts):
            return ts[0].transpose(1, 2).contiguous()

        out = [same(ours + "router.wg.weight", theirs + "gate.weight"),
               same(ours + "router.expert_bias", theirs + "gate.e_score_correction_bias"),
               Rule(ours + "experts.w1", (theirs + "experts.gate_up_proj",), t12, lambda t: [t12([t])]),
               Rule(ours + "experts.w2", (theirs + "experts.down_proj",), t12, lambda t: [t12([t])])]
        shared = cfg.moe.shared_expert_intermediate_size
        if shared:
            sh = theirs + "shared_experts."
            out += [cat_rows(ours + "shared_experts.fc1.weight", (sh + "gate_proj.weight", sh + "up_proj.weight"),
                             [shared, shared]),
                    same(ours + "shared_experts.fc2.weight", sh + "down_proj.weight")]
        return out

    def load_into(self, model, state: dict, cfg: ModelConfig, hf_vocab: int, src: str) -> None:
        """As :meth:`HFFamily.load_into`, after: the MTP layers dropped (with a note), per-expert tensors stacked,
        and (``rope_interleave=False`` in ``src``'s config.json) the rotary rows permuted into the interleaved
        layout."""
        state = self.prepare_state(state, cfg, src, plain_rope=src in self._plain_rope)
        super().load_into(model, state, cfg, hf_vocab, src)

    _plain_rope: set = set()  # sources whose config.json (check_config) says rope_interleave=False

    def prepare_state(self, state: dict, cfg: ModelConfig, src: str, plain_rope: bool = False) -> dict:
        L = cfg.num_layers
        mtp = [n for n in state if (m := _LAYER.match(n)) and int(m.group(1)) >= L]
        if mtp:
            print(f"note: --load {src}: skipped the {len(mtp)} tensors of the multi-token-prediction module "
                  f"(model.layers.{L}+; not used by training or generation here)", file=sys.stderr)
        state = {n: t for n, t in state.items() if n not in set(mtp)}
        per_expert: dict = {}
        for n in [n for n in state if _EXPERT.match(n)]:
            prefix, e, kind = _EXPERT.match(n).groups()
            per_expert.setdefault(prefix, {}).setdefault(kind, {})[int(e)] = state.pop(n)
        for prefix, kinds in per_expert.items():
            n_e = len(kinds.get("down", {}))
            for kind in ("gate", "up", "down"):
                missing = [e for e in range(n_e) if e not in kinds.get(kind, {})]
                if missing or len(kinds.get(kind, {})) != n_e:
                    raise UserError(f"--load {src}: tensor {prefix}.{missing[0] if missing else n_e}.{kind}_proj.weight "
                                    f"is missing from the weights")
            gate_up = torch.stack([torch.cat([kinds["gate"][e], kinds["up"][e]]) for e in range(n_e)])  # [E, 2F, H]
            state[prefix + ".gate_up_proj"] = gate_up
            state[prefix + ".down_proj"] = torch.stack([kinds["down"][e] for e in range(n_e)])  # [E, H, F]
        if plain_rope:
            state = self.interleave_rotary(state, cfg)
        return state

    def interleave_rotary(self, state: dict, cfg: ModelConfig, inverse: bool = False) -> dict:
        """transformers' plain-RoPE (rope_interleave=False) rotary rows <-> DeepSeek's interleaved layout: the
        q_pe rows of every head of q_b_proj / q_proj and the k_pe rows of kv_a_proj_with_mqa."""
        move = _deinterleave_rows if inverse else _interleave_rows
        nh, dn, dr = cfg.num_attention_heads, cfg.qk_head_dim, cfg.qk_pos_emb_head_dim
        state = dict(state)
        for i in range(cfg.num_layers):
            s = f"model.layers.{i}.self_attn."
            q = s + ("q_proj.weight" if cfg.q_lora_rank is None else "q_b_proj.weight")
            if q in state:
                state[q] = move(state[q], dn, dn + dr, nh, dr)
            kv = s + "kv_a_proj_with_mqa.weight"
            if kv in state:
                state[kv] = move(state[kv], cfg.kv_lora_rank, 0, 1, dr)
        return state
