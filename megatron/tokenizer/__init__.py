"""Tokenizers with Megatron's names, built by ``--tokenizer-type`` through the registry (``registry.py``)."""
from megatron.tokenizer.build import build_tokenizer  # noqa: F401
