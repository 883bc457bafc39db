"""The tokenizer files of a transformers directory, so that ``AutoTokenizer.from_pretrained(dir)`` gives the
token ids the checkpoint was trained with."""
from __future__ import annotations

import json
import os
import shutil

from megatron.errors import UserError

EOD = "<|endoftext|>"


def _copy(src, dst_dir: str, name: str, flag: str) -> None:
    if not src or not os.path.isfile(src):
        raise UserError(f"{flag} {src}: the checkpoint's tokenizer file is not found; pass {flag} with its location")
    shutil.copyfile(src, os.path.join(dst_dir, name))


def write_tokenizer_files(data_cfg: dict, out_dir: str, model_max_length: int) -> str:
    """Write the files for the checkpoint's tokenizer (``data_cfg``: its stored data config); returns its kind.

    GPT-2 BPE: vocab.json + merges.txt read by transformers' GPT2Tokenizer (no prefix space, no BOS added).
    SentencePiece: tokenizer.model read by transformers' LlamaTokenizer with no BOS/EOS added and the
    model's own normalisation kept (``legacy``), so its ids equal SentencePieceProcessor.encode.
    NullTokenizer (ids are the text): no files.
    """
    kind = data_cfg.get("tokenizer_type")
    if kind == "GPT2BPETokenizer":
        _copy(data_cfg.get("vocab_file"), out_dir, "vocab.json", "--vocab-file")
        _copy(data_cfg.get("merge_file"), out_dir, "merges.txt", "--merge-file")
        config = {"tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "bos_token": EOD, "eos_token": EOD,
                  "unk_token": EOD, "model_max_length": model_max_length}
    elif kind == "SentencePieceTokenizer":
        _copy(data_cfg.get("tokenizer_model"), out_dir, "tokenizer.model", "--tokenizer-model")
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=os.path.join(out_dir, "tokenizer.model"))
        piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                  "legacy": True, "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()),
                  "unk_token": piece(sp.unk_id()), "model_max_length": model_max_length}
    else:
        return "none (the NullTokenizer's ids are the text itself)"
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return config["tokenizer_class"]
