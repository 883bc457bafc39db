"""Distillation loss per token: the student's cross-entropy and T^2 * KL(teacher || student), plain and fused.

Plain (:func:`cross_entropy_and_kd`, on materialised logits): logits, their fp32 copy, two log-softmaxes, the
teacher's probabilities, their difference and product, and as many gradients: about eight [N, V] fp32 passes
each way, each through memory. For a small student with an 8k vocabulary that output step costs more than
the student's whole transformer (tools/bench/kd_loss.py measures both paths side by side).

Fused (:func:`linear_cross_entropy_kd`, as :func:`~megatron.model.cross_entropy.linear_cross_entropy` does for
the LM loss alone): the student's final hidden states and the tied output weight go in; two [N, V] fp32
buffers are held, the student's softmax at T and the teacher's, filled row block by row block while each
block sits in cache; backward turns the first into the logits' gradient in place before the two matmuls.
Same numbers as the plain path up to fp32 rounding (tests/test_kd_loss.py).

With temperature T, student logits z and teacher logits t (per token):
    ce = logsumexp(z) - z[label]
    kl = T^2 * sum_v p_v (log p_v - log q_v),   p = softmax(t / T),  q = softmax(z / T)
    d ce / d z = softmax(z) - onehot(label),    d kl / d z = T (q - p)
and softmax(z) = q^T / sum(q^T), so backward needs only q and p.

Shapes: N tokens (B * T), H hidden, V vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.model.cross_entropy import block_rows, compute_dtype, projection_grads


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, T, V] x 2 -> per-token T^2 * KL(softmax(teacher / T) || softmax(student / T)) [B, T], fp32."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # fp32 at least (fp64 stays fp64)
    log_p_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)  # [B, T, V]
    log_p_teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)  # [B, T, V]
    # xlogy: a teacher entry of probability 0 (logit -inf, e.g. a masked vocabulary pad) adds 0, not 0 * -inf
    p_teacher = log_p_teacher.exp()  # [B, T, V]
    kl = torch.sum(torch.xlogy(p_teacher, p_teacher) - p_teacher * log_p_student, dim=-1)  # [B, T]
    return kl * (temperature * temperature)


def cross_entropy_and_kd(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                         temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain path: logits [B, T, V], labels [B, T], teacher logits [B, T, V] -> (ce, kl) [B, T] fp32 each."""
    B, T = labels.shape
    ce = F.cross_entropy(logits.float().view(B * T, -1), labels.reshape(-1), reduction="none").view(B, T)
    return ce, kd_loss(logits, teacher_logits, temperature)


_FP32_MIN = torch.finfo(torch.float32).min


class _LinearCrossEntropyKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, teacher_logits, temperature, dtype):
        # h [N, H], weight [V, H], labels [N], teacher_logits [N, V] -> ce [N], kl [N] (fp32)
        temp = float(temperature)
        q = torch.mm(h.to(dtype), weight.to(dtype).t()).float()  # [N, V] student logits; becomes softmax(z / T)
        p = torch.empty_like(q)  # [N, V] becomes the teacher's softmax(t / T)
        ce = q.gather(1, labels[:, None]).squeeze(1).neg()  # [N] -z[label]; + logsumexp(z) below
        kl = torch.empty_like(ce)  # [N]
        rows = block_rows(q.shape[1])
        for s in range(0, q.shape[0], rows):
            zb, pb = q[s:s + rows], p[s:s + rows]  # [rows, V] views
            if temp != 1.0:
                ce[s:s + rows] += torch.logsumexp(zb, dim=1)
                zb.div_(temp)
            mz = zb.amax(dim=1, keepdim=True)  # [rows, 1]
            zb.sub_(mz)  # z' = z / T - max
            pb.copy_(teacher_logits[s:s + rows])  # fp32 before dividing (a bf16 teacher's t / T would round)
            if temp != 1.0:
                pb.div_(temp)
            pb.sub_(pb.amax(dim=1, keepdim=True)).clamp_(min=_FP32_MIN)  # t' = t / T - max; -inf -> finite, so
            # an entry of teacher probability 0 adds 0 * finite to the KL below, not 0 * -inf = NaN
            diff = pb - zb  # [rows, V] t' - z' = log p - log q + (log sum exp t' - log sum exp z')
            sp = pb.exp_().sum(dim=1, keepdim=True)
            pb.div_(sp)  # p: one exp per distribution
            sq = zb.exp_().sum(dim=1, keepdim=True)
            zb.div_(sq)  # q
            log_sq = sq.log_()
            if temp == 1.0:
                ce[s:s + rows] += (mz + log_sq)[:, 0]  # logsumexp(z)
            kl[s:s + rows] = (diff.mul_(pb).sum(dim=1) - sp.log_()[:, 0] + log_sq[:, 0]).mul_(temp * temp)
        ctx.save_for_backward(h, weight, labels, q, p)
        ctx.dtype, ctx.temp, ctx.consumed = dtype, temp, False
        return ce, kl

    @staticmethod
    def backward(ctx, grad_ce, grad_kl):
        # grad_ce, grad_kl [N] -> d h [N, H], d weight [V, H]; the saved q buffer becomes d logits in place
        if ctx.consumed:
            raise RuntimeError("the fused distillation loss was differentiated twice (retain_graph): its saved "
                               "softmax became the first gradient; recompute the loss for a second backward")
        ctx.consumed = True
        h, weight, labels, q, p = ctx.saved_tensors
        temp = ctx.temp
        g_ce, g_kl = grad_ce.float()[:, None], grad_kl.float()[:, None] * temp  # [N, 1]
        rows = block_rows(q.shape[1])
        for s in range(0, q.shape[0], rows):
            qb, pb, gc, gk = q[s:s + rows], p[s:s + rows], g_ce[s:s + rows], g_kl[s:s + rows]
            if temp == 1.0:  # softmax(z) is q: d = (g_ce + g_kl) q - g_kl p
                qb.mul_(gc + gk).addcmul_(pb, gk, value=-1.0)
            else:  # d = g_ce softmax(z) + g_kl (q - p), softmax(z) = q^T / sum(q^T)
                sb = qb.div(qb.amax(dim=1, keepdim=True)).pow_(temp)  # scaled to max 1: no 0/0 at high T
                sb.div_(sb.sum(dim=1, keepdim=True))
                qb.sub_(pb).mul_(gk).addcmul_(sb, gc)
        dlogits = q
        dlogits[torch.arange(labels.shape[0], device=labels.device), labels] -= g_ce[:, 0]
        return (*projection_grads(ctx, dlogits, h, weight), None, None, None, None)


def linear_cross_entropy_kd(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                            temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy and T^2 * KL of the student ``h @ weight.T`` against ``labels`` and the teacher:
    h [B, T, H], weight [V, H], labels [B, T], teacher logits [B, T, V] (no grad) -> (ce, kl) [B, T] fp32 each.

    The saved buffers are consumed by backward (call backward through them once, no ``retain_graph``). fp32
    throughout, whatever the inputs' dtype (as ``linear_cross_entropy``); the teacher logits are not modified.
    """
    B, T, H = h.shape
    if teacher_logits.shape != (B, T, weight.shape[0]):
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"[{B}, {T}, {weight.shape[0]}] (batch, sequence, vocabulary)")
    ce, kl = _LinearCrossEntropyKD.apply(h.reshape(B * T, H), weight, labels.reshape(-1),
                                         teacher_logits.detach().reshape(B * T, -1), temperature, compute_dtype(h))
    return ce.view(B, T), kl.view(B, T)
