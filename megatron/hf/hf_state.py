"""Reading the weights of a transformers directory: model.safetensors, sharded safetensors
(model.safetensors.index.json + its shards) or pytorch_model.bin."""
from __future__ import annotations

import json
import os

import torch

from megatron.errors import UserError

INDEX = "model.safetensors.index.json"


def read_config(src: str) -> dict:
    """config.json of the transformers directory ``src``; a missing or malformed file is one line."""
    path = os.path.join(src, "config.json")
    if not os.path.isfile(path):
        raise UserError(f"--load {src}: no config.json there; give a transformers model directory")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"--load {path}: not valid JSON ({e})") from None


def read_hf_state(src: str) -> dict:
    """{tensor name: tensor} of the directory ``src``; a missing shard, an unreadable file: one line naming it."""
    st, idx, pt = (os.path.join(src, n) for n in ("model.safetensors", INDEX, "pytorch_model.bin"))
    if os.path.isfile(st):
        from safetensors.torch import load_file  # optional dependency: only safetensors directories need it

        return load_file(st)
    if os.path.isfile(idx):
        return _read_sharded(src, idx)
    if os.path.isfile(pt):
        try:
            return torch.load(pt, map_location="cpu", weights_only=True)  # refuses pickled code
        except Exception as e:
            raise UserError(f"--load {pt}: refused or unreadable as plain tensors ({type(e).__name__}); it may be "
                            f"unsafe or corrupt - convert it to model.safetensors") from None
    raise UserError(f"--load {src}: no model.safetensors, {INDEX} or pytorch_model.bin there")


def _read_sharded(src: str, idx: str) -> dict:
    from safetensors.torch import load_file

    try:
        with open(idx, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (ValueError, KeyError, UnicodeDecodeError) as e:
        raise UserError(f"--load {idx}: not a safetensors index (no readable weight_map: {e})") from None
    state: dict = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(src, shard)
        if not os.path.isfile(path):
            raise UserError(f"--load {src}: shard {shard} named by {INDEX} is missing")
        tensors = load_file(path)
        for name, file in weight_map.items():
            if file == shard:
                if name not in tensors:
                    raise UserError(f"--load {path}: tensor {name} named by {INDEX} is not in this shard")
                state[name] = tensors[name]
    return state
