"""Build the tokenizer named by the data config, with clear errors for missing files."""
from __future__ import annotations

import os

from megatron.errors import UserError


class NullTokenizer:
    """Ids are the tokens themselves (synthetic data); the last id is end-of-document."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def _need_file(path, flag):
    if path is None:
        raise UserError(f"{flag} is required for this tokenizer")
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: file not found; check the path")


def build_tokenizer(tokenizer_type: str, vocab_file=None, merge_file=None, tokenizer_model=None, vocab_size=None):
    if tokenizer_type == "GPT2BPETokenizer":
        from megatron.tokenizer.gpt2_bpe import GPT2BPETokenizer

        _need_file(vocab_file, "--vocab-file")
        _need_file(merge_file, "--merge-file")
        try:
            return GPT2BPETokenizer(vocab_file, merge_file)
        except (ValueError, KeyError) as e:
            raise UserError(f"--vocab-file {vocab_file} / --merge-file {merge_file}: not GPT-2 BPE files ({e})") from None
    if tokenizer_type == "SentencePieceTokenizer":
        from megatron.tokenizer.sentencepiece_tokenizer import SentencePieceTokenizer

        _need_file(tokenizer_model, "--tokenizer-model")
        try:
            return SentencePieceTokenizer(tokenizer_model)
        except (RuntimeError, OSError) as e:
            raise UserError(f"--tokenizer-model {tokenizer_model}: not a SentencePiece model ({e})") from None
    if tokenizer_type == "NullTokenizer":
        if not vocab_size:
            raise UserError("NullTokenizer needs --vocab-size")
        return NullTokenizer(vocab_size)
    raise UserError(f"--tokenizer-type {tokenizer_type!r} is unknown: use GPT2BPETokenizer or SentencePieceTokenizer")
