"""The tokenizer registry: one record per ``--tokenizer-type`` saying which class builds it, which files it
needs, and what the rest of the code needs to know about it (the dry run's vocabulary size, the transformers
export's files, whether it is built from --vocab-size, whether it reads text). Training, inference (rebuilding
from a checkpoint's stored config), the dry run, the transformers export and config validation all go through
it, so a new tokenizer is one new record here.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

from megatron.errors import UserError
from megatron.tokenizer import hf_files
from megatron.tokenizer.fast_gpt2_bpe import FastGPT2BPETokenizer, fast_bpe_available
from megatron.tokenizer.gpt2_bpe import GPT2BPETokenizer
from megatron.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer
from megatron.tokenizer.null_tokenizer import NullTokenizer
from megatron.tokenizer.sentencepiece_tokenizer import Llama2Tokenizer, SentencePieceTokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    build: Callable  # (files: dict field -> path, vocab_size) -> tokenizer
    files: tuple  # (data-config field, flag, what it is) of each file or directory it reads
    description: str
    needs_vocab_size: bool = False  # built from --vocab-size alone (synthetic ids), which is then required
    fixed_vocab_size: Optional[int] = None  # its vocabulary whatever the files: what a dry run plans for
    sized_by_files: bool = False  # a dry run may build it from its files, when they exist, to read the vocabulary
    reads_text: bool = True  # False: its "text" is the ids written as numbers (it cannot read natural language)
    # (files: dict field -> path, out_dir, model_max_length) -> tokenizer_config.json contents, after writing the
    # files of a transformers tokenizer with the same ids into out_dir (megatron.tokenizer.hf_files); None: none
    hf_files: Optional[Callable] = None
    hf_note: str = ""  # without hf_files: why a transformers export carries no tokenizer files


def _gpt2(files, vocab_size):
    impl = FastGPT2BPETokenizer if fast_bpe_available() and not os.environ.get("MEGATRON_PYTHON_BPE") else GPT2BPETokenizer
    return impl(files["vocab_file"], files["merge_file"])


def _sentencepiece(files, vocab_size):
    return SentencePieceTokenizer(files["tokenizer_model"])


def _llama2(files, vocab_size):
    return Llama2Tokenizer(files["tokenizer_model"])


def _huggingface(files, vocab_size):
    return HuggingFaceTokenizer(files["tokenizer_model"])


def _null(files, vocab_size):
    return NullTokenizer(vocab_size)


REGISTRY: dict[str, TokenizerSpec] = {s.name: s for s in (
    TokenizerSpec("GPT2BPETokenizer", _gpt2, (("vocab_file", "--vocab-file", "GPT-2 vocab.json"),
                                              ("merge_file", "--merge-file", "GPT-2 merges.txt")),
                  "GPT-2 byte-level BPE (tiktoken when installed, else pure Python; identical ids)",
                  fixed_vocab_size=50257, hf_files=hf_files.gpt2_bpe),
    TokenizerSpec("SentencePieceTokenizer", _sentencepiece, (("tokenizer_model", "--tokenizer-model", "a .model file"),),
                  "SentencePiece model", sized_by_files=True, hf_files=hf_files.sentencepiece),
    # Megatron-LM's name for the same plain SentencePiece tokenizer (EOS is the end of document)
    TokenizerSpec("GPTSentencePieceTokenizer", _sentencepiece,
                  (("tokenizer_model", "--tokenizer-model", "a .model file"),),
                  "SentencePiece model", sized_by_files=True, hf_files=hf_files.sentencepiece),
    TokenizerSpec("Llama2Tokenizer", _llama2, (("tokenizer_model", "--tokenizer-model", "a Llama-2 tokenizer.model"),),
                  "Llama-2 SentencePiece model (documents start with BOS)", sized_by_files=True,
                  hf_files=hf_files.llama2_sentencepiece),
    TokenizerSpec("HuggingFaceTokenizer", _huggingface,
                  (("tokenizer_model", "--tokenizer-model", "a directory with tokenizer.json"),),
                  "a local Hugging Face tokenizer directory (tokenizer.json)",
                  hf_note="not written: copy the --tokenizer-model directory's tokenizer files beside the model"),
    TokenizerSpec("NullTokenizer", _null, (), "ids are the whitespace-separated numbers of the text (synthetic data)",
                  needs_vocab_size=True, reads_text=False, hf_note="the NullTokenizer's ids are the text itself"),
)}
# Without --tokenizer-type a dry run plans for this one's vocabulary (Megatron's usual GPT-2 BPE).
DRY_RUN_DEFAULT = "GPT2BPETokenizer"


def spec(name) -> TokenizerSpec:
    if name not in REGISTRY:
        raise UserError(f"--tokenizer-type {name!r} is unknown: use one of {', '.join(REGISTRY)}")
    return REGISTRY[name]


def check_data_config(tokenizer_type, **files) -> None:
    """Config validation: the type is known and its file flags are given (existence is checked when built)."""
    for field, flag, what in spec(tokenizer_type).files:
        if not files.get(field):
            raise UserError(f"{tokenizer_type} needs {flag} ({what})")


def needs_vocab_size(tokenizer_type) -> bool:
    """Whether the tokenizer is built from --vocab-size (its data gives no vocabulary); False for unknown names."""
    s = REGISTRY.get(tokenizer_type)
    return s is not None and s.needs_vocab_size


def data_files(tokenizer_type, data_cfg) -> dict:
    """The tokenizer's files named by a data config (a DataConfig or a stored config's data dict): field -> path."""
    get = data_cfg.get if isinstance(data_cfg, dict) else lambda field: getattr(data_cfg, field, None)
    return {field: get(field) for field, _, _ in spec(tokenizer_type).files}


def build_for_data_config(data_cfg, vocab_size=None):
    """The tokenizer a run's data config names; ``vocab_size`` (--vocab-size) is used by the tokenizers built from it."""
    kind = data_cfg.tokenizer_type
    s = spec(kind)
    return build(kind, vocab_size=vocab_size if s.needs_vocab_size else None, **data_files(kind, data_cfg))


def dry_run_vocab_size(data_cfg) -> Optional[int]:
    """The (unpadded) vocabulary a dry run plans for without --vocab-size, or None when it cannot tell: the
    tokenizer's fixed vocabulary, else the size of the one built from its files when they all exist."""
    kind = data_cfg.tokenizer_type if data_cfg.tokenizer_type is not None else DRY_RUN_DEFAULT
    s = REGISTRY.get(kind)
    if s is None:
        return None
    if s.fixed_vocab_size is not None:
        return s.fixed_vocab_size
    files = data_files(kind, data_cfg)
    if s.sized_by_files and all(path and os.path.isfile(path) for path in files.values()):
        return build(kind, **files).vocab_size
    return None


def build(tokenizer_type, vocab_size=None, **files):
    s = spec(tokenizer_type)
    if s.needs_vocab_size and not vocab_size:
        raise UserError(f"{tokenizer_type} needs --vocab-size")
    for field, flag, what in s.files:
        path = files.get(field)
        if path is None:
            raise UserError(f"{flag} is required for {tokenizer_type} ({what})")
        if not os.path.exists(path):
            raise UserError(f"{flag} {path}: not found; check the path")
    try:
        return s.build(files, vocab_size)
    except UserError:
        raise
    except Exception as e:  # unreadable or foreign files
        given = " / ".join(f"{flag} {files.get(field)}" for field, flag, _ in s.files)
        raise UserError(f"{given}: cannot be read as {s.description} ({type(e).__name__}: {e})") from None


_FILE_FLAGS = {"vocab_file": "--vocab-file", "merge_file": "--merge-file", "tokenizer_model": "--tokenizer-model"}


def check_overrides(tokenizer_type, **given) -> None:
    """Tokenizer file flags given for a checkpoint (generation, evaluation) must be ones its tokenizer reads:
    any other would be silently ignored, the text read by a tokenizer the user did not ask for."""
    reads = {field for field, _, _ in spec(tokenizer_type).files}
    for field, path in given.items():
        if path is not None and field not in reads:
            flag = _FILE_FLAGS.get(field, field)
            uses = ", ".join(f for _, f, _ in spec(tokenizer_type).files) or "no file"
            raise UserError(f"{flag} {path}: the checkpoint's tokenizer is {tokenizer_type}, which reads {uses}; "
                            f"drop {flag} (it would be ignored; the checkpoint's own tokenizer is used)")


def from_stored_config(config: dict, **overrides):
    """The tokenizer a checkpoint was trained with (its stored config; paths overridable)."""
    d = config["data"]
    kind = d.get("tokenizer_type")
    files = {field: overrides.get(field) or d.get(field) for field, _, _ in spec(kind).files}
    for field, flag, _ in spec(kind).files:
        if files[field] and not os.path.exists(files[field]):
            raise UserError(f"{flag} {files[field]}: the checkpoint's tokenizer file is not found (paths are stored as "
                            f"given at training time); pass {flag} with its location")
    return build(kind, vocab_size=config["model"]["vocab_size"], **files)
