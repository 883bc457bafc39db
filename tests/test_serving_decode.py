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


# ---- issue 28: one request fails only itself


def test_sampler_is_safe_for_tiny_temperature_and_top_p():
    from megatron.inference.generate import sample_token

    logits = torch.tensor([1.0, 3.0, 2.5, -1.0])
    for t in (1e-40, 1e-300, 5e-324, 1e-6):  # below 1e-5: greedy (logits / 1e-40 overflow to inf)
        assert sample_token(logits, temperature=t, generator=torch.Generator().manual_seed(0)) == 1
    for top_p in (1e-300, 1e-45, 1e-8):  # below float32's smallest value it compared as 0 and dropped every token
        for seed in range(5):
            assert sample_token(logits, 1.0, top_p=top_p, generator=torch.Generator().manual_seed(seed)) == 1


def test_a_failing_request_ends_alone_and_the_batch_goes_on():
    """Requests that raise while being served (sampling a row, scoring a prompt, a prefill forward) get
    finish_reason "error"; the greedy requests sharing their batch give exactly what they give alone."""
    model = tiny(True)
    engine = Engine(model, eod=-1, max_length=64, detokenize=str, max_batch_size=8)
    good = [Request(p, SamplingParams(max_new_tokens=8, logprobs=1)) for p in PROMPTS]
    poison = [
        Request([4, 5], SamplingParams(max_new_tokens=8, logprobs=10**6)),  # raises at its first token (top-k > V)
        Request([6, 7, 8], SamplingParams(max_new_tokens=8, logprobs=10**6, echo=True)),  # raises scoring its prompt
        Request([3, 64], SamplingParams(max_new_tokens=8)),  # out of the vocabulary: its prefill forward raises
    ]
    tiny_t = Request([9, 9], SamplingParams(max_new_tokens=8, temperature=1e-40, top_p=1e-300, seed=1))
    for r in good[:2]:  # two rows decoding when the poison arrives
        engine.submit(r)
    engine.step(), engine.step()
    for r in poison + good[2:] + [tiny_t]:
        engine.submit(r)
    while engine.waiting or engine.running:
        engine.step()
    for r in poison:
        assert r.finish_reason == "error" and r.error and "\n" not in r.error, (r.prompt, r.error)
    for r in good:
        assert r.finish_reason == "length" and r.tokens == generate(model, r.prompt, 8), r.prompt
    assert tiny_t.finish_reason == "length" and tiny_t.tokens == generate(model, [9, 9], 8)  # greedy
    assert engine.state.rows == 0
    # and the engine serves the next request
    nxt = engine.submit(Request([1, 2], SamplingParams(max_new_tokens=3)))
    while engine.waiting or engine.running:
        engine.step()
    assert nxt.tokens == generate(model, [1, 2], 3)
