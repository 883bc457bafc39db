"""Write a model's weights as one of our checkpoints with no optimizer, scheduler or RNG state.

Used by import-hf (iteration 0) and upcycle (the dense checkpoint's iteration and consumed samples).
Train from it with ``--load DIR --finetune`` (a fresh start: iteration 0, data from the beginning), or
``--load DIR --no-load-optim --no-load-rng`` (go on with the data where the source stopped); either way
the optimizer is fresh.
"""
from __future__ import annotations

import os
import shutil

import torch

from megatron.checkpoint.checkpointing import FORMAT_VERSION, TRACKER, _atomic_write_text, expert_file, iter_dir_name
from megatron.model.moe.layer import MoELayer


def write_weights_checkpoint(save_dir: str, model, config: dict, iteration: int = 0, consumed_samples: int = 0) -> str:
    """``model``: a GPTModel with every expert local; ``config``: the full stored config (Config.to_dict()).
    Written into ``save_dir`` (which must be new or empty) through a temporary folder renamed at the end."""
    name = iter_dir_name(iteration)
    tmp = os.path.join(save_dir, "." + name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "experts"))
    experts = {id(p) for m in model.modules() if isinstance(m, MoELayer) for p in m.experts.parameters()}
    dense = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if id(p) not in experts}
    torch.save(dense, os.path.join(tmp, "model_dense.pt"))
    for m in model.modules():
        if isinstance(m, MoELayer):
            for g in range(m.experts.num_local):
                blob = {k: p.detach()[g].cpu().clone() for k, p in m.experts.named_parameters(recurse=False)}
                torch.save(blob, os.path.join(tmp, expert_file(m.layer_number, g)))
    torch.save({"format": FORMAT_VERSION, "iteration": iteration, "consumed_samples": consumed_samples, "config": config},
               os.path.join(tmp, "common.pt"))
    os.replace(tmp, os.path.join(save_dir, name))
    _atomic_write_text(os.path.join(save_dir, TRACKER), str(iteration))
    return os.path.join(save_dir, name)
