"""The --kd / --mos teacher's model config, read from its checkpoint and checked against the teacher flags."""
from __future__ import annotations

import dataclasses

from megatron.checkpoint.layout import locate_checkpoint
from megatron.config.schema import ModelConfig, MoEConfig
from megatron.errors import UserError

TEACHER_FLAGS = {"num_layers": "--num-layers-teacher", "hidden_size": "--hidden-size-teacher",
                 "num_attention_heads": "--num-attention-heads-teacher", "ffn_hidden_size": "--ffn-hidden-size-teacher",
                 "num_experts": "--num-experts-teacher", "expert_interval": "--expert-interval-teacher",
                 "mlp_type": "--mlp-type-teacher", "topk": "--topk-teacher"}


def teacher_model_config(kd_cfg, student_cfg: ModelConfig) -> ModelConfig:
    """The teacher's ModelConfig from its checkpoint; teacher flags must agree with it."""
    found = locate_checkpoint(kd_cfg.load_teacher, "--load-teacher")
    if found is None:
        raise UserError(f"--load-teacher {kd_cfg.load_teacher}: no checkpoint there (latest_checkpointed_iteration.txt "
                        f"is missing); train the teacher first or point at its --save directory")
    teacher = ModelConfig.from_dict(found[1]["config"]["model"])
    for field, value in kd_cfg.teacher_overrides().items():
        if field in MoEConfig.__dataclass_fields__:
            have = teacher.moe.num_experts if field == "num_experts" else getattr(teacher.moe, field)
            if field == "num_experts":  # compare per layer: "8" and "8 8" mean the same
                probe = dataclasses.replace(teacher.moe, num_experts=list(value))
                same = probe.experts_per_layer(teacher.num_layers) == teacher.moe.experts_per_layer(teacher.num_layers)
            else:
                same = have == value
        else:
            have = getattr(teacher, field)
            same = have == value
        if not same:
            raise UserError(f"{TEACHER_FLAGS[field]} {_fmt(value)} does not match the teacher checkpoint in "
                            f"{kd_cfg.load_teacher} ({_fmt(have)}): fix the flag or drop it (the checkpoint's config is used)")
    if teacher.vocab_size != student_cfg.vocab_size:
        raise UserError(f"--load-teacher: the teacher's padded vocabulary ({teacher.vocab_size}) differs from the "
                        f"student's ({student_cfg.vocab_size}): use the teacher's tokenizer")
    if teacher.max_position_embeddings < student_cfg.seq_length:
        raise UserError(f"--seq-length {student_cfg.seq_length} exceeds the teacher's max position embeddings "
                        f"({teacher.max_position_embeddings}): shorten --seq-length")
    teacher.hidden_dropout = teacher.attention_dropout = 0.0
    # its eval capacity would cut each micro-batch's overflow in position order: no dropping unless asked for
    teacher.moe.token_dropping = kd_cfg.teacher_capacity_factor is not None
    if kd_cfg.teacher_capacity_factor is not None:
        teacher.moe.eval_capacity_factor = kd_cfg.teacher_capacity_factor
    teacher.checkpoint_activations = False
    return teacher


def _fmt(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

