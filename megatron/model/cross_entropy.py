"""Output projection and per-token cross-entropy in one autograd step, holding one [N, V] fp32 buffer.

The plain path (``F.linear`` then ``F.cross_entropy``) materialises the logits, their log-softmax (kept for
backward), a zero-filled [N, V] gradient for the NLL and the log-softmax gradient: four [N, V] fp32 tensors
and a profile where the vocabulary softmax costs as much as a transformer layer. Here the logits are turned
into the softmax in place, row block by row block while they sit in cache, and backward turns that same
buffer into the logits' gradient in place before the two matmuls. Same numbers as the plain path up to
fp32 rounding (tested); under autocast the matmuls run in the autocast dtype and the softmax in fp32, as
the plain path does.

Shapes: N tokens (B * T), H hidden, V vocabulary.
"""
from __future__ import annotations

import torch

# rows per block of the in-place softmax: about 1 MiB of fp32 logits, so a block stays in L2
BLOCK_BYTES = 1 << 20


def block_rows(vocab: int) -> int:
    """Rows of a [rows, vocab] fp32 block of about BLOCK_BYTES (at least one)."""
    return max(1, BLOCK_BYTES // (4 * vocab))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def projection_grads(ctx, dlogits: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> tuple:
    """d logits [N, V] fp32 -> (d h [N, H], d weight [V, H]) in ``ctx.dtype``, each None where not needed."""
    d = dlogits.to(ctx.dtype)
    grad_h = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_h = torch.mm(d, weight.to(ctx.dtype)).to(h.dtype)
    if ctx.needs_input_grad[1]:
        grad_w = torch.mm(d.t(), h.to(ctx.dtype)).to(weight.dtype)
    return grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, dtype):
        # h [N, H], weight [V, H], labels [N] -> loss [N] fp32
        probs = torch.mm(h.to(dtype), weight.to(dtype).t()).float()  # [N, V] logits, fp32; becomes the softmax
        target = probs.gather(1, labels[:, None]).squeeze(1)  # [N]
        lse = torch.empty(probs.shape[0], dtype=torch.float32, device=probs.device)
        rows = block_rows(probs.shape[1])
        for s in range(0, probs.shape[0], rows):
            block = probs[s:s + rows]  # [rows, V] view
            torch.logsumexp(block, dim=1, out=lse[s:s + rows])
            block.sub_(lse[s:s + rows, None]).exp_()
        ctx.save_for_backward(h, weight, labels, probs)
        ctx.dtype, ctx.consumed = dtype, False
        return lse - target

    @staticmethod
    def backward(ctx, grad_loss):
        # grad_loss [N] -> d h [N, H], d weight [V, H]; the saved softmax buffer becomes d logits in place
        if ctx.consumed:
            raise RuntimeError("the fused output cross-entropy was differentiated twice (retain_graph): its saved "
                               "softmax became the first gradient; recompute the loss for a second backward")
        ctx.consumed = True
        h, weight, labels, probs = ctx.saved_tensors
        dlogits = probs
        dlogits[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
        dlogits.mul_(grad_loss.float()[:, None])  # [N, V]
        return (*projection_grads(ctx, dlogits, h, weight), None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token loss of ``h @ weight.T`` against ``labels``: h [B, T, H], weight [V, H], labels [B, T] -> [B, T] fp32.

    The saved buffer is consumed by backward (call backward through it once, no ``retain_graph``).
    """
    B, T, H = h.shape
    loss = _LinearCrossEntropy.apply(h.reshape(B * T, H), weight, labels.reshape(-1), compute_dtype(h))
    return loss.view(B, T)
