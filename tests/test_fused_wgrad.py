"""Gradient-accumulation fusion of the experts (weight gradients written into ``.grad`` in place) against
plain autograd (``fuse_wgrad=False``) and the per-expert loop oracle: outputs, input gradients, weight
gradients over accumulated micro-batches, the capacity and no-drop paths, recompute, no_grad, autocast,
expert parallelism and the overlapped gradient reduce on 2 gloo processes, and 3 training steps."""
import pytest
import torch

from megatron.config.schema import ModelConfig, MoEConfig
from megatron.model.gpt_model import GPTModel
from megatron.model.moe.dispatchers import ExpertBatch
from megatron.model.moe.experts import StackedExperts
from megatron.model.moe.layer import MoELayer
from tests.dist_utils import run_distributed
from tests.moe_oracle import loop_experts

H, F, E = 8, 16, 4
TIGHT = dict(rtol=1e-5, atol=1e-6)


def _pair(make):
    """Two identical modules (StackedExperts or MoELayer): fused (the default) and autograd-only."""
    fused = make()
    _experts(fused).init_weights(0, 1, 0.3, 0.3)
    plain = make()
    plain.load_state_dict(fused.state_dict())
    _experts(plain).fuse_wgrad = False
    return fused, plain


def _experts(m):
    return m if isinstance(m, StackedExperts) else m.experts


def _count_fused(module):
    """Parameters reported by the fused backward (stays empty if autograd accumulated)."""
    seen = []
    _experts(module).set_grad_ready_callback(seen.append)
    return seen


def _loop_rows(experts, x, counts):
    """The per-expert loop oracle on rows sorted by expert ([N, H], counts [E])."""
    starts = torch.cumsum(counts, 0) - counts
    buf = torch.stack([torch.nn.functional.pad(x[s:s + n], (0, 0, 0, int(counts.max()) - n))
                       for s, n in zip(starts.tolist(), counts.tolist())])  # [E, max, H]
    out = loop_experts(experts, buf)
    return torch.cat([out[e, :n] for e, n in enumerate(counts.tolist())])


@pytest.mark.parametrize("kernel", ["capacity", "padded", "grouped_mm"])
def test_stacked_experts_fused_equals_loop_oracle_over_two_micro_batches(kernel):
    fused, plain = _pair(lambda: StackedExperts(E, H, F))
    reported = _count_fused(fused)
    counts = torch.tensor([3, 0, 6, 2])  # an expert without rows
    for step in range(2):  # the first backward creates .grad, the second accumulates into it
        shape = (E, 5, H) if kernel == "capacity" else (int(counts.sum()), H)
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(step))
        g = torch.randn(*shape, generator=torch.Generator().manual_seed(10 + step))
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        if kernel == "capacity":
            ya, yb = fused.run(ExpertBatch(xa)), loop_experts(plain, xb)
        else:
            ya, yb = fused.forward_grouped(xa, counts, kernel=kernel, fused=True), _loop_rows(plain, xb, counts)
        torch.testing.assert_close(ya, yb, **TIGHT)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad, **TIGHT)
    assert len(reported) == 8  # 4 parameters x 2 backwards went through the fused path
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TIGHT, msg=name)


@pytest.mark.parametrize("topk,dropping", [(1, True), (2, True), (2, False)], ids=["top1-capacity", "top2-capacity",
                                                                                 "top2-nodrop"])
def test_moe_layer_fused_equals_autograd(topk, dropping):
    cfg = MoEConfig(num_experts=[E], topk=topk, token_dropping=dropping, train_capacity_factor=1.0, min_capacity=0)
    fused, plain = _pair(lambda: MoELayer(cfg, H, F, E, layer_number=1))
    reported = _count_fused(fused)
    x = torch.randn(2, 24, H, generator=torch.Generator().manual_seed(3))
    for micro in range(2):
        outs = []
        for m in (fused, plain):
            torch.manual_seed(micro)  # the same random token selection for both
            xi = (x + micro).requires_grad_()
            y, stats = m(xi)
            (y.square().sum() + stats.aux_loss).backward()
            outs.append((y.detach(), xi.grad))
        torch.testing.assert_close(outs[0][0], outs[1][0], **TIGHT)
        torch.testing.assert_close(outs[0][1], outs[1][1], **TIGHT)
    assert len(reported) == 8
    for (name, a), b in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, **TIGHT, msg=name)


def test_no_grad_autocast_and_frozen_weights_keep_autograd_semantics():
    cfg = MoEConfig(num_experts=[E], train_capacity_factor=2.0)
    fused, plain = _pair(lambda: MoELayer(cfg, H, F, E, layer_number=1))
    reported = _count_fused(fused)
    x = torch.randn(1, 16, H)
    with torch.no_grad():  # inference: no graph, nothing written
        torch.manual_seed(0)
        y = fused(x)[0]
    assert not y.requires_grad and all(p.grad is None for p in fused.parameters())
    for m in (fused, plain):  # bf16 autocast: autograd casts and accumulates (fp32 .grad), same as unfused
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x.clone().requires_grad_())[0]
        y.float().sum().backward()
    assert reported == []
    for a, b in zip(fused.parameters(), plain.parameters()):
        assert a.grad.dtype == torch.float32
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
    fused.zero_grad(set_to_none=True)
    fused.experts.w1.requires_grad_(False)  # a frozen weight gets no gradient; the others still do
    torch.manual_seed(0)
    fused(x.clone().requires_grad_())[0].sum().backward()
    assert fused.experts.w1.grad is None and fused.experts.w2.grad is not None and len(reported) == 3


def _tiny_gpt(fused: bool, dropping: bool, recompute: bool):
    cfg = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=64,
                      hidden_dropout=0.0, attention_dropout=0.0, checkpoint_activations=recompute,
                      moe=MoEConfig(num_experts=[E], expert_interval=1, token_dropping=dropping))
    model = GPTModel(cfg)
    model.init_weights(5)
    for layer in model.moe_layers():
        layer.experts.fuse_wgrad = fused
    return model


def _train_three_steps(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(11)
    losses, norms = [], []
    for step in range(3):
        model.zero_grad(set_to_none=True)  # the trainer's p.grad = None: the first micro-batch creates
        total = 0.0
        for micro in range(2):
            torch.manual_seed(100 * step + micro)
            tokens = torch.randint(0, 64, (2, 8), generator=g)
            loss, stats = model(tokens, torch.roll(tokens, -1, 1))
            loss = loss.mean() + 0.1 * sum(s.aux_loss for s in stats)
            (loss / 2).backward()
            total += loss.item() / 2
        norms.append(float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm()))
        losses.append(total)
        opt.step()
    return losses, norms


@pytest.mark.parametrize("dropping,recompute", [(True, False), (False, True)], ids=["capacity", "nodrop-recompute"])
def test_three_training_steps_equal_the_unfused_model(dropping, recompute):
    fused_model = _tiny_gpt(True, dropping, recompute)
    reported = []
    for layer in fused_model.moe_layers():
        layer.experts.set_grad_ready_callback(reported.append)
    fused = _train_three_steps(fused_model)
    plain = _train_three_steps(_tiny_gpt(False, dropping, False))
    assert len(reported) == 3 * 2 * 2 * 4  # steps x micro-batches x MoE layers x parameters
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)


def test_expert_parallel_and_overlapped_reduce_on_two_processes(tmp_path):
    for r in run_distributed(_worker, 2, str(tmp_path)):
        for name, (got, want) in r["pairs"].items():
            torch.testing.assert_close(got, want, **TIGHT, msg=name)
        # every bucket (experts included) launched inside backward, with no autograd hook on the experts
        assert r["autograd_hooks_on_experts"] == 0 and r["launched_in_backward"] == r["buckets"] >= 2


def _worker(rank):
    import torch.distributed as dist

    from megatron.parallel.expert_parallel import AllToAllDispatcher
    from megatron.parallel.grad_sync import allreduce_gradients
    from megatron.parallel.overlapped_grad_reduce import OverlappedGradReducer
    from megatron.parallel.state import build_groups

    dist.init_process_group("gloo", rank=rank, world_size=2)
    pairs = {}
    # EP=2 (fused, all-to-all) against EP=1 (autograd), two micro-batches, capacity and no-drop
    for dropping in (True, False):
        cfg = MoEConfig(num_experts=[E], topk=2, token_dropping=dropping, eval_capacity_factor=1.0, min_capacity=0)
        full = MoELayer(cfg, H, F, E, layer_number=1)
        full.experts.init_weights(0, 1, 0.3, 0.3)
        full.experts.fuse_wgrad = False
        ep = MoELayer(cfg, H, F, E, layer_number=1, ep_rank=rank, ep_size=2)
        ep.experts.init_weights(0, 1, 0.3, 0.3)
        ep.router.load_state_dict(full.router.state_dict())
        ep.set_dispatcher(AllToAllDispatcher(dist.group.WORLD, 2, E, torch.device("cpu")))
        full.eval(), ep.eval()  # position order: both layouts keep the same assignments
        for micro in range(2):
            x = torch.randn(1, 16, H, generator=torch.Generator().manual_seed(10 * rank + micro))
            for m in (full, ep):
                m(x.clone().requires_grad_())[0].square().sum().backward()
        for p in full.experts.parameters():  # the EP expert gradient sums both ranks' tokens
            dist.all_reduce(p.grad)
        sl = slice(2 * rank, 2 * rank + 2)
        for name in ("w1", "b1", "w2", "b2"):
            pairs[f"{name}.grad dropping={dropping}"] = (getattr(ep.experts, name).grad.detach(),
                                                        getattr(full.experts, name).grad[sl].detach())
    # the overlapped reduce (DP 2, experts replicated) sees the fused gradients, launched inside backward
    ps = build_groups(rank, 2, 1, torch.device("cpu"))
    models, reported = [], []
    for fused in (True, False):
        model = _tiny_gpt(fused, True, False)
        tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(rank))
        reducer = OverlappedGradReducer(model, ps, bucket_bytes=4000) if fused else None
        if fused:
            for layer in model.moe_layers():  # autograd's hooks on the experts stay silent on the fused path
                for p in layer.experts.parameters():
                    p.register_post_accumulate_grad_hook(reported.append)
            reducer.arm()
        torch.manual_seed(0)
        loss, _ = model(tokens, torch.roll(tokens, -1, 1))
        loss.mean().backward()
        if fused:
            launched, buckets = len(reducer.launched), len(reducer.buckets)
            reducer.finish()
        else:
            allreduce_gradients(model, ps)
        models.append(model)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        pairs[f"reduced {name}"] = (a.grad.detach(), b.grad.detach())
    out = {"pairs": pairs, "autograd_hooks_on_experts": len(reported), "launched_in_backward": launched, "buckets": buckets}
    dist.destroy_process_group()
    return out
