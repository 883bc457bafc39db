"""The only place that uses argparse: Megatron-named flags -> a validated :class:`Config`.

Flag names and defaults follow Megatron-LM / Megatron-DeepSpeed (see SPEC.md §2) so existing
launch scripts work unchanged. ``parse_args(argv)`` returns a ``Config``; nothing else reads flags.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from megatron.config import (
    CheckpointConfig, Config, DataConfig, KDConfig, LoggingConfig, ModelConfig, MoEConfig, OptimizerConfig,
    ParallelConfig, PrecisionConfig, TrainConfig,
)
from megatron.errors import UserError

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UserError(f"{message} (see --help)")


def argument_parser(**kwargs) -> argparse.ArgumentParser:
    """The parser for the tools' own command lines: mistakes raise UserError (one line, no usage dump)."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    kwargs.setdefault("allow_abbrev", False)
    return _Parser(**kwargs)


def _none_or_str(v: str) -> Optional[str]:
    return None if v in ("None", "none", "") else v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="Megatron-style GPT + DeepSpeed-MoE pretraining", allow_abbrev=False)

    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--ffn-hidden-size", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--layernorm-epsilon", type=float, default=1e-5)
    g.add_argument("--checkpoint-activations", action="store_true")
    g.add_argument("--recompute-activations", dest="checkpoint_activations", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, nargs="+", default=[1])
    g.add_argument("--expert-interval", type=int, default=2)
    g.add_argument("--mlp-type", type=str, default="standard")
    g.add_argument("--topk", type=int, default=1)
    g.add_argument("--moe-expert-parallel-size", type=int, default=1)
    g.add_argument("--moe-train-capacity-factor", type=float, default=1.0)
    g.add_argument("--moe-eval-capacity-factor", type=float, default=1.0)
    g.add_argument("--moe-min-capacity", type=int, default=4)
    g.add_argument("--moe-loss-coeff", type=float, default=0.1)
    g.add_argument("--disable-moe-token-dropping", action="store_true")
    g.add_argument("--disable-moe-top2-2nd-expert-sampling", action="store_true")
    g.add_argument("--create-moe-param-group", action="store_true",
                   help="accepted for compatibility: expert parameters always have their own groups")
    g.add_argument("--moe-noisy-gate-policy", type=_none_or_str, default=None)
    g.add_argument("--moe-z-loss-coeff", type=float, default=0.0)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="all-reduce gradient buckets asynchronously during the last micro-batch's backward")
    g.add_argument("--distributed-backend", type=str, default=None, choices=["gloo", "nccl"])
    g.add_argument("--use-cpu", action="store_true", help="run on CPU even if a GPU is present")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", type=str, default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-tokens", type=int, default=None)
    g.add_argument("--lr-warmup-fraction", type=float, default=None)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-samples", type=int, default=None)
    g.add_argument("--lr-decay-tokens", type=int, default=None)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--optimizer", type=str, default="adam", choices=["adam"])
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="ZeRO stage 1: shard Adam state over data-parallel ranks (experts over expert-data-parallel ranks)")
    g.add_argument("--zero-stage", type=int, default=None, choices=[0, 1, 2, 3],
                   help="DeepSpeed-style synonym: 1 = --use-distributed-optimizer, 0 = off")

    g = p.add_argument_group("mixed precision")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--loss-scale", type=float, default=None)
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32)
    g.add_argument("--min-loss-scale", type=float, default=1.0)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--hysteresis", type=int, default=2)

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--rampup-batch-size", type=int, nargs="*", default=None)
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--train-samples", type=int, default=None)
    g.add_argument("--train-tokens", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--exit-interval", type=int, default=None)
    g.add_argument("--exit-duration-in-mins", type=float, default=None)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--skip-train", action="store_true")

    g = p.add_argument_group("data and tokenizer")
    g.add_argument("--data-path", nargs="*", default=[])
    g.add_argument("--split", type=str, default="969, 30, 1")
    g.add_argument("--tokenizer-type", type=str, default=None)
    g.add_argument("--vocab-file", type=str, default=None)
    g.add_argument("--merge-file", type=str, default=None)
    g.add_argument("--tokenizer-model", type=str, default=None)
    g.add_argument("--data-cache-path", type=str, default=None)
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens, no files (smoke tests)")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size for --mock-data / NullTokenizer")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", type=str, default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--load", type=str, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--finetune", action="store_true")
    g.add_argument("--reset-iteration", action="store_true")

    g = p.add_argument_group("logging")
    g.add_argument("--tensorboard-dir", type=str, default=None)
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="peak TFLOP/s of one device for the MFU estimate (default: known GPUs, else a measured matmul peak)")

    g = p.add_argument_group("knowledge distillation / mixture of students")
    g.add_argument("--mos", action="store_true", help="Mixture-of-Students: distil an MoE student from --load-teacher")
    g.add_argument("--kd", action="store_true", help="plain knowledge distillation from --load-teacher")
    g.add_argument("--load-teacher", type=str, default=None)
    g.add_argument("--num-layers-teacher", type=int, default=None)
    g.add_argument("--hidden-size-teacher", type=int, default=None)
    g.add_argument("--num-attention-heads-teacher", type=int, default=None)
    g.add_argument("--ffn-hidden-size-teacher", type=int, default=None)
    g.add_argument("--num-experts-teacher", type=int, nargs="+", default=None)
    g.add_argument("--expert-interval-teacher", type=int, default=None)
    g.add_argument("--mlp-type-teacher", type=str, default=None)
    g.add_argument("--topk-teacher", type=int, default=None)
    g.add_argument("--kd-alpha-ce", type=float, default=1.0, help="weight of the LM cross-entropy")
    g.add_argument("--kd-beta-ce", type=float, default=1.0, help="weight of the distillation KL term")
    g.add_argument("--kd-temp", type=float, default=1.0, help="distillation temperature T (the KL term is scaled by T^2)")
    g.add_argument("--kd-stop-iters", type=int, default=None,
                   help="staged KD: stop distilling at this iteration, free the teacher, train on LM loss only")

    g = p.add_argument_group("dry run")
    g.add_argument("--dry-run", action="store_true",
                   help="build the model on the meta device, print parameters, FLOPs and the per-GPU memory plan, exit")
    g.add_argument("--dry-run-world-size", type=int, default=None,
                   help="GPUs the dry run plans for (default: $WORLD_SIZE or 1)")
    return p


def parse_data_path(items: Sequence[str]) -> list[tuple[float, str]]:
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


def namespace_to_config(a: argparse.Namespace) -> Config:
    moe = MoEConfig(
        num_experts=list(a.num_experts), expert_interval=a.expert_interval, mlp_type=a.mlp_type, topk=a.topk,
        expert_parallel_size=a.moe_expert_parallel_size, train_capacity_factor=a.moe_train_capacity_factor,
        eval_capacity_factor=a.moe_eval_capacity_factor, min_capacity=a.moe_min_capacity, loss_coeff=a.moe_loss_coeff,
        token_dropping=not a.disable_moe_token_dropping,
        top2_2nd_expert_sampling=not a.disable_moe_top2_2nd_expert_sampling,
        noisy_gate_policy=a.moe_noisy_gate_policy, z_loss_coeff=a.moe_z_loss_coeff,
    )
    model = ModelConfig(
        num_layers=a.num_layers, hidden_size=a.hidden_size, num_attention_heads=a.num_attention_heads,
        ffn_hidden_size=a.ffn_hidden_size, seq_length=a.seq_length, max_position_embeddings=a.max_position_embeddings,
        vocab_size=a.vocab_size or 0, init_method_std=a.init_method_std, hidden_dropout=a.hidden_dropout,
        attention_dropout=a.attention_dropout, layernorm_epsilon=a.layernorm_epsilon,
        checkpoint_activations=a.checkpoint_activations, moe=moe,
    )
    cfg = Config(
        model=model,
        parallel=ParallelConfig(tensor_model_parallel_size=a.tensor_model_parallel_size,
                                overlap_grad_reduce=a.overlap_grad_reduce,
                                distributed_backend=a.distributed_backend, use_cpu=a.use_cpu),
        optimizer=OptimizerConfig(
            lr=a.lr, min_lr=a.min_lr, lr_decay_style=a.lr_decay_style, lr_warmup_iters=a.lr_warmup_iters,
            lr_warmup_samples=a.lr_warmup_samples, lr_warmup_tokens=a.lr_warmup_tokens,
            lr_warmup_fraction=a.lr_warmup_fraction, lr_decay_iters=a.lr_decay_iters,
            lr_decay_samples=a.lr_decay_samples, lr_decay_tokens=a.lr_decay_tokens, weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps, clip_grad=a.clip_grad,
            use_distributed_optimizer=a.use_distributed_optimizer or a.zero_stage == 1,
        ),
        precision=PrecisionConfig(
            fp16=a.fp16, bf16=a.bf16, loss_scale=a.loss_scale, initial_loss_scale=a.initial_loss_scale,
            min_loss_scale=a.min_loss_scale, loss_scale_window=a.loss_scale_window, hysteresis=a.hysteresis,
        ),
        train=TrainConfig(
            micro_batch_size=a.micro_batch_size, global_batch_size=a.global_batch_size,
            rampup_batch_size=a.rampup_batch_size, train_iters=a.train_iters, train_samples=a.train_samples,
            train_tokens=a.train_tokens, eval_interval=a.eval_interval, eval_iters=a.eval_iters,
            log_interval=a.log_interval, exit_interval=a.exit_interval, exit_duration_in_mins=a.exit_duration_in_mins,
            seed=a.seed, skip_train=a.skip_train,
        ),
        data=DataConfig(
            data_path=parse_data_path(a.data_path), split=a.split,
            tokenizer_type=a.tokenizer_type or ("NullTokenizer" if a.mock_data else None),
            vocab_file=a.vocab_file, merge_file=a.merge_file, tokenizer_model=a.tokenizer_model,
            make_vocab_size_divisible_by=a.make_vocab_size_divisible_by, data_cache_path=a.data_cache_path,
            mock_data=a.mock_data,
        ),
        checkpoint=CheckpointConfig(
            save=a.save, save_interval=a.save_interval, load=a.load, no_load_optim=a.no_load_optim,
            no_load_rng=a.no_load_rng, finetune=a.finetune, reset_iteration=a.reset_iteration,
            no_save_optim=a.no_save_optim,
        ),
        logging=LoggingConfig(tensorboard_dir=a.tensorboard_dir, peak_tflops=a.peak_tflops),
        kd=KDConfig(
            kd=a.kd, mos=a.mos, load_teacher=a.load_teacher, num_layers_teacher=a.num_layers_teacher,
            hidden_size_teacher=a.hidden_size_teacher, num_attention_heads_teacher=a.num_attention_heads_teacher,
            ffn_hidden_size_teacher=a.ffn_hidden_size_teacher, num_experts_teacher=a.num_experts_teacher,
            expert_interval_teacher=a.expert_interval_teacher, mlp_type_teacher=a.mlp_type_teacher,
            topk_teacher=a.topk_teacher, alpha_ce=a.kd_alpha_ce, beta_ce=a.kd_beta_ce, temperature=a.kd_temp,
            stop_iters=a.kd_stop_iters,
        ),
        dry_run=a.dry_run,
        dry_run_world_size=a.dry_run_world_size or int(os.environ.get("WORLD_SIZE", "1")),
    )
    if a.zero_stage in (2, 3):
        raise UserError(f"--zero-stage {a.zero_stage} is not implemented: use --zero-stage 1 (or --use-distributed-optimizer), "
                        f"which shards the Adam state; gradients and parameters stay replicated")
    if cfg.dry_run_world_size < 1:
        raise UserError("--dry-run-world-size must be >= 1")
    if a.mock_data and not a.vocab_size and cfg.data.tokenizer_type == "NullTokenizer":
        raise UserError("--mock-data needs --vocab-size (or a real tokenizer via --tokenizer-type)")
    return cfg


def parse_args(argv: Optional[Sequence[str]] = None, extra_args_provider=None) -> Config:
    """Parse Megatron flags into a validated Config. Raises UserError on bad input."""
    import sys

    import os

    from megatron.upstream_flags import translate_argv

    upstream = translate_argv(sys.argv[1:] if argv is None else argv)  # upstream flags and the DeepSpeed JSON
    if os.environ.get("RANK", "0") == "0":
        for note in upstream.notes:
            print(note, file=sys.stderr, flush=True)
    argv = upstream.argv
    parser = build_parser()
    if extra_args_provider is not None:
        parser = extra_args_provider(parser)
    a = parser.parse_args(argv)
    return namespace_to_config(a).validate()
