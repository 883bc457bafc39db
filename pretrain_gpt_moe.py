#!/usr/bin/env python3
"""Pretrain a GPT (dense, MoE, PR-MoE) with Megatron flags.

    python pretrain_gpt_moe.py --num-layers 4 --hidden-size 128 ... --data-path P_text_document
    torchrun --nproc_per_node 4 pretrain_gpt_moe.py ... --num-experts 8 --moe-expert-parallel-size 2

Only Megatron-style hooks live here; ``megatron.training.pretrain`` runs the loop.
"""
from __future__ import annotations

from functools import partial

import torch

from megatron.data.builder import build_datasets
from megatron.errors import run_cli
from megatron.model.gpt_model import DistillOutput, LossOutput
from megatron.model.moe.aux_loss import moe_loss as moe_loss_of
from megatron.parallel.apply import gpt_module
from megatron.planning.dry_run import dry_run
from megatron.training import pretrain
from megatron.training.arguments import parse_args
from megatron.training.distillation import build_teacher, teacher_logits
from megatron.training.step_output import StepOutput


def model_provider(cfg, ps):
    """The GPT model; this rank holds experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of each MoE layer."""
    return gpt_module(cfg.model, ps)


def train_valid_test_datasets_provider(cfg, num_samples):
    # token ids lie below the real vocabulary (--true-vocab-size: the padding ids have no probability)
    vocab = cfg.model.true_vocab_size or cfg.model.vocab_size
    return build_datasets(cfg.data, cfg.model.seq_length, cfg.train.seed, num_samples, vocab)


def get_batch(data_iterator, device):
    """[mbs, seq + 1] token block -> tokens, labels [mbs, seq] and the loss mask."""
    block = torch.from_numpy(next(data_iterator)).to(device, non_blocking=True)
    tokens, labels = block[:, :-1].contiguous(), block[:, 1:].contiguous()
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    return tokens, labels, loss_mask


def loss_func(loss_mask, cfg, output: LossOutput | DistillOutput) -> StepOutput:
    """lm loss (token mean) + moe_loss_coeff * sum of aux losses (+ z-loss); logged apart.

    With a teacher (a DistillOutput, with the per-token KD term T^2 * KL): alpha * lm loss
    + beta * kd loss + moe loss; "lm loss" stays the student's plain cross-entropy.
    """
    per_token, stats = output.loss, output.moe_stats  # [B, T] fp32; MoEStats per MoE layer
    denom = loss_mask.sum()
    lm_loss = torch.sum(per_token * loss_mask) / denom
    loss = lm_loss
    logs = {"lm loss": lm_loss.detach()}
    if isinstance(output, DistillOutput):
        kd_term = cfg.kd.beta_ce * torch.sum(output.kd_loss * loss_mask) / denom
        loss = cfg.kd.alpha_ce * lm_loss + kd_term
        logs["kd loss"] = kd_term.detach()
    if stats:
        moe_loss = moe_loss_of(stats, cfg.model.moe)
        loss = loss + moe_loss
        logs["moe loss"] = moe_loss.detach()
    return StepOutput(loss, logs, list(stats))


def teacher_provider(cfg, ps):
    """The frozen teacher of --kd / --mos, built from its checkpoint's config."""
    return build_teacher(cfg.kd, cfg.model, ps)


def forward_step(cfg, data_iterator, model, teacher=None):
    device = next(model.parameters()).device
    tokens, labels, loss_mask = get_batch(data_iterator, device)
    if teacher is None:
        output = model(tokens, labels)  # LossOutput: per-token loss [B, T], moe stats
    else:  # DistillOutput: per-token loss and KD term [B, T] each, moe stats
        output = model.distill(tokens, labels, teacher_logits(teacher, tokens), cfg.kd.temperature)
    return output, partial(loss_func, loss_mask, cfg)


def main(argv=None, cfg=None):
    cfg = cfg or parse_args(argv)
    if cfg.dry_run:
        return dry_run(cfg, cfg.dry_run_world_size)
    return pretrain(train_valid_test_datasets_provider, model_provider, partial(forward_step, cfg), cfg=cfg,
                    teacher_provider=teacher_provider)


if __name__ == "__main__":
    run_cli(lambda: main() is None)  # exit status 0 once training returns its summary
