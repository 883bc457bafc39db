import pytest

from megatron.errors import UserError
from megatron.tokenizer import build_tokenizer
from tests.conftest import require_shared


def gpt2():
    vocab = require_shared("gpt2", "gpt2-vocab.json")
    merges = require_shared("gpt2", "gpt2-merges.txt")
    return build_tokenizer("GPT2BPETokenizer", vocab, merges)


def test_gpt2_reference_ids():
    tok = gpt2()
    assert tok.tokenize("Hello world") == [15496, 995]
    assert tok.tokenize(" the") == [262]
    assert tok.eod == 50256 and tok.vocab_size == 50257


def test_gpt2_roundtrip_wikitext_valid_exact():
    tok = gpt2()
    text = open(require_shared("corpus", "wikitext-2-raw", "valid.txt"), encoding="utf-8").read()
    ids = tok.tokenize(text)
    assert len(ids) == 249_887  # the count published with the data
    assert tok.detokenize(ids) == text


def test_sentencepiece_train_and_roundtrip(tmp_path):
    from megatron.tokenizer.sentencepiece_tokenizer import train_sentencepiece

    src = tmp_path / "t.txt"
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "theta", "kappa", "lambda", "omega"]
    src.write_text("\n".join(" ".join(words[(i * j) % 10] for j in range(12)) for i in range(400)))
    model = train_sentencepiece([str(src)], str(tmp_path / "sp"), vocab_size=300)
    tok = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    text = "alpha beta gamma, Ωmega 123!"
    assert tok.detokenize(tok.tokenize(text)) == text  # byte fallback keeps unseen characters
    assert tok.eod == 2 and tok.vocab_size == 300


def test_missing_tokenizer_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--vocab-file"):
        build_tokenizer("GPT2BPETokenizer", str(tmp_path / "nope.json"), str(tmp_path / "m.txt"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="--tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", tokenizer_model=str(bad))
