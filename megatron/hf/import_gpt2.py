"""Import a transformers GPT-2-family directory (config.json + model.safetensors or pytorch_model.bin, and
optionally vocab.json + merges.txt) as our dense GPT checkpoint at iteration 0 with the same logits."""
from __future__ import annotations

import os
import shutil

import torch

from megatron.checkpoint.weights_only import write_weights_checkpoint
from megatron.config.schema import Config, ModelConfig, pad_vocab_size
from megatron.errors import UserError
from megatron.hf.hf_state import read_config, read_hf_state  # noqa: F401  (read_hf_state re-exported)
from megatron.model.gpt_model import GPTModel

SUPPORTED = "GPT-2 family (model_type gpt2: GPT2LMHeadModel / GPT2Model, e.g. gpt2, distilgpt2, DialoGPT)"


def read_hf_config(src: str) -> dict:
    hf = read_config(src)
    if hf.get("model_type") != "gpt2":
        arch = hf.get("architectures") or [hf.get("model_type")]
        raise UserError(f"--load {src}: architecture {arch[0]!r} is not supported; import-hf supports the {SUPPORTED}")
    for key, want in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                      ("add_cross_attention", False), ("scale_attn_weights", True)):
        if hf.get(key, want) != want:
            raise UserError(f"--load {src}: config {key}={hf[key]} is not supported (our attention has {key}={want})")
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise UserError(f"--load {src}: activation_function {act!r} is not supported (GeLU only)")
    return hf


def gpt2_model_config(hf: dict, vocab_size: int):
    return ModelConfig(num_layers=hf["n_layer"], hidden_size=hf["n_embd"], num_attention_heads=hf["n_head"],
                       ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"], seq_length=hf["n_positions"],
                       max_position_embeddings=hf["n_positions"], vocab_size=vocab_size,
                       init_method_std=hf.get("initializer_range", 0.02),
                       layernorm_epsilon=hf.get("layer_norm_epsilon", 1e-5))


def load_gpt2_into(model, state: dict, n_vocab: int) -> None:
    """Copy a GPT2LMHeadModel/GPT2Model state (Conv1D weights [in, out]) into our dense GPTModel."""
    sd = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in state.items()}

    def get(name):
        if name not in sd:
            raise UserError(f"--load: tensor {name} is missing from the GPT-2 weights")
        return sd[name].float()

    with torch.no_grad():
        model.word_embeddings.weight.zero_()
        model.word_embeddings.weight[:n_vocab].copy_(get("wte.weight"))  # padding rows stay zero
        model.position_embeddings.weight.copy_(get("wpe.weight"))
        model.final_layernorm.weight.copy_(get("ln_f.weight"))
        model.final_layernorm.bias.copy_(get("ln_f.bias"))
        for i, layer in enumerate(model.layers):
            h = f"h.{i}."
            mlp = layer.mlp.mlp
            pairs = [(layer.input_layernorm.weight, get(h + "ln_1.weight")), (layer.input_layernorm.bias, get(h + "ln_1.bias")),
                     (layer.attention.qkv.weight, get(h + "attn.c_attn.weight").t()),
                     (layer.attention.qkv.bias, get(h + "attn.c_attn.bias")),
                     (layer.attention.proj.weight, get(h + "attn.c_proj.weight").t()),
                     (layer.attention.proj.bias, get(h + "attn.c_proj.bias")),
                     (layer.post_attention_layernorm.weight, get(h + "ln_2.weight")),
                     (layer.post_attention_layernorm.bias, get(h + "ln_2.bias")),
                     (mlp.fc1.weight, get(h + "mlp.c_fc.weight").t()), (mlp.fc1.bias, get(h + "mlp.c_fc.bias")),
                     (mlp.fc2.weight, get(h + "mlp.c_proj.weight").t()), (mlp.fc2.bias, get(h + "mlp.c_proj.bias"))]
            for ours, theirs in pairs:
                if tuple(ours.shape) != tuple(theirs.shape):
                    raise UserError(f"--load: {h} tensor of shape {tuple(theirs.shape)} does not fit config.json "
                                    f"(expected {tuple(ours.shape)})")
                ours.copy_(theirs)


def import_gpt2(src: str, save_dir: str, final_dir: str, divisible_by: int = 128) -> dict:
    """Writes the checkpoint (and a tokenizer/ copy of vocab.json + merges.txt) in save_dir, a folder that is
    to be renamed ``final_dir`` (the tokenizer paths stored point there); returns a summary."""
    hf = read_hf_config(src)
    state = read_hf_state(src)
    n_vocab = hf["vocab_size"]
    cfg = Config()
    cfg.model = gpt2_model_config(hf, pad_vocab_size(n_vocab, divisible_by))
    cfg.model.validate()
    model = GPTModel(cfg.model)
    load_gpt2_into(model, state, n_vocab)
    if cfg.model.vocab_size != n_vocab:  # the padding rows are zero: mask their logits (and drop them on export)
        cfg.model.true_vocab_size = n_vocab
    cfg.data.make_vocab_size_divisible_by = divisible_by
    vocab, merges = os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt")
    if os.path.isfile(vocab) and os.path.isfile(merges):
        tok_dir = os.path.join(save_dir, "tokenizer")
        os.makedirs(tok_dir, exist_ok=True)
        shutil.copyfile(vocab, os.path.join(tok_dir, "vocab.json"))
        shutil.copyfile(merges, os.path.join(tok_dir, "merges.txt"))
        final = os.path.abspath(final_dir)
        cfg.data.tokenizer_type = "GPT2BPETokenizer"
        cfg.data.vocab_file = os.path.join(final, "tokenizer", "vocab.json")
        cfg.data.merge_file = os.path.join(final, "tokenizer", "merges.txt")
    else:  # no tokenizer files: ids stand for themselves until a tokenizer is given at training time
        cfg.data.tokenizer_type = "NullTokenizer"
    write_weights_checkpoint(save_dir, model, cfg.to_dict())
    note = ""
    if hf.get("activation_function", "gelu_new") != "gelu":
        note = (f"; note: config.json has activation_function {hf.get('activation_function', 'gelu_new')} (tanh GeLU), "
                f"our MLP uses the exact GeLU: logits differ by the approximation (about 1e-3)")
    flags = "" if cfg.model.true_vocab_size is None else f"--true-vocab-size {cfg.model.true_vocab_size}"
    return {"layers": cfg.model.num_layers, "vocab": cfg.model.vocab_size, "tokenizer": cfg.data.tokenizer_type,
            "note": note, "flags": flags}
