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
from megatron.model.gpt_model import GPTModel
from megatron.errors import run_cli
from megatron.training import pretrain


def model_provider(cfg, ps):
    """The GPT model; this rank holds experts [ep_rank * E/ep, (ep_rank + 1) * E/ep) of each MoE layer."""
    return GPTModel(cfg.model, ep_rank=ps.ep_rank, ep_size=ps.ep_size)


def train_valid_test_datasets_provider(cfg, num_samples):
    return build_datasets(cfg.data, cfg.model.seq_length, cfg.train.seed, num_samples, cfg.model.vocab_size)


def get_batch(data_iterator, device):
    """[mbs, seq + 1] token block -> tokens, labels [mbs, seq] and the loss mask."""
    block = torch.from_numpy(next(data_iterator)).to(device, non_blocking=True)
    tokens, labels = block[:, :-1].contiguous(), block[:, 1:].contiguous()
    loss_mask = torch.ones_like(labels, dtype=torch.float32)
    return tokens, labels, loss_mask


def loss_func(loss_mask, moe_cfg, output):
    """lm loss (token mean) + moe_loss_coeff * sum of aux losses (+ z-loss); logged apart."""
    per_token, stats = output
    lm_loss = torch.sum(per_token * loss_mask) / loss_mask.sum()
    loss = lm_loss
    logs = {"lm loss": lm_loss.detach()}
    if stats:
        moe_loss = moe_cfg.loss_coeff * torch.stack([s["aux_loss"] for s in stats]).sum()
        if moe_cfg.z_loss_coeff > 0:
            moe_loss = moe_loss + moe_cfg.z_loss_coeff * torch.stack([s["z_loss"] for s in stats]).sum()
        loss = loss + moe_loss
        logs["moe loss"] = moe_loss.detach()
        logs["moe stats"] = stats
    return loss, logs


def forward_step(cfg, data_iterator, model):
    device = next(model.parameters()).device
    tokens, labels, loss_mask = get_batch(data_iterator, device)
    output = model(tokens, labels)
    return output, partial(loss_func, loss_mask, cfg.model.moe)


def main(argv=None, cfg=None):
    from megatron.arguments import parse_args

    cfg = cfg or parse_args(argv)
    return pretrain(train_valid_test_datasets_provider, model_provider, partial(forward_step, cfg), cfg=cfg)


if __name__ == "__main__":
    run_cli(lambda: main() is None)  # exit status 0 once training returns its summary
