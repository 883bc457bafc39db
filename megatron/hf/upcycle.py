"""Sparse upcycling (Komatsuzaki et al., 2022): a dense checkpoint becomes an MoE checkpoint whose model
computes the dense model's function at step 0; granular upcycling (He et al., 2024, "Upcycling Large Language
Models into Mixture of Experts"; Megatron-LM's ``--moe-upcycling-granularity``) splits each copy into
fine-grained experts.

Plain upcycling (granularity 1, the default): every expert of an MoE layer is a copy of that layer's dense
MLP (GeLU or SwiGLU, with or without biases: a Llama / Qwen dense checkpoint becomes a Mixtral / Qwen-MoE
shape). The combine weight decides the output scale:

- top-2 renormalises the two chosen probabilities to sum to 1: the output is the dense MLP's, unchanged,
  whatever the router says, so the router keeps its random initialisation (as Megatron-LM's upcycling);
- otherwise the router weights are zero, so its softmax is uniform (1/E for each expert) and, in evaluation
  routing, every token picks expert 0:
- top-1 scales the chosen expert's output by its probability 1/E (DeepSpeed does not renormalise top-1),
  so each expert's output projection (w2, b2) is multiplied by E: (1/E) * E * mlp(x) = mlp(x);
- Residual-MoE mixes the expert output and a dense MLP with softmax(coefficient(x)): the residual MLP is
  another copy of the dense MLP and the coefficient layer is zero, giving 1/2 + 1/2 of the same function.

In training the router then learns from zero; with top-1 the E-fold scale meets a gate probability that
grows from 1/E, so the output scale can grow with it (at most E-fold) as the router sharpens.

Granular upcycling (granularity G > 1), with Megatron-LM's meaning of the flags: ``--num-experts E`` and
``--topk k`` are the fine-grained MoE's own (what the checkpoint records and training passes again; Megatron-LM
never multiplies --moe-router-topk by G either: its granular test runs G = 2 at top-2). The dense
MLP of width F is cut into G shards of width F/G along its hidden dimension (SwiGLU: the same rows of the gate
and of the up projection); the MoE has E/G copies of the dense MLP, so E experts of width F/G
(``--moe-ffn-hidden-size F/G`` in the written config; --ffn-hidden-size stays F for the dense layers and
the Residual-MoE MLP); expert ``c*G + g`` is shard g of copy c. The router
row of copy c is repeated for its G experts (the random initialisation of the first E/G rows), so the G
shards of a copy score the same and are chosen together: k must be a multiple of G, each token then picks
k/G whole copies (default k = G: one copy, the paper's top-1 made granular; k = 2G: top-2). The kept weights
are renormalised to sum to 1, so each chosen copy's G shards carry the same weight w_c with sum_c w_c = 1/G;
every expert's output projection w2 is multiplied by G (b2 copied unchanged, b1 split with its rows), so
sum_c w_c * (G * sum_g shard_g(x) + G * b2) = mlp(x): the dense function exactly, whatever the router says
(with Residual-MoE the residual MLP is again the whole dense MLP and the coefficient layer zero). Megatron-LM
spreads its factor over the layers (G^(1/3) on fc1 and fc2 for SwiGLU, G^(1/2) for GeLU), exact only for
(squared) ReLU; here the whole factor sits on the linear output projection, exact for GeLU and SwiGLU, with
or without biases. Refused with a one-line error: F or E not divisible by G, k not a multiple of G, and a
router whose kept weights do not sum to 1 (Megatron-LM routing with ``--moe-router-pre-softmax`` and no
normalisation, a ``--moe-router-topk-scaling-factor``, or group-limited routing). Exactness needs every
assignment kept (no token dropped under a capacity) and, at k = 2 in training, the deterministic second
choice (``--disable-moe-top2-2nd-expert-sampling``): DeepSpeed's sampled second expert may belong to
another copy. Evaluation routing is exact.
"""
from __future__ import annotations

import copy

import torch

from megatron.checkpoint.stored_config import read_checkpoint_config
from megatron.checkpoint.weights_only import write_weights_checkpoint
from megatron.config.schema import ModelConfig
from megatron.errors import UserError
from megatron.inference.load import load_model
from megatron.model.gpt_model import GPTModel
from megatron.model.moe.layer import MoELayer
from megatron.model.moe.routers import MegatronRouter, TopKRouter

GRANULARITY_FLAG = "--moe-upcycling-granularity"


def _shards(w: torch.Tensor, G: int, gated: bool) -> torch.Tensor:
    """w [F1, ...] (rows along the MLP's hidden dimension; SwiGLU: gate rows then up rows) -> [G, F1/G, ...]:
    shard g holds rows g*F/G..(g+1)*F/G (SwiGLU: those of the gate, then the same of the up projection)."""
    if not gated:
        return w.reshape(G, -1, *w.shape[1:])
    gate, up = w.chunk(2, dim=0)
    return torch.cat([gate.reshape(G, -1, *w.shape[1:]), up.reshape(G, -1, *w.shape[1:])], dim=1)


def upcycle_model(dense, moe, granularity: int = 1) -> None:
    """Fill ``moe`` (GPTModel, every expert local) from ``dense`` (GPTModel without MoE layers); ``granularity``
    G: each expert is 1/G of the dense MLP (its width ``ffn_hidden_size / G``), see the module docstring."""
    G = granularity
    dense_params = dict(dense.named_parameters())
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name in dense_params:
                p.copy_(dense_params[name])
        for layer_dense, layer_moe in zip(dense.layers, moe.layers):
            m = layer_moe.mlp
            if not isinstance(m, MoELayer):
                continue
            mlp, E, gated = layer_dense.mlp.mlp, m.num_experts, m.experts.gated
            uniform = G == 1 and _top1_uniform(m.router)
            if G == 1:  # DeepSpeed's top-1: the chosen weight is 1/E (zero router); else the kept weights sum to 1
                w2_scale = b2_scale = float(E) if uniform else 1.0
            else:  # each chosen copy's G shards share a weight, the copies' weights sum to 1/G
                w2_scale, b2_scale = float(G), 1.0
            # SwiGLU: fc1 [2F, H] is [gate; up] rows and w1 [E, H, 2F'] gate columns then up: shard g of both
            w1 = _shards(mlp.fc1.weight, G, gated).transpose(1, 2)  # [G, H, F1/G]
            m.experts.w1.copy_(w1.repeat(E // G, 1, 1))  # expert c*G + g = shard g
            w2 = mlp.fc2.weight.t().reshape(G, -1, mlp.fc2.weight.shape[0])  # [G, F/G, H]
            m.experts.w2.copy_(w2_scale * w2.repeat(E // G, 1, 1))
            if getattr(m.experts, "b1", None) is not None:  # none under --disable-bias-linear (Llama-style)
                m.experts.b1.copy_(_shards(mlp.fc1.bias, G, gated).repeat(E // G, 1))
            if getattr(m.experts, "b2", None) is not None:
                m.experts.b2.copy_(b2_scale * mlp.fc2.bias[None].expand_as(m.experts.b2))
            wg = m.router.wg.weight  # [E, H]
            if G > 1:  # copy c's row for its G shards: they score the same and are chosen together
                wg.copy_(wg[: E // G].repeat_interleave(G, dim=0))
            elif uniform:
                wg.zero_()
            # weights that sum to 1 (top-2, a normalised Megatron-LM router): with equal experts any router gives the
            # dense function, so it keeps its random initialisation (Megatron-LM's upcycling) to break the symmetry
            if m.residual:
                m.residual_mlp.load_state_dict(mlp.state_dict())
                m.coefficient.weight.zero_()
                m.coefficient.bias.zero_()


def _top1_uniform(router) -> bool:
    """Whether the one kept weight is the softmax probability (1/E from a zero router): DeepSpeed's top-1, or
    Megatron-LM's un-normalised softmax top-1; otherwise the kept weights must sum to 1 (see
    :func:`_routing_problem`)."""
    if isinstance(router, TopKRouter):
        return router.topk == 1
    return isinstance(router, MegatronRouter) and router.topk == 1 and not router.normalize and not router.sigmoid \
        and router.scaling is None


def _routing_problem(router, granular: bool) -> str | None:
    """Why upcycling cannot give the dense function with this router, or None: its kept top-k weights must sum
    to 1 (plain upcycling also takes top-1 softmax weights, :func:`_top1_uniform`); granular upcycling also needs
    a copy's shards chosen together."""
    if isinstance(router, TopKRouter) or (not granular and _top1_uniform(router)):
        return None  # DeepSpeed's (and its aux-free variant): renormalised at k > 1
    if isinstance(router, MegatronRouter):
        if not router.normalize:
            return "its top-k weights are not normalised (--moe-router-pre-softmax; --moe-router-norm-topk-prob)"
        if router.scaling is not None:
            return "--moe-router-topk-scaling-factor scales its weights"
        if granular and router.num_groups is not None:
            return "group-limited routing (--moe-router-num-groups) may split a copy's shards"
        return None
    return f"the router {type(router).__name__} is not known to renormalise its top-k weights"


def upcycle_checkpoint(load: str, save_dir: str, num_experts: list, expert_interval: int, mlp_type: str,
                       topk: int | None = None, granularity: int = 1) -> dict:
    """``topk`` None: ``granularity`` (top-1 over the dense copies)."""
    _, common = read_checkpoint_config(load)
    config = copy.deepcopy(common["config"])
    dense_cfg = ModelConfig.from_dict(config["model"])
    if dense_cfg.moe.enabled:
        raise UserError(f"--load {load}: this checkpoint already has MoE layers; upcycle starts from a dense one")
    if any(e < 2 for e in num_experts):
        raise UserError(f"--num-experts {num_experts}: each MoE layer needs at least 2 experts")
    G = granularity
    if G < 1:
        raise UserError(f"{GRANULARITY_FLAG} {G}: must be >= 1 (1: every expert a whole copy of the dense MLP)")
    topk = G if topk is None else topk
    F = dense_cfg.ffn_hidden_size
    if G == 1 and topk not in (1, 2):
        raise UserError(f"--topk {topk}: upcycling without {GRANULARITY_FLAG} gives top-1 or top-2")
    if G > 1:
        if F % G:
            raise UserError(f"{GRANULARITY_FLAG} {G} does not divide the dense MLP width --ffn-hidden-size {F}: "
                            f"choose a divisor of {F}")
        bad = sorted({e for e in num_experts if e % G})
        if bad:
            raise UserError(f"{GRANULARITY_FLAG} {G}: --num-experts {bad} is not a multiple of {G} (E = {G} x the "
                            f"copies of the dense MLP)")
        if topk % G:
            raise UserError(f"{GRANULARITY_FLAG} {G}: --topk {topk} is not a multiple of {G} (the {G} shards of a "
                            f"copy are chosen together: --topk {G} picks one copy, {2 * G} two)")
    moe_cfg = dict(num_experts=list(num_experts), expert_interval=expert_interval, mlp_type=mlp_type, topk=topk,
                   expert_parallel_size=1)
    if G > 1:
        moe_cfg["moe_ffn_hidden_size"] = F // G
    config["model"]["moe"].update(moe_cfg)
    cfg = ModelConfig.from_dict(config["model"])
    cfg.validate()
    moe = GPTModel(cfg)
    for layer in moe.layers:
        problem = _routing_problem(layer.mlp.router, G > 1) if isinstance(layer.mlp, MoELayer) else None
        if problem:
            raise UserError(f"{GRANULARITY_FLAG} {G} needs top-k weights that sum to 1, and {problem}" if G > 1 else
                            f"upcycle --topk {topk}: the dense function needs top-k weights that sum to 1 (or top-1 "
                            f"softmax weights), and {problem}")
    dense = load_model(load, "cpu").model
    upcycle_model(dense, moe, G)
    write_weights_checkpoint(save_dir, moe, config, int(common["iteration"]), int(common.get("consumed_samples") or 0))
    return {"from_iteration": int(common["iteration"]), "experts_per_layer": cfg.moe.experts_per_layer(cfg.num_layers),
            "topk": topk, "granularity": G, "expert_ffn_hidden_size": F // G}
