"""The dense Llama-style families: ``LlamaForCausalLM`` (llama), ``Qwen2ForCausalLM`` (qwen2: q/k/v biases),
``Qwen3ForCausalLM`` (qwen3: per-head q/k RMSNorm). RoPE (default type, full rotary), RMSNorm, SwiGLU,
grouped-query attention, tied or untied output layer.

Where transformers and Megatron-LM differ for these families we follow transformers: RoPE in the
rotate-half convention on q and k after the qk-norm, RMSNorm in fp32 cast back before the weight.
"""
from __future__ import annotations

from typing import Optional

from megatron.config.schema import ModelConfig
from megatron.hf.families.base import Field, HFFamily, anything, equals


def _rope(hf: dict) -> tuple[float, Optional[str]]:
    """(rope theta, why the RoPE variant is not supported or None) from either transformers layout:
    ``rope_parameters`` (v5) or ``rope_theta`` + ``rope_scaling`` (v4)."""
    params = hf.get("rope_parameters")
    if params is None:
        scaling = hf.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind != "default":
                return 0.0, f"rope_scaling type {kind!r} (only the default RoPE is implemented)"
        return float(hf.get("rope_theta", 10000.0)), None
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
        return 0.0, f"rope_parameters rope_type {kind!r} (only the default RoPE is implemented)"
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
    if extra:
        return 0.0, f"rope_parameters field {extra[0]!r} (only the default RoPE is implemented)"
    return float(params.get("rope_theta", 10000.0)), None


def _no_sliding(v) -> bool:
    return not v


def _full_attention_only(v) -> bool:
    return v is None or all(t == "full_attention" for t in v)


class LlamaFamily(HFFamily):
    model_type = "llama"
    architecture = "LlamaForCausalLM"
    qk_norm = False
    qk_norm_full = False  # OLMoE: q/k norms over the whole projections (--qk-layernorm-full)

    def fields(self) -> dict:
        return {
            "vocab_size": anything(), "hidden_size": anything(), "intermediate_size": anything(),
            "num_hidden_layers": anything(), "num_attention_heads": anything(), "num_key_value_heads": anything(),
            "head_dim": anything(), "max_position_embeddings": anything(), "rms_norm_eps": anything(),
            "tie_word_embeddings": anything(), "attention_dropout": anything(),
            "hidden_act": equals("silu"), "pretraining_tp": anything(),  # a v4 matmul split: the same function
            "rope_theta": anything(), "rope_scaling": anything(), "rope_parameters": anything(),  # checked by _rope
            "attention_bias": anything(), "mlp_bias": anything(),  # checked together in model_config
        }

    def check_config(self, hf: dict, src: str) -> None:
        from megatron.errors import UserError

        super().check_config(hf, src)
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "max_position_embeddings"):
            if not isinstance(hf.get(key), int):
                raise UserError(f"--load {src}: config.json has no integer {key!r} (a {self.model_type} config needs it)")
        _, refusal = _rope(hf)
        if refusal:
            raise UserError(f"--load {src}: config.json {refusal} is not supported by the {self.model_type} import")
        att, mlp = self.attention_bias(hf), hf.get("mlp_bias", False)
        if att != mlp and not self.qkv_bias_only:
            raise UserError(f"--load {src}: config.json attention_bias={att} with mlp_bias={mlp} is not supported by "
                            f"the {self.model_type} import (biases in all linears or in none: --disable-bias-linear)")

    qkv_bias_only = False  # Qwen2: q/k/v biases, none elsewhere

    def attention_bias(self, hf: dict) -> bool:
        return bool(hf.get("attention_bias", False))

    def model_config(self, hf: dict, vocab_size: int) -> ModelConfig:
        theta, _ = _rope(hf)
        H, nh = hf["hidden_size"], hf["num_attention_heads"]
        ng = hf.get("num_key_value_heads") or nh
        hd = hf.get("head_dim") or H // nh
        bias = self.attention_bias(hf) and not self.qkv_bias_only
        P = hf["max_position_embeddings"]
        return ModelConfig(
            num_layers=hf["num_hidden_layers"], hidden_size=H, num_attention_heads=nh,
            ffn_hidden_size=hf["intermediate_size"], seq_length=P, max_position_embeddings=P, vocab_size=vocab_size,
            init_method_std=hf.get("initializer_range", 0.02), layernorm_epsilon=hf.get("rms_norm_eps", 1e-6),
            hidden_dropout=0.0, attention_dropout=float(hf.get("attention_dropout", 0.0)),
            position_embedding_type="rope", add_position_embedding=False, rotary_base=theta, rotary_percent=1.0,
            normalization="RMSNorm", swiglu=True, add_bias_linear=bias, add_qkv_bias=self.qkv_bias_only,
            group_query_attention=ng != nh, num_query_groups=ng if ng != nh else None, qk_layernorm=self.qk_norm,
            kv_channels=hd if hd * nh != H else None,
            untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", self.default_tied))

    default_tied = False  # transformers' default tie_word_embeddings for the family

    def export_refusal(self, cfg: ModelConfig) -> Optional[str]:
        wrong = [(cfg.moe.enabled, "MoE layers"), (not cfg.rope, "learned positions (not RoPE)"),
                 (cfg.multi_latent_attention, "multi-latent attention"),
                 (cfg.learned_positions, "learned positions"), (cfg.rotary_percent != 1.0, "partial rotary"),
                 (cfg.normalization != "RMSNorm", "LayerNorm"), (not cfg.swiglu, "a GeLU MLP"),
                 (cfg.qk_layernorm != self.qk_norm, "qk-norm" if cfg.qk_layernorm else "no qk-norm"),
                 (cfg.qk_layernorm and getattr(cfg, "qk_layernorm_full", False) != self.qk_norm_full,
                  "per-head qk-norm" if self.qk_norm_full else "whole-projection qk-norm")]
        if self.qkv_bias_only:
            wrong += [(cfg.add_bias_linear or not cfg.add_qkv_bias, "not exactly q/k/v biases")]
        else:
            wrong += [(cfg.add_qkv_bias and not cfg.add_bias_linear, "q/k/v-only biases")]
        found = [what for bad, what in wrong if bad]
        return ", ".join(found) if found else None

    def hf_config(self, cfg: ModelConfig, vocab_size: int, eod: int) -> dict:
        out = {
            "architectures": [self.architecture], "model_type": self.model_type, "vocab_size": vocab_size,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.ffn_hidden_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.layernorm_epsilon,
            "initializer_range": cfg.init_method_std, "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base},
            "rope_theta": cfg.rotary_base,  # transformers v4 reads this one
            "tie_word_embeddings": not cfg.untie_embeddings_and_output_weights, "use_cache": True,
            "bos_token_id": eod, "eos_token_id": eod, "torch_dtype": "float32",
        }
        out.update(self.extra_hf_config(cfg))
        return out

    def extra_hf_config(self, cfg: ModelConfig) -> dict:
        return {"attention_bias": cfg.add_bias_linear, "mlp_bias": cfg.add_bias_linear, "pretraining_tp": 1}


class Qwen2Family(LlamaFamily):
    model_type = "qwen2"
    architecture = "Qwen2ForCausalLM"
    qkv_bias_only = True

    def fields(self) -> dict:
        f = super().fields()
        for key in ("attention_bias", "mlp_bias", "pretraining_tp"):
            f.pop(key)
        f.update({"use_sliding_window": Field(_no_sliding, "sliding-window attention is not implemented"),
                  "sliding_window": anything(), "max_window_layers": anything(),  # only read with a sliding window
                  "layer_types": Field(_full_attention_only, "only full_attention layers are implemented")})
        return f

    def attention_bias(self, hf: dict) -> bool:
        return True  # Qwen2Attention: q/k/v biases always, o_proj and the MLP without

    def extra_hf_config(self, cfg: ModelConfig) -> dict:
        return {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.num_layers,
                "layer_types": ["full_attention"] * cfg.num_layers}


class Qwen3Family(Qwen2Family):
    model_type = "qwen3"
    architecture = "Qwen3ForCausalLM"
    qkv_bias_only = False
    qk_norm = True

    def fields(self) -> dict:
        f = super().fields()
        f["attention_bias"] = equals(False)  # o_proj would have one, the MLP not: no flag combination says that
        return f

    def attention_bias(self, hf: dict) -> bool:
        return bool(hf.get("attention_bias", False))

    def export_refusal(self, cfg: ModelConfig) -> Optional[str]:
        refusal = super().export_refusal(cfg)
        extra = "biases" if (cfg.add_bias_linear or cfg.add_qkv_bias) else None
        return ", ".join(x for x in (refusal, extra) if x) or None

    def extra_hf_config(self, cfg: ModelConfig) -> dict:
        return dict(super().extra_hf_config(cfg), attention_bias=False)
