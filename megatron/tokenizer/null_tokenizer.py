"""The tokenizer of synthetic data: ids are the tokens themselves."""
from __future__ import annotations


class NullTokenizer:
    """Ids are the tokens themselves (synthetic data); the last id is end-of-document."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)

