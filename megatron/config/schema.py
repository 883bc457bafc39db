"""Typed, self-validating configuration.

Every command-line option is declared once, here, as a dataclass field made by
:func:`megatron.config.options.option` (flag, type, default, help, per-option check). To add a flag, add a
field to the dataclass it belongs to; ``megatron/training/arguments.py`` generates the parser from these
fields and builds the :class:`Config` back, and nothing else reads argparse output. Each dataclass
checks itself in ``validate()`` (per-option checks, then cross-option ones) and raises
:class:`~megatron.errors.UserError` naming the flag and the fix.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from megatron.config.compat.ds_config import read_deepspeed_config
from megatron.config.moe import MoEConfig  # noqa: F401  (re-exported: the schema's MoE section)
from megatron.config.options import check_options, non_negative, option, positive, unit_interval
from megatron.config.pipeline_layout import build_layout
from megatron.errors import UserError, check


@dataclass
class ModelConfig:
    OPTION_GROUP: ClassVar[str] = "model"

    model_family: str = option("--model-family", "gpt", "the network's class, a name in megatron/model/families.py")
    num_layers: int = option("--num-layers", 2, "transformer layers", check=(positive, "must be >= 1"))
    hidden_size: int = option("--hidden-size", 64, "model width H (embedding and residual stream)", check=(positive, "must be >= 1"))
    num_attention_heads: int = option("--num-attention-heads", 4, "attention heads (must divide --hidden-size)",
                                      check=(positive, "must be >= 1"))
    ffn_hidden_size: Optional[int] = option("--ffn-hidden-size", None, "MLP and expert width F (default 4 x hidden)",
                                            type=int, check=(positive, "must be >= 1"))
    seq_length: int = option("--seq-length", 128, "tokens per training sample", check=(positive, "must be >= 1"))
    max_position_embeddings: Optional[int] = option("--max-position-embeddings", None,
                                                    "learned positions (default --seq-length)", type=int,
                                                    check=(positive, "must be >= 1"))
    vocab_size: int = option("--vocab-size", 0, "vocabulary size for --mock-data / NullTokenizer (a real tokenizer "
                             "sets it; the model pads it)", check=(non_negative, "must be >= 0"))
    true_vocab_size: Optional[int] = option(
        "--true-vocab-size", None, "the real vocabulary below the padded one (Megatron-LM's converter name): the "
        "logits of the padding ids are masked out of the loss, scoring and generation, and an export keeps only "
        "these rows (import-hf sets it when it pads; unset: padding rows are ordinary outputs, as in Megatron)",
        type=int, check=(positive, "must be >= 1"))
    init_method_std: float = option("--init-method-std", 0.02, "standard deviation of the normal weight init",
                                    check=(positive, "must be > 0"))
    hidden_dropout: float = option("--hidden-dropout", 0.1, "dropout on the residual branches",
                                   check=(unit_interval, "must be in [0, 1)"))
    attention_dropout: float = option("--attention-dropout", 0.1, "dropout on the attention probabilities",
                                      check=(unit_interval, "must be in [0, 1)"))
    layernorm_epsilon: float = option("--layernorm-epsilon", 1e-5, "epsilon of every LayerNorm / RMSNorm",
                                      check=(positive, "must be > 0"), aliases=("--norm-epsilon",))
    # ---- the block specification (Megatron-LM's names); the defaults are the GPT-3 block
    position_embedding_type: str = option("--position-embedding-type", "learned_absolute", "positions: learned "
                                          "absolute embeddings (GPT) or rotary embeddings on q and k (rope, Llama)",
                                          type=str, choices=["learned_absolute", "rope"])
    add_position_embedding: bool = option("--no-position-embedding", True, "no learned absolute position embeddings "
                                          "(implied by --position-embedding-type rope)")
    rotary_base: float = option("--rotary-base", 10000.0, "RoPE base theta", type=float, check=(positive, "must be > 0"))
    rotary_percent: float = option("--rotary-percent", 1.0, "share of each head's dims that RoPE rotates (the first "
                                   "ones; partial rotary)", type=float,
                                   check=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    normalization: str = option("--normalization", "LayerNorm", "the norm of every block, the final norm and the "
                                "qk-norm", type=str, choices=["LayerNorm", "RMSNorm"])
    swiglu: bool = option("--swiglu", False, "SwiGLU MLPs: fc1 gives gate and up ([2F, H]), silu(gate) * up "
                          "(default --ffn-hidden-size then int(8H/3 / 64) * 64, as Megatron-LM)")
    add_bias_linear: bool = option("--disable-bias-linear", True, "no biases in the attention and MLP linears")
    add_qkv_bias: bool = option("--add-qkv-bias", False, "biases in the q, k, v projections even with "
                                "--disable-bias-linear (Qwen2)")
    group_query_attention: bool = option("--group-query-attention", False, "grouped-query attention: "
                                         "--num-query-groups key/value heads shared by the query heads")
    num_query_groups: Optional[int] = option("--num-query-groups", None, "key/value heads with --group-query-attention "
                                             "(must divide --num-attention-heads)", type=int,
                                             check=(positive, "must be >= 1"))
    qk_layernorm: bool = option("--qk-layernorm", False, "normalise q and k per head (over the head dim) before RoPE "
                                "(Qwen3, OLMoE)")
    qk_layernorm_full: bool = option("--qk-layernorm-full", False, "with --qk-layernorm: normalise the whole q and "
                                     "k projections (q over all heads, k over all key/value heads) instead of each "
                                     "head (OLMoE's q_norm / k_norm)")
    kv_channels: Optional[int] = option("--kv-channels", None, "head dim (default --hidden-size / "
                                        "--num-attention-heads)", type=int, check=(positive, "must be >= 1"))
    # ---- multi-latent attention (DeepSeek-V2 / V3; Megatron-LM's names), megatron/model/mla.py
    multi_latent_attention: bool = option("--multi-latent-attention", False, "multi-latent attention (DeepSeek-V3) "
                                          "instead of multi-head / grouped-query attention (needs --position-"
                                          "embedding-type rope)")
    q_lora_rank: Optional[int] = option("--q-lora-rank", None, "MLA: rank of the query compression (default: no "
                                        "compression, one q projection)", type=int, check=(positive, "must be >= 1"))
    kv_lora_rank: int = option("--kv-lora-rank", 32, "MLA: rank of the key/value compression (the latent)",
                               check=(positive, "must be >= 1"))
    qk_head_dim: int = option("--qk-head-dim", 128, "MLA: per-head q / k dims without RoPE (the nope part)",
                              check=(positive, "must be >= 1"))
    qk_pos_emb_head_dim: int = option("--qk-pos-emb-head-dim", 64, "MLA: per-head q / k dims with RoPE (the "
                                      "rotary part; the key's is one head shared by all)",
                                      check=(positive, "must be >= 1"))
    v_head_dim: int = option("--v-head-dim", 128, "MLA: per-head value dims", check=(positive, "must be >= 1"))
    rope_type: Optional[str] = option("--rope-type", None, "MLA: RoPE frequencies, rope or yarn (YaRN, DeepSeek-V3's "
                                      "context extension; default rope)", type=str, choices=["rope", "yarn"])
    rotary_scaling_factor: float = option("--rotary-scaling-factor", 1.0, "YaRN: context extension factor (DeepSeek-V3: "
                                          "40)", type=float, check=(positive, "must be > 0"))
    mscale: float = option("--mscale", 1.0, "YaRN: mscale of the attention factor on cos / sin", type=float,
                           check=(non_negative, "must be >= 0"))
    mscale_all_dim: float = option("--mscale-all-dim", 0.0, "YaRN: mscale_all_dim (the softmax scale is multiplied by "
                                   "(0.1 mscale_all_dim ln factor + 1)^2; 0: not)", type=float,
                                   check=(non_negative, "must be >= 0"))
    beta_fast: float = option("--beta-fast", 32.0, "YaRN: rotations above which a dim keeps its frequency",
                              type=float, check=(positive, "must be > 0"))
    beta_slow: float = option("--beta-slow", 1.0, "YaRN: rotations below which a dim is interpolated", type=float,
                              check=(positive, "must be > 0"))
    original_max_position_embeddings: Optional[int] = option(
        "--original-max-position-embeddings", None, "YaRN: the pre-training context the factor extends (DeepSeek-V3: "
        "4096)", type=int, check=(positive, "must be >= 1"))
    untie_embeddings_and_output_weights: bool = option("--untie-embeddings-and-output-weights", False, "a separate "
                                                       "output layer [V, H] instead of the word embeddings")
    checkpoint_activations: bool = option("--checkpoint-activations", False, "recompute each layer's activations in "
                                          "the backward pass (saves memory)",
                                          aliases=("--recompute-activations", "--deepspeed-activation-checkpointing"))
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.ffn_hidden_size is None:  # Megatron-LM's defaults
            self.ffn_hidden_size = int(4 * self.hidden_size * 2 / 3 / 64) * 64 if self.swiglu else 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads: --num-query-groups with --group-query-attention, else one per query head."""
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    @property
    def learned_positions(self) -> bool:
        """Whether the model holds learned absolute position embeddings."""
        return self.position_embedding_type == "learned_absolute" and self.add_position_embedding

    @property
    def rope(self) -> bool:
        return self.position_embedding_type == "rope"

    @property
    def qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias

    def validate(self) -> None:
        check_options(self)
        check(
            self.kv_channels is not None or self.multi_latent_attention or self.hidden_size % self.num_attention_heads == 0,
            f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads {self.num_attention_heads}: "
            f"choose a head count that divides the hidden size (or set --kv-channels)",
        )
        check(self.qk_layernorm or not self.qk_layernorm_full, "--qk-layernorm-full needs --qk-layernorm")
        check(not self.group_query_attention or self.num_query_groups is not None,
              "--group-query-attention needs --num-query-groups N (the key/value heads)")
        check(self.group_query_attention or self.num_query_groups is None,
              "--num-query-groups needs --group-query-attention")
        check(self.num_attention_heads % self.num_kv_heads == 0,
              f"--num-query-groups {self.num_kv_heads} does not divide --num-attention-heads "
              f"{self.num_attention_heads}")
        check(int(self.head_dim * self.rotary_percent) % 2 == 0 or not self.rope or self.multi_latent_attention,
              f"--rotary-percent {self.rotary_percent} of head dim {self.head_dim} is not an even number of dims")
        check(
            self.seq_length <= self.max_position_embeddings,
            f"--seq-length {self.seq_length} exceeds --max-position-embeddings {self.max_position_embeddings}: "
            f"raise --max-position-embeddings or shorten --seq-length",
        )
        if self.multi_latent_attention:
            self.validate_mla()
        check(self.rope_type != "yarn" or self.multi_latent_attention,
              "--rope-type yarn is implemented with --multi-latent-attention only: drop it (or add MLA)")
        self.moe.validate(self.num_layers)

    def validate_mla(self) -> None:
        """--multi-latent-attention's cross-option checks (one line each)."""
        check(self.rope, "--multi-latent-attention needs --position-embedding-type rope (RoPE on its "
              "--qk-pos-emb-head-dim part)")
        for flag, used in (("--group-query-attention", self.group_query_attention),
                           ("--qk-layernorm", self.qk_layernorm), ("--add-qkv-bias", self.add_qkv_bias),
                           ("--kv-channels", self.kv_channels is not None),
                           ("--rotary-percent", self.rotary_percent != 1.0)):
            check(not used, f"{flag} does not combine with --multi-latent-attention (MLA sets its head dims with "
                  f"--qk-head-dim, --qk-pos-emb-head-dim, --v-head-dim): drop it")
        check(self.rope_type != "yarn" or self.rotary_scaling_factor <= 1
              or self.original_max_position_embeddings is not None,
              "--rope-type yarn with --rotary-scaling-factor > 1 needs --original-max-position-embeddings (the "
              "pre-training context, DeepSeek-V3: 4096)")
        check(self.qk_pos_emb_head_dim % 2 == 0,
              f"--qk-pos-emb-head-dim {self.qk_pos_emb_head_dim} must be even (RoPE rotates pairs of dims)")

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A ModelConfig from a checkpoint's stored dict (unknown keys, e.g. from newer versions, ignored)."""
        d = dict(d)
        moe = d.pop("moe", {})
        moe = MoEConfig(**{k: v for k, v in moe.items() if k in MoEConfig.__dataclass_fields__})
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__}, moe=moe)

    def block_spec(self) -> dict:
        """The block-shape fields (positions, norm, MLP kind, biases, attention heads, tied output)."""
        return {"learned_positions": self.learned_positions, "rope": self.rope, "normalization": self.normalization,
                "swiglu": self.swiglu, "add_bias_linear": self.add_bias_linear, "qkv_bias": self.qkv_bias,
                "num_kv_heads": self.num_kv_heads, "qk_layernorm": self.qk_layernorm, "head_dim": self.head_dim,
                "untie_embeddings_and_output_weights": self.untie_embeddings_and_output_weights,
                **self.mla_spec()}

    def mla_spec(self) -> dict:
        """The MLA shape fields ({} without --multi-latent-attention, so other block specs stay as they were)."""
        if not self.multi_latent_attention:
            return {}
        return {"multi_latent_attention": True, "q_lora_rank": self.q_lora_rank, "kv_lora_rank": self.kv_lora_rank,
                "qk_head_dim": self.qk_head_dim, "qk_pos_emb_head_dim": self.qk_pos_emb_head_dim,
                "v_head_dim": self.v_head_dim}

    def architecture(self) -> dict:
        """Fields that must match for a checkpoint to load into this model."""
        keys = ("model_family", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings", "vocab_size")
        arch = {k: getattr(self, k) for k in keys}
        if not self.learned_positions:  # no parameters depend on it (RoPE): any --max-position-embeddings loads
            arch.pop("max_position_embeddings")
        arch.update(self.block_spec())
        arch["experts_per_layer"] = self.moe.experts_per_layer(self.num_layers)
        arch["mlp_type"] = self.moe.mlp_type if self.moe.enabled else "standard"
        return arch


@dataclass
class ParallelConfig:
    OPTION_GROUP: ClassVar[str] = "parallelism"

    tensor_model_parallel_size: int = option("--tensor-model-parallel-size", 1, "tensor-parallel group size (attention "
                                             "heads, MLP and vocabulary split over TP ranks)", check=(positive, "must be >= 1"))
    moe_tp_token_split: bool = option("--disable-moe-tp-token-split", True, "under TP, run every MoE layer's experts "
                                      "and all-to-all on all routed tokens on every TP rank instead of 1/TP of them on "
                                      "each (the split's expert-gradient all-reduce over TP is then not needed)")
    sequence_parallel: bool = option("--sequence-parallel", False, "with --tensor-model-parallel-size > 1: split the "
                                     "residual stream (norms, dropout, MoE layers) along the sequence over the TP "
                                     "ranks (Megatron-LM's; 1/TP of those activations); a no-op at TP 1")
    pipeline_model_parallel_size: int = option(
        "--pipeline-model-parallel-size", 1, "pipeline stages: the layers are split into this many stages on "
        "different ranks (torch.distributed.pipelining, 1F1B schedule)", check=(positive, "must be >= 1"))
    num_layers_per_virtual_pipeline_stage: Optional[int] = option(
        "--num-layers-per-virtual-pipeline-stage", None, "layers per virtual stage: each rank holds several "
        "non-consecutive chunks of layers and runs the interleaved 1F1B schedule (smaller bubble)", type=int,
        check=(positive, "must be >= 1"))
    decoder_first_pipeline_num_layers: Optional[int] = option(
        "--decoder-first-pipeline-num-layers", None, "layers of the first pipeline stage (it also holds the "
        "embeddings); the other layers are split evenly over the other stages", type=int,
        check=(non_negative, "must be >= 0"))
    decoder_last_pipeline_num_layers: Optional[int] = option(
        "--decoder-last-pipeline-num-layers", None, "layers of the last pipeline stage (it also holds the output "
        "layer and the loss)", type=int, check=(non_negative, "must be >= 0"))
    pipeline_schedule: Optional[str] = option(
        "--pipeline-schedule", None, "pipeline schedule: 1F1B (default), Interleaved1F1B (default with virtual "
        "stages) or GPipe", type=str, choices=["1F1B", "Interleaved1F1B", "GPipe"])
    overlap_grad_reduce: bool = option("--overlap-grad-reduce", False, "all-reduce gradient buckets asynchronously "
                                       "during the last micro-batch's backward")
    distributed_backend: Optional[str] = option("--distributed-backend", None, "torch.distributed backend (default: "
                                                "nccl on GPU, gloo on CPU)", type=str, choices=["gloo", "nccl"])
    use_cpu: bool = option("--use-cpu", False, "run on CPU even if a GPU is present")

    def validate(self) -> None:
        check_options(self)


@dataclass
class OptimizerConfig:
    OPTION_GROUP: ClassVar[str] = "optimizer and schedule"

    optimizer: str = option("--optimizer", "adam", "optimizer (AdamW with decoupled weight decay)", choices=["adam"])
    lr: Optional[float] = option("--lr", None, "peak learning rate (required)", type=float, check=(positive, "must be > 0"))
    min_lr: float = option("--min-lr", 0.0, "learning rate at the end of the decay", check=(non_negative, "must be >= 0"))
    lr_decay_style: str = option("--lr-decay-style", "linear", "decay after warm-up",
                                 choices=["constant", "linear", "cosine", "inverse-square-root"])
    lr_warmup_iters: int = option("--lr-warmup-iters", 0, "linear warm-up length in iterations",
                                  check=(non_negative, "must be >= 0"))
    lr_warmup_samples: int = option("--lr-warmup-samples", 0, "linear warm-up length in samples",
                                    check=(non_negative, "must be >= 0"))
    lr_warmup_tokens: Optional[int] = option("--lr-warmup-tokens", None, "linear warm-up length in tokens "
                                             "(token-based schedule)", type=int, check=(non_negative, "must be >= 0"))
    lr_warmup_fraction: Optional[float] = option("--lr-warmup-fraction", None, "warm-up as a fraction of the decay "
                                                 "length", type=float, check=(lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]"))
    lr_decay_iters: Optional[int] = option("--lr-decay-iters", None, "decay length in iterations (default: the "
                                           "training length)", type=int, check=(non_negative, "must be >= 0"))
    lr_decay_samples: Optional[int] = option("--lr-decay-samples", None, "decay length in samples", type=int,
                                             check=(non_negative, "must be >= 0"))
    lr_decay_tokens: Optional[int] = option("--lr-decay-tokens", None, "decay length in tokens (token-based schedule)",
                                            type=int, check=(non_negative, "must be >= 0"))
    weight_decay: float = option("--weight-decay", 0.01, "AdamW weight decay (not on biases and norms)",
                                 check=(non_negative, "must be >= 0"))
    adam_beta1: float = option("--adam-beta1", 0.9, "Adam beta1: decay rate of the running mean of gradients", check=(unit_interval, "must be in [0, 1)"))
    adam_beta2: float = option("--adam-beta2", 0.999, "Adam beta2: decay rate of the running mean of squared gradients", check=(unit_interval, "must be in [0, 1)"))
    adam_eps: float = option("--adam-eps", 1e-8, "Adam epsilon added to the denominator", check=(positive, "must be > 0"))
    clip_grad: float = option("--clip-grad", 1.0, "global gradient-norm clipping threshold (0 disables clipping)",
                              check=(non_negative, "must be >= 0 (0 disables clipping)"))
    use_distributed_optimizer: bool = option("--use-distributed-optimizer", False, "ZeRO stage 1: shard the Adam "
                                             "state over data-parallel ranks (experts over expert-data-parallel ranks)")
    create_moe_param_group: bool = option("--create-moe-param-group", False, "accepted for compatibility: expert "
                                          "parameters always have their own groups")
    zero_stage: Optional[int] = option("--zero-stage", None, "DeepSpeed-style: 1 = --use-distributed-optimizer "
                                       "(sharded Adam state), 2 = also sharded gradients, 3 = --use-torch-fsdp2 "
                                       "(also sharded parameters), 0 = off", type=int, choices=[0, 1, 2, 3])
    use_torch_fsdp2: bool = option("--use-torch-fsdp2", False, "ZeRO stage 3 through PyTorch FSDP2 (fully_shard): "
                                   "parameters, gradients and Adam state sharded over data-parallel ranks (experts "
                                   "over expert-data-parallel ranks)")

    def validate(self) -> None:
        check(self.lr is not None, "--lr is required: give the peak learning rate, e.g. --lr 3e-4")
        check_options(self)
        check(self.min_lr <= self.lr, f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        if self.zero_stage == 3:
            self.use_torch_fsdp2 = True
        if self.use_torch_fsdp2:
            check(self.zero_stage in (None, 3), f"--use-torch-fsdp2 (ZeRO-3) contradicts --zero-stage {self.zero_stage}: "
                                                f"use --zero-stage 3 or drop --zero-stage")
            check(not self.use_distributed_optimizer, "--use-torch-fsdp2 (ZeRO-3) does not combine with "
                                                      "--use-distributed-optimizer: FSDP2 shards the Adam state itself; "
                                                      "drop one of the two")
        if self.zero_stage in (1, 2):  # stage 2 is stage 1's sharded Adam plus sharded gradients
            self.use_distributed_optimizer = True


@dataclass
class PrecisionConfig:
    OPTION_GROUP: ClassVar[str] = "mixed precision"

    fp16: bool = option("--fp16", False, "fp16 autocast with fp32 master weights and dynamic loss scaling")
    bf16: bool = option("--bf16", False, "bf16 autocast with fp32 master weights")
    loss_scale: Optional[float] = option("--loss-scale", None, "static fp16 loss scale (default: dynamic)", type=float,
                                         check=(positive, "must be > 0"))
    initial_loss_scale: float = option("--initial-loss-scale", 2.0**32, "initial dynamic loss scale",
                                       check=(positive, "must be > 0"))
    min_loss_scale: float = option("--min-loss-scale", 1.0, "lower bound of the dynamic loss scale",
                                   check=(positive, "must be > 0"))
    loss_scale_window: int = option("--loss-scale-window", 1000, "overflow-free steps before the scale doubles",
                                    check=(positive, "must be >= 1"))
    hysteresis: int = option("--hysteresis", 2, "overflows tolerated before the scale halves",
                             check=(positive, "must be >= 1"))

    def validate(self) -> None:
        check_options(self)
        check(not (self.fp16 and self.bf16), "--fp16 and --bf16 are exclusive: pick one")


@dataclass
class TrainConfig:
    OPTION_GROUP: ClassVar[str] = "training"

    micro_batch_size: int = option("--micro-batch-size", 1, "samples per micro-batch per data-parallel rank",
                                   check=(positive, "must be >= 1"))
    global_batch_size: Optional[int] = option("--global-batch-size", None, "samples per optimizer step over all ranks "
                                              "(default micro-batch x data-parallel size)", type=int,
                                              check=(positive, "must be >= 1"))
    rampup_batch_size: Optional[list[int]] = option("--rampup-batch-size", None, "batch-size ramp-up: <start> "
                                                    "<increment> <ramp-up samples>", type=int, nargs="*")
    train_iters: Optional[int] = option("--train-iters", None, "training length in iterations", type=int,
                                        check=(non_negative, "must be >= 0"))
    train_samples: Optional[int] = option("--train-samples", None, "training length in samples", type=int,
                                          check=(non_negative, "must be >= 0"))
    train_tokens: Optional[int] = option("--train-tokens", None, "training length in tokens", type=int,
                                         check=(non_negative, "must be >= 0"))
    eval_interval: int = option("--eval-interval", 1000, "iterations between validations", check=(positive, "must be >= 1"))
    eval_iters: int = option("--eval-iters", 100, "validation iterations (global batches) per evaluation",
                             check=(non_negative, "must be >= 0"))
    log_interval: int = option("--log-interval", 100, "iterations between log lines", check=(positive, "must be >= 1"))
    exit_interval: Optional[int] = option("--exit-interval", None, "stop (after saving) at an iteration divisible by this",
                                          type=int, check=(positive, "must be >= 1"))
    exit_duration_in_mins: Optional[float] = option("--exit-duration-in-mins", None, "stop (after saving) once the run "
                                                    "has lasted this many minutes", type=float, check=(positive, "must be > 0"))
    exit_signal_handler: bool = option("--exit-signal-handler", False, "on SIGTERM (a preempted job), save a checkpoint "
                                       "at the end of the current step and exit 0")
    max_skipped_iterations: int = option("--max-skipped-iterations", 10, "stop (exit 3) after this many consecutive "
                                         "steps skipped for a non-finite gradient norm; with fp16 dynamic loss scaling "
                                         "only steps at the minimum loss scale count", check=(non_negative, "must be >= 0"))
    loss_spike_factor: float = option("--loss-spike-factor", 3.0, "skip a step whose LM loss exceeds this many times "
                                      "the running mean of recent losses (0: off); see --max-spike-iterations",
                                      type=float, check=(non_negative, "must be >= 0"))
    grad_norm_spike_factor: float = option("--grad-norm-spike-factor", 50.0, "skip a step whose gradient norm exceeds "
                                           "this many times the running mean of recent norms (0: off)", type=float,
                                           check=(non_negative, "must be >= 0"))
    spike_warmup_iters: int = option("--spike-warmup-iters", 2, "accepted steps before the spike checks start",
                                     check=(non_negative, "must be >= 0"))
    max_spike_iterations: int = option("--max-spike-iterations", 5, "stop (exit 3) after more than this many loss or "
                                       "grad-norm spikes in a row, keeping the last checkpoint before them",
                                       check=(non_negative, "must be >= 0"))
    seed: int = option("--seed", 1234, "random seed (weights, data order, dropout, routing noise)")
    skip_train: bool = option("--skip-train", False, "load, evaluate and exit without training")

    def validate(self) -> None:
        check_options(self)
        n = sum(x is not None for x in (self.train_iters, self.train_samples))
        check(n == 1 or (n == 0 and self.train_tokens is not None),
              "give one of --train-iters, --train-samples, --train-tokens (--train-tokens may join either: "
              "training stops at the first bound reached)")
        if self.rampup_batch_size is not None:
            check(
                len(self.rampup_batch_size) == 3,
                "--rampup-batch-size takes three numbers: <start batch size> <increment> <ramp-up samples>",
            )
            check(self.train_iters is None, "--rampup-batch-size needs --train-samples or --train-tokens, not --train-iters")


def parse_data_path(items) -> list[tuple[float, str]]:
    """``A`` or ``0.3 A 0.7 B`` -> [(weight, prefix), ...] with weights summing to 1."""
    items = list(items)
    if not items:
        return []
    if len(items) == 1:
        return [(1.0, items[0])]
    if len(items) % 2 != 0:
        raise UserError(f"--data-path {' '.join(items)!r} is malformed: give one prefix, or pairs of weight and prefix (0.3 A 0.7 B)")
    pairs = []
    for w, prefix in zip(items[0::2], items[1::2]):
        try:
            weight = float(w)
        except ValueError:
            raise UserError(f"--data-path weight {w!r} is not a number: give pairs of weight and prefix (0.3 A 0.7 B)") from None
        if weight < 0:
            raise UserError(f"--data-path weight {w} is negative: weights must be >= 0")
        pairs.append((weight, prefix))
    total = sum(w for w, _ in pairs)
    if total <= 0:
        raise UserError("--data-path weights sum to 0: give positive weights")
    return [(w / total, prefix) for w, prefix in pairs]


@dataclass
class DataConfig:
    OPTION_GROUP: ClassVar[str] = "data and tokenizer"

    data_path: list = option("--data-path", [], "dataset prefix (P for P.bin / P.idx), or weight-prefix pairs for a "
                             "blend: 0.3 A 0.7 B", type=str, nargs="*", convert=parse_data_path)
    split: str = option("--split", "969, 30, 1", "train, validation, test proportions, e.g. 98,2,0")
    train_data_path: list = option("--train-data-path", [], "training dataset prefix (or weight-prefix pairs), read "
                                   "whole; with --valid-data-path / --test-data-path instead of --data-path and --split",
                                   type=str, nargs="*", convert=parse_data_path)
    valid_data_path: list = option("--valid-data-path", [], "validation dataset prefix (or weight-prefix pairs), read "
                                   "whole", type=str, nargs="*", convert=parse_data_path)
    test_data_path: list = option("--test-data-path", [], "test dataset prefix (or weight-prefix pairs), read whole",
                                  type=str, nargs="*", convert=parse_data_path)
    tokenizer_type: Optional[str] = option("--tokenizer-type", None, "tokenizer, a name in megatron/tokenizer/registry.py "
                                           "(default with --mock-data: NullTokenizer)", type=str)
    vocab_file: Optional[str] = option("--vocab-file", None, "GPT-2 BPE vocabulary (vocab.json)", type=str)
    merge_file: Optional[str] = option("--merge-file", None, "GPT-2 BPE merges (merges.txt)", type=str)
    tokenizer_model: Optional[str] = option("--tokenizer-model", None, "SentencePiece .model file, or a Hugging Face tokenizer directory", type=str)
    make_vocab_size_divisible_by: int = option("--make-vocab-size-divisible-by", 128, "pad the vocabulary to a "
                                               "multiple of this", check=(positive, "must be >= 1"))
    data_cache_path: Optional[str] = option("--data-cache-path", None, "where to cache the sample index files "
                                            "(default: beside the data)", type=str)
    mock_data: bool = option("--mock-data", False, "synthetic tokens, no files (smoke tests); needs --vocab-size")

    def split_fractions(self) -> list[float]:
        text = self.split.replace("/", ",")
        try:
            parts = [float(s) for s in text.split(",") if s.strip() != ""]
        except ValueError:
            raise UserError(f"--split {self.split!r} is malformed: give comma-separated numbers such as 98,2,0") from None
        check(1 <= len(parts) <= 3 and all(p >= 0 for p in parts) and sum(parts) > 0,
              f"--split {self.split!r} is malformed: give up to three non-negative numbers such as 98,2,0")
        parts = parts + [0.0] * (3 - len(parts))
        total = sum(parts)
        return [p / total for p in parts]

    def validate(self) -> None:
        check_options(self)
        if self.tokenizer_type is None and self.mock_data:
            self.tokenizer_type = "NullTokenizer"
        separate = bool(self.train_data_path or self.valid_data_path or self.test_data_path)
        check(not (separate and self.data_path), "--data-path and --train-data-path / --valid-data-path / "
              "--test-data-path exclude each other: give one split file per set, or one --data-path with --split")
        check(not separate or bool(self.train_data_path), "--valid-data-path / --test-data-path need "
              "--train-data-path as well")
        check(self.mock_data or len(self.data_path) > 0 or separate,
              "--data-path (or --train-data-path) is required (or --mock-data for a synthetic run)")
        self.split_fractions()

    def split_data_paths(self) -> list[list[tuple[float, str]]]:
        """[train, valid, test] weight-prefix lists when the sets come as separate files, else []."""
        if not (self.train_data_path or self.valid_data_path or self.test_data_path):
            return []
        return [self.train_data_path, self.valid_data_path, self.test_data_path]


@dataclass
class CheckpointConfig:
    OPTION_GROUP: ClassVar[str] = "checkpointing"

    save: Optional[str] = option("--save", None, "checkpoint directory to write", type=str)
    save_interval: Optional[int] = option("--save-interval", None, "iterations between checkpoints (a final one is "
                                          "always written)", type=int, check=(positive, "must be >= 1"))
    load: Optional[str] = option("--load", None, "checkpoint directory to resume from", type=str)
    no_load_optim: bool = option("--no-load-optim", False, "do not load the optimizer state")
    no_load_rng: bool = option("--no-load-rng", False, "do not load the random-number-generator states")
    finetune: bool = option("--finetune", False, "load weights only and start at iteration 0 (no optimizer, RNG or "
                            "schedule state)")
    reset_iteration: bool = option("--reset-iteration", False, "start counting iterations and samples from 0 after "
                                   "loading")
    no_save_optim: bool = option("--no-save-optim", False, "do not save the optimizer state")
    ckpt_format: str = option("--ckpt-format", "torch_dist", "how checkpoints are written: torch_dist (sharded: "
                              "every rank writes its own shard through torch.distributed.checkpoint; loads at any "
                              "layout) or torch (full tensors gathered to one writer, the pre-2.0 layout); both "
                              "load", type=str, choices=["torch_dist", "torch"])
    overwrite_checkpoints: bool = option("--overwrite-checkpoints", False, "let a run that does not resume from "
                                         "--save (no --load, or --load elsewhere) replace the checkpoints already "
                                         "there; without it such a run is refused")
    async_save: bool = option("--async-save", False, "write checkpoint shards in a background thread while training "
                              "goes on (torch_dist format); a failure is reported at the next step")

    def validate(self) -> None:
        check_options(self)
        check(not (self.async_save and self.ckpt_format != "torch_dist"),
              "--async-save needs --ckpt-format torch_dist (the sharded format)")


@dataclass
class KDConfig:
    """Knowledge distillation (--kd) and Mixture-of-Students (--mos) from a loaded teacher.

    Teacher architecture fields left None are taken from the teacher checkpoint's stored config;
    the ones given are checked against it.
    """

    OPTION_GROUP: ClassVar[str] = "knowledge distillation / mixture of students"

    kd: bool = option("--kd", False, "plain knowledge distillation from --load-teacher")
    mos: bool = option("--mos", False, "Mixture-of-Students: distil an MoE student from --load-teacher")
    load_teacher: Optional[str] = option("--load-teacher", None, "the teacher's checkpoint directory", type=str)
    num_layers_teacher: Optional[int] = option("--num-layers-teacher", None, "teacher layers (checked against its "
                                               "checkpoint)", type=int)
    hidden_size_teacher: Optional[int] = option("--hidden-size-teacher", None, "teacher width (checked against its "
                                                "checkpoint)", type=int)
    num_attention_heads_teacher: Optional[int] = option("--num-attention-heads-teacher", None, "teacher attention "
                                                        "heads (checked against its checkpoint)", type=int)
    ffn_hidden_size_teacher: Optional[int] = option("--ffn-hidden-size-teacher", None, "teacher MLP width (checked "
                                                    "against its checkpoint)", type=int)
    num_experts_teacher: Optional[list[int]] = option("--num-experts-teacher", None, "teacher experts per MoE layer "
                                                      "(checked against its checkpoint)", type=int, nargs="+")
    expert_interval_teacher: Optional[int] = option("--expert-interval-teacher", None, "teacher MoE layer interval "
                                                    "(checked against its checkpoint)", type=int)
    mlp_type_teacher: Optional[str] = option("--mlp-type-teacher", None, "teacher MoE layer kind (checked against its "
                                             "checkpoint)", type=str)
    topk_teacher: Optional[int] = option("--topk-teacher", None, "teacher top-k (checked against its checkpoint)", type=int)
    alpha_ce: float = option("--kd-alpha-ce", 1.0, "weight of the LM cross-entropy", check=(non_negative, "must be >= 0"))
    beta_ce: float = option("--kd-beta-ce", 1.0, "weight of the distillation KL term", check=(non_negative, "must be >= 0"))
    temperature: float = option("--kd-temp", 1.0, "distillation temperature T (the KL term is scaled by T^2)",
                                check=(positive, "must be > 0"))
    stop_iters: Optional[int] = option("--kd-stop-iters", None, "staged KD: stop distilling at this iteration, free the "
                                       "teacher, train on LM loss only", type=int, check=(non_negative, "must be >= 0"))
    teacher_capacity_factor: Optional[float] = option("--kd-teacher-capacity-factor", None, "run the teacher with "
                                                      "token dropping at this eval capacity factor (default: it drops no token)",
                                                      type=float, check=(positive, "must be > 0"))

    @property
    def enabled(self) -> bool:
        return self.kd or self.mos

    def teacher_overrides(self) -> dict:
        """ModelConfig / MoEConfig field -> value for the teacher flags that were given."""
        names = {"num_layers": self.num_layers_teacher, "hidden_size": self.hidden_size_teacher,
                 "num_attention_heads": self.num_attention_heads_teacher,
                 "ffn_hidden_size": self.ffn_hidden_size_teacher, "num_experts": self.num_experts_teacher,
                 "expert_interval": self.expert_interval_teacher, "mlp_type": self.mlp_type_teacher,
                 "topk": self.topk_teacher}
        return {k: v for k, v in names.items() if v is not None}

    def validate(self) -> None:
        if not self.enabled:
            check(self.load_teacher is None, "--load-teacher needs --kd or --mos")
            return
        check(self.load_teacher is not None,
              f"--{'mos' if self.mos else 'kd'} needs --load-teacher DIR (the teacher's checkpoint directory)")
        check_options(self)
        check(self.alpha_ce + self.beta_ce > 0, "--kd-alpha-ce and --kd-beta-ce are both 0: nothing to train on")


@dataclass
class LoggingConfig:
    OPTION_GROUP: ClassVar[str] = "logging"

    tensorboard_dir: Optional[str] = option("--tensorboard-dir", None, "write TensorBoard event files here", type=str)
    peak_tflops: Optional[float] = option("--peak-tflops", None, "peak TFLOP/s of one device for the MFU estimate "
                                          "(default: known GPUs, else a measured matmul peak)", type=float,
                                          check=(positive, "must be > 0"))
    tensorboard_queue_size: int = option("--tensorboard-queue-size", 1000, "TensorBoard events buffered before a "
                                         "write", check=(positive, "must be >= 1"))
    log_timers_to_tensorboard: bool = option("--log-timers-to-tensorboard", False, "write the per-phase timers "
                                             "(forward, backward, all-to-all, optimizer, data) to TensorBoard")
    log_batch_size_to_tensorboard: bool = option("--log-batch-size-to-tensorboard", False, "write the global batch "
                                                 "size to TensorBoard (it is always written)")
    log_validation_ppl_to_tensorboard: bool = option("--log-validation-ppl-to-tensorboard", False, "write validation "
                                                     "perplexity to TensorBoard (it is always written)")
    log_optimizer_states_to_tensorboard: bool = option("--log-optimizer-states-to-tensorboard", False, "write Adam "
                                                       "moment norms and max-abs values to TensorBoard")
    moe_health: str = option("--moe-health", "warn", "what a collapsed MoE layer (one expert taking more than "
                             "--moe-collapse-share of its tokens) or a dead expert (no token) lasting "
                             "--moe-health-window iterations does: warn, stop (exit 3) or off; the figures (tokens "
                             "per expert min / p50 / max, dead experts, router entropy, top-expert share) are always "
                             "in the log line, TensorBoard and wandb", type=str, choices=["off", "warn", "stop"])
    moe_health_window: int = option("--moe-health-window", 100, "iterations an expert may go without a token, or a "
                                    "layer stay collapsed, before --moe-health warns", check=(positive, "must be >= 1"))
    moe_collapse_share: float = option("--moe-collapse-share", 0.9, "a MoE layer counts as collapsed while one expert "
                                       "takes more than this share of its tokens", type=float,
                                       check=(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    wandb_project: Optional[str] = option("--wandb-project", None, "log the TensorBoard scalars to this Weights & "
                                          "Biases project too (needs the wandb package)", type=str)
    wandb_exp_name: Optional[str] = option("--wandb-exp-name", None, "the wandb run name", type=str)
    wandb_save_dir: Optional[str] = option("--wandb-save-dir", None, "directory for wandb's local files", type=str)

    def validate(self) -> None:
        check_options(self)
        check(self.wandb_project is not None or (self.wandb_exp_name is None and self.wandb_save_dir is None),
              "--wandb-exp-name / --wandb-save-dir need --wandb-project (the Weights & Biases project to log to)")
        check(not self.wandb_project or importlib.util.find_spec("wandb") is not None,
              "--wandb-project needs the wandb package: pip install wandb (or drop the --wandb-* flags)")


def _world_size_default(v: Optional[int]) -> int:
    return v if v is not None else int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class DeepSpeedCompatConfig:
    """Megatron-DeepSpeed's launch flags. The JSON's values are applied to the other options while the
    command line is read (megatron/config/compat/upstream_flags.py); what needs the run — the data-parallel size
    for the batch identity, the curriculum — is read from it again here (megatron/config/compat/ds_config.py)."""

    OPTION_GROUP: ClassVar[str] = "DeepSpeed compatibility"

    deepspeed: bool = option("--deepspeed", False, "accepted: there is no DeepSpeed engine here (MoE, expert "
                             "parallelism, ZeRO-1 and mixed precision are built in)")
    deepspeed_config: Optional[str] = option("--deepspeed_config", None, "a DeepSpeed JSON: its batch sizes, precision, "
                                             "loss scaling, clipping, ZeRO stage and curriculum are read (a value that "
                                             "contradicts a typed flag is an error)", type=str,
                                             aliases=("--deepspeed-config",))

    def validate(self) -> None:
        check_options(self)

    def read(self):
        """The parsed JSON (megatron.config.compat.ds_config.DeepSpeedConfig), or None without --deepspeed_config.

        The file is read once: the flag translation hands over what it parsed (:meth:`adopt`), or the first
        call reads it; every later reader (the batch identity, the curriculum, the trainer) gets the same object.
        """
        if self.deepspeed_config is None:
            return None
        parsed = self.__dict__.get("_parsed")  # not a dataclass field: never stored in checkpoints
        if parsed is None or parsed.path != self.deepspeed_config:
            parsed = read_deepspeed_config(self.deepspeed_config)
            self.__dict__["_parsed"] = parsed
        return parsed

    def adopt(self, parsed) -> None:
        """Keep the JSON the flag translation already parsed (None: nothing parsed)."""
        if parsed is not None:
            self.__dict__["_parsed"] = parsed


@dataclass
class Config:
    OPTION_GROUP: ClassVar[str] = "dry run"

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    deepspeed: DeepSpeedCompatConfig = field(default_factory=DeepSpeedCompatConfig)
    dry_run: bool = option("--dry-run", False, "build the model on the meta device, print parameters, FLOPs and the "
                           "per-GPU memory plan, exit")
    dry_run_world_size: Optional[int] = option("--dry-run-world-size", None, "GPUs the dry run plans for (default: "
                                               "$WORLD_SIZE or 1)", type=int, check=(positive, "must be >= 1"))
    # not options: values of flags added by a caller's extra_args_provider, and the flags given on the command line
    extra: dict = field(default_factory=dict, repr=False)
    flags_given: tuple = field(default=(), repr=False)

    def validate(self) -> "Config":
        check_options(self)
        self.dry_run_world_size = _world_size_default(self.dry_run_world_size)
        self.model.validate()
        self.parallel.validate()
        self.optimizer.validate()
        self.validate_pipeline()
        self.validate_sequence_parallel()
        if self.optimizer.use_torch_fsdp2:
            check(not self.parallel.overlap_grad_reduce, "--overlap-grad-reduce does not combine with "
                  "--use-torch-fsdp2 (ZeRO-3): FSDP2 reduce-scatters during the backward itself; drop one of the two")
        self.precision.validate()
        self.train.validate()
        if not self.dry_run:
            self.data.validate()
        self.checkpoint.validate()
        self.logging.validate()
        self.kd.validate()
        self.deepspeed.validate()
        return self

    def pipeline_layout(self):
        """The layers of each pipeline stage (``megatron.config.pipeline_layout``); a UserError if they cannot split."""
        par = self.parallel
        return build_layout(self.model.num_layers, par.pipeline_model_parallel_size,
                            par.num_layers_per_virtual_pipeline_stage, par.decoder_first_pipeline_num_layers,
                            par.decoder_last_pipeline_num_layers)

    def validate_sequence_parallel(self) -> None:
        par, tp = self.parallel, self.parallel.tensor_model_parallel_size
        if not par.sequence_parallel or tp == 1:
            return
        check(self.model.seq_length % tp == 0, f"--sequence-parallel: --seq-length {self.model.seq_length} is not "
              f"divisible by --tensor-model-parallel-size {tp}: choose a multiple of {tp}")
        unsupported = [("--pipeline-model-parallel-size > 1", par.pipeline_model_parallel_size > 1),
                       ("--multi-latent-attention", self.model.multi_latent_attention),
                       ("--zero-stage 2", self.optimizer.zero_stage == 2),
                       ("--use-torch-fsdp2 / --zero-stage 3", self.optimizer.use_torch_fsdp2),
                       ("--model-family " + str(self.model.model_family), self.model.model_family != "gpt")]
        for flag, used in unsupported:
            check(not used, f"--sequence-parallel does not combine with {flag} yet: drop one of the two (without "
                  f"--sequence-parallel each TP rank keeps whole layer-norm and dropout activations)")

    def validate_pipeline(self) -> None:
        par = self.parallel
        layout = self.pipeline_layout()
        if par.pipeline_model_parallel_size == 1:
            return
        check(par.pipeline_schedule != "Interleaved1F1B" or layout.virtual > 1, "--pipeline-schedule Interleaved1F1B "
              "needs virtual stages: set --num-layers-per-virtual-pipeline-stage")
        check(par.pipeline_schedule not in ("1F1B", "GPipe") or layout.virtual == 1, f"--pipeline-schedule "
              f"{par.pipeline_schedule} runs one stage per rank: drop --num-layers-per-virtual-pipeline-stage or use "
              f"Interleaved1F1B")
        unsupported = [("--zero-stage 2", self.optimizer.zero_stage == 2),
                       ("--use-torch-fsdp2 / --zero-stage 3", self.optimizer.use_torch_fsdp2),
                       ("--ckpt-format torch", self.checkpoint.ckpt_format != "torch_dist"),
                       ("--model-family " + str(self.model.model_family), self.model.model_family != "gpt")]
        for flag, used in unsupported:
            check(not used, f"{flag} does not combine with --pipeline-model-parallel-size > 1 yet: drop it (pipeline "
                  f"parallelism runs with ZeRO-1 or plain data parallelism, --ckpt-format torch_dist, the gpt family)")

    def validate_world(self, world_size: int) -> None:
        """Checks that need the number of processes."""
        tp = self.parallel.tensor_model_parallel_size
        pp = self.parallel.pipeline_model_parallel_size
        check(world_size % tp == 0, f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp}")
        check(world_size % (tp * pp) == 0, f"world size {world_size} is not divisible by --tensor-model-parallel-size "
              f"× --pipeline-model-parallel-size ({tp} × {pp} = {tp * pp}): launch a multiple of {tp * pp} processes")
        m = self.model
        check(m.num_attention_heads % tp == 0,
              f"--num-attention-heads {m.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}")
        check(m.num_kv_heads % tp == 0,
              f"--num-query-groups {m.num_kv_heads} is not divisible by --tensor-model-parallel-size {tp}")
        check(m.ffn_hidden_size % tp == 0,
              f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
        dp = world_size // (tp * pp)
        ep = self.model.moe.expert_parallel_size
        check(
            dp % ep == 0,
            f"--moe-expert-parallel-size {ep} does not divide the data-parallel size {dp}: "
            f"launch a multiple of {ep} processes or lower the EP size",
        )
        mbs = self.train.micro_batch_size
        gbs = self.train.global_batch_size
        if gbs is None:
            self.train.global_batch_size = gbs = mbs * dp
        check(
            gbs % (mbs * dp) == 0,
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size × data-parallel size ({mbs} × {dp} = {mbs * dp}): "
            f"change one of them",
        )
        ds = self.deepspeed.read()
        if ds is not None:
            ds.check_batch(gbs, mbs, dp)
        if self.train.rampup_batch_size is not None:
            start, incr, _ = self.train.rampup_batch_size
            check(start % (mbs * dp) == 0 and incr % (mbs * dp) == 0,
                  f"--rampup-batch-size start and increment must be multiples of micro-batch × data-parallel size ({mbs * dp})")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d.pop("flags_given")
        return d


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Pad the vocabulary so the embedding splits evenly over TP ranks and matmuls are aligned.

    Megatron pads to a multiple of divisible_by x TP, so the padded size (and the checkpoint) depends
    on TP; here it is a multiple of divisible_by whenever TP divides it (the default 128 with TP up to
    128), so a checkpoint moves between TP layouts unchanged.
    """
    multiple = divisible_by if divisible_by % tp == 0 else divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)
