"""The tokenizer files of a transformers directory, so that ``AutoTokenizer.from_pretrained(dir)`` gives the
token ids the checkpoint was trained with."""
from __future__ import annotations

import json
import os
import shutil

from megatron.errors import UserError

EOD = "<|endoftext|>"


def _copy(src, dst_dir: str, name: str, flag: str) -> None:
    if not src or not os.path.isfile(src):
        raise UserError(f"{flag} {src}: the checkpoint's tokenizer file is not found; pass {flag} with its location")
    shutil.copyfile(src, os.path.join(dst_dir, name))


def write_tokenizer_files(data_cfg: dict, out_dir: str, model_max_length: int) -> str:
    """Write the files for the checkpoint's tokenizer (``data_cfg``: its stored data config); returns its kind.

    GPT-2 BPE: vocab.json + merges.txt read by transformers' GPT2Tokenizer (no prefix space, no BOS added).
    SentencePiece: tokenizer.model plus a tokenizer.json (PreTrainedTokenizerFast) whose normaliser, like
    SentencePiece, always prepends the dummy-prefix "▁" (transformers' Llama conversion skips it when the
    text already starts with a space) and does not split at spaces; no BOS/EOS added. Writing it needs
    transformers (its SentencePiece converter).
    NullTokenizer (ids are the text): no files.
    """
    kind = data_cfg.get("tokenizer_type")
    if kind == "GPT2BPETokenizer":
        _copy(data_cfg.get("vocab_file"), out_dir, "vocab.json", "--vocab-file")
        _copy(data_cfg.get("merge_file"), out_dir, "merges.txt", "--merge-file")
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": EOD, "eos_token": EOD,
                  "unk_token": EOD, "model_max_length": model_max_length}
    elif kind == "SentencePieceTokenizer":
        _copy(data_cfg.get("tokenizer_model"), out_dir, "tokenizer.model", "--tokenizer-model")
        config = _sentencepiece_tokenizer_json(out_dir)
    else:
        return "none (the NullTokenizer's ids are the text itself)"
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config["tokenizer_class"]


def _sentencepiece_tokenizer_json(out_dir: str) -> dict:
    try:
        from tokenizers import normalizers, pre_tokenizers
        from transformers import LlamaTokenizer
    except ImportError:
        raise UserError("export-hf of a SentencePiece checkpoint needs transformers to write tokenizer.json: "
                        "pip install transformers") from None
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id())}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:  # replaced by the caller
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, **special}, f)
    tok = LlamaTokenizer.from_pretrained(out_dir).backend_tokenizer
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    tok.post_processor = None
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False, **special}
