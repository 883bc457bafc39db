"""The tokenizer registry: one record per ``--tokenizer-type`` saying which class builds it and which files
it needs. Training, inference (rebuilding from a checkpoint's stored config), the dry run and config
validation all go through it, so a new tokenizer is one new record here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from megatron.errors import UserError
from megatron.tokenizer.fast_gpt2_bpe import FastGPT2BPETokenizer, fast_bpe_available
from megatron.tokenizer.gpt2_bpe import GPT2BPETokenizer
from megatron.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer
from megatron.tokenizer.null_tokenizer import NullTokenizer
from megatron.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    build: Callable  # (files: dict field -> path, vocab_size) -> tokenizer
    files: tuple  # (data-config field, flag, what it is) of each file or directory it reads
    description: str


def _gpt2(files, vocab_size):
    impl = FastGPT2BPETokenizer if fast_bpe_available() and not os.environ.get("MEGATRON_PYTHON_BPE") else GPT2BPETokenizer
    return impl(files["vocab_file"], files["merge_file"])


def _sentencepiece(files, vocab_size):
    return SentencePieceTokenizer(files["tokenizer_model"])


def _huggingface(files, vocab_size):
    return HuggingFaceTokenizer(files["tokenizer_model"])


def _null(files, vocab_size):
    if not vocab_size:
        raise UserError("NullTokenizer needs --vocab-size")
    return NullTokenizer(vocab_size)


REGISTRY: dict[str, TokenizerSpec] = {s.name: s for s in (
    TokenizerSpec("GPT2BPETokenizer", _gpt2, (("vocab_file", "--vocab-file", "GPT-2 vocab.json"),
                                              ("merge_file", "--merge-file", "GPT-2 merges.txt")),
                  "GPT-2 byte-level BPE (tiktoken when installed, else pure Python; identical ids)"),
    TokenizerSpec("SentencePieceTokenizer", _sentencepiece, (("tokenizer_model", "--tokenizer-model", "a .model file"),),
                  "SentencePiece model"),
    TokenizerSpec("HuggingFaceTokenizer", _huggingface,
                  (("tokenizer_model", "--tokenizer-model", "a directory with tokenizer.json"),),
                  "a local Hugging Face tokenizer directory (tokenizer.json)"),
    TokenizerSpec("NullTokenizer", _null, (), "ids are the whitespace-separated numbers of the text (synthetic data)"),
)}


def spec(name) -> TokenizerSpec:
    if name not in REGISTRY:
        raise UserError(f"--tokenizer-type {name!r} is unknown: use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def check_data_config(tokenizer_type, **files) -> None:
    """Config validation: the type is known and its file flags are given (existence is checked when built)."""
    for field, flag, what in spec(tokenizer_type).files:
        if not files.get(field):
            raise UserError(f"{tokenizer_type} needs {flag} ({what})")


def build(tokenizer_type, vocab_size=None, **files):
    s = spec(tokenizer_type)
    for field, flag, what in s.files:
        path = files.get(field)
        if path is None:
            raise UserError(f"{flag} is required for {tokenizer_type} ({what})")
        if not os.path.exists(path):
            raise UserError(f"{flag} {path}: not found; check the path")
    try:
        return s.build(files, vocab_size)
    except UserError:
        raise
    except Exception as e:  # unreadable or foreign files
        given = " / ".join(f"{flag} {files.get(field)}" for field, flag, _ in s.files)
        raise UserError(f"{given}: cannot be read as {s.description} ({type(e).__name__}: {e})") from None


def from_stored_config(config: dict, **overrides):
    """The tokenizer a checkpoint was trained with (its stored config; paths overridable)."""
    d = config["data"]
    kind = d.get("tokenizer_type")
    files = {field: overrides.get(field) or d.get(field) for field, _, _ in spec(kind).files}
    for field, flag, _ in spec(kind).files:
        if files[field] and not os.path.exists(files[field]):
            raise UserError(f"{flag} {files[field]}: the checkpoint's tokenizer file is not found (paths are stored as "
                            f"given at training time); pass {flag} with its location")
    return build(kind, vocab_size=config["model"]["vocab_size"], **files)
