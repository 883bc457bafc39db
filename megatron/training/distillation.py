"""Knowledge distillation from a frozen teacher (--kd) and Mixture-of-Students (--mos) (the DeepSpeed-MoE paper's MoS recipe).

The teacher is built from its OWN full config, read from its checkpoint (flags given for it are
checked against that config), placed with the student's expert-parallel layout (a teacher layer with
fewer experts than EP at EP degree E, as a PR-MoE student's), loaded, frozen,
and run in eval mode under no_grad: no dropout, no random token selection, no gate noise, and no
token dropping (as in evaluation: every token gets its experts' output, whatever capacity factor
the teacher was trained with) unless ``--kd-teacher-capacity-factor`` asks for one.

Loss per token: alpha * CE(student, labels) + beta * T^2 * KL(softmax(teacher / T) || softmax(student / T)),
computed by the model's output step (megatron/model/kd_loss.py) from the teacher logits given here.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from megatron.checkpoint.load import load_checkpoint
from megatron.checkpoint.teacher_config import teacher_model_config
from megatron.config.schema import ModelConfig
from megatron.errors import UserError
from megatron.parallel.apply import build_model


def build_teacher(kd_cfg, student_cfg: ModelConfig, ps, model_provider=None) -> torch.nn.Module:
    """The frozen teacher on ``ps.device`` with the student's expert-parallel layout, weights loaded."""
    tcfg = teacher_model_config(kd_cfg, student_cfg)
    for e in tcfg.moe.experts_per_layer(tcfg.num_layers):
        if e > 1 and e % ps.ep_size and ps.ep_size % e:
            raise UserError(f"--moe-expert-parallel-size {ps.ep_size} and a teacher layer's {e} experts do not divide "
                            f"one another: the teacher uses the student's EP layout, so choose an EP size that fits both")
    tcfg.moe.expert_parallel_size = ps.ep_size
    # a teacher layer with fewer experts than EP runs at EP degree E (its own, as the student's PR-MoE layers do)
    missing = [e for e in tcfg.moe.layer_ep_sizes(tcfg.num_layers) if e != ps.ep_size and e not in ps.expert_layouts]
    if ps.distributed and missing:
        raise UserError(f"--num-experts-teacher: teacher MoE layers would run at EP degrees {missing} (fewer experts "
                        f"than --moe-expert-parallel-size {ps.ep_size}), which no student layer uses; give the teacher "
                        f"layers expert counts the student also has, or at least --moe-expert-parallel-size")
    teacher = build_model(tcfg, ps)  # meta build, this rank's experts and TP shards; weights from the checkpoint
    load_checkpoint(kd_cfg.load_teacher, teacher, None, None, None, SimpleNamespace(model=tcfg), ps,
                    load_optim=False, load_rng=False, flag="--load-teacher")
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def teacher_logits(teacher: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, T] -> teacher logits [B, T, V] (eval mode, no grad)."""
    with torch.no_grad():
        return teacher.logits(tokens).logits  # [B, T, V]
