"""Hugging Face model families by transformers ``model_type``: adding one is a module with an
:class:`~megatron.hf.families.base.HFFamily` subclass and one line in :data:`FAMILIES`.

GPT-2 (``gpt2``) is imported by :mod:`megatron.hf.import_gpt2` and exported by :mod:`megatron.hf.export`
(its own, older path); :func:`megatron.hf.native.import_hf_checkpoint` dispatches on ``model_type``.
"""
from __future__ import annotations

from typing import Optional

from megatron.errors import UserError
from megatron.hf.families.base import HFFamily
from megatron.hf.families.deepseek_v3 import DeepseekV3Family
from megatron.hf.families.llama import LlamaFamily, Qwen2Family, Qwen3Family
from megatron.hf.families.moe_families import MixtralFamily, OlmoeFamily, Qwen2MoeFamily, Qwen3MoeFamily

FAMILIES: dict[str, HFFamily] = {f.model_type: f for f in (
    LlamaFamily(), Qwen2Family(), Qwen3Family(), MixtralFamily(), Qwen2MoeFamily(), Qwen3MoeFamily(), OlmoeFamily(),
    DeepseekV3Family())}
# export: the first family (in this order) whose transformers class reproduces a checkpoint's blocks
EXPORT_ORDER: list[str] = ["deepseek_v3", "qwen3", "qwen2", "llama", "qwen3_moe", "qwen2_moe", "mixtral", "olmoe"]
OTHER_SUPPORTED = {"gpt2": "GPT2LMHeadModel"}  # imported elsewhere (megatron/hf/import_gpt2.py)


def supported() -> str:
    """The supported model types and classes, for messages."""
    names = {**OTHER_SUPPORTED, **{k: f.architecture for k, f in FAMILIES.items()}}  # registry order
    return ", ".join(f"{k} ({v})" for k, v in names.items())


def family_for_model_type(model_type, src: str, arch=None) -> HFFamily:
    """The family of config.json's ``model_type``; an unsupported one is one line listing the supported ones."""
    if model_type not in FAMILIES:
        what = repr(arch) if arch else f"model_type {model_type!r}"
        raise UserError(f"--load {src}: architecture {what} is not supported; import-hf supports {supported()}")
    return FAMILIES[model_type]


def family_for_config(cfg) -> Optional[HFFamily]:
    """The family whose native transformers class reproduces ModelConfig ``cfg``, or None (the GPT blocks:
    learned positions, LayerNorm, GeLU; those go to the GPT-2 / self-contained export)."""
    if not (cfg.rope or cfg.normalization == "RMSNorm" or cfg.swiglu):
        return None
    for name in EXPORT_ORDER:
        if FAMILIES[name].export_refusal(cfg) is None:
            return FAMILIES[name]
    return None


def export_refusal(cfg) -> str:
    """Why no native family reproduces ``cfg`` (for the message)."""
    return "; ".join(f"{FAMILIES[n].architecture}: not {FAMILIES[n].export_refusal(cfg)}" for n in EXPORT_ORDER)
