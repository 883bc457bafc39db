"""Mixture-of-experts options: which layers are MoE, gating, capacity, the auxiliary losses, expert parallelism.

Part of the option schema (``megatron.config.schema``): every option is declared once, here, with its
flag, type, default, help and check; ``ModelConfig.moe`` holds one of these.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from megatron.config.options import check_options, non_negative, none_or_str, option, positive
from megatron.errors import check

MAX_AUX_COEFF = 100.0  # --moe-loss-coeff / --moe-z-loss-coeff: papers use 1e-3 .. 1e-1; far above is a typo


@dataclass
class MoEConfig:
    """DeepSpeed-MoE semantics: which layers are MoE, gating, capacity and the auxiliary losses."""

    OPTION_GROUP: ClassVar[str] = "mixture of experts"

    num_experts: list[int] = option(
        "--num-experts", [1], "experts per MoE layer: one value for every MoE layer, or one value per MoE layer "
        "(PR-MoE, e.g. 32 32 64 64); 1 means dense", check=(positive, "values must be >= 1"))
    expert_interval: int = option("--expert-interval", 2, "every n-th layer (1-based n %% interval == 0) is an MoE layer",
                                  check=(positive, "must be >= 1"))
    mlp_type: str = option("--mlp-type", "standard", "MoE layer kind: standard, or residual (Residual-MoE: a dense MLP "
                           "plus the chosen expert, mixed by a learned coefficient)", choices=["standard", "residual"])
    topk: int = option("--topk", 1, "experts chosen per token (top-1 or top-2 gating)", check=(positive, "must be >= 1"),
                       aliases=("--moe-router-topk",))
    expert_parallel_size: int = option("--moe-expert-parallel-size", 1, "expert-parallel group size: each rank holds "
                                       "1/EP of every MoE layer's experts", check=(positive, "must be >= 1"),
                                       aliases=("--expert-model-parallel-size",))
    token_dispatcher_type: str = option(
        "--moe-token-dispatcher-type", "alltoall", "how expert parallelism moves routed tokens to the experts "
        "and back, a name in TOKEN_DISPATCHERS (megatron/parallel/expert_parallel.py): alltoall (each rank sends "
        "each expert rank only the tokens routed there) or allgather (Megatron-LM's: all-gather the tokens and their "
        "routing over the EP group, reduce-scatter the outputs); without expert parallelism the layer's local "
        "dispatcher runs")
    train_capacity_factor: float = option("--moe-train-capacity-factor", 1.0, "expert capacity in training: "
                                          "ceil(tokens / experts * k * factor) slots per expert", check=(positive, "must be > 0"))
    eval_capacity_factor: float = option("--moe-eval-capacity-factor", 1.0, "expert capacity factor in evaluation",
                                         check=(positive, "must be > 0"))
    min_capacity: int = option("--moe-min-capacity", 4, "lower bound on the slots of each expert",
                               check=(non_negative, "must be >= 0"))
    loss_coeff: float = option("--moe-loss-coeff", 0.1, "weight of the load-balancing (aux) loss, summed over MoE layers",
                               check=(lambda v: 0 <= v <= MAX_AUX_COEFF, f"must be in [0, {MAX_AUX_COEFF:g}] (DeepSpeed-MoE "
                                      f"uses 0.01; a huge weight swamps the LM loss and sends grad norms to 1e38)"),
                               aliases=("--moe-aux-loss-coeff",))
    token_dropping: bool = option("--disable-moe-token-dropping", True, "no-drop MoE: every token reaches its experts "
                                  "(capacity grows to the demand)")
    top2_2nd_expert_sampling: bool = option("--disable-moe-top2-2nd-expert-sampling", True,
                                            "top-2: take the second-best expert instead of a Gumbel-sampled one in training")
    noisy_gate_policy: Optional[str] = option("--moe-noisy-gate-policy", None, "gate noise in training: None, Jitter "
                                              "(multiplicative input noise) or RSample (Gumbel on the logits, top-1)",
                                              type=none_or_str, check=(lambda v: v in ("Jitter", "RSample"), "must be None, Jitter or RSample"))
    z_loss_coeff: float = option("--moe-z-loss-coeff", 0.0, "weight of the router z-loss (mean squared logsumexp of "
                                 "the gate logits)", check=(lambda v: 0 <= v <= MAX_AUX_COEFF,
                                                            f"must be in [0, {MAX_AUX_COEFF:g}] (ST-MoE uses 1e-3)"))
    router_type: str = option("--moe-router-type", "topk", "router, a name in megatron/model/moe/routers")
    router_bias_update_rate: float = option("--moe-router-bias-update-rate", 1e-3, "aux_free router: bias step per "
                                            "optimizer step (bias += rate * sign(mean load - load))",
                                            check=(non_negative, "must be >= 0"))
    use_rts: bool = option("--disable-moe-rts", True, "top-1 under a capacity: keep tokens in position order instead "
                           "of random token selection (DeepSpeed's use_rts=False); top-2 always keeps position order")
    token_drop_policy: str = option("--moe-token-drop-policy", "deepspeed", "which assignments an expert keeps "
                                    "under a capacity: deepspeed (top-1: random token selection in training; top-2: "
                                    "first choices, then second, in position order; top-k > 2: by gate probability), "
                                    "probs (highest gate probability first, Megatron-LM's default) or position "
                                    "(earliest tokens first)", choices=["deepspeed", "probs", "position"])
    gradient_accumulation_fusion: bool = option("--no-gradient-accumulation-fusion", True, "experts' weight "
                                                "gradients through autograd instead of accumulating in place into .grad")
    force_layer: bool = option("--moe-force-layer", False, "build MoE layers in the MoE positions even with "
                               "--num-experts 1 (a one-expert MoE layer, e.g. to check it against the dense model)")

    def is_moe_layer(self, index: int, num_experts: int) -> bool:
        """Whether layer ``index`` (0-based) with ``num_experts`` experts is an MoE layer: more than one
        expert, or an MoE position with one expert under force_layer."""
        return num_experts > 1 or (self.force_layer and (index + 1) % self.expert_interval == 0)

    def layer_ep_size(self, num_experts: int) -> int:
        """The EP degree of an MoE layer with ``num_experts`` experts: ``--moe-expert-parallel-size``, or the
        expert count when the layer has fewer experts (PR-MoE), its other ranks then being extra
        expert-data-parallel replicas of the layer."""
        return min(self.expert_parallel_size, num_experts)

    def layer_ep_sizes(self, num_layers: int) -> list[int]:
        """The distinct EP degrees of the MoE layers, ascending."""
        return sorted({self.layer_ep_size(e) for i, e in enumerate(self.experts_per_layer(num_layers))
                       if self.is_moe_layer(i, e)})

    def experts_per_layer(self, num_layers: int) -> list[int]:
        """Experts of each layer (0-based); 1 means a dense MLP.

        A layer is MoE when its 1-based index n satisfies n % expert_interval == 0.
        """
        moe_layers = [i for i in range(num_layers) if (i + 1) % self.expert_interval == 0]
        if len(self.num_experts) == 1:
            per_moe = self.num_experts * len(moe_layers)
        else:
            per_moe = list(self.num_experts)
        out = [1] * num_layers
        for i, e in zip(moe_layers, per_moe):
            out[i] = e
        return out

    @property
    def enabled(self) -> bool:
        return any(e > 1 for e in self.num_experts) or self.force_layer

    def validate(self, num_layers: int) -> None:
        check_options(self)
        n_moe = num_layers // self.expert_interval
        check(
            len(self.num_experts) in (1, n_moe),
            f"--num-experts has {len(self.num_experts)} values but --num-layers {num_layers} with "
            f"--expert-interval {self.expert_interval} gives {n_moe} MoE layers: give one value or {n_moe}",
        )
        moe_counts = [e for i, e in enumerate(self.experts_per_layer(num_layers)) if self.is_moe_layer(i, e)]
        if moe_counts:
            check(
                self.topk <= min(moe_counts),
                f"--topk {self.topk} exceeds the experts of a MoE layer ({min(moe_counts)}): lower --topk or raise --num-experts",
            )
        ep = self.expert_parallel_size
        for e in moe_counts:
            check(
                e % ep == 0 or ep % e == 0,
                f"--moe-expert-parallel-size {ep} and a layer's expert count {e} do not divide one another: a layer "
                f"runs at EP = min(EP size, its experts), so choose an EP size that each value of --num-experts "
                f"divides or is divided by",
            )
        check(
            not (self.noisy_gate_policy == "RSample" and self.topk != 1),
            "--moe-noisy-gate-policy RSample works with --topk 1 only: use Jitter or None for top-k > 1",
        )
