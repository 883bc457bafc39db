"""The all-to-all dispatcher on 2 real gloo processes against the local dispatchers, at the layer level:
outputs, input gradients and expert gradients; no-drop sends exactly the routed rows (no padding)."""
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
