"""The ZeRO-1 / ZeRO-2 optimizers keep parameters in one contiguous buffer per domain and allocate no
tensor of the whole flat model during a step (chunked all-gather, reduce-scatter and checkpoint gather);
with small chunks (many of them per shard) they still equal torch AdamW element for element, and the
Adam state gathered for a checkpoint reaches only the writing rank."""
import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from tests.dist_utils import run_distributed
from tests.test_zero2 import _batch, _loss, _setup

CHUNK = 1000  # elements: far below a shard, so every collective runs in many chunks


class _Allocations(TorchDispatchMode):
    """The largest tensor (in elements) an op creates with new storage while the mode is active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


def _worker(rank, native):
    import megatron.optim.distributed_optimizer as do
    import megatron.optim.zero2 as z2
    from megatron.optim.build import build_optimizer
    from megatron.optim.distributed_optimizer import DistributedAdamW
    from megatron.optim.zero2 import ShardedGradients
    from megatron.parallel.grad_sync import allreduce_gradients, clip_gradients, global_grad_norm

    do.CHUNK = CHUNK
    if native:  # the NCCL path (one in-place all-gather, reduce-scatter per chunk), which gloo also runs here
        do.native_tensor_collectives = z2.native_tensor_collectives = lambda group: True
    cfg, ps, model = _setup()
    models = {"plain": model, "zero1": copy.deepcopy(model), "zero2": copy.deepcopy(model)}
    for kind in ("zero1", "zero2"):  # deepcopy drops the parameters' tags (is_expert, ...): keep both domains
        for p, q in zip(model.parameters(), models[kind].parameters()):
            q.__dict__.update(p.__dict__)
    opts = {"plain": build_optimizer(models["plain"], cfg.optimizer, ps.device),
            "zero1": DistributedAdamW(models["zero1"], cfg.optimizer, ps),
            "zero2": ShardedGradients(models["zero2"], cfg.optimizer, ps)}
    out = {"views": {}, "largest": {}, "total": {}, "shard": {}, "diff": {}, "state_diff": {}, "state_keys": {}}
    for kind in ("zero1", "zero2"):
        doms = opts[kind].domains
        out["views"][kind] = all(p.untyped_storage().data_ptr() == d.buffer.untyped_storage().data_ptr()
                                 for d in doms for p in d.params)
        out["total"][kind] = [d.total for d in doms]
        out["shard"][kind] = [d.shard for d in doms]
        out["largest"][kind] = {}
    for step in range(3):
        tokens, labels = _batch(step, ps.dp_rank)
        for kind, m in models.items():
            opt = opts[kind]
            m.zero_grad(set_to_none=True)
            _loss(m, tokens, labels).backward()
            track = _Allocations()
            if kind == "zero2":
                with track:
                    opt.reduce_gradients()
                out["largest"][kind]["reduce"] = track.largest
                norm = opt.grad_norm()
                opt.clip_gradients(cfg.optimizer.clip_grad, norm)
            else:
                allreduce_gradients(m, ps)
                clip_gradients(m, cfg.optimizer.clip_grad, global_grad_norm(m, ps))
            track = _Allocations()
            with track:
                opt.step()
            if kind != "plain":
                out["largest"][kind]["step"] = track.largest
    plain_params = list(models["plain"].parameters())
    for kind in ("zero1", "zero2"):
        out["diff"][kind] = max(float((a - b).abs().max()) for a, b in zip(plain_params, models[kind].parameters()))
        track = _Allocations()
        with track:
            state = opts[kind].state_by_param()  # collective: every rank
        out["largest"][kind]["state"] = track.largest
        out["state_keys"][kind] = len(state)
        diffs = []
        for p, q in zip(plain_params, models[kind].parameters()):
            if q in state:
                ref = opts["plain"].state[p]
                diffs += [float((ref[k] - state[q][k]).abs().max()) for k in ("exp_avg", "exp_avg_sq")]
                diffs.append(abs(float(ref["step"]) - state[q]["step"]))
        out["state_diff"][kind] = max(diffs) if diffs else None
    out["num_params"] = len(plain_params)
    out["largest_param"] = max(p.numel() for p in plain_params)
    return out


@pytest.mark.parametrize("native", [False, True], ids=["gloo-chunked", "flat-collectives"])
def test_zero_buffers_views_no_full_size_transients_and_equal_adam(tmp_path, native):
    r0, r1 = run_distributed(_worker, 2, str(tmp_path), native)
    for r in (r0, r1):
        for kind in ("zero1", "zero2"):
            assert r["views"][kind]  # every parameter is a view of its domain's buffer
            assert r["diff"][kind] < 1e-6, (kind, r["diff"][kind])  # measured: 0.0
            assert min(r["total"][kind]) > 20 * CHUNK  # both domains (dense, experts), many chunks per shard
            big = r["largest"][kind]
            # the update and the all-gather: at most one chunk of temporaries (the flat all-gather: in place)
            assert big["step"] <= CHUNK, big
            # checkpoint gather: one chunk per rank; the writer also builds each parameter's full state
            assert big["state"] <= max(2 * CHUNK, r["largest_param"] if r is r0 else 0), big
        assert r["largest"]["zero2"]["reduce"] <= max(r["shard"]["zero2"]), r["largest"]["zero2"]  # the shard
        assert r["largest"]["zero2"]["reduce"] < max(r["total"]["zero2"])
    for kind in ("zero1", "zero2"):
        assert r0["state_keys"][kind] == r0["num_params"]  # the writer (DP rank 0) holds every parameter's state
        assert r0["state_diff"][kind] < 1e-6, r0["state_diff"]  # equal to torch AdamW's state
        assert r1["state_keys"][kind] == 0  # no gathered copy on the other rank
