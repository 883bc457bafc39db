"""Routing semantics against DeepSpeed's gates: drop orders, top-k loss, noise policies, loss terms,
the aux-loss-free router, precision per kernel path and the per-forward load statistics."""
from types import SimpleNamespace

import pytest
import torch

from megatron.config.schema import MoEConfig
from megatron.model.gpt_model import DistillOutput, LossOutput
from megatron.model.moe.capacity import expert_capacity
from megatron.model.moe.dispatch import plan_capacity
from megatron.model.moe.layer import MoELayer
from megatron.model.moe.metrics import MoEStats, accumulate, summarize
from megatron.model.moe.routers import AuxLossFreeRouter
from megatron.model.moe.routing import topk_balancing_loss
from megatron.model.transformer import MLP
from tests.dist_utils import run_distributed

H, F = 16, 32


def make_layer(E=4, seed=0, **kw):
    torch.manual_seed(seed)
    layer = MoELayer(MoEConfig(num_experts=[E], **kw), H, F, E, layer_number=1, dense_mlp_factory=lambda: MLP(H, F))
    layer.experts.init_weights(seed, 1, 0.2, 0.2)
    torch.nn.init.normal_(layer.router.wg.weight, 0, 0.5)
    return layer


def route_all_to(layer, experts):
    """Gate that sends every (positive) token's choices to ``experts``, best first."""
    with torch.no_grad():
        layer.router.wg.weight.zero_()
        for rank, e in enumerate(experts):
            layer.router.wg.weight[e].fill_(1.0 / (rank + 1))


def kept_tokens(y):
    return (y[0].abs().sum(-1) > 0).nonzero().squeeze(1).tolist()


def test_top2_keeps_position_order_in_training_like_deepspeed():
    layer = make_layer(E=4, topk=2, train_capacity_factor=0.25, min_capacity=0,
                       top2_2nd_expert_sampling=False)
    route_all_to(layer, [0, 1])
    x = torch.rand(1, 32, H) + 0.1
    C = expert_capacity(32, 4, 0.25, 0, 2)
    for seed in (0, 1):
        torch.manual_seed(seed)
        y, stats = layer(x)  # training mode
        assert kept_tokens(y) == list(range(C))  # expert 0 and 1 both keep the first C positions
        assert stats.dropped.item() == 2 * (32 - C)


@pytest.mark.parametrize("use_rts", [True, False])
def test_top1_random_token_selection_follows_use_rts(use_rts):
    layer = make_layer(E=2, train_capacity_factor=0.25, min_capacity=0, use_rts=use_rts)
    route_all_to(layer, [0])
    torch.manual_seed(0)
    kept = kept_tokens(layer(torch.rand(1, 64, H) + 0.1)[0])
    assert len(kept) == 8
    assert (kept != list(range(8))) == use_rts


def test_topk_3_loss_counts_every_choice_and_balanced_is_one():
    S, E, k = 12, 6, 3
    probs = torch.full((S, E), 1.0 / E)
    idx = torch.stack([(torch.arange(S) + j) % E for j in range(k)], 1)  # every expert chosen S*k/E times
    assert topk_balancing_loss(probs, idx).item() == pytest.approx(1.0)
    skew = torch.softmax(torch.randn(S, E, generator=torch.Generator().manual_seed(0)), -1)
    idx = torch.topk(skew, k, -1).indices
    me = skew.mean(0)
    ce = torch.zeros(E).index_add(0, idx.reshape(-1), torch.ones(S * k)) / S
    assert topk_balancing_loss(skew, idx).item() == pytest.approx(float((me * ce).mean() * E * E / k))
    layer = make_layer(E=6, topk=3)
    x = torch.randn(S, H)
    r = layer.router(x)
    assert r.aux_loss.item() == pytest.approx(topk_balancing_loss(r.probs, r.indices).item())
    r = layer.router(x.detach())
    assert r.aux_loss.item() != pytest.approx(6 * float((r.probs.detach().mean(0) * torch.bincount(r.indices[:, 0], minlength=6) / S).sum()))


def test_topk_3_drops_by_gate_probability():
    layer = make_layer(E=4, topk=3, train_capacity_factor=0.5, min_capacity=0)
    layer.eval()
    x = torch.randn(16, H)
    r = layer.router(x)
    prio = layer.router.drop_priority(r)
    C = expert_capacity(16, 4, 0.5, 0, 3)
    plan = plan_capacity(r.indices, r.weights, 4, C, prio)
    for e in range(4):  # each expert keeps its C most probable assignments
        chosen = (r.indices == e).any(1).nonzero().squeeze(1)
        probs = r.probs[chosen, e]
        want = set(chosen[torch.argsort(probs, descending=True)[:C]].tolist())
        got = set(plan.token[(plan.slot // C) == e].tolist())
        assert got == want


def _kept_per_expert(layer, r, C):
    plan = plan_capacity(r.indices, r.weights, layer.num_experts, C, layer.router.drop_priority(r))
    return {e: set(plan.token[(plan.slot // C) == e].tolist()) for e in range(layer.num_experts)}


@pytest.mark.parametrize("topk", [1, 2])
def test_drop_policy_probs_keeps_the_most_probable(topk):
    layer = make_layer(E=4, topk=topk, token_drop_policy="probs")  # training mode: overrides random selection
    r = layer.router(torch.randn(32, H))
    C = 3
    for e, got in _kept_per_expert(layer, r, C).items():
        tok, tier = (r.indices == e).nonzero(as_tuple=True)
        want = tok[torch.argsort(r.weights[tok, tier], descending=True)[:C]]
        assert got == set(want.tolist()) and len(got) == min(C, tok.numel())


@pytest.mark.parametrize("topk", [1, 2])
def test_drop_policy_position_keeps_the_earliest_tokens(topk):
    layer = make_layer(E=4, topk=topk, token_drop_policy="position")
    r = layer.router(torch.randn(32, H))
    C = 3
    kept = _kept_per_expert(layer, r, C)
    for e, got in kept.items():  # token-major: a token's second choice comes before a later token's first
        assert got == set(sorted(set((r.indices == e).nonzero(as_tuple=True)[0].tolist()))[:C])
    if topk == 2:  # differs from DeepSpeed's order (all first choices before any second choice)
        ds = make_layer(E=4, topk=2)
        ds.eval()
        plan = plan_capacity(r.indices, r.weights, 4, C, ds.router.drop_priority(r))
        assert any(set(plan.token[(plan.slot // C) == e].tolist()) != kept[e] for e in range(4))


@pytest.mark.parametrize("policy", ["Jitter", "RSample"])
def test_noise_policies_act_in_training_only(policy):
    layer = make_layer(E=4, noisy_gate_policy=policy, token_dropping=False)
    with torch.no_grad():
        layer.router.wg.weight.mul_(0.1)  # close logits, so sampling changes choices
    x = torch.randn(256, H)
    clean = layer.router.wg(x).softmax(-1)
    torch.manual_seed(0)
    noisy = layer.router(x)
    if policy == "Jitter":  # the gate input is scaled by U(0.99, 1.01)
        diff = (noisy.probs - clean).abs().max().item()
        assert 1e-5 < diff < 0.05
    else:  # Gumbel-sampled first choice
        assert (noisy.indices[:, 0] != clean.argmax(-1)).sum() > 10
    layer.eval()
    r = layer.router(x)
    torch.testing.assert_close(r.probs, clean)
    assert torch.equal(r.indices[:, 0], clean.argmax(-1))


def _loss_cfg(**moe):
    return SimpleNamespace(model=SimpleNamespace(moe=SimpleNamespace(**moe)),
                           kd=SimpleNamespace(alpha_ce=0.3, beta_ce=2.0))


def _stats(aux, z):
    return MoEStats(layer=1, aux_loss=torch.tensor(aux), z_loss=torch.tensor(z), counts=torch.ones(2),
                    dropped=torch.tensor(0.0), assignments=torch.tensor(2.0))


def test_loss_terms_are_weighted_by_their_own_coefficients():
    import pretrain_gpt_moe

    per_token, mask = torch.full((1, 4), 2.0), torch.ones(1, 4)
    stats = [_stats(1.5, 7.0), _stats(2.5, 9.0)]
    cfg = _loss_cfg(loss_coeff=0.1, z_loss_coeff=0.01)
    out = pretrain_gpt_moe.loss_func(mask, cfg, LossOutput(per_token, stats))
    loss, logs = out.loss, out.logs
    assert logs["moe loss"].item() == pytest.approx(0.1 * 4.0 + 0.01 * 16.0)
    assert loss.item() == pytest.approx(2.0 + 0.1 * 4.0 + 0.01 * 16.0)
    kd = torch.full((1, 4), 5.0)
    out = pretrain_gpt_moe.loss_func(mask, _loss_cfg(loss_coeff=0.0, z_loss_coeff=0.0), DistillOutput(per_token, stats, kd))
    loss, logs = out.loss, out.logs
    assert logs["kd loss"].item() == pytest.approx(2.0 * 5.0) and logs["lm loss"].item() == pytest.approx(2.0)
    assert loss.item() == pytest.approx(0.3 * 2.0 + 2.0 * 5.0)  # alpha * CE + beta * KD


@pytest.mark.parametrize("path", ["capacity", "grouped_mm", "padded"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_expert_precision_follows_autocast_on_every_kernel_path(path, dtype):
    layer = make_layer(E=4)
    x = torch.randn(10, H)
    with torch.autocast("cpu", dtype=dtype):
        if path == "capacity":
            out = layer.experts(torch.randn(4, 3, H))
        else:
            out = layer.experts.forward_grouped(x, torch.tensor([3, 0, 5, 2]), kernel=path)
    assert out.dtype == dtype


def test_load_line_reports_per_forward_imbalance():
    balanced = MoEStats(1, torch.tensor(0.0), torch.tensor(0.0), torch.tensor([4.0, 0.0]), torch.tensor(0.0),
                        torch.tensor(4.0))
    mirrored = MoEStats(1, torch.tensor(0.0), torch.tensor(0.0), torch.tensor([0.0, 4.0]), torch.tensor(2.0),
                        torch.tensor(4.0))
    acc = accumulate(accumulate([], [balanced]), [mirrored])  # each forward sends everything to one expert
    s, = summarize(acc, lambda t: None)
    assert s.cv == pytest.approx(1.0) and s.max_over_mean == pytest.approx(2.0)  # summed counts would say 0 and 1
    assert s.drop == pytest.approx(0.25) and s.counts.tolist() == [4.0, 4.0]
    assert set(s.scalars()) == {f"moe/layer1/{k}" for k in (
        "drop-fraction", "load-cv", "load-max-over-mean", "tokens-per-expert-min", "tokens-per-expert-p50",
        "tokens-per-expert-max", "dead-experts", "top-expert-share")}  # no router-entropy: these stats carry none


def test_aux_free_router_balances_a_skewed_gate():
    torch.manual_seed(0)
    router = AuxLossFreeRouter(H, 4, MoEConfig(num_experts=[4], router_type="aux_free", router_bias_update_rate=0.005))
    with torch.no_grad():
        router.wg.weight.normal_(0, 0.1)
        router.wg.weight[0] += 0.1  # expert 0 is preferred
    x = torch.randn(512, H).abs()
    first = router(x).counts.max().item() / 128
    for _ in range(100):
        router(x)
        router.update_bias(router.pending_load.clone())
    assert router.pending_load.sum() == 0
    last = router(x).counts.max().item() / 128
    assert first == 4.0 and last < 1.2, (first, last)  # every token on expert 0 at first
    assert router.expert_bias[0] < 0 and "expert_bias" in dict(router.named_parameters())  # saved in checkpoints
    assert not router.expert_bias.requires_grad


def test_aux_free_bias_updates_are_identical_on_dp_replicas(tmp_path):
    biases = run_distributed(_aux_free_worker, 2, str(tmp_path))
    assert torch.equal(biases[0], biases[1])
    ref = torch.zeros(4) + 0.01 * torch.sign(torch.tensor([6.0, 4.0, 3.0, 3.0]).mean() - torch.tensor([6.0, 4.0, 3.0, 3.0]))
    torch.testing.assert_close(biases[0], ref)


def _aux_free_worker(rank):
    import torch.distributed as dist

    from megatron.parallel.router_balance import update_router_biases
    from megatron.parallel.state import build_groups

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ps = build_groups(rank, 2, 1, torch.device("cpu"))
    layer = make_layer(E=4, router_type="aux_free", router_bias_update_rate=0.01)
    # each replica saw different tokens: rank 0 loads [5, 1, 0, 2], rank 1 [1, 3, 3, 1] -> sum [6, 4, 3, 3]
    layer.router.pending_load.copy_(torch.tensor([[5.0, 1.0, 0.0, 2.0], [1.0, 3.0, 3.0, 1.0]][rank]))
    update_router_biases(layer, ps)
    out = layer.router.expert_bias.detach().clone()
    dist.destroy_process_group()
    return out


def test_aux_free_training_run_saves_the_bias_and_counts_each_forward_once(tmp_path):
    from megatron.config.schema import ModelConfig
    from megatron.inference.load import load_model
    from megatron.model.gpt_model import GPTModel
    from tests.runs import mock_args, train

    ck = str(tmp_path / "ck")
    argv = mock_args(["--num-experts", "4", "--moe-router-type", "aux_free", "--moe-router-bias-update-rate", "0.01",
                      "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--save", ck])
    train(0, argv)
    bias = load_model(ck, "cpu").model.layers[1].mlp.router.expert_bias.detach()  # what the checkpoint holds
    steps = bias / 0.01  # two updates of +-0.01 (or 0) each
    assert bias.shape == (4,) and bias.abs().max() > 0
    torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
    assert steps.abs().max() <= 2
    # activation checkpointing re-runs the router in backward: its load must not count twice
    loads = []
    for ckpt in (False, True):
        cfg = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=64,
                          hidden_dropout=0.0, attention_dropout=0.0, checkpoint_activations=ckpt,
                          moe=MoEConfig(num_experts=[4], router_type="aux_free"))
        model = GPTModel(cfg)
        model.init_weights(0)
        loss, _ = model(torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long))
        loss.mean().backward()
        loads.append(model.moe_layers()[0].router.pending_load.clone())
    assert loads[0].sum() == 16 and torch.equal(loads[0], loads[1])


@pytest.mark.parametrize("name", ["topk", "aux_free", "megatron", "megatron_aux_free"])
def test_router_classes_carry_their_facts(name):
    from megatron.model.moe.routers import ROUTERS, Router
    from megatron.parallel.router_balance import balancing_routers

    cls = ROUTERS[name]
    cfg = MoEConfig(num_experts=[4], router_type=name)
    assert cfg.router_type == name  # the flags resolve to the named router (MoEConfig.__post_init__)
    router = cls(H, 4, cfg)
    assert isinstance(router, Router) and cls.num_parameters(H, 4) == sum(p.numel() for p in router.parameters())
    megatron = name.startswith("megatron")
    # the self-contained transformers export's Router reproduces the DeepSpeed ones; the Megatron-LM routing
    # goes to the native transformers classes instead
    assert router.plain_eval and cls.hf_router_type == (None if megatron else name)
    assert cls.renormalize_kept == (not megatron) and cls.wants_sequence_ids == megatron
    assert (balancing_routers(router) == [router]) == cls.balances_after_step == name.endswith("aux_free")
