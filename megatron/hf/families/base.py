"""What a Hugging Face model family is to the import / export: a config mapping and a weight-name mapping.

A family (:class:`HFFamily`, registered by its transformers ``model_type`` in
:mod:`megatron.hf.families`) says:

- which config.json fields it understands, each with the values it supports (:meth:`HFFamily.fields`):
  a field it does not know, or a value it does not implement (sliding-window attention, a RoPE scaling
  type), is refused by name, never ignored;
- how config.json becomes our ModelConfig (:meth:`HFFamily.model_config`) and back
  (:meth:`HFFamily.hf_config`);
- the weight mapping, as :class:`Rule` s (:meth:`HFFamily.rules`): each of our parameters is made from one
  or more transformers tensors (``join``) and split back into them (``split``). The per-layer rules come
  from :meth:`HFFamily.attention_rules` and :meth:`HFFamily.mlp_rules`, so an MoE family extends a dense
  one by overriding :meth:`HFFamily.mlp_rules` for its MoE layers (router, stacked experts, shared
  expert) and :meth:`HFFamily.moe_config` / :meth:`HFFamily.fields` for its routing fields.

Our layouts (megatron/model/transformer.py): ``attention.qkv`` = [q; k; v] rows, ``mlp.fc1`` =
[gate; up] rows for SwiGLU; transformers' Linear weights are [out, in] like ours.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from megatron.config.schema import ModelConfig
from megatron.errors import UserError

# PretrainedConfig's own fields and bookkeeping every config.json may carry: no effect on the network
GENERIC_FIELDS = frozenset({
    "architectures", "model_type", "transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range",
    "output_hidden_states", "output_attentions", "return_dict", "id2label", "label2id", "problem_type",
    "chunk_size_feed_forward", "is_encoder_decoder", "tokenizer_class", "prefix", "task_specific_params",
    "finetuning_task", "num_labels", "tie_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "pruned_heads", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "_attn_implementation_autoset", "_commit_hash", "bad_words_ids", "begin_suppress_tokens", "forced_bos_token_id",
    "forced_eos_token_id", "suppress_tokens", "max_length", "min_length", "do_sample", "early_stopping", "num_beams",
    "num_beam_groups", "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty",
    "encoder_hidden_size",
})
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers older transformers versions saved


class Rule(NamedTuple):
    """Our parameter ``ours`` = ``join`` (the transformers tensors ``theirs``, in order); ``split`` inverts it."""

    ours: str
    theirs: tuple
    join: Callable[[list], torch.Tensor]
    split: Callable[[torch.Tensor], list]


def same(ours: str, theirs: str) -> Rule:
    return Rule(ours, (theirs,), lambda ts: ts[0], lambda t: [t])


def cat_rows(ours: str, theirs: tuple, sizes: list) -> Rule:
    """Ours is the row (dim 0) concatenation of ``theirs``, of ``sizes`` rows each."""
    return Rule(ours, tuple(theirs), lambda ts: torch.cat(list(ts), dim=0), lambda t: list(t.split(sizes, dim=0)))


def padded_rows(ours: str, theirs: str, rows: int, padded: int) -> Rule:
    """Ours is ``theirs`` [rows, ...] with zero rows appended up to ``padded`` (the padded vocabulary)."""
    def join(ts):
        t = ts[0]
        return torch.cat([t, t.new_zeros(padded - rows, *t.shape[1:])]) if padded > rows else t

    return Rule(ours, (theirs,), join, lambda t: [t[:rows]])


class Field(NamedTuple):
    """A config.json field a family understands: ``ok(value)`` says whether the value is supported, ``needs``
    says what is (for the message)."""

    ok: Callable
    needs: str


def anything() -> Field:
    return Field(lambda v: True, "")


def equals(*values) -> Field:
    return Field(lambda v: v in values, "supported: " + " or ".join(repr(v) for v in values))


class HFFamily:
    """A transformers model family; subclasses set the class attributes and override what differs."""

    model_type: str = ""
    architecture: str = ""  # the transformers class of the export (config.json "architectures")

    # ---- config.json -> ours

    def fields(self) -> dict:
        """{config.json field: Field} this family understands (besides :data:`GENERIC_FIELDS`)."""
        return {}

    def check_config(self, hf: dict, src: str) -> None:
        """Refuse, by name, a field this family does not know or a value it does not implement."""
        known = self.fields()
        for key, value in hf.items():
            if key in GENERIC_FIELDS:
                continue
            if key not in known:
                raise UserError(f"--load {src}: config.json field {key!r} is not supported by the {self.model_type} "
                                f"import (it would change the network and nothing here implements it)")
            spec = known[key]
            if not spec.ok(value):
                raise UserError(f"--load {src}: config.json {key}={value!r} is not supported by the "
                                f"{self.model_type} import ({spec.needs})")

    def model_config(self, hf: dict, vocab_size: int) -> ModelConfig:
        """Our ModelConfig for config.json ``hf`` (checked), the vocabulary padded to ``vocab_size``."""
        raise NotImplementedError

    def hf_config(self, cfg: ModelConfig, vocab_size: int, eod: int) -> dict:
        """config.json of the native transformers class for ``cfg`` (vocabulary cut to ``vocab_size``)."""
        raise NotImplementedError

    def export_refusal(self, cfg: ModelConfig) -> Optional[str]:
        """Why the transformers class cannot reproduce ``cfg`` (None: it can)."""
        raise NotImplementedError

    # ---- weights

    def rules(self, cfg: ModelConfig, hf_vocab: int) -> list:
        """Every :class:`Rule` of a model of ``cfg`` (transformers vocabulary ``hf_vocab`` rows)."""
        out = [padded_rows("word_embeddings.weight", "model.embed_tokens.weight", hf_vocab, cfg.vocab_size),
               same("final_layernorm.weight", "model.norm.weight")]
        if cfg.normalization == "LayerNorm":
            out.append(same("final_layernorm.bias", "model.norm.bias"))
        if cfg.untie_embeddings_and_output_weights:
            out.append(padded_rows("output_layer.weight", "lm_head.weight", hf_vocab, cfg.vocab_size))
        for i, n_experts in enumerate(cfg.moe.experts_per_layer(cfg.num_layers)):
            out += self.attention_rules(cfg, i) + self.mlp_rules(cfg, i, cfg.moe.is_moe_layer(i, n_experts))
        return out

    def rules_for_state(self, cfg: ModelConfig, hf_vocab: int, state: dict) -> list:
        """The rules that read ``state`` (a family whose checkpoints come in more than one layout, e.g. per-expert
        or fused expert tensors, picks the one ``state`` has); default :meth:`rules`."""
        return self.rules(cfg, hf_vocab)

    def tied_tensors(self, cfg: ModelConfig) -> tuple:
        """transformers tensors that repeat another one (skipped on import, not written on export)."""
        return () if cfg.untie_embeddings_and_output_weights else ("lm_head.weight",)

    def attention_rules(self, cfg: ModelConfig, i: int) -> list:
        """Layer ``i``'s norms and self-attention (Llama names: q/k/v/o_proj, q_norm/k_norm)."""
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        nh, ng, hd = cfg.num_attention_heads, cfg.num_kv_heads, cfg.head_dim
        sizes = [nh * hd, ng * hd, ng * hd]
        qkv = tuple(theirs + f"self_attn.{p}_proj." for p in "qkv")
        out = [same(ours + "input_layernorm.weight", theirs + "input_layernorm.weight"),
               same(ours + "post_attention_layernorm.weight", theirs + "post_attention_layernorm.weight"),
               cat_rows(ours + "attention.qkv.weight", tuple(n + "weight" for n in qkv), sizes),
               same(ours + "attention.proj.weight", theirs + "self_attn.o_proj.weight")]
        if cfg.qkv_bias:
            out.append(cat_rows(ours + "attention.qkv.bias", tuple(n + "bias" for n in qkv), sizes))
        if cfg.add_bias_linear:
            out.append(same(ours + "attention.proj.bias", theirs + "self_attn.o_proj.bias"))
        if cfg.qk_layernorm:
            out += [same(ours + "attention.q_layernorm.weight", theirs + "self_attn.q_norm.weight"),
                    same(ours + "attention.k_layernorm.weight", theirs + "self_attn.k_norm.weight")]
        return out

    def mlp_rules(self, cfg: ModelConfig, i: int, moe: bool) -> list:
        """Layer ``i``'s MLP (dense: Llama's gate/up/down_proj). An MoE family overrides this for MoE layers."""
        if moe:
            raise UserError(f"the {self.model_type} family has no MoE layers (layer {i} is one)")
        ours, theirs = f"layers.{i}.mlp.mlp.", f"model.layers.{i}.mlp."
        F = cfg.ffn_hidden_size
        out = [cat_rows(ours + "fc1.weight", (theirs + "gate_proj.weight", theirs + "up_proj.weight"), [F, F]),
               same(ours + "fc2.weight", theirs + "down_proj.weight")]
        if cfg.add_bias_linear:
            out += [cat_rows(ours + "fc1.bias", (theirs + "gate_proj.bias", theirs + "up_proj.bias"), [F, F]),
                    same(ours + "fc2.bias", theirs + "down_proj.bias")]
        return out

    # ---- applying the rules

    def load_into(self, model, state: dict, cfg: ModelConfig, hf_vocab: int, src: str) -> None:
        """Copy the transformers ``state`` into ``model`` (a GPTModel of ``cfg``, every expert local); every one of
        our parameters must be made and every transformers tensor used (else one line naming it)."""
        params = dict(model.named_parameters())
        used = set(self.tied_tensors(cfg))
        made = set()
        with torch.no_grad():
            for rule in self.rules_for_state(cfg, hf_vocab, state):
                missing = [n for n in rule.theirs if n not in state]
                if missing:
                    raise UserError(f"--load {src}: tensor {missing[0]} is missing from the weights")
                value = rule.join([state[n].float() for n in rule.theirs])
                p = params[rule.ours]
                if tuple(p.shape) != tuple(value.shape):
                    raise UserError(f"--load {src}: {', '.join(rule.theirs)} give {rule.ours} the shape "
                                    f"{tuple(value.shape)}, config.json says {tuple(p.shape)}")
                p.copy_(value)
                used.update(rule.theirs)
                made.add(rule.ours)
        left = sorted(n for n in state if n not in used and not n.endswith(IGNORED_TENSORS))
        if left:
            raise UserError(f"--load {src}: tensor {left[0]} is not used by the {self.model_type} import "
                            f"({len(left)} unused; config.json does not describe these weights)")
        unmade = sorted(set(params) - made)
        if unmade:
            raise ValueError(f"{self.model_type} rules make no value for {unmade}")  # a bug in a family's rules

    def hf_state(self, model, cfg: ModelConfig, hf_vocab: int) -> dict:
        """The transformers state dict of ``model`` (fp32, contiguous, on the CPU)."""
        params = dict(model.named_parameters())
        out = {}
        for rule in self.rules(cfg, hf_vocab):
            for name, t in zip(rule.theirs, rule.split(params[rule.ours].detach())):
                out[name] = t.to(device="cpu", dtype=torch.float32, copy=True).contiguous()  # no shared storage
        return out
