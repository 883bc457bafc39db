"""Parameter counts (total / active per token / expert) and FLOPs per token from a ModelConfig.

Computed analytically from the config (so the counts hold for any EP layout and for models too
big to build), and checked against a built model in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron.model.mla import MultiLatentAttention
from megatron.model.moe.experts import StackedExperts
from megatron.model.moe.routers import router_class
from megatron.model.moe.shared_experts import SharedExpertMLP


@dataclass
class ParamCounts:
    total: int
    active: int  # parameters a token passes through (top-k experts per MoE layer)
    expert: int  # all expert parameters
    embedding: int

    @property
    def dense(self) -> int:
        return self.total - self.expert


def norm_parameters(cfg, n: int) -> int:
    """Parameters of one norm over ``n`` features: LayerNorm weight and bias, RMSNorm weight."""
    return n if cfg.normalization == "RMSNorm" else 2 * n


def attention_parameters(cfg) -> int:
    """One self-attention block: qkv (GQA: nh query, ng key/value heads of hd), proj, biases, q/k norms;
    multi-latent attention: its down / up projections, latent norms, proj (MultiLatentAttention.num_parameters)."""
    if getattr(cfg, "multi_latent_attention", False):
        return MultiLatentAttention.num_parameters(
            cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_head_dim,
            cfg.qk_pos_emb_head_dim, cfg.v_head_dim, cfg.add_bias_linear)
    H, hd, nh, ng = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_kv_heads
    qkv = (nh + 2 * ng) * hd
    n = H * qkv + nh * hd * H
    n += qkv if cfg.qkv_bias else 0
    n += H if cfg.add_bias_linear else 0
    if cfg.qk_layernorm:
        n += (norm_parameters(cfg, nh * hd) + norm_parameters(cfg, ng * hd) if getattr(cfg, "qk_layernorm_full", False)
              else 2 * norm_parameters(cfg, hd))
    return n


def mlp_parameters(cfg, ffn_hidden_size=None) -> int:
    """One dense MLP of width F (default --ffn-hidden-size): GeLU H*F + F*H, SwiGLU 2 H*F + F*H, + biases."""
    H, F = cfg.hidden_size, ffn_hidden_size or cfg.ffn_hidden_size
    f1 = 2 * F if cfg.swiglu else F
    return H * f1 + F * H + ((f1 + H) if cfg.add_bias_linear else 0)


def count_parameters(cfg) -> ParamCounts:
    H, V, P, L = cfg.hidden_size, cfg.vocab_size, cfg.max_position_embeddings, cfg.num_layers
    ln = norm_parameters(cfg, H)
    attn = attention_parameters(cfg)
    mlp = mlp_parameters(cfg)
    # word embeddings, learned positions (if any), the untied output layer (if any)
    embedding = V * H + (P * H if cfg.learned_positions else 0) + (V * H if cfg.untie_embeddings_and_output_weights else 0)
    total = embedding + ln  # final layernorm
    active = embedding + ln
    expert = 0
    expert_ffn = getattr(cfg.moe, "moe_ffn_hidden_size", None) or cfg.ffn_hidden_size
    one_expert = StackedExperts.num_parameters(H, expert_ffn, gated=cfg.swiglu, bias=cfg.add_bias_linear)
    shared_size = getattr(cfg.moe, "shared_expert_intermediate_size", None)
    shared = SharedExpertMLP.num_parameters(H, shared_size, gated=cfg.swiglu, bias=cfg.add_bias_linear,
                                            gate=getattr(cfg.moe, "shared_expert_gate", False)) if shared_size else 0
    for i, e in enumerate(cfg.moe.experts_per_layer(L)):
        base = 2 * ln + attn
        if not cfg.moe.is_moe_layer(i, e):
            total += base + mlp
            active += base + mlp
            continue
        router = router_class(cfg.moe.router_type).num_parameters(H, e)  # wg, + aux_free's balancing bias
        layer_expert = e * one_expert
        residual = (mlp + 2 * H + 2) if cfg.moe.mlp_type == "residual" else 0
        residual += shared  # dense like the Residual-MoE MLP: every token runs it
        total += base + router + layer_expert + residual
        active += base + router + min(cfg.moe.topk, e) * one_expert + residual
        expert += layer_expert
    return ParamCounts(total=total, active=active, expert=expert, embedding=embedding)


def flops_per_token(cfg, training: bool = True) -> float:
    """Model FLOPs per token: 2 x active matmul params (+ output layer) + attention scores, x3 for training."""
    counts = count_parameters(cfg)
    matmul_params = counts.active - counts.embedding + cfg.vocab_size * cfg.hidden_size
    # QK^T and AV over nh heads of hd (GQA shares k / v, not the score FLOPs), causal not discounted
    attention = 2 * 2 * cfg.num_layers * cfg.seq_length * cfg.num_attention_heads * cfg.head_dim
    if getattr(cfg, "multi_latent_attention", False):  # QK^T over dn + dr dims per head, AV over dv
        attention = (2 * cfg.num_layers * cfg.seq_length * cfg.num_attention_heads
                     * (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim + cfg.v_head_dim))
    fwd = 2 * matmul_params + attention
    return 3.0 * fwd if training else float(fwd)


KNOWN_PEAK_TFLOPS = {  # dense bf16/fp16 tensor-core peak per GPU
    "H100": 989.0, "H200": 989.0, "A100": 312.0, "A10": 125.0, "L4": 121.0, "V100": 125.0, "L40": 181.0,
}


def device_peak_tflops(device, dtype) -> float | None:
    import torch

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return val if dtype in (torch.bfloat16, torch.float16) else val / 2  # TF32 ~ half
        return None
    return measure_matmul_tflops(dtype)


def measure_matmul_tflops(dtype, n: int = 512, reps: int = 8) -> float:
    """Achievable matmul TFLOP/s of this CPU (a stand-in for the peak in the MFU estimate)."""
    import time

    import torch

    g = torch.Generator().manual_seed(0)  # leave the global RNG streams alone
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    dt = time.perf_counter() - t0
    return 2 * n**3 * reps / dt / 1e12


@dataclass
class LocalSizes:
    """Element counts of one rank's largest pieces (TP ``tp``, EP ``ep``): the memory plan's transients."""

    largest_param: int  # the largest single parameter tensor (an expert stack [E_local, H, F] counts as one)
    largest_layer: int  # the largest transformer layer (this rank's experts included)
    embedding: int  # word + position embeddings and the final layer norm (the tied output layer's weight)


def local_sizes(cfg, tp: int = 1, ep: int = 1) -> LocalSizes:
    """The largest parameter, layer and the embedding block on one rank, in elements (TP-sharded matrices
    divided by ``tp``, expert stacks by ``ep``; approximate for the small replicated vectors)."""
    H, F, V, P, L = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size, cfg.max_position_embeddings, cfg.num_layers
    qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    attn = attention_parameters(cfg) // tp + H
    mlp = mlp_parameters(cfg) // tp + H
    embedding = (V * H // tp + (P * H if cfg.learned_positions else 0) + 2 * H
                 + (V * H // tp if cfg.untie_embeddings_and_output_weights else 0))
    if getattr(cfg, "multi_latent_attention", False):  # the largest MLA matrix (the down projections stay whole under TP; counted as sharded here)
        nh, dq = cfg.num_attention_heads, cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
        qkv_rows = max(nh * dq * (cfg.q_lora_rank or H) // H, cfg.kv_lora_rank + cfg.qk_pos_emb_head_dim,
                       cfg.kv_lora_rank * nh * (cfg.qk_head_dim + cfg.v_head_dim) // H, nh * cfg.v_head_dim)
    largest_param = max(V * H // tp, H * F * (2 if cfg.swiglu else 1) // tp, qkv_rows * H // tp)
    largest_layer = 0
    for i, e in enumerate(cfg.moe.experts_per_layer(L)):
        layer = 4 * H + attn
        if not cfg.moe.is_moe_layer(i, e):
            layer += mlp
        else:
            local = max(e // ep, 1)
            layer += router_class(cfg.moe.router_type).num_parameters(H, e) + local * (2 * H * F + F + H)
            layer += (mlp + 2 * H + 2) if cfg.moe.mlp_type == "residual" else 0
            largest_param = max(largest_param, local * H * F)
        largest_layer = max(largest_layer, layer)
    return LocalSizes(largest_param=largest_param, largest_layer=largest_layer, embedding=embedding)
