"""Serving's prefill computes only the last position's logits unless a request scores its prompt (echo):
same tokens and log-probs as one-prompt generation either way, for a dense and a Residual-MoE model."""
import pytest
import torch

from megatron.config.schema import ModelConfig, MoEConfig
from megatron.inference.generate import generate
from megatron.inference.serving.batch import BatchState
from megatron.inference.serving.engine import Engine, Request, SamplingParams
from megatron.model.gpt_model import GPTModel

PROMPTS = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [20], [9, 8, 7, 6]]


def tiny(moe: bool) -> GPTModel:
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=64,
                      hidden_dropout=0.0, attention_dropout=0.0,
                      moe=MoEConfig(num_experts=[4] if moe else [1], topk=2, mlp_type="residual", token_dropping=False))
    m = GPTModel(cfg)
    m.init_weights(5)
    return m.eval()


@pytest.mark.parametrize("moe", [False, True])
def test_prefill_last_logits_equal_the_full_forward(moe):
    model = tiny(moe)
    tokens = torch.tensor([[0, 0, 3, 4, 5], [7, 8, 9, 10, 11]])
    valid = tokens != 0
    last = BatchState(model).prefill(tokens, valid)
    full = BatchState(model).prefill(tokens, valid, all_logits=True)
    assert last.shape == (2, 1, 64) and full.shape == (2, 5, 64)
    torch.testing.assert_close(last[:, 0], full[:, -1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("moe", [False, True])
def test_engine_tokens_equal_generate_with_and_without_echo(moe):
    model = tiny(moe)
    engine = Engine(model, eod=-1, max_length=64, detokenize=str, max_batch_size=4)
    reqs = [Request(p, SamplingParams(max_new_tokens=6, logprobs=1, echo=i == 3)) for i, p in enumerate(PROMPTS)]
    for r in reqs[:2]:  # admitted together without echo: last-position logits only
        engine.submit(r)
    engine.step()
    for r in reqs[2:]:  # one of these scores its prompt: that prefill computes every position's logits
        engine.submit(r)
    while engine.waiting or engine.running:
        engine.step()
    for r in reqs:
        assert r.tokens == generate(model, r.prompt, 6)
    r = reqs[3]
    with torch.no_grad():
        logp = torch.log_softmax(model.logits(torch.tensor([r.prompt + r.tokens]))[0][0].float(), -1)  # [T, V]
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(r.prompt)
    direct = [float(logp[j, t]) for j, t in enumerate(r.prompt[1:] + r.tokens)]
    assert max(abs(a - b) for a, b in zip(r.prompt_logprobs[1:] + r.token_logprobs, direct)) < 1e-4
