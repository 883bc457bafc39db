"""Test oracle: the per-expert Python loop (the only place such a loop exists)."""
import torch
import torch.nn.functional as F


def loop_experts(experts, buf):
    # buf [E, C, H] -> [E, C, H], one expert at a time
    outs = []
    for e in range(experts.num_local):
        h = F.gelu(buf[e] @ experts.w1[e] + experts.b1[e])
        outs.append(h @ experts.w2[e] + experts.b2[e])
    return torch.stack(outs)


def loop_moe_reference(layer, x):
    """Top-k MoE output computed token by token with the loop experts and no capacity limit (eval order)."""
    routing = layer.router(x)
    k = routing.indices.shape[1]
    w = routing.weights
    if k > 1:
        w = w / w.sum(dim=1, keepdim=True)
    out = torch.zeros_like(x)
    ex = layer.experts
    for e in range(layer.num_experts):
        mask = routing.indices == e  # [S, k]
        tok = mask.any(dim=1).nonzero().squeeze(1)
        if tok.numel() == 0:
            continue
        weight = (w * mask).sum(dim=1)[tok]
        h = F.gelu(x[tok] @ ex.w1[e] + ex.b1[e]) @ ex.w2[e] + ex.b2[e]
        out = out.index_add(0, tok, h * weight[:, None])
    return out
