import os

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


def _python_and_fast():
    from megatron.tokenizer.fast_gpt2_bpe import FastGPT2BPETokenizer
    from megatron.tokenizer.gpt2_bpe import GPT2BPETokenizer

    pytest.importorskip("tiktoken")
    files = (require_shared("gpt2", "gpt2-vocab.json"), require_shared("gpt2", "gpt2-merges.txt"))
    return GPT2BPETokenizer(*files), FastGPT2BPETokenizer(*files)


@pytest.mark.parametrize("corpus", [("wikitext-2-raw", "valid.txt"), ("gutenberg", "valid.txt")])
def test_fast_gpt2_gives_the_python_ids(corpus):
    python, fast = _python_and_fast()
    with open(require_shared("corpus", *corpus), encoding="utf-8") as f:
        text = f.read(150_000)
    text += " <|endoftext|> Ünïcödé — 東京 🙂 don't  double  spaces \t\n\n\r\n  end  "
    assert fast.tokenize(text) == python.tokenize(text)
    docs = text.split("\n\n")[:300]
    assert fast.tokenize_batch(docs) == [python.tokenize(d) for d in docs]
    assert fast.eod == python.eod and fast.vocab_size == python.vocab_size
    ids = fast.tokenize(text)
    assert fast.detokenize(ids) == python.detokenize(ids) == text


def test_gpt2_bpe_type_uses_the_fast_one_unless_told(monkeypatch):
    from megatron.tokenizer.fast_gpt2_bpe import FastGPT2BPETokenizer
    from megatron.tokenizer.gpt2_bpe import GPT2BPETokenizer

    pytest.importorskip("tiktoken")
    assert isinstance(gpt2(), FastGPT2BPETokenizer)
    monkeypatch.setenv("MEGATRON_PYTHON_BPE", "1")
    assert isinstance(gpt2(), GPT2BPETokenizer)


def test_huggingface_tokenizer_directory(tmp_path):
    import json

    tokenizers = pytest.importorskip("tokenizers")
    python, _ = _python_and_fast()
    hf = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(require_shared("gpt2", "gpt2-vocab.json"),
                                                             require_shared("gpt2", "gpt2-merges.txt")))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = tokenizers.decoders.ByteLevel()
    hf.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    text = "Hello world, the HuggingFaceTokenizer reads tokenizer.json."
    assert tok.tokenize(text) == python.tokenize(text) and tok.eod == 50256 and tok.vocab_size == 50257
    with pytest.raises(UserError, match="--tokenizer-model .*no tokenizer.json"):
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path.parent))
    with pytest.raises(UserError, match="--tokenizer-type 'WordPiece' is unknown: use one of GPT2BPETokenizer"):
        build_tokenizer("WordPiece")


def test_registry_rebuilds_a_stored_config(tmp_path):
    from megatron.tokenizer import registry

    stored = {"data": {"tokenizer_type": "NullTokenizer"}, "model": {"vocab_size": 64}}
    assert registry.from_stored_config(stored).eod == 63
    with pytest.raises(UserError, match="--vocab-file .*pass --vocab-file with its location"):
        registry.from_stored_config({"data": {"tokenizer_type": "GPT2BPETokenizer", "vocab_file": str(tmp_path / "v"),
                                              "merge_file": str(tmp_path / "m")}, "model": {"vocab_size": 64}})
    with pytest.raises(UserError, match="GPT2BPETokenizer needs --merge-file"):
        registry.check_data_config("GPT2BPETokenizer", vocab_file="v.json")


def test_registry_facts_drive_the_trainer_dry_run_and_export(tmp_path):
    from types import SimpleNamespace

    from megatron.hf.tokenizer_files import write_tokenizer_files
    from megatron.tokenizer import registry

    data = lambda kind, **files: SimpleNamespace(tokenizer_type=kind, vocab_file=None, merge_file=None,  # noqa: E731
                                                 tokenizer_model=None, **files)
    assert registry.build_for_data_config(data("NullTokenizer"), vocab_size=64).eod == 63
    with pytest.raises(UserError, match="NullTokenizer needs --vocab-size"):
        registry.build_for_data_config(data("NullTokenizer"), vocab_size=0)
    assert registry.needs_vocab_size("NullTokenizer") and not registry.needs_vocab_size("GPT2BPETokenizer")
    assert registry.dry_run_vocab_size(data(None)) == registry.dry_run_vocab_size(data("GPT2BPETokenizer")) == 50257
    for kind in ("NullTokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "WordPiece"):
        assert registry.dry_run_vocab_size(data(kind)) is None  # no files to read the size from
    assert write_tokenizer_files({"tokenizer_type": "NullTokenizer"}, str(tmp_path), 64).startswith("none (")
    assert os.listdir(tmp_path) == []
    assert all(s.hf_files or s.hf_note for s in registry.REGISTRY.values())
