"""SentencePiece tokenizers (Megatron's SentencePieceTokenizer / GPTSentencePieceTokenizer, and Llama2Tokenizer,
whose documents start with BOS) and a trainer for small vocabularies."""
from __future__ import annotations

from typing import Iterable

from megatron.errors import UserError


class SentencePieceTokenizer:
    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        eos = self.sp.eos_id()
        if eos < 0:  # piece_to_id gives the unknown piece's id for a piece the model lacks: not an end of document
            eos = self.sp.piece_to_id("<|endoftext|>")
            if self.sp.id_to_piece(eos) != "<|endoftext|>":
                raise UserError(f"--tokenizer-model {model_file}: this SentencePiece model has neither an EOS piece nor "
                                f"<|endoftext|>, which separate documents: train it with an EOS (eos_id >= 0)")
        self.eod = eos
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None  # the exported tokenizer's bos_token

    def special_text(self, i: int) -> str:
        """The text transformers gives token ``i`` (decode keeps special tokens): a control piece's own name
        ("<s>", "</s>"), which SentencePiece's decode drops."""
        return self.sp.id_to_piece(int(i)) if self.sp.is_control(int(i)) else self.detokenize([i])

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def detokenize(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def document_prefix(self) -> list[int]:
        """Ids that start every document tokenized for training (tools/preprocess_data.py): none."""
        return []


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron-LM's ``Llama2Tokenizer``: a Llama-2 SentencePiece ``tokenizer.model`` whose training documents
    start with BOS (Megatron-LM's tokenize adds it by default) and end with EOS under ``--append-eod``.
    ``tokenize`` itself adds nothing, so a continuation scored by lm-eval or a prompt's suffix gets no BOS in
    the middle."""

    def __init__(self, model_file: str):
        super().__init__(model_file)
        if self.sp.bos_id() < 0:
            raise UserError(f"--tokenizer-model {model_file}: this SentencePiece model has no BOS piece, which "
                            "Llama2Tokenizer starts documents with: use --tokenizer-type SentencePieceTokenizer")

    def document_prefix(self) -> list[int]:
        return [self.bos]

    def encode_special(self, text: str) -> list[int]:
        """BOS + the text's ids: what the exported transformers tokenizer encodes by default."""
        return [self.bos] + self.tokenize(text)


def train_sentencepiece(inputs: Iterable[str], model_prefix: str, vocab_size: int = 8000,
                        model_type: str = "bpe", max_sentence_length: int = 16384,
                        input_sentence_size: int = 2_000_000) -> str:
    """Train a byte-fallback SentencePiece model on text files; returns the .model path."""
    import sentencepiece as spm

    try:
        spm.SentencePieceTrainer.train(
            input=",".join(inputs), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995,
            max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, normalization_rule_name="identity", num_threads=2, minloglevel=2,
        )
    except (RuntimeError, OSError) as e:  # SentencePiece's C++ checks: "INTERNAL: file.cc(N) [cond] message"
        raise UserError(_training_error(str(e), vocab_size)) from None
    return model_prefix + ".model"


def _training_error(message: str, vocab_size: int) -> str:
    """SentencePiece's failure as one line naming the flag to change."""
    text = " ".join(message.split())
    detail = text.split("] ", 1)[1].strip() if "] " in text else text
    if "vocab_size" in text or "Vocabulary size" in text:
        return f"--vocab-size {vocab_size} does not fit this text ({detail or text}); choose another --vocab-size"
    if "sentences_.empty()" in text:
        return "--input: no sentence to train on (the text is empty or every line is too long); give more text"
    return f"training the SentencePiece model failed ({(detail or text)[:300]}); check --input and --model-prefix"
