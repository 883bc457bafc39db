"""The tokenizer files of a transformers directory, so that ``AutoTokenizer.from_pretrained(dir)`` gives the
token ids the checkpoint was trained with."""
from __future__ import annotations

import json
import os

from megatron.tokenizer import registry as tokenizers


def write_tokenizer_files(data_cfg: dict, out_dir: str, model_max_length: int) -> str:
    """Write the files for the checkpoint's tokenizer (``data_cfg``: its stored data config); returns its kind.

    The tokenizer's registry record says what to write (``TokenizerSpec.hf_files``, the writers in
    megatron/tokenizer/hf_files.py): GPT-2 BPE gives vocab.json + merges.txt for transformers' GPT2Tokenizer,
    SentencePiece a tokenizer.model plus a tokenizer.json (writing it needs transformers); a tokenizer without a
    writer (NullTokenizer: ids are the text) gives no files.
    """
    kind = data_cfg.get("tokenizer_type")
    spec = tokenizers.spec(kind)
    if spec.hf_files is None:
        return f"none ({spec.hf_note})"
    config = spec.hf_files(tokenizers.data_files(kind, data_cfg), out_dir, model_max_length)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config["tokenizer_class"]
