"""Typed, self-validating configuration.

``megatron/arguments.py`` parses the command line once and builds a :class:`Config`; nothing
else in the code base reads argparse output. Each dataclass checks itself in ``validate()`` and
raises :class:`~megatron.errors.UserError` naming the flag and the fix.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

from megatron.errors import UserError, check


@dataclass
class MoEConfig:
    """DeepSpeed-MoE semantics (SPEC §3)."""

    num_experts: list[int] = field(default_factory=lambda: [1])
    expert_interval: int = 2
    mlp_type: str = "standard"  # standard | residual (PR-MoE's Residual-MoE)
    topk: int = 1
    expert_parallel_size: int = 1
    train_capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    loss_coeff: float = 0.1
    token_dropping: bool = True
    top2_2nd_expert_sampling: bool = True
    noisy_gate_policy: Optional[str] = None  # None | Jitter | RSample
    z_loss_coeff: float = 0.0

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
        return any(e > 1 for e in self.num_experts)

    def validate(self, num_layers: int) -> None:
        check(self.expert_interval >= 1, f"--expert-interval must be >= 1 (got {self.expert_interval})")
        n_moe = num_layers // self.expert_interval
        check(
            len(self.num_experts) in (1, n_moe),
            f"--num-experts has {len(self.num_experts)} values but --num-layers {num_layers} with "
            f"--expert-interval {self.expert_interval} gives {n_moe} MoE layers: give one value or {n_moe}",
        )
        check(all(e >= 1 for e in self.num_experts), f"--num-experts values must be >= 1 (got {self.num_experts})")
        check(self.mlp_type in ("standard", "residual"), f"--mlp-type must be standard or residual (got {self.mlp_type!r})")
        check(self.topk >= 1, f"--topk must be >= 1 (got {self.topk})")
        moe_counts = [e for e in self.experts_per_layer(num_layers) if e > 1]
        if moe_counts:
            check(
                self.topk <= min(moe_counts),
                f"--topk {self.topk} exceeds the experts of a MoE layer ({min(moe_counts)}): lower --topk or raise --num-experts",
            )
        check(self.expert_parallel_size >= 1, "--moe-expert-parallel-size must be >= 1")
        for e in moe_counts:
            check(
                e % self.expert_parallel_size == 0,
                f"--moe-expert-parallel-size {self.expert_parallel_size} does not divide a layer's expert count {e}: "
                f"choose an EP size that divides every value of --num-experts",
            )
        check(self.train_capacity_factor > 0, "--moe-train-capacity-factor must be > 0")
        check(self.eval_capacity_factor > 0, "--moe-eval-capacity-factor must be > 0")
        check(self.min_capacity >= 0, "--moe-min-capacity must be >= 0")
        check(self.loss_coeff >= 0, "--moe-loss-coeff must be >= 0")
        check(self.z_loss_coeff >= 0, "--moe-z-loss-coeff must be >= 0")
        check(
            self.noisy_gate_policy in (None, "Jitter", "RSample"),
            f"--moe-noisy-gate-policy must be None, Jitter or RSample (got {self.noisy_gate_policy!r})",
        )
        check(
            not (self.noisy_gate_policy == "RSample" and self.topk != 1),
            "--moe-noisy-gate-policy RSample works with --topk 1 only: use Jitter or None for top-k > 1",
        )


@dataclass
class ModelConfig:
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None  # None -> 4 * hidden_size
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None  # None -> seq_length
    vocab_size: int = 0  # padded vocabulary, filled in from the tokenizer
    init_method_std: float = 0.02
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layernorm_epsilon: float = 1e-5
    checkpoint_activations: bool = False
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = 4 * self.hidden_size
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        check(self.num_layers >= 1, f"--num-layers must be >= 1 (got {self.num_layers})")
        check(self.hidden_size >= 1, f"--hidden-size must be >= 1 (got {self.hidden_size})")
        check(self.num_attention_heads >= 1, "--num-attention-heads must be >= 1")
        check(
            self.hidden_size % self.num_attention_heads == 0,
            f"--hidden-size {self.hidden_size} is not divisible by --num-attention-heads {self.num_attention_heads}: "
            f"choose a head count that divides the hidden size",
        )
        check(self.ffn_hidden_size >= 1, "--ffn-hidden-size must be >= 1")
        check(self.seq_length >= 1, "--seq-length must be >= 1")
        check(
            self.seq_length <= self.max_position_embeddings,
            f"--seq-length {self.seq_length} exceeds --max-position-embeddings {self.max_position_embeddings}: "
            f"raise --max-position-embeddings or shorten --seq-length",
        )
        check(0.0 <= self.hidden_dropout < 1.0, "--hidden-dropout must be in [0, 1)")
        check(0.0 <= self.attention_dropout < 1.0, "--attention-dropout must be in [0, 1)")
        check(self.init_method_std > 0, "--init-method-std must be > 0")
        self.moe.validate(self.num_layers)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A ModelConfig from a checkpoint's stored dict (unknown keys, e.g. from newer versions, ignored)."""
        d = dict(d)
        moe = d.pop("moe", {})
        moe = MoEConfig(**{k: v for k, v in moe.items() if k in MoEConfig.__dataclass_fields__})
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__}, moe=moe)

    def architecture(self) -> dict:
        """Fields that must match for a checkpoint to load into this model."""
        keys = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "max_position_embeddings", "vocab_size")
        arch = {k: getattr(self, k) for k in keys}
        arch["experts_per_layer"] = self.moe.experts_per_layer(self.num_layers)
        arch["mlp_type"] = self.moe.mlp_type if self.moe.enabled else "standard"
        return arch


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    overlap_grad_reduce: bool = False  # all-reduce gradient buckets during the last micro-batch's backward
    distributed_backend: Optional[str] = None  # None -> nccl on GPU, gloo on CPU
    use_cpu: bool = False

    def validate(self) -> None:
        check(self.tensor_model_parallel_size >= 1, "--tensor-model-parallel-size must be >= 1")
        check(
            self.distributed_backend in (None, "gloo", "nccl"),
            f"--distributed-backend must be gloo or nccl (got {self.distributed_backend!r})",
        )


@dataclass
class OptimizerConfig:
    lr: Optional[float] = None
    min_lr: float = 0.0
    lr_decay_style: str = "linear"
    lr_warmup_iters: int = 0
    lr_warmup_samples: int = 0
    lr_warmup_tokens: Optional[int] = None
    lr_warmup_fraction: Optional[float] = None
    lr_decay_iters: Optional[int] = None
    lr_decay_samples: Optional[int] = None
    lr_decay_tokens: Optional[int] = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    use_distributed_optimizer: bool = False  # ZeRO-1: Adam state sharded over DP (experts: expert-DP)

    def validate(self) -> None:
        check(self.lr is not None, "--lr is required: give the peak learning rate, e.g. --lr 3e-4")
        check(self.lr > 0, f"--lr must be > 0 (got {self.lr})")
        check(0 <= self.min_lr <= self.lr, f"--min-lr {self.min_lr} must be in [0, --lr {self.lr}]")
        check(
            self.lr_decay_style in ("constant", "linear", "cosine", "inverse-square-root"),
            f"--lr-decay-style must be constant, linear, cosine or inverse-square-root (got {self.lr_decay_style!r})",
        )
        check(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0, "--adam-beta1/--adam-beta2 must be in [0, 1)")
        check(self.adam_eps > 0, "--adam-eps must be > 0")
        check(self.weight_decay >= 0, "--weight-decay must be >= 0")
        check(self.clip_grad >= 0, "--clip-grad must be >= 0 (0 disables clipping)")
        if self.lr_warmup_fraction is not None:
            check(0.0 <= self.lr_warmup_fraction <= 1.0, "--lr-warmup-fraction must be in [0, 1]")


@dataclass
class PrecisionConfig:
    fp16: bool = False
    bf16: bool = False
    loss_scale: Optional[float] = None  # static scale; None -> dynamic
    initial_loss_scale: float = 2.0**32
    min_loss_scale: float = 1.0
    loss_scale_window: int = 1000
    hysteresis: int = 2

    def validate(self) -> None:
        check(not (self.fp16 and self.bf16), "--fp16 and --bf16 are exclusive: pick one")
        check(self.initial_loss_scale > 0, "--initial-loss-scale must be > 0")
        check(self.min_loss_scale > 0, "--min-loss-scale must be > 0")
        check(self.loss_scale_window >= 1, "--loss-scale-window must be >= 1")
        check(self.hysteresis >= 1, "--hysteresis must be >= 1")
        if self.loss_scale is not None:
            check(self.loss_scale > 0, "--loss-scale must be > 0")


@dataclass
class TrainConfig:
    micro_batch_size: int = 1
    global_batch_size: Optional[int] = None  # None -> micro_batch_size * data-parallel size
    rampup_batch_size: Optional[list[int]] = None  # [start, increment, ramp-up samples]
    train_iters: Optional[int] = None
    train_samples: Optional[int] = None
    train_tokens: Optional[int] = None
    eval_interval: int = 1000
    eval_iters: int = 100
    log_interval: int = 100
    exit_interval: Optional[int] = None
    exit_duration_in_mins: Optional[float] = None
    seed: int = 1234
    skip_train: bool = False

    def validate(self) -> None:
        check(self.micro_batch_size >= 1, f"--micro-batch-size must be >= 1 (got {self.micro_batch_size})")
        n = sum(x is not None for x in (self.train_iters, self.train_samples))
        check(n == 1 or (n == 0 and self.train_tokens is not None),
              "give one of --train-iters, --train-samples, --train-tokens (--train-tokens may join either: "
              "training stops at the first bound reached)")
        for name in ("train_iters", "train_samples", "train_tokens"):
            v = getattr(self, name)
            check(v is None or v >= 0, f"--{name.replace('_', '-')} must be >= 0")
        check(self.eval_interval >= 1, "--eval-interval must be >= 1")
        check(self.eval_iters >= 0, "--eval-iters must be >= 0")
        check(self.log_interval >= 1, "--log-interval must be >= 1")
        if self.rampup_batch_size is not None:
            check(
                len(self.rampup_batch_size) == 3,
                "--rampup-batch-size takes three numbers: <start batch size> <increment> <ramp-up samples>",
            )
            check(self.train_iters is None, "--rampup-batch-size needs --train-samples or --train-tokens, not --train-iters")


@dataclass
class DataConfig:
    data_path: list = field(default_factory=list)  # [(weight, prefix), ...]
    split: str = "969, 30, 1"
    tokenizer_type: Optional[str] = None
    vocab_file: Optional[str] = None
    merge_file: Optional[str] = None
    tokenizer_model: Optional[str] = None
    make_vocab_size_divisible_by: int = 128
    data_cache_path: Optional[str] = None
    mock_data: bool = False

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
        check(
            self.tokenizer_type in ("GPT2BPETokenizer", "SentencePieceTokenizer", "NullTokenizer"),
            f"--tokenizer-type must be GPT2BPETokenizer or SentencePieceTokenizer (got {self.tokenizer_type!r})",
        )
        if self.tokenizer_type == "GPT2BPETokenizer":
            check(self.vocab_file is not None and self.merge_file is not None,
                  "GPT2BPETokenizer needs --vocab-file and --merge-file (GPT-2's vocab.json and merges.txt)")
        if self.tokenizer_type == "SentencePieceTokenizer":
            check(self.tokenizer_model is not None, "SentencePieceTokenizer needs --tokenizer-model (a .model file)")
        check(self.mock_data or len(self.data_path) > 0, "--data-path is required (or --mock-data for a synthetic run)")
        self.split_fractions()


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    save_interval: Optional[int] = None
    load: Optional[str] = None
    no_load_optim: bool = False
    no_load_rng: bool = False
    finetune: bool = False
    reset_iteration: bool = False
    no_save_optim: bool = False

    def validate(self) -> None:
        if self.save_interval is not None:
            check(self.save_interval >= 1, "--save-interval must be >= 1")


@dataclass
class KDConfig:
    """Knowledge distillation (--kd) and Mixture-of-Students (--mos) from a loaded teacher (SPEC §4).

    Teacher architecture fields left None are taken from the teacher checkpoint's stored config;
    the ones given are checked against it.
    """

    kd: bool = False
    mos: bool = False
    load_teacher: Optional[str] = None
    num_layers_teacher: Optional[int] = None
    hidden_size_teacher: Optional[int] = None
    num_attention_heads_teacher: Optional[int] = None
    ffn_hidden_size_teacher: Optional[int] = None
    num_experts_teacher: Optional[list[int]] = None
    expert_interval_teacher: Optional[int] = None
    mlp_type_teacher: Optional[str] = None
    topk_teacher: Optional[int] = None
    alpha_ce: float = 1.0
    beta_ce: float = 1.0
    temperature: float = 1.0
    stop_iters: Optional[int] = None  # staged KD: LM loss only from this iteration on

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
        check(self.temperature > 0, f"--kd-temp must be > 0 (got {self.temperature})")
        check(self.alpha_ce >= 0 and self.beta_ce >= 0, "--kd-alpha-ce and --kd-beta-ce must be >= 0")
        check(self.alpha_ce + self.beta_ce > 0, "--kd-alpha-ce and --kd-beta-ce are both 0: nothing to train on")
        if self.stop_iters is not None:
            check(self.stop_iters >= 0, "--kd-stop-iters must be >= 0")


@dataclass
class LoggingConfig:
    tensorboard_dir: Optional[str] = None
    peak_tflops: Optional[float] = None  # for the MFU estimate; None -> known GPU or measured CPU matmul peak


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    dry_run: bool = False
    dry_run_world_size: int = 1  # the number of GPUs the dry run plans memory for

    def validate(self) -> "Config":
        self.model.validate()
        self.parallel.validate()
        self.optimizer.validate()
        self.precision.validate()
        self.train.validate()
        if not self.dry_run:
            self.data.validate()
        self.checkpoint.validate()
        self.kd.validate()
        return self

    def validate_world(self, world_size: int) -> None:
        """Checks that need the number of processes."""
        tp = self.parallel.tensor_model_parallel_size
        check(world_size % tp == 0, f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp}")
        m = self.model
        check(m.num_attention_heads % tp == 0,
              f"--num-attention-heads {m.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}")
        check(m.ffn_hidden_size % tp == 0,
              f"--ffn-hidden-size {m.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
        dp = world_size // tp
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
        if self.train.rampup_batch_size is not None:
            start, incr, _ = self.train.rampup_batch_size
            check(start % (mbs * dp) == 0 and incr % (mbs * dp) == 0,
                  f"--rampup-batch-size start and increment must be multiples of micro-batch × data-parallel size ({mbs * dp})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pad_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Pad the vocabulary so the embedding splits evenly over TP ranks and matmuls are aligned.

    Megatron pads to a multiple of divisible_by x TP, so the padded size (and the checkpoint) depends
    on TP; here it is a multiple of divisible_by whenever TP divides it (the default 128 with TP up to
    128), so a checkpoint moves between TP layouts unchanged.
    """
    multiple = divisible_by if divisible_by % tp == 0 else divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)
