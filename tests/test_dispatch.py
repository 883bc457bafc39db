"""The expert-parallel token dispatchers on real gloo processes against the local dispatchers, at the layer
level: outputs, input gradients and expert gradients; no-drop sends exactly the routed rows (no padding).
Both registered dispatchers (``--moe-token-dispatcher-type alltoall`` / ``allgather``) at EP=2, under the TP
token split (TP=2) and at EP=2 x TP=2, with the router's gradient too; dispatch returns frozen metadata."""
import pytest
import torch

from megatron.config.schema import MoEConfig
from megatron.model.moe.layer import MoELayer
from tests.dist_utils import run_distributed

H, F, E = 8, 16, 4


@pytest.mark.parametrize("dropping", [False, True], ids=["no-drop", "capacity"])
def test_all_to_all_dispatcher_equals_local_dispatch(tmp_path, dropping):
    results = run_distributed(_worker, 2, str(tmp_path), dropping)
    for r in results:
        for name, (got, want) in r["pairs"].items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    if not dropping:  # each rank's experts received exactly the rows routed to them by both ranks
        assert sum(r["rows"] for r in results) == sum(r["assignments"] for r in results)
        assert all(r["rows"] == r["received"] for r in results)


def _worker(rank, dropping):
    import torch.distributed as dist

    from megatron.parallel.expert_parallel import AllToAllDispatcher

    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = MoEConfig(num_experts=[E], topk=2, token_dropping=dropping, eval_capacity_factor=0.5, min_capacity=0)
    torch.manual_seed(0)
    full = MoELayer(cfg, H, F, E, layer_number=1)
    full.experts.init_weights(0, 1, 0.3, 0.3)
    torch.nn.init.normal_(full.router.wg.weight, 0, 1.0)
    ep = MoELayer(cfg, H, F, E, layer_number=1, ep_rank=rank, ep_size=2)
    ep.experts.init_weights(0, 1, 0.3, 0.3)  # its 2 experts, by global id
    ep.router.load_state_dict(full.router.state_dict())
    ep.set_dispatcher(AllToAllDispatcher(dist.group.WORLD, 2, E, torch.device("cpu")))
    full.eval(), ep.eval()  # position order: both layouts drop the same assignments
    seen = {}
    run = ep.experts.run
    ep.experts.run = lambda batch: (seen.update(rows=batch.tokens.shape[0], counts=batch.counts), run(batch))[1]

    S = 24 if dropping else 24 + 8 * rank  # capacity is agreed (MAX) over EP: equal S keeps it each rank's own
    x = torch.randn(1, S, H, generator=torch.Generator().manual_seed(rank + 1))
    g = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, sa = full(xa)
    yb, sb = ep(xb)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    for p in full.experts.parameters():  # the EP expert gradient sums both ranks' tokens
        dist.all_reduce(p.grad)
    sl = slice(2 * rank, 2 * rank + 2)
    pairs = {"y": (yb, ya), "x.grad": (xb.grad, xa.grad), "dropped": (sb.dropped, sa.dropped),
             "w1.grad": (ep.experts.w1.grad, full.experts.w1.grad[sl]),
             "b2.grad": (ep.experts.b2.grad, full.experts.b2.grad[sl])}
    assert sa.dropped.item() > 0 if dropping else sa.dropped.item() == 0
    out = {"pairs": {k: (a.detach(), b.detach()) for k, (a, b) in pairs.items()}, "rows": seen["rows"],
           "assignments": int(sa.assignments.item()),
           "received": int(seen["counts"].sum()) if seen["counts"] is not None else None}
    dist.destroy_process_group()
    return out


# --moe-token-dispatcher-type: allgather ≡ alltoall ≡ EP=1, installed through the registry --------------------

CASES = [(True, 1), (True, 2), (False, 1), (False, 2)]  # (token dropping, top-k)


@pytest.mark.parametrize("world,ep,tp", [(2, 2, 1), (2, 1, 2), (4, 2, 2)], ids=["ep2", "tp2-split", "ep2xtp2-split"])
def test_allgather_dispatcher_equals_all_to_all_and_local(tmp_path, world, ep, tp):
    """Outputs, input, router and expert gradients of both registered EP dispatchers equal the one-process layer's
    (capacity with drops and no-drop, top-1 and top-2; under TP the routed tokens split over the TP ranks)."""
    results = run_distributed(_registry_worker, world, str(tmp_path), world, ep, tp)
    for r in results:
        assert r["types"] == {"alltoall": "AllToAllDispatcher", "allgather": "AllGatherDispatcher"}
        for name, (got, want) in r["pairs"].items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
        assert all(r["dropped"][c] > 0 for c in r["dropped"] if c.startswith("capacity"))
        assert all(r["dropped"][c] == 0 for c in r["dropped"] if c.startswith("no-drop"))
    if tp == 1:  # no-drop, all-gather: each rank's experts ran exactly the rows routed to them by both ranks
        for c in ("no-drop top1", "no-drop top2"):
            assert sum(r["rows"][c] for r in results) == sum(r["assignments"][c] for r in results)


def _interleaved(layer, xs):
    """Plan and dispatch every x before combining any (in reverse order): the metadata carries each call."""
    staged = []
    for x in xs:
        routing = layer.router(x)
        capacity = layer.capacity(x.shape[0])
        priority = layer.router.drop_priority(routing) if capacity is not None else None
        plan = layer.dispatcher.plan(routing, layer.num_experts, capacity, priority, renormalize=layer.topk > 1)
        staged.append(layer.dispatcher.dispatch(x, plan))
    outs = [layer.experts.run(batch) for batch, _ in staged]
    ys = [layer.dispatcher.combine(out, meta) for out, (_, meta) in reversed(list(zip(outs, staged)))]
    return ys[::-1]


def _registry_worker(rank, world, ep, tp):
    import torch.distributed as dist

    from megatron.parallel.expert_parallel import TOKEN_DISPATCHERS, apply_expert_parallel
    from megatron.parallel.state import build_groups

    dist.init_process_group("gloo", rank=rank, world_size=world)
    ps = build_groups(rank, world, ep, torch.device("cpu"), tp_size=tp)
    d = rank // tp  # TP peers hold the same tokens
    out = {"pairs": {}, "dropped": {}, "rows": {}, "assignments": {}, "types": {}}
    for dropping, topk in CASES:
        case = f"{'capacity' if dropping else 'no-drop'} top{topk}"
        kw = dict(num_experts=[E], topk=topk, token_dropping=dropping, eval_capacity_factor=0.5, min_capacity=0)
        torch.manual_seed(0)
        full = MoELayer(MoEConfig(**kw), H, F, E, layer_number=1)
        full.experts.init_weights(0, 1, 0.3, 0.3)
        torch.nn.init.normal_(full.router.wg.weight, 0, 1.0)
        layers = {}
        for name in TOKEN_DISPATCHERS:
            layer = MoELayer(MoEConfig(token_dispatcher_type=name, **kw), H, F, E, layer_number=1,
                             ep_rank=ps.ep_rank, ep_size=ep)
            layer.experts.init_weights(0, 1, 0.3, 0.3)  # its experts, by global id
            layer.router.load_state_dict(full.router.state_dict())
            apply_expert_parallel(layer, ps)
            layer.eval()
            out["types"][name] = type(layer.dispatcher).__name__
            layers[name] = layer
        full.eval()  # position order: every layout drops the same assignments
        seen = {}
        run = layers["allgather"].experts.run
        layers["allgather"].experts.run = lambda batch: (seen.update(rows=batch.tokens.shape[0]), run(batch))[1]

        # capacity: equal S (it is agreed (MAX) over EP: equal S keeps each rank's own); no-drop: unequal S
        S = 24 if dropping else 24 + 8 * d
        x = torch.randn(1, S, H, generator=torch.Generator().manual_seed(d + 1))
        g = torch.randn_like(x)
        xf = x.clone().requires_grad_()
        yf, sf = full(xf)
        (yf * g).sum().backward()
        if ep > 1:  # the EP expert gradient sums the EP group's tokens
            for p in full.experts.parameters():
                dist.all_reduce(p.grad, group=ps.ep_group)
        sl = slice(ps.ep_rank * E // ep, (ps.ep_rank + 1) * E // ep)
        out["dropped"][case] = sf.dropped.item()
        out["assignments"][case] = int(sf.assignments.item())
        for name, layer in layers.items():
            xl = x.clone().requires_grad_()
            y, s = layer(xl)
            (y * g).sum().backward()
            if tp > 1:  # each TP rank's expert gradient covers its share of the tokens
                for p in layer.experts.parameters():
                    dist.all_reduce(p.grad, group=ps.tp_group)
            pairs = {"y": (y, yf), "x.grad": (xl.grad, xf.grad), "dropped": (s.dropped, sf.dropped),
                     "router.grad": (layer.router.wg.weight.grad, full.router.wg.weight.grad)}
            for pname in ("w1", "b1", "w2", "b2"):
                pairs[f"{pname}.grad"] = (getattr(layer.experts, pname).grad, getattr(full.experts, pname).grad[sl])
            with torch.no_grad():  # two calls in flight on one dispatcher
                x2 = torch.randn(1, S, H, generator=torch.Generator().manual_seed(d + 11))
                want = [full(x)[0], full(x2)[0]]
                got = _interleaved(layer, [x[0], x2[0]])
            pairs["interleaved"] = (torch.stack([got[0], got[1]]), torch.stack([want[0][0], want[1][0]]))
            for k, (a, b) in pairs.items():
                out["pairs"][f"{case} {name} {k}"] = (a.detach(), b.detach())
        out["rows"][case] = seen["rows"]
    dist.destroy_process_group()
    return out


def test_token_dispatcher_flag_lists_and_checks_the_registry():
    from types import SimpleNamespace

    from megatron.errors import UserError
    from megatron.parallel.expert_parallel import TOKEN_DISPATCHERS, apply_expert_parallel
    from megatron.training.arguments import build_parser, check_registry_options, parse_args
    from tests.runs import mock_args

    assert list(TOKEN_DISPATCHERS) == ["alltoall", "allgather"]
    parser, _ = build_parser()
    action = next(a for a in parser._actions if "--moe-token-dispatcher-type" in a.option_strings)
    assert action.default == "alltoall" and action.help.endswith("(one of: alltoall, allgather)")
    cfg = parse_args(mock_args(["--train-iters", "1", "--num-experts", "4", "--moe-token-dispatcher-type", "alltoall"]))
    assert cfg.model.moe.token_dispatcher_type == "alltoall"
    for argv in (["--moe-token-dispatcher-type", "allgather"], ["--moe-token-dispatcher-type=allgather"]):
        cfg = parse_args(mock_args(["--train-iters", "1", "--num-experts", "4", *argv]))
        assert cfg.model.moe.token_dispatcher_type == "allgather"
    with pytest.raises(UserError, match=r"--moe-token-dispatcher-type must be one of alltoall, allgather \(got 'flex'\)"):
        parse_args(mock_args(["--train-iters", "1", "--num-experts", "4", "--moe-token-dispatcher-type", "flex"]))
    cfg.model.moe.token_dispatcher_type = "broadcast"
    with pytest.raises(UserError, match=r"--moe-token-dispatcher-type must be one of alltoall, allgather "
                                        r"\(got 'broadcast'\)") as e:
        check_registry_options(cfg)
    assert "\n" not in str(e.value)
    layer = MoELayer(MoEConfig(num_experts=[E], token_dispatcher_type="broadcast"), H, F, E, layer_number=1)
    ps = SimpleNamespace(ep_size=2, tp_token_split=False, ep_group=None, device=torch.device("cpu"))
    with pytest.raises(UserError, match="--moe-token-dispatcher-type must be one of"):
        apply_expert_parallel(layer, ps)


def test_dispatch_returns_frozen_metadata_and_leaves_the_plan_alone():
    import dataclasses

    from megatron.model.moe.dispatchers import LocalDispatchMetadata

    for dropping in (True, False):
        layer = MoELayer(MoEConfig(num_experts=[E], topk=2, token_dropping=dropping), H, F, E, layer_number=1)
        x = torch.randn(10, H)
        routing = layer.router(x)
        plan = layer.dispatcher.plan(routing, E, layer.capacity(10), None, renormalize=True)
        batch, meta = layer.dispatcher.dispatch(x, plan)
        assert type(meta) is LocalDispatchMetadata and meta.num_tokens == 10
        assert meta.token is plan.token and meta.slot is plan.slot and meta.weight is plan.weight
        with pytest.raises(dataclasses.FrozenInstanceError):
            plan.capacity = 1
        with pytest.raises(dataclasses.FrozenInstanceError):
            meta.num_tokens = 1
        assert layer.dispatcher.combine(layer.experts.run(batch), meta).shape == (10, H)
