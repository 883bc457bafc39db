"""Mixture-of-experts options: which layers are MoE, gating, capacity, the auxiliary losses, expert parallelism.

Part of the option schema (``megatron.config.schema``): every option is declared once, here, with its
flag, type, default, help and check; ``ModelConfig.moe`` holds one of these.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar, Optional

from megatron.config.options import check_options, non_negative, none_or_str, option, positive
from megatron.errors import UserError, check

MAX_AUX_COEFF = 100.0  # --moe-loss-coeff / --moe-z-loss-coeff: papers use 1e-3 .. 1e-1; far above is a typo
# the routers with Megatron-LM / transformers semantics (megatron/model/moe/routers/megatron.py): without and with
# the aux-loss-free expert bias; the DeepSpeed ones are "topk" and "aux_free"
MEGATRON_ROUTERS = ("megatron", "megatron_aux_free")


def on_off(v) -> bool:
    """true/false, 1/0, yes/no, on/off -> bool (for options whose unset value means "derive it")."""
    if isinstance(v, bool):
        return v
    text = str(v).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {v!r}")


on_off.__name__ = "true/false"  # argparse names the type in its message


_PATTERN_TOKEN = re.compile(r"\s*(?:(\d+)|(.))")


def parse_layer_pattern(text: str) -> list[int]:
    """A ``--moe-layer-freq`` pattern -> its list of 0/1 (1: MoE layer), without eval.

    Grammar (Megatron-LM's forms): ``expr := term ('+' term)*``, ``term := list ['*' INT] | INT '*' list``,
    ``list := '[' INT (',' INT)* ']'``; the whole may be wrapped in parentheses: ``([0]*3+[1]*58)``, ``[0,1,1]``.
    """
    toks = []
    for num, ch in _PATTERN_TOKEN.findall(text.strip()):
        if num:
            toks.append(int(num))
        elif ch.strip():
            toks.append(ch)
    while len(toks) >= 2 and toks[0] == "(" and toks[-1] == ")":
        toks = toks[1:-1]
    pos = 0

    def bad(what: str):
        return UserError(f"--moe-layer-freq {text!r}: {what}; give an integer N (every N-th layer from layer 0) "
                         f"or a pattern such as [0,1,1] or ([0]*3+[1]*58)")

    def peek():
        return toks[pos] if pos < len(toks) else None

    def take(expected=None):
        nonlocal pos
        t = peek()
        if t is None or (expected is not None and t != expected) or (expected is None and not isinstance(t, int)):
            raise bad(f"expected {expected or 'a number'} at token {pos + 1}")
        pos += 1
        return t

    def a_list() -> list[int]:
        take("[")
        out = [take()]
        while peek() == ",":
            take(",")
            out.append(take())
        take("]")
        return out

    def term() -> list[int]:
        if isinstance(peek(), int):
            n = take()
            take("*")
            return a_list() * n
        out = a_list()
        if peek() == "*":
            take("*")
            out = out * take()
        return out

    if not toks:
        raise bad("empty")
    layers = term()
    while peek() == "+":
        take("+")
        layers += term()
    if pos != len(toks):
        raise bad(f"unexpected {toks[pos]!r}")
    if any(v not in (0, 1) for v in layers):
        raise bad("the pattern's values must be 0 (dense) or 1 (MoE)")
    return layers


@dataclass
class MoEConfig:
    """DeepSpeed-MoE semantics: which layers are MoE, gating, capacity and the auxiliary losses; and today's
    families (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3) under Megatron-LM's flag names: fine-grained and
    shared experts, the Megatron-LM / transformers routing (``routers/megatron.py``), ``--moe-layer-freq``."""

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
    # ---- today's MoE families (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3), Megatron-LM's flag names
    layer_freq: Optional[str] = option(
        "--moe-layer-freq", None, "which layers are MoE (Megatron-LM's): an integer N (0-based layer i is MoE when "
        "i %% N == 0: N=1 every layer; our --expert-interval n is the 1-based (i + 1) %% n == 0) or a pattern of "
        "0/1 per layer, e.g. ([0]*3+[1]*58) (DeepSeek-V3's three dense first layers) or [0,1,1]; overrides "
        "--expert-interval", type=str)
    moe_ffn_hidden_size: Optional[int] = option("--moe-ffn-hidden-size", None, "width of each routed expert "
                                                "(fine-grained experts; default --ffn-hidden-size)", type=int,
                                                check=(positive, "must be >= 1"))
    shared_expert_intermediate_size: Optional[int] = option(
        "--moe-shared-expert-intermediate-size", None, "width of the shared expert(s) of every MoE layer: a dense "
        "MLP (SwiGLU under --swiglu) on every token, added to the routed output (DeepSeek: n_shared x the expert "
        "width; Qwen2-MoE: shared_expert_intermediate_size)", type=int, check=(positive, "must be >= 1"))
    shared_expert_gate: bool = option("--moe-shared-expert-gate", False, "scale the shared expert's output by "
                                      "sigmoid(x @ w_gate), w_gate [1, H] (Qwen2-MoE)")
    router_score_function: str = option("--moe-router-score-function", "softmax", "router scores: softmax (over "
                                        "the experts) or sigmoid (per expert, DeepSeek-V3)",
                                        choices=["softmax", "sigmoid"])
    router_pre_softmax: bool = option("--moe-router-pre-softmax", False, "softmax over all experts, then top-k, "
                                      "weights not renormalised (Qwen2-MoE / OLMoE norm_topk_prob=False); "
                                      "default: the top-k weights sum to 1 (Mixtral, Qwen3-MoE)")
    router_norm_topk_prob: Optional[bool] = option(
        "--moe-router-norm-topk-prob", None, "true/false: divide the k chosen scores by their sum (transformers' "
        "norm_topk_prob); default Megatron-LM's: softmax without --moe-router-pre-softmax, or sigmoid at k > 1",
        type=on_off)
    router_topk_scaling_factor: Optional[float] = option(
        "--moe-router-topk-scaling-factor", None, "multiply the routed weights by this (DeepSeek-V3's "
        "routed_scaling_factor, 2.5)", type=float, check=(positive, "must be > 0"))
    router_num_groups: Optional[int] = option(
        "--moe-router-num-groups", None, "group-limited routing: the experts form this many equal groups (by id; "
        "DeepSeek-V3 n_group); each token picks --moe-router-group-topk groups by the sum of their 2 best "
        "scores, then its top-k experts inside them", type=int, check=(positive, "must be >= 1"))
    router_group_topk: Optional[int] = option("--moe-router-group-topk", None, "groups each token may route to "
                                              "(DeepSeek-V3 topk_group)", type=int, check=(positive, "must be >= 1"))
    router_enable_expert_bias: bool = option(
        "--moe-router-enable-expert-bias", False, "aux-loss-free balancing (DeepSeek-V3): a per-expert bias added "
        "to the scores for the choice only, stepped by --moe-router-bias-update-rate after each optimizer step "
        "(with the DeepSpeed router this is --moe-router-type aux_free)")
    router_load_balancing_type: Optional[str] = option(
        "--moe-router-load-balancing-type", None, "the balancing loss weighted by --moe-aux-loss-coeff "
        "(Megatron-LM's): aux_loss (over the micro-batch), seq_aux_loss (per sequence, DeepSeek-V3) or none; "
        "default: the DeepSpeed router's own", type=str, choices=["aux_loss", "seq_aux_loss", "none"])
    router_dtype: Optional[str] = option("--moe-router-dtype", None, "router precision: fp32 (what every router "
                                         "computes in anyway) or fp64", type=str, choices=["fp32", "fp64"])

    def __post_init__(self):
        """Resolve the router class from the flags: the Megatron-LM / transformers routing flags (any of them
        set) choose the "megatron" router, and the expert bias its "megatron_aux_free" variant; with the
        DeepSpeed router the expert bias is "aux_free". Idempotent (a saved config reloads to itself)."""
        if self.router_type not in ("topk", "aux_free", *MEGATRON_ROUTERS):
            return  # another registered router: left as named (the registry check names a bad one)
        modern = self.router_type in MEGATRON_ROUTERS or self.uses_megatron_routing_flags()
        bias = self.router_enable_expert_bias or self.router_type in ("aux_free", "megatron_aux_free")
        self.router_enable_expert_bias = bias
        if modern:
            self.router_type = "megatron_aux_free" if bias else "megatron"
        else:
            self.router_type = "aux_free" if bias else "topk"

    def uses_megatron_routing_flags(self) -> bool:
        """Whether any flag of the Megatron-LM / transformers routing is set (then the "megatron" router runs)."""
        return (self.router_score_function != "softmax" or self.router_pre_softmax
                or self.router_norm_topk_prob is not None or self.router_topk_scaling_factor is not None
                or self.router_num_groups is not None or self.router_group_topk is not None
                or self.router_load_balancing_type is not None or self.router_dtype == "fp64")

    def moe_layer_pattern(self, num_layers: int) -> list[bool]:
        """Which layers (0-based) are MoE positions: ``--moe-layer-freq`` when given, else ``--expert-interval``."""
        if self.layer_freq is None:
            return [(i + 1) % self.expert_interval == 0 for i in range(num_layers)]
        text = str(self.layer_freq).strip()
        if text.isdigit():
            n = int(text)
            check(n >= 1, f"--moe-layer-freq must be >= 1 (got {n})")
            return [i % n == 0 for i in range(num_layers)]
        pattern = parse_layer_pattern(text)
        check(len(pattern) == num_layers, f"--moe-layer-freq {text} gives {len(pattern)} layers but --num-layers "
                                          f"is {num_layers}: give one 0/1 per layer")
        return [bool(v) for v in pattern]

    def is_moe_layer(self, index: int, num_experts: int) -> bool:
        """Whether layer ``index`` (0-based) with ``num_experts`` experts is an MoE layer: more than one
        expert, or an MoE position with one expert under force_layer."""
        if num_experts > 1 or not self.force_layer:
            return num_experts > 1
        if self.layer_freq is None:
            return (index + 1) % self.expert_interval == 0
        text = str(self.layer_freq).strip()
        if text.isdigit():
            return index % max(int(text), 1) == 0
        pattern = parse_layer_pattern(text)
        return index < len(pattern) and bool(pattern[index])

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

        A layer is MoE when :meth:`moe_layer_pattern` marks it (by default its 1-based index n satisfies
        n % expert_interval == 0).
        """
        moe_layers = [i for i, m in enumerate(self.moe_layer_pattern(num_layers)) if m]
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
        n_moe = sum(self.moe_layer_pattern(num_layers))
        layout = (f"--expert-interval {self.expert_interval}" if self.layer_freq is None
                  else f"--moe-layer-freq {self.layer_freq}")
        check(
            len(self.num_experts) in (1, n_moe),
            f"--num-experts has {len(self.num_experts)} values but --num-layers {num_layers} with "
            f"{layout} gives {n_moe} MoE layers: give one value or {n_moe}",
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
        self._validate_megatron_routing(moe_counts)
        check(self.shared_expert_intermediate_size is not None or not self.shared_expert_gate,
              "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size (the shared expert it gates)")
        check(self.shared_expert_intermediate_size is None or self.mlp_type == "standard",
              "--moe-shared-expert-intermediate-size and --mlp-type residual both add a dense MLP to the experts: "
              "choose one")

    def _validate_megatron_routing(self, moe_counts: list[int]) -> None:
        if self.router_type not in MEGATRON_ROUTERS:
            return
        check(self.noisy_gate_policy != "RSample", "--moe-noisy-gate-policy RSample is the DeepSpeed top-1 gate's: "
                                                  "the Megatron-LM routing flags take Jitter or None")
        groups, group_topk = self.router_num_groups, self.router_group_topk
        check((groups is None) == (group_topk is None),
              "--moe-router-num-groups and --moe-router-group-topk go together: give both or neither")
        if groups is None:
            return
        check(group_topk <= groups, f"--moe-router-group-topk {group_topk} exceeds --moe-router-num-groups {groups}")
        for e in moe_counts:
            check(e % groups == 0, f"--moe-router-num-groups {groups} does not divide a MoE layer's {e} experts")
            check(self.topk <= group_topk * (e // groups),
                  f"--topk {self.topk} exceeds the experts of --moe-router-group-topk {group_topk} groups of "
                  f"{e // groups}: raise --moe-router-group-topk")
