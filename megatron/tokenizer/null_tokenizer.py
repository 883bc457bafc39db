"""The tokenizer of synthetic data: ids are the tokens themselves."""
from __future__ import annotations

from megatron.errors import UserError


class NullTokenizer:
    """Ids are the tokens themselves (synthetic data); the last id is end-of-document."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        """The whitespace-separated numbers of ``text``; a word that is not a number, or an id outside
        ``[0, vocab_size)``, is a :class:`UserError` naming it (it would index past the embedding)."""
        words = text.split()
        try:
            ids = [int(t) for t in words]
        except ValueError:
            bad = next(w for w in words if not _is_int(w))
            raise UserError(f"{_show(bad)} is not a token id: the NullTokenizer reads whitespace-separated "
                            f"numbers; use a text tokenizer (--tokenizer-type) for words") from None
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise UserError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size}) of the NullTokenizer; "
                            f"raise --vocab-size or fix the id")
        return ids

    def detokenize(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


def _is_int(word: str) -> bool:
    try:
        int(word)
        return True
    except ValueError:
        return False


def _show(word: str) -> str:
    """A word for an error line: quoted, escaped (no control character or lone surrogate), at most 40 characters."""
    return ascii(word[:40]) + ("..." if len(word) > 40 else "")
