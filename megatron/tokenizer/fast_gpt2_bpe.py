"""GPT-2 byte-level BPE on tiktoken (Rust), built from the same local vocab.json as the pure-Python
:class:`~megatron.tokenizer.gpt2_bpe.GPT2BPETokenizer`, with identical ids.

GPT-2's vocabulary numbers merged tokens in merge order, so a token's id is its merge rank: tiktoken's
``mergeable_ranks`` is the vocabulary with each token mapped back to its bytes (merges.txt is implied by
it and only checked to exist). ``<|endoftext|>`` inside text stays plain text (``encode_ordinary``), as in
the Python one; the end-of-document id is appended by the caller.
"""
from __future__ import annotations

import json

from megatron.tokenizer.gpt2_bpe import EOD_TOKEN, GPT2_PATTERN, bytes_to_unicode


def fast_bpe_available() -> bool:
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return False
    return True


class FastGPT2BPETokenizer:
    def __init__(self, vocab_file: str, merge_file: str):
        import tiktoken

        with open(vocab_file, encoding="utf-8") as f:
            vocab: dict[str, int] = json.load(f)
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self.eod = vocab[EOD_TOKEN]
        ranks = {bytes(byte_decoder[c] for c in token): i for token, i in vocab.items() if token != EOD_TOKEN}
        self._enc = tiktoken.Encoding("gpt2-local", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={EOD_TOKEN: self.eod})
        self._vocab_size = len(vocab)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        return self._enc.encode_ordinary_batch(texts, num_threads=1)

    def detokenize(self, ids) -> str:
        return self._enc.decode([int(i) for i in ids], errors="replace")
