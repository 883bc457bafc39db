"""MoE equivalences on one process: the backbone of the MoE implementation."""
import pytest
import torch

from megatron.config.schema import MoEConfig
from megatron.model.moe.capacity import expert_capacity
from megatron.model.moe.dispatch import plan_capacity
from megatron.model.moe.layer import MoELayer
from megatron.model.moe.routing import load_balancing_loss
from megatron.model.transformer import MLP
from tests.moe_oracle import loop_experts, loop_moe_reference

H, F = 16, 32


def make_layer(E=4, seed=0, **kw):
    cfg = MoEConfig(num_experts=[E], **kw)
    torch.manual_seed(seed)
    layer = MoELayer(cfg, H, F, E, layer_number=1, dense_mlp_factory=lambda: MLP(H, F))
    layer.experts.init_weights(seed, 1, 0.2, 0.2)
    torch.nn.init.normal_(layer.router.wg.weight, 0, 0.5)
    return layer


def test_capacity_formula_table():
    # (S, E, cf, min, k) -> C
    table = [((64, 8, 1.0, 4, 1), 8), ((64, 8, 1.0, 4, 2), 16), ((10, 8, 1.0, 4, 1), 4), ((100, 8, 1.25, 0, 1), 16),
             ((2048, 128, 1.0, 4, 1), 16), ((7, 2, 1.0, 0, 1), 4), ((64, 8, 2.0, 4, 2), 32), ((3, 64, 1.0, 4, 1), 4)]
    for args, want in table:
        assert expert_capacity(*args) == want, args


def test_one_expert_equals_dense_mlp():
    layer = make_layer(E=1, min_capacity=0)
    layer.eval()
    dense = MLP(H, F)
    with torch.no_grad():
        dense.fc1.weight.copy_(layer.experts.w1[0].t())
        dense.fc1.bias.copy_(layer.experts.b1[0])
        dense.fc2.weight.copy_(layer.experts.w2[0].t())
        dense.fc2.bias.copy_(layer.experts.b2[0])
    x = torch.randn(2, 12, H)
    y, stats = layer(x)
    torch.testing.assert_close(y, dense(x), rtol=1e-5, atol=1e-6)
    assert stats.dropped.item() == 0


def test_batched_experts_equal_loop_oracle_forward_and_grads():
    layer = make_layer(E=4)
    buf = torch.randn(4, 6, H, requires_grad=True)
    y = layer.experts(buf)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = [p.grad.clone() for p in layer.experts.parameters()]
    bx = buf.grad.clone()
    layer.experts.zero_grad()
    buf.grad = None
    y2 = loop_experts(layer.experts, buf)
    (y2 * g).sum().backward()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bx, buf.grad, rtol=1e-5, atol=1e-5)
    for a, p in zip(grads, layer.experts.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("topk", [1, 2])
def test_grouped_nodrop_equals_loop_oracle(topk):
    layer = make_layer(E=4, topk=topk, token_dropping=False)
    layer.eval()
    x = torch.randn(40, H, requires_grad=True)
    y, stats = layer(x[None])
    ref = loop_moe_reference(layer, x)
    torch.testing.assert_close(y[0], ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    (y[0] * g).sum().backward()
    gx = x.grad.clone()
    gw = layer.experts.w1.grad.clone()
    x.grad = None
    layer.zero_grad()
    (loop_moe_reference(layer, x) * g).sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, layer.experts.w1.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("topk", [1, 2])
def test_nodrop_equals_capacity_mode_when_nothing_overflows(topk):
    capped = make_layer(E=4, topk=topk, train_capacity_factor=100.0, eval_capacity_factor=100.0)
    nodrop = make_layer(E=4, topk=topk, token_dropping=False)
    nodrop.load_state_dict(capped.state_dict())
    x = torch.randn(3, 10, H)
    for mode in ("train", "eval"):
        capped.train(mode == "train")
        nodrop.train(mode == "train")
        torch.manual_seed(7)
        y1, s1 = capped(x)
        torch.manual_seed(7)
        y2, s2 = nodrop(x)
        assert s1.dropped.item() == 0
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s1.aux_loss, s2.aux_loss)


def test_capacity_drops_overflow_and_dropped_tokens_output_zero():
    layer = make_layer(E=2, eval_capacity_factor=0.25, min_capacity=0)
    layer.eval()
    with torch.no_grad():  # route every token to expert 0
        layer.router.wg.weight.zero_()
        layer.router.wg.weight[0].fill_(1.0)
    x = torch.rand(1, 16, H) + 0.1
    y, stats = layer(x)
    C = expert_capacity(16, 2, 0.25, 0, 1)
    assert C == 2
    assert stats.dropped.item() == 16 - C
    # deterministic eval order: the first C tokens by position keep their output
    assert torch.count_nonzero(y[0].abs().sum(-1)) == C
    assert y[0, :C].abs().sum() > 0 and y[0, C:].abs().sum() == 0


def test_random_token_selection_in_training_keeps_random_tokens():
    layer = make_layer(E=2, train_capacity_factor=0.25, min_capacity=0)
    with torch.no_grad():
        layer.router.wg.weight.zero_()
        layer.router.wg.weight[0].fill_(1.0)
    x = torch.rand(1, 64, H) + 0.1
    torch.manual_seed(0)
    y, _ = layer(x)
    kept = (y[0].abs().sum(-1) > 0).nonzero().squeeze(1)
    C = expert_capacity(64, 2, 0.25, 0, 1)
    assert len(kept) == C == 8
    assert kept.tolist() != list(range(C))  # not simply the first tokens


def test_eval_routing_is_deterministic():
    layer = make_layer(E=4, topk=2, eval_capacity_factor=0.5, noisy_gate_policy="Jitter")
    layer.eval()
    x = torch.randn(2, 20, H)
    torch.manual_seed(1)
    y1, _ = layer(x)
    torch.manual_seed(2)
    y2, _ = layer(x)
    assert torch.equal(y1, y2)


def test_aux_loss_is_one_when_balanced_and_its_gradient():
    E, S = 4, 8
    probs = torch.full((S, E), 1.0 / E, requires_grad=True)
    first = torch.arange(S) % E
    loss = load_balancing_loss(probs, first)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    # d/dp[s,e] = E * ce_e / S with ce_e = 1/E -> 1/S
    torch.testing.assert_close(probs.grad, torch.full((S, E), 1.0 / S))
    # imbalanced routing costs more
    collapsed = torch.softmax(torch.tensor([[5.0, 0.0, 0.0, 0.0]]).repeat(S, 1), -1)
    assert load_balancing_loss(collapsed, torch.zeros(S, dtype=torch.long)).item() > 3.5


def test_top2_weights_renormalised_after_dropping():
    idx = torch.tensor([[0, 1], [0, 1], [1, 0]])
    w = torch.tensor([[0.6, 0.3], [0.5, 0.4], [0.7, 0.2]])
    plan = plan_capacity(idx, w, 2, capacity=2, renormalize=True)
    # first choices go first: expert 0 gets tokens 0, 1 (tier 0); expert 1 gets token 2 (tier 0) then token 0 (tier 1)
    per_token = torch.zeros(3).index_add(0, plan.token, plan.weight)
    torch.testing.assert_close(per_token, torch.ones(3))
    assert plan.dropped.item() == 2  # token 1's 2nd choice and token 2's 2nd choice


def test_residual_moe_with_mix_forced_to_moe_branch_equals_standard():
    std = make_layer(E=4)
    res = make_layer(E=4, mlp_type="residual")
    res.router.load_state_dict(std.router.state_dict())
    res.experts.load_state_dict(std.experts.state_dict())
    with torch.no_grad():
        res.coefficient.weight.zero_()
        res.coefficient.bias.copy_(torch.tensor([50.0, -50.0]))  # softmax -> (1, 0)
    std.eval()
    res.eval()
    x = torch.randn(2, 9, H)
    torch.testing.assert_close(res(x)[0], std(x)[0], rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # forced to the dense branch: equals the residual MLP
        res.coefficient.bias.copy_(torch.tensor([-50.0, 50.0]))
    torch.testing.assert_close(res(x)[0], res.residual_mlp(x), rtol=1e-5, atol=1e-6)


def test_padding_mask_keeps_padding_out_of_routing():
    layer = make_layer(E=4, eval_capacity_factor=1.0, min_capacity=0)
    layer.eval()
    x = torch.randn(1, 12, H)
    y_real, s_real = layer(x[:, :8])
    padded = torch.cat([x[:, :8], torch.zeros(1, 4, H)], dim=1)
    mask = torch.tensor([[True] * 8 + [False] * 4])
    y_pad, s_pad = layer(padded, token_mask=mask)
    torch.testing.assert_close(y_pad[:, :8], y_real)
    assert torch.equal(s_pad.counts, s_real.counts)


def test_experts_initialised_independently_and_layout_free():
    layer = make_layer(E=4)
    w = layer.experts.w1.detach()
    assert not torch.allclose(w[0], w[1])
    # the same global expert gets the same weights when it sits on another rank
    from megatron.model.moe.experts import StackedExperts
    half = StackedExperts(2, H, F, first_expert=2)
    half.init_weights(0, 1, 0.2, 0.2)
    torch.testing.assert_close(half.w1[0], layer.experts.w1[2])


@pytest.mark.parametrize("kernel", ["grouped_mm", "padded"])
def test_grouped_kernels_equal_loop_oracle(kernel):
    layer = make_layer(E=4)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, H, requires_grad=True)
    y = layer.experts.forward_grouped(x, counts, kernel=kernel)
    starts = [0, 3, 3, 8, 10]
    ex = layer.experts
    ref = torch.cat([torch.nn.functional.gelu(x[starts[e]:starts[e + 1]] @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]
                     for e in range(4)])
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    gy = torch.autograd.grad((y * g).sum(), [x, ex.w1, ex.b2])
    gr = torch.autograd.grad((ref * g).sum(), [x, ex.w1, ex.b2])
    for a, b in zip(gy, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_one_expert_moe_model_trains_like_the_dense_model():
    """--num-experts 1 --moe-force-layer: a one-expert MoE layer in every MoE position. With the dense model's
    MLP weights copied into the expert, three AdamW steps give the same LM losses and gradient norms."""
    from megatron.config.schema import ModelConfig, OptimizerConfig
    from megatron.model.gpt_model import GPTModel
    from megatron.optim.build import build_optimizer
    from megatron.parallel.grad_sync import global_grad_norm
    from megatron.parallel.state import ParallelState
    from megatron.training.arguments import parse_args
    from tests.runs import mock_args

    flags = parse_args(mock_args(["--num-experts", "1", "--moe-force-layer", "--train-iters", "1"]))
    assert flags.model.moe.force_layer and flags.model.moe.enabled
    shape = dict(num_layers=4, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=64,
                 hidden_dropout=0.0, attention_dropout=0.0)
    dense = GPTModel(ModelConfig(**shape))
    moe = GPTModel(ModelConfig(**shape, moe=MoEConfig(num_experts=[1], force_layer=True)))
    assert len(moe.moe_layers()) == 2 and len(dense.moe_layers()) == 0
    dense.init_weights(3)
    moe.init_weights(4)
    with torch.no_grad():  # the dense model's weights everywhere, the MLP into expert 0
        sd = moe.state_dict()
        for name, t in dense.state_dict().items():
            if name in sd:
                sd[name].copy_(t)
        for i in (1, 3):
            mlp, ex = dense.layers[i].mlp.mlp, moe.layers[i].mlp.experts
            ex.w1[0].copy_(mlp.fc1.weight.t()), ex.b1[0].copy_(mlp.fc1.bias)
            ex.w2[0].copy_(mlp.fc2.weight.t()), ex.b2[0].copy_(mlp.fc2.bias)
    ps = ParallelState()
    opt_cfg = OptimizerConfig(lr=1e-2, weight_decay=0.1)
    opts = [build_optimizer(m, opt_cfg, torch.device("cpu")) for m in (dense, moe)]
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        tokens = torch.randint(0, 64, (2, 9), generator=g)
        out = []
        for model, opt in zip((dense, moe), opts):
            opt.zero_grad(set_to_none=True)
            per_token, stats = model(tokens[:, :-1], tokens[:, 1:])
            lm = per_token.mean()
            aux = sum((s.aux_loss for s in stats), torch.zeros(()))  # 1.0 per one-expert layer, no gradient
            (lm + 0.1 * aux).backward()
            out.append((lm.item(), global_grad_norm(model, ps)))
            opt.step()
        (l_dense, n_dense), (l_moe, n_moe) = out
        assert l_moe == pytest.approx(l_dense, rel=1e-5) and n_moe == pytest.approx(n_dense, rel=1e-5), step
        assert n_dense > 0.1
