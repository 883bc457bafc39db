"""The MoE layer under tensor parallelism splits its routed tokens over the TP ranks (2 real gloo processes):
outputs, input, router and expert gradients equal the one-process layer's, with dropping (an odd capacity, so
the split pads) and without (an odd number of rows), and each rank's experts see only its share."""
import math

import pytest
import torch

from megatron.config.schema import MoEConfig
from megatron.model.moe.layer import MoELayer
from megatron.parallel.token_split import chunk_counts
from tests.dist_utils import run_distributed

H, F, E = 8, 16, 4


@pytest.mark.parametrize("dropping,topk,S", [(True, 1, 20), (True, 2, 24), (False, 1, 23), (False, 2, 21)],
                         ids=["capacity-top1", "capacity-top2", "no-drop-top1", "no-drop-top2"])
def test_tp_token_split_equals_the_replicated_layer(tmp_path, dropping, topk, S):
    results = run_distributed(_worker, 2, str(tmp_path), dropping, topk, S)
    for r in results:
        for name, (got, want) in r["pairs"].items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    want = results[0]
    if dropping:  # the [E, C, H] buffer split along C: each rank runs ceil(C / 2) slots per expert
        assert want["dropped"] > 0 and want["capacity"] % 2 == 1
        assert all(r["shape"][1] == math.ceil(want["capacity"] / 2) for r in results)
    else:  # the expert-sorted rows split in two contiguous chunks: together exactly the routed rows
        assert want["assignments"] % 2 == (1 if topk == 1 else 0)
        assert sum(r["shape"][0] for r in results) == want["assignments"]
        assert all(r["shape"][0] <= math.ceil(want["assignments"] / 2) for r in results)


def _worker(rank, dropping, topk, S):
    import torch.distributed as dist

    from megatron.parallel.expert_parallel import AllToAllDispatcher, TPSplit

    dist.init_process_group("gloo", rank=rank, world_size=2)
    cfg = MoEConfig(num_experts=[E], topk=topk, token_dropping=dropping, eval_capacity_factor=0.55, min_capacity=0)
    torch.manual_seed(0)
    full = MoELayer(cfg, H, F, E, layer_number=1)
    full.experts.init_weights(0, 1, 0.3, 0.3)
    torch.nn.init.normal_(full.router.wg.weight, 0, 1.0)
    tp = MoELayer(cfg, H, F, E, layer_number=1)
    tp.load_state_dict(full.state_dict())
    tp.set_dispatcher(AllToAllDispatcher(None, 1, E, torch.device("cpu"), tp=TPSplit(dist.group.WORLD, rank, 2)))
    full.eval(), tp.eval()
    seen = {}
    run = tp.experts.run
    tp.experts.run = lambda batch: (seen.update(shape=tuple(batch.tokens.shape)), run(batch))[1]

    x = torch.randn(1, S, H, generator=torch.Generator().manual_seed(7))  # the same tokens on both TP ranks
    g = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, sa = full(xa)
    yb, sb = tp(xb)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    for p in tp.experts.parameters():  # each rank's expert gradient covers its share of the tokens
        dist.all_reduce(p.grad)
    pairs = {"y": (yb, ya), "x.grad": (xb.grad, xa.grad), "dropped": (sb.dropped, sa.dropped),
             "router.grad": (tp.router.wg.weight.grad, full.router.wg.weight.grad)}
    for (name, p), q in zip(tp.experts.named_parameters(), full.experts.parameters()):
        pairs[f"{name}.grad"] = (p.grad, q.grad)
    out = {"pairs": {k: (a.detach(), b.detach()) for k, (a, b) in pairs.items()}, "shape": seen["shape"],
           "dropped": int(sa.dropped.item()), "assignments": int(sa.assignments.item()),
           "capacity": full.capacity(S)}
    dist.destroy_process_group()
    return out


def test_chunk_counts_cut_expert_sorted_rows_into_contiguous_chunks():
    counts = torch.tensor([3, 0, 4, 2])  # 9 rows: expert 0 rows 0-2, expert 2 rows 3-6, expert 3 rows 7-8
    assert chunk_counts(counts, 0, 2).tolist() == [3, 0, 2, 0]  # rows 0-4
    assert chunk_counts(counts, 1, 2).tolist() == [0, 0, 2, 2]  # rows 5-8
    assert [chunk_counts(counts, r, 4).tolist() for r in range(4)] == [[3, 0, 0, 0], [0, 0, 3, 0], [0, 0, 1, 2], [0, 0, 0, 0]]
    assert chunk_counts(torch.zeros(3, dtype=torch.long), 1, 2).tolist() == [0, 0, 0]
