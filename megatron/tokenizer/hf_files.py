"""Writers of a transformers tokenizer directory, one per tokenizer kind that has one (``TokenizerSpec.hf_files``).

A writer takes the checkpoint's tokenizer files (data-config field -> path, as stored at training time), the
export directory and the model's maximum length; it copies or converts the files there and returns the
``tokenizer_config.json`` contents, which the caller (``megatron.hf.tokenizer_files``) writes.
"""
from __future__ import annotations

import json
import os
import shutil

from megatron.errors import UserError

EOD = "<|endoftext|>"


def copy_file(src, dst_dir: str, name: str, flag: str) -> None:
    if not src or not os.path.isfile(src):
        raise UserError(f"{flag} {src}: the checkpoint's tokenizer file is not found; pass {flag} with its location")
    shutil.copyfile(src, os.path.join(dst_dir, name))


def gpt2_bpe(files: dict, out_dir: str, model_max_length: int) -> dict:
    """vocab.json + merges.txt read by transformers' GPT2Tokenizer (no prefix space, no BOS added)."""
    copy_file(files.get("vocab_file"), out_dir, "vocab.json", "--vocab-file")
    copy_file(files.get("merge_file"), out_dir, "merges.txt", "--merge-file")
    return {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": EOD, "eos_token": EOD,
            "unk_token": EOD, "model_max_length": model_max_length}


def sentencepiece(files: dict, out_dir: str, model_max_length: int) -> dict:
    """tokenizer.model plus a tokenizer.json (PreTrainedTokenizerFast) whose normaliser, like SentencePiece, always
    prepends the dummy-prefix "▁" (transformers' Llama conversion skips it when the text already starts with a
    space) and does not split at spaces; no BOS/EOS added; "<s>" in a text is text (``split_special_tokens``).
    Writing it needs transformers (its SentencePiece converter)."""
    copy_file(files.get("tokenizer_model"), out_dir, "tokenizer.model", "--tokenizer-model")
    try:  # optional dependencies: only an export of a SentencePiece checkpoint needs them
        from tokenizers import normalizers, pre_tokenizers
        from transformers import LlamaTokenizer
    except ImportError:
        raise UserError("export-hf of a SentencePiece checkpoint needs transformers to write tokenizer.json: "
                        "pip install transformers") from None
    import sentencepiece as spm  # imported when used, as in sentencepiece_tokenizer

    sp = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    eos = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id(EOD)  # the end of document, as SentencePieceTokenizer
    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(eos), "unk_token": piece(sp.unk_id())}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:  # replaced by the caller
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": True, **special}, f)
    tok = LlamaTokenizer.from_pretrained(out_dir).backend_tokenizer
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
    tok.post_processor = None
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    # split_special_tokens: "<s>" / "</s>" in a text are characters, as SentencePiece (and so training) reads them
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
            "split_special_tokens": True, **special}


def llama2_sentencepiece(files: dict, out_dir: str, model_max_length: int) -> dict:
    """:func:`sentencepiece`'s files with BOS added in front of every text, as the Llama2Tokenizer started every
    training document (transformers' Llama-2 tokenizers do the same)."""
    config = sentencepiece(files, out_dir, model_max_length)
    from tokenizers import Tokenizer, processors  # present: sentencepiece() needed them

    path = os.path.join(out_dir, "tokenizer.json")
    tok = Tokenizer.from_file(path)
    bos = config["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(path)
    return {**config, "add_bos_token": True}
