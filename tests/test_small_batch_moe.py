"""The small-batch MoE path (inference with a few tokens) equals the regular dispatched path.

The regular path is what the same layer computes with autograd on (``torch.enable_grad()``); the
small-batch path is taken under ``torch.no_grad()`` in eval mode (checked through the type of the
statistics it returns).
"""
import pytest
import torch

from megatron.config.schema import ModelConfig, MoEConfig
from megatron.model.gpt_model import GPTModel
from megatron.model.moe.layer import MoELayer
from megatron.model.moe.metrics import MoEStats
from megatron.model.moe.small_batch import MAX_ASSIGNMENTS, LazyMoEStats, small_batch_applies
from megatron.model.transformer import MLP

H, F = 16, 32


def make_layer(E=8, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(num_experts=[E], **kw), H, F, E, layer_number=3, dense_mlp_factory=lambda: MLP(H, F))
    layer.experts.init_weights(seed, 3, 0.2, 0.2)
    with torch.no_grad():
        torch.nn.init.normal_(layer.router.wg.weight, 0, 0.5)
        layer.experts.b1.normal_(0, 0.1)
        layer.experts.b2.normal_(0, 0.1)
    return layer.eval()


def both_paths(layer, x, token_mask=None):
    with torch.no_grad():
        fast = layer(x, token_mask)
    with torch.enable_grad():
        regular = layer(x, token_mask)
    return fast, (regular[0].detach(), regular[1])


def assert_same(fast, regular, small=True):
    (y1, s1), (y2, s2) = fast, regular
    assert isinstance(s1, LazyMoEStats) == small and not isinstance(s2, LazyMoEStats)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    for name in ("aux_loss", "z_loss", "counts", "dropped", "assignments"):
        torch.testing.assert_close(getattr(s1, name).detach(), getattr(s2, name).detach(), msg=name)
    assert s1.layer == s2.layer


CASES = {
    "top1 no-drop": dict(topk=1, token_dropping=False),
    "top2 no-drop": dict(topk=2, token_dropping=False),
    "top3 no-drop": dict(topk=3, token_dropping=False),
    "top1 capacity": dict(topk=1, eval_capacity_factor=1.0, min_capacity=4),
    "top2 capacity": dict(topk=2, eval_capacity_factor=1.0, min_capacity=4),
    "residual top1": dict(topk=1, token_dropping=False, mlp_type="residual"),
    "residual top2 capacity": dict(topk=2, mlp_type="residual", eval_capacity_factor=2.0),
    "aux_free top2": dict(topk=2, token_dropping=False, router_type="aux_free"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_small_batch_equals_regular_path(case, tokens):
    layer = make_layer(**CASES[case])
    if case.startswith("aux_free"):
        with torch.no_grad():
            layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))  # the bias changes the choice
    torch.manual_seed(tokens)
    x = torch.randn(tokens, 1, H)  # one decode step of `tokens` rows
    fast, regular = both_paths(layer, x)
    assert regular[1].dropped.item() == 0
    assert_same(fast, regular)


def test_padding_mask_and_prefill_sized_calls():
    layer = make_layer(topk=2, token_dropping=False)
    x = torch.randn(2, 3, H)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    assert_same(*both_paths(layer, x, mask))
    big = torch.randn(1, MAX_ASSIGNMENTS // 2 + 1, H)  # over the limit at top-2: the regular path
    assert_same(*both_paths(layer, big), small=False)


def test_capacity_overflow_falls_back_to_the_dropping_path():
    layer = make_layer(E=4, topk=1, eval_capacity_factor=1.0, min_capacity=1)
    with torch.no_grad():  # every token to expert 0: capacity ceil(6 / 4) = 2 < 6
        layer.router.wg.weight.zero_()
        layer.router.wg.weight[0].fill_(1.0)
    x = torch.rand(6, 1, H) + 0.1
    (y1, s1), (y2, s2) = both_paths(layer, x)
    assert type(s1) is MoEStats and s1.dropped.item() == 4 == s2.dropped.item()
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(y1.abs().sum(-1)) == 2


def test_off_in_training_with_grad_and_under_expert_parallelism():
    layer = make_layer()
    with torch.enable_grad():
        assert not small_batch_applies(layer, 1)
    with torch.no_grad():
        assert small_batch_applies(layer, 1) and small_batch_applies(layer, MAX_ASSIGNMENTS)
        assert not small_batch_applies(layer, MAX_ASSIGNMENTS + 1)
        layer.small_batch = False
        assert not small_batch_applies(layer, 1)
        layer.small_batch = True
        layer.train()
        assert not small_batch_applies(layer, 1)
        layer.eval()
        ep = MoELayer(MoEConfig(num_experts=[8]), H, F, 8, layer_number=1, ep_rank=1, ep_size=2).eval()
        assert ep.experts.num_local == 4 and not small_batch_applies(ep, 1)  # half the experts are elsewhere

        from megatron.parallel.expert_parallel import AllToAllDispatcher, TPSplit

        # tensor-parallel peers route the same tokens: every TP rank takes the same path, so it stays on
        layer.set_dispatcher(AllToAllDispatcher(None, 1, 8, torch.device("cpu"), tp=TPSplit(None, 0, 2)))
        assert small_batch_applies(layer, 1)

        layer.dispatcher.peers_route_other_tokens = True  # as under expert parallelism: off
        assert not small_batch_applies(layer, 1)


@pytest.mark.parametrize("mlp_type", ["standard", "residual"])
def test_model_decode_logits_equal_with_kv_cache(mlp_type):
    """A whole PR-MoE model (pyramid: 4 then 8 experts), prefill then decode steps of 3 rows."""
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=32,
                      hidden_dropout=0.0, attention_dropout=0.0,
                      moe=MoEConfig(num_experts=[4, 8], topk=2, mlp_type=mlp_type, token_dropping=False))
    model = GPTModel(cfg)
    model.init_weights(3)
    model.eval()
    tokens = torch.randint(0, 64, (3, 5))
    outs = []
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            cache = model.new_cache()
            logits, _ = model.decode(tokens, cache, all_logits=True)
            steps = [logits[:, -1]]
            for t in range(4):
                nxt = steps[-1].argmax(-1)[:, None]
                logits, stats = model.decode(nxt, cache)  # positions count on from the cache: 5 + t
                steps.append(logits[:, -1])
            assert all(isinstance(s, LazyMoEStats) != grad for s in stats)
            outs.append(torch.stack(steps).detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk", [1, 2])
def test_bf16_autocast_follows_the_dispatched_path(topk):
    layer = make_layer(topk=topk, token_dropping=False, mlp_type="residual")
    x = torch.randn(4, 1, H)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, regular = both_paths(layer, x)
    assert isinstance(fast[1], LazyMoEStats) and fast[0].dtype == regular[0].dtype
    torch.testing.assert_close(fast[0], regular[0], rtol=2e-2, atol=2e-2)
