"""Writing a model's weights as a checkpoint with no optimizer, scheduler or RNG state.

Used by import-hf (iteration 0) and upcycle (the dense checkpoint's iteration and consumed samples),
both in one process with every expert local. Train from it with ``--load DIR --finetune`` (a fresh
start: iteration 0, data from the beginning), or ``--load DIR --no-load-optim --no-load-rng`` (go on
with the data where the source stopped); either way the optimizer is fresh.
"""
from __future__ import annotations

import os
import shutil

from megatron.checkpoint.atomic import write_tracker
from megatron.checkpoint.file_io import save_file
from megatron.checkpoint.formats import SAVED_FORMAT
from megatron.checkpoint.layout import COMMON_FILE, iter_dir_name, staging_dir


def write_weights_checkpoint(save_dir: str, model, config: dict, iteration: int = 0, consumed_samples: int = 0) -> str:
    """``model``: a GPTModel with every expert local; ``config``: the full stored config (Config.to_dict()).
    Written into ``save_dir`` (which must be new or empty) through a staging folder renamed at the end, then
    named by the tracker. Returns the checkpoint folder."""
    tmp = staging_dir(save_dir, iteration)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    SAVED_FORMAT.write_weights(tmp, model)
    save_file({"format": SAVED_FORMAT.VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
               "config": config}, os.path.join(tmp, COMMON_FILE))
    final = os.path.join(save_dir, iter_dir_name(iteration))
    os.replace(tmp, final)
    write_tracker(save_dir, iteration)
    return final
