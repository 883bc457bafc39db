"""Build the tokenizer named by the data config (through the registry), with clear errors for missing files."""
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


def build_tokenizer(tokenizer_type: str, vocab_file=None, merge_file=None, tokenizer_model=None, vocab_size=None):
    """Build a tokenizer by its ``--tokenizer-type`` name (see megatron.tokenizer.registry)."""
    from megatron.tokenizer import registry

    return registry.build(tokenizer_type, vocab_size=vocab_size, vocab_file=vocab_file, merge_file=merge_file,
                          tokenizer_model=tokenizer_model)
