"""Expert-parallel serving: rank 0 runs the scheduler and broadcasts every batch operation; every rank
runs the same forward (dense parts replicated, each rank holding 1/N of the experts, tokens exchanged
by the expert-parallel all-to-all), so the KV caches on all ranks stay identical.

Wire format of one operation: a header int64 [3] = (op, d0, d1), then its tensors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.inference.serving.batch import BatchState

STOP, PREFILL, DECODE, KEEP, IDLE, PREFILL_ALL_LOGITS = 0, 1, 2, 3, 4, 5


class BroadcastBatchState(BatchState):
    """A BatchState on rank 0 that first sends each operation to the other ranks (see ``follow``)."""

    def __init__(self, model, device):
        super().__init__(model)
        self.comm_device = device

    def _send(self, op: int, d0: int = 0, d1: int = 0, *tensors: torch.Tensor) -> None:
        dist.broadcast(torch.tensor([op, d0, d1], dtype=torch.long, device=self.comm_device), src=0)
        for t in tensors:
            dist.broadcast(t.to(self.comm_device).contiguous(), src=0)

    def prefill(self, tokens, valid, all_logits=False):
        op = PREFILL_ALL_LOGITS if all_logits else PREFILL  # every rank runs the same forward
        self._send(op, tokens.shape[0], tokens.shape[1], tokens, valid.long())
        return super().prefill(tokens, valid, all_logits)

    def decode(self, tokens, positions):
        self._send(DECODE, tokens.shape[0], 0, tokens, positions)
        return super().decode(tokens, positions)

    def keep(self, rows):
        self._send(KEEP, len(rows), 0, *([torch.tensor(rows, dtype=torch.long)] if rows else []))
        super().keep(rows)

    def idle(self) -> None:
        """Nothing to run: tell the other ranks so, before their broadcast waits reach the process group's timeout."""
        self._send(IDLE)

    def stop(self) -> None:
        self._send(STOP)


def follow(model, device) -> None:
    """Ranks > 0: repeat rank 0's batch operations until it sends STOP."""
    state = BatchState(model)
    header = torch.empty(3, dtype=torch.long, device=device)

    def recv(*shape):
        t = torch.empty(*shape, dtype=torch.long, device=device)
        dist.broadcast(t, src=0)
        return t.to(state.device)

    while True:
        dist.broadcast(header, src=0)
        op, d0, d1 = (int(x) for x in header)
        if op == STOP:
            return
        if op in (PREFILL, PREFILL_ALL_LOGITS):
            tokens, valid = recv(d0, d1), recv(d0, d1).bool()
            state.prefill(tokens, valid, all_logits=op == PREFILL_ALL_LOGITS)
        elif op == DECODE:
            state.decode(recv(d0), recv(d0))
        elif op == KEEP:
            state.keep(recv(d0).tolist() if d0 else [])
        # IDLE: nothing to do
