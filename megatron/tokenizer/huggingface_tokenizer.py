"""``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR`` (Megatron-LM's name): a local tokenizer
directory's ``tokenizer.json`` read with Hugging Face ``tokenizers`` (no transformers, no download).

Special tokens the tokenizer adds (BOS, ...) are not added by ``tokenize``: documents are separated by the
end-of-document id, which is the ``eos_token`` of DIR/tokenizer_config.json, else ``<|endoftext|>`` or ``</s>``.
Evaluation asks for them as transformers would (``encode_special``; ``bos``: the declared BOS token's id).
"""
from __future__ import annotations

import json
import os

from megatron.errors import UserError


class HuggingFaceTokenizer:
    def __init__(self, directory: str):
        from tokenizers import Tokenizer

        path = os.path.join(directory, "tokenizer.json") if os.path.isdir(directory) else directory
        if not os.path.isfile(path):
            raise UserError(f"--tokenizer-model {directory}: no tokenizer.json there; give a Hugging Face tokenizer "
                            f"directory")
        self._tok = Tokenizer.from_file(path)
        self.eod = self._eod_id(os.path.dirname(path))
        bos = self._config_token(os.path.dirname(path), "bos_token")
        self.bos = self._tok.token_to_id(bos) if bos else None  # None: no BOS declared (or not in the vocabulary)

    @staticmethod
    def _config_token(directory: str, key: str):
        """tokenizer_config.json's ``key`` token text (a string or {"content": ...}), or None."""
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        if not os.path.isfile(cfg_path):
            return None
        with open(cfg_path, encoding="utf-8") as f:
            token = json.load(f).get(key)
        return token.get("content") if isinstance(token, dict) else token

    def _eod_id(self, directory: str) -> int:
        candidates = [self._config_token(directory, "eos_token")]
        for token in candidates + ["<|endoftext|>", "</s>", "<eos>"]:
            i = self._tok.token_to_id(token) if token else None
            if i is not None:
                return i
        raise UserError(f"--tokenizer-model {directory}: no end-of-document token found (set eos_token in "
                        f"tokenizer_config.json)")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def special_text(self, i: int) -> str:
        """The text of token ``i`` with special tokens kept (transformers' decode)."""
        return self.detokenize([i])

    def encode_special(self, text: str) -> list[int]:
        """With the special tokens the tokenizer's post-processor adds (transformers' default encoding)."""
        return self._tok.encode(text, add_special_tokens=True).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
