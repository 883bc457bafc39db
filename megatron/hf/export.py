"""Export a checkpoint to a transformers directory.

Llama-style checkpoints (RoPE, RMSNorm, SwiGLU, GQA, ...) become their family's native transformers class
(LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM: :mod:`megatron.hf.native`); a block no class
reproduces is refused in one line. Dense GPT checkpoints become transformers' own GPT2LMHeadModel. MoE, PR-MoE, Residual-MoE and MoS-student
checkpoints become ``megatron_moe`` models: config.json with ``auto_map`` plus the self-contained
configuration and modeling files copied beside the weights, so that
``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads them with nothing of ours
installed. Both carry the tokenizer files of the checkpoint's tokenizer.
"""
from __future__ import annotations

import json
import os
import shutil

from megatron.errors import UserError
from megatron.hf.families import family_for_config
from megatron.hf.native import write_native_export
from megatron.hf.tokenizer_files import write_tokenizer_files
from megatron.model.moe.routers import router_class

HERE = os.path.dirname(os.path.abspath(__file__))
REMOTE_CODE = ("configuration_megatron_moe.py", "modeling_megatron_moe.py")


def hf_gpt2_state(model, vocab: int = None) -> dict:
    """Our dense GPT -> transformers GPT2LMHeadModel state (Conv1D weights are [in, out]); ``vocab``: the word
    embedding rows to keep (--true-vocab-size; default all)."""
    sd = {"transformer.wte.weight": model.word_embeddings.weight[:vocab], "transformer.wpe.weight": model.position_embeddings.weight,
          "transformer.ln_f.weight": model.final_layernorm.weight, "transformer.ln_f.bias": model.final_layernorm.bias}
    for i, layer in enumerate(model.layers):
        h = f"transformer.h.{i}."
        mlp = layer.mlp.mlp
        sd.update({
            h + "ln_1.weight": layer.input_layernorm.weight, h + "ln_1.bias": layer.input_layernorm.bias,
            h + "attn.c_attn.weight": layer.attention.qkv.weight.t(), h + "attn.c_attn.bias": layer.attention.qkv.bias,
            h + "attn.c_proj.weight": layer.attention.proj.weight.t(), h + "attn.c_proj.bias": layer.attention.proj.bias,
            h + "ln_2.weight": layer.post_attention_layernorm.weight, h + "ln_2.bias": layer.post_attention_layernorm.bias,
            h + "mlp.c_fc.weight": mlp.fc1.weight.t(), h + "mlp.c_fc.bias": mlp.fc1.bias,
            h + "mlp.c_proj.weight": mlp.fc2.weight.t(), h + "mlp.c_proj.bias": mlp.fc2.bias,
        })
    return {k: v.detach().float().contiguous().cpu() for k, v in sd.items()}


def hf_gpt2_config(cfg, eod: int) -> dict:
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.true_vocab_size or cfg.vocab_size,
        "n_positions": cfg.max_position_embeddings, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
        "n_head": cfg.num_attention_heads, "n_inner": cfg.ffn_hidden_size, "activation_function": "gelu",
        "layer_norm_epsilon": cfg.layernorm_epsilon, "initializer_range": cfg.init_method_std,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
        "tie_word_embeddings": True, "bos_token_id": eod, "eos_token_id": eod, "torch_dtype": "float32",
    }


def moe_config(cfg, eod: int) -> dict:
    """config.json of a ``megatron_moe`` export (read by configuration_megatron_moe.MegatronMoEConfig)."""
    router_type = router_class(cfg.moe.router_type).hf_router_type  # the routing modeling_megatron_moe.py reproduces
    if router_type is None:
        raise UserError(f"--moe-router-type {cfg.moe.router_type}: the transformers export has no router that "
                        f"reproduces it")
    return {
        "architectures": ["MegatronMoEForCausalLM"], "model_type": "megatron_moe", "format": "megatron-moe",
        "auto_map": {"AutoConfig": "configuration_megatron_moe.MegatronMoEConfig",
                     "AutoModelForCausalLM": "modeling_megatron_moe.MegatronMoEForCausalLM"},
        "vocab_size": cfg.true_vocab_size or cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads, "ffn_hidden_size": cfg.ffn_hidden_size,
        "max_position_embeddings": cfg.max_position_embeddings, "layernorm_epsilon": cfg.layernorm_epsilon,
        "experts_per_layer": cfg.moe.experts_per_layer(cfg.num_layers), "mlp_type": cfg.moe.mlp_type,
        "topk": cfg.moe.topk, "router_type": router_type, "initializer_range": cfg.init_method_std, "tie_word_embeddings": True,
        "bos_token_id": eod, "eos_token_id": eod, "torch_dtype": "float32",
    }


def is_gpt_block(cfg) -> bool:
    """The GPT-3 block this export (GPT-2 class or megatron_moe) reproduces: learned positions, LayerNorm, GeLU,
    biases everywhere, multi-head attention, tied output layer."""
    return (cfg.learned_positions and cfg.normalization == "LayerNorm" and not cfg.swiglu and cfg.add_bias_linear
            and not cfg.group_query_attention and not cfg.qk_layernorm and cfg.kv_channels in (None, cfg.head_dim)
            and cfg.head_dim * cfg.num_attention_heads == cfg.hidden_size
            and not cfg.untie_embeddings_and_output_weights)


def write_export(lm, out_dir: str) -> dict:
    """Write ``lm`` (megatron.inference.load.LoadedModel) into the empty directory ``out_dir``; returns a summary."""
    from safetensors.torch import save_file

    cfg = lm.cfg
    if family_for_config(cfg) is not None or not is_gpt_block(cfg):  # Llama-style blocks: the native class
        return write_native_export(lm, out_dir)
    if cfg.moe.enabled:
        state = {n: p.detach().float().contiguous().cpu() for n, p in lm.model.named_parameters()}
        state["word_embeddings.weight"] = state["word_embeddings.weight"][: cfg.true_vocab_size].contiguous()
        config = moe_config(cfg, lm.tokenizer.eod)
        for name in REMOTE_CODE:
            shutil.copyfile(os.path.join(HERE, name), os.path.join(out_dir, name))
        kind = "megatron_moe (AutoModelForCausalLM with trust_remote_code=True)"
    else:
        state = hf_gpt2_state(lm.model, cfg.true_vocab_size)
        config = hf_gpt2_config(cfg, lm.tokenizer.eod)
        kind = "transformers GPT2LMHeadModel"
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": lm.tokenizer.eod, "eos_token_id": lm.tokenizer.eod}, f, indent=2)
    tokenizer = write_tokenizer_files(lm.config["data"], out_dir, cfg.max_position_embeddings)
    return {"kind": kind, "tensors": len(state), "tokenizer": tokenizer}
