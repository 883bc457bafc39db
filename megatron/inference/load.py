"""Load a training checkpoint for inference: config, tokenizer and model from the checkpoint alone.

Used by tools/eval_harness.py, tools/generate_text.py and tools/checkpoint_util.py. Experts are
keyed by global id on disk, so a checkpoint saved at any expert-parallel size loads here on one
device with every expert local.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

import torch

from megatron.checkpoint.load import load_checkpoint
from megatron.checkpoint.stored_config import read_checkpoint_config
from megatron.config.schema import ModelConfig
from megatron.errors import UserError
from megatron.parallel.apply import build_model
from megatron.parallel.state import ParallelState
from megatron.tokenizer import registry as tokenizer_registry


@dataclass
class LoadedModel:
    model: torch.nn.Module
    cfg: ModelConfig
    tokenizer: object
    iteration: int
    config: dict  # the checkpoint's full stored config
    path: str


def load_model(load_dir: str, device: Optional[str] = None, eval_capacity_factor: Optional[float] = None,
               dtype: Optional[torch.dtype] = None, vocab_file=None, merge_file=None, tokenizer_model=None,
               flag: str = "--load", ps: Optional[ParallelState] = None) -> LoadedModel:
    """The model in eval mode on ``device``. No token is dropped unless ``eval_capacity_factor`` is given.

    With ``ps`` (expert-parallel size > 1) this rank holds only its 1/N of each layer's experts (1/E of a PR-MoE
    layer with E < N experts, which runs at EP degree E), and the MoE layers are wired for the expert-parallel
    all-to-all over their degree's EP group (``ps.expert_groups``); every rank of the group must then run the
    same forwards."""
    path, common = read_checkpoint_config(load_dir, flag)
    cfg = ModelConfig.from_dict(common["config"]["model"])
    cfg.hidden_dropout = cfg.attention_dropout = 0.0
    cfg.checkpoint_activations = False
    ep_size = ps.ep_size if ps is not None else 1
    if ep_size > 1 and any(n % ep_size and ep_size % n for n in cfg.moe.experts_per_layer(cfg.num_layers) if n > 1):
        raise UserError(f"--moe-expert-parallel-size {ep_size}: the checkpoint's expert counts "
                        f"{cfg.moe.experts_per_layer(cfg.num_layers)} and it must divide one another")
    cfg.moe.expert_parallel_size = ep_size
    if ps is not None and ps.distributed:  # PR-MoE layers with fewer experts run at EP = E: their groups must exist
        missing = [e for e in cfg.moe.layer_ep_sizes(cfg.num_layers) if e != ep_size and e not in ps.expert_layouts]
        if missing:
            raise UserError(f"--moe-expert-parallel-size {ep_size}: the checkpoint has MoE layers at EP degrees "
                            f"{missing} (fewer experts than EP ranks) and the process groups were built without them; "
                            f"start the groups with initialize(..., layer_ep_sizes=cfg.moe.layer_ep_sizes(num_layers))")
    if eval_capacity_factor is None:
        cfg.moe.token_dropping = False
    else:
        cfg.moe.token_dropping = True
        cfg.moe.eval_capacity_factor = eval_capacity_factor
    dev = ps.device if ps is not None else torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ps = ps or ParallelState(device=dev)
    model = build_model(cfg, ps, device=dev)  # meta build, this rank's experts (and EP dispatch); weights loaded
    load_checkpoint(load_dir, model, None, None, None, SimpleNamespace(model=cfg), ps,
                    load_optim=False, load_rng=False, flag=flag)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    tokenizer = tokenizer_registry.from_stored_config(common["config"], vocab_file=vocab_file, merge_file=merge_file,
                                                      tokenizer_model=tokenizer_model)
    return LoadedModel(model=model, cfg=cfg, tokenizer=tokenizer, iteration=int(common["iteration"]),
                       config=common["config"], path=path)
