"""Build the tokenizer named by the data config (through the registry), with clear errors for missing files."""
from __future__ import annotations

from megatron.tokenizer import registry


def build_tokenizer(tokenizer_type: str, vocab_file=None, merge_file=None, tokenizer_model=None, vocab_size=None):
    """Build a tokenizer by its ``--tokenizer-type`` name (see megatron.tokenizer.registry)."""
    return registry.build(tokenizer_type, vocab_size=vocab_size, vocab_file=vocab_file, merge_file=merge_file,
                          tokenizer_model=tokenizer_model)
