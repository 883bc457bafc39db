"""Tokenizers with Megatron's names: GPT2BPETokenizer, SentencePieceTokenizer (and NullTokenizer)."""
from megatron.tokenizer.build import build_tokenizer  # noqa: F401
