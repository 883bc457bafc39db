"""Import of a transformers checkpoint directory of a registered family (or GPT-2), and export back to the
family's native transformers class (``AutoModelForCausalLM.from_pretrained(dir)``, no remote code).

    import_hf_checkpoint(src, save_dir, final_dir, divisible_by=128) -> summary
    export_native(model, cfg, out_dir, eod=..., data_cfg=..., model_type=None, vocab_size=None) -> summary
    write_native_export(lm, out_dir) -> summary   (lm: megatron.inference.load.LoadedModel)

Tokenizers: a directory with tokenizer.json is imported as ``--tokenizer-type HuggingFaceTokenizer`` (its
tokenizer files copied into the checkpoint's ``tokenizer/``) and those files are copied back on export.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Optional

from megatron.checkpoint.weights_only import write_weights_checkpoint
from megatron.config.schema import Config, ModelConfig, pad_vocab_size
from megatron.errors import UserError
from megatron.hf.families import FAMILIES, export_refusal, family_for_config, family_for_model_type
from megatron.hf.hf_state import read_config, read_hf_state
from megatron.model.gpt_model import GPTModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json")


def import_hf_checkpoint(src: str, save_dir: str, final_dir: str, divisible_by: int = 128) -> dict:
    """A transformers directory ``src`` -> our checkpoint at iteration 0 written into ``save_dir``, a folder that
    is to be renamed ``final_dir`` (the tokenizer paths stored point there). Dispatches on config.json's
    ``model_type``. Returns {"layers", "vocab", "tokenizer", "note", "model_type", "flags"}."""
    hf = read_config(src)
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        from megatron.hf.import_gpt2 import import_gpt2

        return dict(import_gpt2(src, save_dir, final_dir, divisible_by), model_type="gpt2")
    family = family_for_model_type(model_type, src, (hf.get("architectures") or [None])[0])
    family.check_config(hf, src)
    n_vocab = hf["vocab_size"]
    cfg = Config()
    cfg.model = family.model_config(hf, pad_vocab_size(n_vocab, divisible_by))
    cfg.model.validate()
    state = read_hf_state(src)
    model = GPTModel(cfg.model)
    family.load_into(model, state, cfg.model, n_vocab, src)
    if cfg.model.vocab_size != n_vocab:  # the padding rows are zero: mask their logits (and drop them on export)
        cfg.model.true_vocab_size = n_vocab
    cfg.data.make_vocab_size_divisible_by = divisible_by
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        tok_dir = os.path.join(save_dir, "tokenizer")
        os.makedirs(tok_dir, exist_ok=True)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(tok_dir, name))
        cfg.data.tokenizer_type = "HuggingFaceTokenizer"
        cfg.data.tokenizer_model = os.path.join(os.path.abspath(final_dir), "tokenizer")
    else:  # no tokenizer files: ids stand for themselves until a tokenizer is given at training time
        cfg.data.tokenizer_type = "NullTokenizer"
    write_weights_checkpoint(save_dir, model, cfg.to_dict())
    return {"layers": cfg.model.num_layers, "vocab": cfg.model.vocab_size, "tokenizer": cfg.data.tokenizer_type,
            "note": "", "model_type": model_type, "flags": " ".join(model_flags(cfg.model))}


def model_flags(cfg: ModelConfig) -> list:
    """The command-line flags that build ``cfg``'s network (to train on an imported checkpoint)."""
    flags = ["--num-layers", cfg.num_layers, "--hidden-size", cfg.hidden_size, "--num-attention-heads",
             cfg.num_attention_heads, "--ffn-hidden-size", cfg.ffn_hidden_size]
    if cfg.rope:
        flags += ["--position-embedding-type", "rope", "--no-position-embedding", "--rotary-base", cfg.rotary_base]
        if cfg.rotary_percent != 1.0:
            flags += ["--rotary-percent", cfg.rotary_percent]
    elif not cfg.add_position_embedding:
        flags += ["--no-position-embedding"]
    flags += ["--max-position-embeddings", cfg.max_position_embeddings]
    if cfg.normalization != "LayerNorm":
        flags += ["--normalization", cfg.normalization]
    flags += ["--norm-epsilon", cfg.layernorm_epsilon]
    if cfg.true_vocab_size is not None:
        flags += ["--true-vocab-size", cfg.true_vocab_size]
    switches = [(cfg.swiglu, "--swiglu"), (not cfg.add_bias_linear, "--disable-bias-linear"),
                (cfg.add_qkv_bias, "--add-qkv-bias"), (cfg.qk_layernorm, "--qk-layernorm"),
                (getattr(cfg, "qk_layernorm_full", False), "--qk-layernorm-full"),
                (cfg.untie_embeddings_and_output_weights, "--untie-embeddings-and-output-weights")]
    flags += [flag for on, flag in switches if on]
    if cfg.group_query_attention:
        flags += ["--group-query-attention", "--num-query-groups", cfg.num_query_groups]
    if cfg.kv_channels is not None:
        flags += ["--kv-channels", cfg.kv_channels]
    if cfg.multi_latent_attention:
        flags += ["--multi-latent-attention", "--kv-lora-rank", cfg.kv_lora_rank, "--qk-head-dim", cfg.qk_head_dim,
                  "--qk-pos-emb-head-dim", cfg.qk_pos_emb_head_dim, "--v-head-dim", cfg.v_head_dim]
        if cfg.q_lora_rank is not None:
            flags += ["--q-lora-rank", cfg.q_lora_rank]
        if cfg.rope_type == "yarn":
            flags += ["--rope-type", "yarn", "--rotary-scaling-factor", cfg.rotary_scaling_factor, "--mscale", cfg.mscale,
                      "--mscale-all-dim", cfg.mscale_all_dim, "--beta-fast", cfg.beta_fast, "--beta-slow", cfg.beta_slow,
                      "--original-max-position-embeddings", cfg.original_max_position_embeddings]
    if cfg.moe.enabled:
        flags += moe_flags(cfg)
    return [str(f) for f in flags]


def moe_flags(cfg: ModelConfig) -> list:
    """The MoE flags of an imported sparse family (the MoEConfig fields hf_layouts.moe_options_from_hf_config
    sets): experts, top-k, widths, which layers, routing, shared expert, no token dropping."""
    m = cfg.moe
    flags = ["--num-experts", *m.num_experts, "--moe-router-topk", m.topk]
    if m.moe_ffn_hidden_size is not None:
        flags += ["--moe-ffn-hidden-size", m.moe_ffn_hidden_size]
    if m.layer_freq is not None:
        flags += ["--moe-layer-freq", m.layer_freq]
    if not m.token_dropping:
        flags += ["--disable-moe-token-dropping"]
    if m.router_load_balancing_type is not None:
        flags += ["--moe-router-load-balancing-type", m.router_load_balancing_type]
    flags += ["--moe-aux-loss-coeff", repr(float(m.loss_coeff))]
    if m.router_score_function != "softmax":
        flags += ["--moe-router-score-function", m.router_score_function]
    if m.router_pre_softmax:
        flags += ["--moe-router-pre-softmax"]
    if m.router_norm_topk_prob is not None:
        flags += ["--moe-router-norm-topk-prob", "true" if m.router_norm_topk_prob else "false"]
    if m.router_topk_scaling_factor is not None:
        flags += ["--moe-router-topk-scaling-factor", m.router_topk_scaling_factor]
    if m.router_num_groups is not None:
        flags += ["--moe-router-num-groups", m.router_num_groups, "--moe-router-group-topk", m.router_group_topk]
    if m.router_enable_expert_bias:
        flags += ["--moe-router-enable-expert-bias"]
    if m.shared_expert_intermediate_size is not None:
        flags += ["--moe-shared-expert-intermediate-size", m.shared_expert_intermediate_size]
        if m.shared_expert_gate:
            flags += ["--moe-shared-expert-gate"]
    return flags


def export_native(model, cfg: ModelConfig, out_dir: str, *, eod: int, data_cfg: Optional[dict] = None,
                  model_type: Optional[str] = None, vocab_size: Optional[int] = None) -> dict:
    """Write ``model`` (a GPTModel of ``cfg``, full: TP 1, every expert local) into the empty directory ``out_dir``
    as the native transformers class of its family (``model_type``, default: the one whose class reproduces
    ``cfg``): config.json, model.safetensors, generation_config.json and the tokenizer files of ``data_cfg``
    (the checkpoint's stored data config). ``vocab_size``: the rows to keep (default: the padded vocabulary)."""
    from safetensors.torch import save_file

    family = FAMILIES[model_type] if model_type is not None else family_for_config(cfg)
    if family is None or family.export_refusal(cfg) is not None:
        raise UserError(f"export-hf: no transformers class reproduces this checkpoint's blocks ({export_refusal(cfg)})")
    vocab = vocab_size or cfg.true_vocab_size or cfg.vocab_size
    state = family.hf_state(model, cfg, vocab)
    for name in family.tied_tensors(cfg):
        state.pop(name, None)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(family.hf_config(cfg, vocab, eod), f, indent=2)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": eod, "eos_token_id": eod}, f, indent=2)
    tokenizer = _write_tokenizer(data_cfg or {}, out_dir, cfg.max_position_embeddings)
    return {"kind": f"transformers {family.architecture}", "tensors": len(state), "tokenizer": tokenizer,
            "model_type": family.model_type}


def _write_tokenizer(data_cfg: dict, out_dir: str, max_length: int) -> str:
    if data_cfg.get("tokenizer_type") == "HuggingFaceTokenizer" and data_cfg.get("tokenizer_model"):
        src = data_cfg["tokenizer_model"]
        src = src if os.path.isdir(src) else os.path.dirname(src)
        copied = [n for n in TOKENIZER_FILES[:-1] if os.path.isfile(os.path.join(src, n))]
        for name in copied:
            shutil.copyfile(os.path.join(src, name), os.path.join(out_dir, name))
        return f"HuggingFaceTokenizer ({', '.join(copied) or 'no files found in ' + src})"
    if not data_cfg.get("tokenizer_type"):
        return "none"
    from megatron.hf.tokenizer_files import write_tokenizer_files

    return write_tokenizer_files(data_cfg, out_dir, max_length)


def write_native_export(lm, out_dir: str, model_type: Optional[str] = None) -> dict:
    """``export_native`` of a loaded checkpoint (megatron.inference.load.LoadedModel)."""
    return export_native(lm.model, lm.cfg, out_dir, eod=lm.tokenizer.eod, data_cfg=lm.config.get("data"),
                         model_type=model_type)
