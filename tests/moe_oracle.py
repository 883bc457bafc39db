"""Test oracle: the per-expert Python loop (the only place such a loop exists)."""
import torch
import torch.nn.functional as F


def _act(h, gated):
    if not gated:
        return F.gelu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def loop_expert(experts, e, x):
    """Expert e of a StackedExperts (GeLU or SwiGLU, biases or none) on rows x [n, H] -> [n, H]."""
    gated = getattr(experts, "gated", False)
    h = x @ experts.w1[e] + (experts.b1[e] if experts.b1 is not None else 0)
    return _act(h, gated) @ experts.w2[e] + (experts.b2[e] if experts.b2 is not None else 0)


def loop_experts(experts, buf):
    # buf [E, C, H] -> [E, C, H], one expert at a time
    return torch.stack([loop_expert(experts, e, buf[e]) for e in range(experts.num_local)])


def loop_moe_reference(layer, x):
    """Top-k MoE output computed token by token with the loop experts and no capacity limit (eval order);
    shared experts added when the layer has them."""
    routing = layer.router(x)
    k = routing.indices.shape[1]
    w = routing.weights
    if k > 1 and getattr(layer.router, "renormalize_kept", True):
        w = w / w.sum(dim=1, keepdim=True)
    out = torch.zeros_like(x)
    ex = layer.experts
    for e in range(layer.num_experts):
        mask = routing.indices == e  # [S, k]
        tok = mask.any(dim=1).nonzero().squeeze(1)
        if tok.numel() == 0:
            continue
        weight = (w * mask).sum(dim=1)[tok]
        out = out.index_add(0, tok, loop_expert(ex, e, x[tok]) * weight[:, None])
    if getattr(layer, "shared_experts", None) is not None:
        out = out + layer.shared_experts(x)
    return out
