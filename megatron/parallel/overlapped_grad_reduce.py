"""``--overlap-grad-reduce``: all-reduce gradient buckets while the backward pass is still running.

Buckets (<= 32 MiB) hold parameters in reverse registration order, roughly the order in which
backward finishes them. During the last micro-batch's backward a post-accumulate-grad hook counts
each bucket's finished parameters; a full bucket is flattened and its all-reduce launched
asynchronously (dense over DP, experts over the expert-DP group of their layer's EP
degree). ``finish()`` launches what is left in a fixed order, waits, scales by 1/DP and copies back. Every rank runs the same graph, so the hooks
fire, and the collectives launch, in the same order everywhere. The values are those of the
blocking reduction (``grad_sync.allreduce_gradients``).

Expert weights whose gradients are accumulated in place outside autograd (the fused expert path,
``StackedExperts``) get no autograd hook for that backward; their module reports each finished
gradient through the callback installed here, which counts exactly like the hook.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from megatron.model.moe.experts import StackedExperts
from megatron.parallel.grad_sync import BUCKET_BYTES, GradReducer, expert_params_by_degree, split_params


class _Bucket:
    def __init__(self, params, group, scale):
        self.params, self.group, self.scale = params, group, scale
        self.ready, self.handle, self.flat = 0, None, None


class OverlappedGradReducer(GradReducer):
    def __init__(self, model: torch.nn.Module, ps, bucket_bytes: int = BUCKET_BYTES):
        dense, expert = split_params(model)
        self.ps, self.buckets, self.bucket_of = ps, [], {}
        domains = [(dense, ps.dp_group, ps.dp_size)]
        self.scale_only = []  # experts with no replica (EDP 1 at their layer's EP degree)
        for g, params in (expert_params_by_degree(model, ps, expert) if ps.distributed else []):
            domains.append((params, g.edp_group, g.edp_size))
            if g.edp_size == 1 and ps.dp_size > 1:
                self.scale_only += params
        for params, group, size in domains:
            if size <= 1:
                continue
            cur, nbytes = [], 0
            for p in reversed(params):
                cur.append(p)
                nbytes += p.numel() * p.element_size()
                if nbytes >= bucket_bytes:
                    self.buckets.append(_Bucket(cur, group, 1.0 / ps.dp_size))
                    cur, nbytes = [], 0
            if cur:
                self.buckets.append(_Bucket(cur, group, 1.0 / ps.dp_size))
        for b in self.buckets:
            for p in b.params:
                self.bucket_of[p] = b
        self.params = dense + expert
        self.armed, self.launched = False, []
        for p in self.params:
            p.register_post_accumulate_grad_hook(self.mark_ready)
        for m in model.modules():
            if isinstance(m, StackedExperts):
                m.set_grad_ready_callback(self.mark_ready)

    def arm(self) -> None:
        """Call before the backward of the step's last micro-batch."""
        self.armed, self.launched = True, []
        for b in self.buckets:
            b.ready, b.handle, b.flat = 0, None, None

    def mark_ready(self, p) -> None:
        """``p.grad`` is complete for this backward (from autograd's hook or a module's callback)."""
        b = self.bucket_of.get(p) if self.armed else None
        if b is None:
            return
        b.ready += 1
        if b.ready == len(b.params):
            self._launch(b)

    def _launch(self, b: _Bucket) -> None:
        for p in b.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        b.flat = _flatten_dense_tensors([p.grad for p in b.params])
        b.handle = dist.all_reduce(b.flat, group=b.group, async_op=True)
        self.launched.append(b)

    def finish(self) -> None:
        """Launch the buckets backward did not complete (fixed order), wait for all, scale, copy back."""
        for b in self.buckets:
            if b.handle is None:
                self._launch(b)
        for b in self.launched:
            b.handle.wait()
            b.flat.mul_(b.scale)
            for p, t in zip(b.params, _unflatten_dense_tensors(b.flat, [p.grad for p in b.params])):
                p.grad.copy_(t)
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for p in self.scale_only:
            p.grad.mul_(1.0 / self.ps.dp_size)
        self.armed, self.launched = False, []
