"""transformers' MoE block tensors <-> our MoE layer's, as pure tensor reshaping (no transformers import).

The seed of the Hugging Face import / export of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V3: the
names and layouts of one sparse MoE block (transformers 5.x, ``modeling_<family>.py``) and of our
:class:`~megatron.model.moe.layer.MoELayer` (SwiGLU experts ``gated=True``, no biases):

===============================================  =====================================================
transformers (block-relative)                    ours (MoELayer-relative)
===============================================  =====================================================
``gate.weight`` [E, H]                           ``router.wg.weight`` [E, H]
``gate.e_score_correction_bias`` [E] (DS-V3)     ``router.expert_bias`` [E] (the aux-free router's)
``experts.gate_up_proj`` [E, 2F, H] (gate rows,  ``experts.w1`` [E, H, 2F] (gate columns, then up):
then up rows)                                    its transpose
``experts.down_proj`` [E, H, F]                  ``experts.w2`` [E, F, H]: its transpose
``experts.{e}.gate_proj / up_proj / down_proj``  the same, per expert (checkpoints written per expert;
(``w1 / w3 / w2`` in Mixtral's original files)   :func:`experts_from_per_expert`)
``shared_expert(s).gate_proj / up_proj`` [I, H]  ``shared_experts.fc1.weight`` [2I, H] (gate rows, then up)
``shared_expert(s).down_proj`` [H, I]            ``shared_experts.fc2.weight`` [H, I]
``shared_expert_gate.weight`` [1, H] (Qwen2)     ``shared_experts.gate.weight`` [1, H]
===============================================  =====================================================

Qwen2-MoE names its shared MLP ``shared_expert``, DeepSeek-V3 ``shared_experts``. Expert parallelism: these
are full [E, ...] tensors; a rank holding experts first .. first + E_l - 1 takes ``t[first:first + E_l]``.

:func:`moe_options_from_hf_config` gives the MoEConfig fields (our flags) of a family's config.json; the
experts of all five are SwiGLU without biases (the model's ``--swiglu --disable-bias-linear``).

Shapes: E experts, H hidden, F expert width, I shared width.
"""
from __future__ import annotations

from typing import Sequence

import torch

from megatron.errors import UserError

SHARED_PREFIXES = ("shared_expert.", "shared_experts.")  # Qwen2-MoE, DeepSeek-V3


def experts_from_fused(gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' gate_up_proj [E, 2F, H], down_proj [E, H, F] -> our w1 [E, H, 2F], w2 [E, F, H]."""
    return gate_up_proj.transpose(1, 2).contiguous(), down_proj.transpose(1, 2).contiguous()


def experts_to_fused(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our w1 [E, H, 2F], w2 [E, F, H] -> transformers' gate_up_proj [E, 2F, H], down_proj [E, H, F]."""
    return w1.transpose(1, 2).contiguous(), w2.transpose(1, 2).contiguous()


def experts_from_per_expert(gate: Sequence[torch.Tensor], up: Sequence[torch.Tensor],
                            down: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert nn.Linear weights gate_proj [F, H], up_proj [F, H], down_proj [H, F] (Mixtral's w1, w3, w2)
    -> our w1 [E, H, 2F], w2 [E, F, H]."""
    gate_up = torch.stack([torch.cat([g, u], dim=0) for g, u in zip(gate, up)])  # [E, 2F, H]
    return experts_from_fused(gate_up, torch.stack(list(down)))


def experts_to_per_expert(w1: torch.Tensor, w2: torch.Tensor) -> tuple[list, list, list]:
    """Our w1 [E, H, 2F], w2 [E, F, H] -> per-expert gate_proj [F, H], up_proj [F, H], down_proj [H, F] lists."""
    gate_up, down = experts_to_fused(w1, w2)  # [E, 2F, H], [E, H, F]
    F = w2.shape[1]
    return ([g[:F].clone() for g in gate_up], [g[F:].clone() for g in gate_up], [d.clone() for d in down])


def shared_from_hf(gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor):
    """A dense SwiGLU MLP's gate_proj [I, H], up_proj [I, H], down_proj [H, I] -> fc1 [2I, H], fc2 [H, I]."""
    return torch.cat([gate_proj, up_proj], dim=0), down_proj.clone()


def shared_to_hf(fc1: torch.Tensor, fc2: torch.Tensor):
    """fc1 [2I, H], fc2 [H, I] -> gate_proj [I, H], up_proj [I, H], down_proj [H, I]."""
    gate, up = fc1.chunk(2, dim=0)
    return gate.clone(), up.clone(), fc2.clone()


def moe_block_from_hf(sd: dict) -> dict:
    """One transformers sparse MoE block's state dict (block-relative names, fused experts) -> our MoELayer's
    (MoELayer-relative names). Keys it does not know are refused by name."""
    out, used = {}, set()

    def take(key):
        used.add(key)
        return sd[key]

    out["router.wg.weight"] = take("gate.weight")
    if "gate.e_score_correction_bias" in sd:
        out["router.expert_bias"] = take("gate.e_score_correction_bias").float()
    out["experts.w1"], out["experts.w2"] = experts_from_fused(take("experts.gate_up_proj"), take("experts.down_proj"))
    for prefix in SHARED_PREFIXES:
        if f"{prefix}gate_proj.weight" in sd:
            fc1, fc2 = shared_from_hf(*(take(f"{prefix}{n}_proj.weight") for n in ("gate", "up", "down")))
            out["shared_experts.fc1.weight"], out["shared_experts.fc2.weight"] = fc1, fc2
    if "shared_expert_gate.weight" in sd:
        out["shared_experts.gate.weight"] = take("shared_expert_gate.weight")
    unknown = sorted(set(sd) - used)
    if unknown:
        raise ValueError(f"MoE block tensors without a mapping: {', '.join(unknown)}")
    return out


def moe_block_to_hf(sd: dict, shared_prefix: str = "shared_experts.") -> dict:
    """Our MoELayer's state dict (SwiGLU experts, no biases) -> transformers' block names (fused experts);
    ``shared_prefix``: "shared_expert." for Qwen2-MoE, "shared_experts." for DeepSeek-V3."""
    out = {"gate.weight": sd["router.wg.weight"]}
    if "router.expert_bias" in sd:
        out["gate.e_score_correction_bias"] = sd["router.expert_bias"]
    out["experts.gate_up_proj"], out["experts.down_proj"] = experts_to_fused(sd["experts.w1"], sd["experts.w2"])
    if "shared_experts.fc1.weight" in sd:
        g, u, d = shared_to_hf(sd["shared_experts.fc1.weight"], sd["shared_experts.fc2.weight"])
        out.update({f"{shared_prefix}gate_proj.weight": g, f"{shared_prefix}up_proj.weight": u,
                    f"{shared_prefix}down_proj.weight": d})
    if "shared_experts.gate.weight" in sd:
        out["shared_expert_gate.weight"] = sd["shared_experts.gate.weight"]
    return out


MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def _first(config: dict, *names, default=None):
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


def _pattern(flags: list) -> str:
    """[0, 0, 1, 1, 1] -> "([0]*2+[1]*3)" (the --moe-layer-freq form; runs of equal values)."""
    runs = []
    for v in flags:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return "(" + "+".join(f"[{v}]*{n}" for v, n in runs) + ")"


def moe_options_from_hf_config(config: dict) -> dict:
    """A transformers config.json (as a dict) of a sparse MoE family -> our MoEConfig fields.

    Follows transformers' modeling (import / export parity): which layers are sparse (Qwen's
    ``decoder_sparse_step`` / ``mlp_only_layers``, DeepSeek-V3's ``first_k_dense_replace``), the routing
    (softmax + ``norm_topk_prob``: renormalised top-k or Megatron-LM's pre-softmax; DeepSeek-V3: sigmoid, the
    expert bias for the choice, ``n_group`` / ``topk_group``, ``routed_scaling_factor``), the expert and
    shared widths, no token dropping. ``loss_coeff``: transformers' load-balancing loss is k x Megatron-LM's
    aux_loss, so ``router_aux_loss_coef`` x k (DeepSeek-V3: the paper's sequence-wise alpha 1e-4).
    A field that would change the computation and that we do not implement is refused by name.
    """
    mt = config.get("model_type")
    if mt not in MOE_MODEL_TYPES:
        raise UserError(f"model_type {mt!r} is not a sparse MoE family we map: one of {', '.join(MOE_MODEL_TYPES)}")
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"{mt}: hidden_act {config['hidden_act']!r} is not supported (the experts are SwiGLU: silu)")
    if float(config.get("router_jitter_noise") or 0.0) != 0.0:
        raise UserError(f"{mt}: router_jitter_noise {config['router_jitter_noise']} is not supported (set it to 0)")
    L = int(config["num_hidden_layers"])
    E = int(_first(config, "num_experts", "num_local_experts", "n_routed_experts"))
    k = int(config["num_experts_per_tok"])
    out = dict(num_experts=[E], topk=k, token_dropping=False)
    if mt in ("mixtral", "olmoe"):
        sparse = [1] * L
        out["moe_ffn_hidden_size"] = int(config["intermediate_size"])
    elif mt in ("qwen2_moe", "qwen3_moe"):
        step, dense = int(config.get("decoder_sparse_step") or 1), set(config.get("mlp_only_layers") or [])
        sparse = [int(i not in dense and (i + 1) % step == 0) for i in range(L)]
        out["moe_ffn_hidden_size"] = int(config["moe_intermediate_size"])
    else:  # deepseek_v3
        if config.get("topk_method", "noaux_tc") != "noaux_tc" or config.get("scoring_func", "sigmoid") != "sigmoid":
            raise UserError(f"{mt}: topk_method {config.get('topk_method')!r} / scoring_func "
                            f"{config.get('scoring_func')!r}: only noaux_tc with sigmoid is supported")
        first_dense = int(config.get("first_k_dense_replace") or 0)
        sparse = [int(i >= first_dense) for i in range(L)]
        out["moe_ffn_hidden_size"] = int(config["moe_intermediate_size"])
    out["layer_freq"] = "1" if all(sparse) else _pattern(sparse)
    coef = float(config.get("router_aux_loss_coef") or 0.0)
    if mt == "deepseek_v3":
        n_group, topk_group = config.get("n_group"), config.get("topk_group")
        out.update(router_score_function="sigmoid", router_enable_expert_bias=True,
                   router_norm_topk_prob=bool(config.get("norm_topk_prob", True)),
                   router_topk_scaling_factor=float(config.get("routed_scaling_factor") or 1.0),
                   router_load_balancing_type="seq_aux_loss", loss_coeff=1e-4)
        if n_group and int(n_group) > 1:
            out.update(router_num_groups=int(n_group), router_group_topk=int(topk_group))
        shared = int(config.get("n_shared_experts") or 0) * int(config["moe_intermediate_size"])
        if shared:
            out["shared_expert_intermediate_size"] = shared
        return out
    norm = True if mt == "mixtral" else bool(config.get("norm_topk_prob", False))
    out.update(router_load_balancing_type="aux_loss", loss_coeff=coef * k)
    if not norm:
        out["router_pre_softmax"] = True  # softmax over all experts, top-k weights not renormalised
    if mt == "qwen2_moe" and config.get("shared_expert_intermediate_size"):
        out.update(shared_expert_intermediate_size=int(config["shared_expert_intermediate_size"]),
                   shared_expert_gate=True)
    return out
