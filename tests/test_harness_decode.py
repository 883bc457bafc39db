"""lm-eval's tok_decode on ids of the padded vocabulary (GPT-2's 50257 tokens padded to 50304 rows)."""
import pytest
import torch

from megatron.config.schema import ModelConfig, pad_vocab_size
from megatron.inference.load import LoadedModel
from megatron.model.gpt_model import GPTModel
from megatron.tokenizer import build_tokenizer
from tests.conftest import require_shared, shared_path


@pytest.mark.parametrize("impl", ["fast", "python"])
def test_tok_decode_skips_padded_vocabulary_ids(monkeypatch, impl):
    pytest.importorskip("lm_eval")
    from megatron.evaluation.harness_model import MegatronMoELM

    if impl == "python":  # the pure-Python BPE (its decoder is a dict: a padded id was a KeyError)
        monkeypatch.setenv("MEGATRON_PYTHON_BPE", "1")
    vocab = require_shared("gpt2", "gpt2-vocab.json")
    tok = build_tokenizer("GPT2BPETokenizer", vocab, shared_path("gpt2", "gpt2-merges.txt"))
    cfg = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, seq_length=8,
                      vocab_size=pad_vocab_size(tok.vocab_size, 128, 1))
    assert cfg.vocab_size > tok.vocab_size  # padded rows exist
    model = GPTModel(cfg)
    model.init_weights(0)
    lm = MegatronMoELM(loaded=LoadedModel(model, cfg, tok, 0, {}, ""), device="cpu")
    ids = tok.tokenize("Hello world")
    padded = [tok.vocab_size, cfg.vocab_size - 1]
    assert lm.tok_decode(ids[:1] + padded + ids[1:]) == "Hello world"
    assert lm.tok_decode(torch.tensor(padded)) == ""
