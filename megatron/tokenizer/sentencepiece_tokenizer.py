"""SentencePiece tokenizer (Megatron's SentencePieceTokenizer) and a trainer for small vocabularies."""
from __future__ import annotations

from typing import Iterable


class SentencePieceTokenizer:
    def __init__(self, model_file: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        eos = self.sp.eos_id()
        self.eod = eos if eos >= 0 else self.sp.piece_to_id("<|endoftext|>")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def tokenize(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def detokenize(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def train_sentencepiece(inputs: Iterable[str], model_prefix: str, vocab_size: int = 8000,
                        model_type: str = "bpe", max_sentence_length: int = 16384,
                        input_sentence_size: int = 2_000_000) -> str:
    """Train a byte-fallback SentencePiece model on text files; returns the .model path."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=",".join(inputs), model_prefix=model_prefix, vocab_size=vocab_size, model_type=model_type,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995,
        max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", num_threads=2, minloglevel=2,
    )
    return model_prefix + ".model"
