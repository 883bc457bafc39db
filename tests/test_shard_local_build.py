"""Shard-local model build (megatron/parallel/apply.py, megatron/model/init_rng.py): each rank materialises and
initialises only its own shard, and a TP=2 / EP=2 model holds exactly the slices of the TP=1 / EP=1 one."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.config.schema import ModelConfig, MoEConfig
from megatron.model import init_rng
from megatron.parallel.apply import build_model
from megatron.parallel.state import ParallelState
from tests.dist_utils import run_distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**moe):
    # F = 66: the row-parallel fc2 at TP=2 holds 33 columns, so its per-row runs start at odd positions
    return ModelConfig(num_layers=4, hidden_size=40, num_attention_heads=4, ffn_hidden_size=66, vocab_size=96,
                       max_position_embeddings=32, moe=MoEConfig(num_experts=[4], **moe))


@pytest.mark.parametrize("layout", [(1, 3), (0, 1)], ids=["dim1", "dim0"])
def test_a_shard_is_the_slice_of_the_full_tensor(layout):
    dim, n = layout
    full = torch.empty(12, 13, 7)
    init_rng.normal_(full, 5, "w", 0.5)
    for index in (torch.arange(2, 9), torch.tensor([0, 1, 5, 6, 7, 11]), torch.tensor([3])):
        shape = list(full.shape)
        shape[dim] = len(index)
        shard = init_rng.normal_(torch.empty(shape), 5, "w", 0.5, full.shape, dim, index)
        assert torch.equal(shard, full.index_select(dim, index))


def test_values_do_not_depend_on_the_block_size(monkeypatch):
    ref = init_rng.normal_(torch.empty(301, 77), 1, "b", 1.0)
    monkeypatch.setattr(init_rng, "BLOCK", 97)
    assert torch.equal(init_rng.normal_(torch.empty(301, 77), 1, "b", 1.0), ref)
    cols = init_rng.normal_(torch.empty(301, 40), 1, "b", 1.0, (301, 77), 1, torch.arange(37, 77))
    assert torch.equal(cols, ref[:, 37:])
    half = init_rng.normal_(torch.empty(301, 77, dtype=torch.float64), 1, "b", 1.0)
    assert torch.equal(half.float(), ref)  # float32 is the float64 values rounded once
    assert not torch.equal(init_rng.normal_(torch.empty(301, 77), 2, "b", 1.0), ref)  # another seed
    assert not torch.equal(init_rng.normal_(torch.empty(301, 77), 1, "c", 1.0), ref)  # another parameter


def test_the_transform_is_box_muller():
    raw = np.random.Philox(key=init_rng.stream_key(0, "x")).random_raw(100_000)
    z = init_rng.box_muller(raw)
    hi, lo = (raw >> np.uint64(32)).astype(np.float64), (raw & np.uint64(0xFFFFFFFF)).astype(np.float64)
    radius, theta = np.sqrt(-2 * np.log((hi + 1) / 2**32)), 2 * np.pi * lo / 2**32
    np.testing.assert_allclose(z, np.stack([radius * np.cos(theta), radius * np.sin(theta)], 1).reshape(-1),
                               rtol=0, atol=1e-9)


def _layout_worker(rank, tp, ep, moe):
    import torch.distributed as dist

    from megatron.model.param_tags import is_expert, is_tp_sharded
    from megatron.parallel.state import build_groups

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ps = build_groups(rank, 2, ep, torch.device("cpu"), tp_size=tp)
    model = build_model(_cfg(**moe), ps, seed=11)
    full = dict(build_model(_cfg(**moe), ParallelState(device=torch.device("cpu")), seed=11).named_parameters())
    checked = {"tp": 0, "expert": 0, "replicated": 0}
    for name, p in model.named_parameters():
        ref = full[name]
        if is_tp_sharded(p):
            ref = ref.index_select(p.tp_dim, p.tp_indices[ps.tp_rank])
            checked["tp"] += 1
        elif is_expert(p):
            E_l = p.shape[0]
            ref = ref[ps.ep_rank * E_l:(ps.ep_rank + 1) * E_l]
            checked["expert"] += E_l < full[name].shape[0]
        else:
            checked["replicated"] += 1
        assert torch.equal(p.detach(), ref.detach()), name
    dist.destroy_process_group()
    return checked


@pytest.mark.parametrize("moe", [{}, {"mlp_type": "residual", "router_type": "aux_free"}], ids=["moe", "residual"])
def test_tp2_shards_are_the_slices_of_the_tp1_model(tmp_path, moe):
    for checked in run_distributed(_layout_worker, 2, str(tmp_path), 2, 1, moe):
        assert checked["tp"] >= 4 * 2 + 1 and checked["replicated"] > 0  # qkv, proj (+ fc1, fc2), embedding


def test_ep2_experts_are_the_slices_of_the_ep1_model(tmp_path):
    for checked in run_distributed(_layout_worker, 2, str(tmp_path), 1, 2, {}):
        assert checked["expert"] == 2 * 4  # w1, b1, w2, b2 of the 2 MoE layers, half of the experts each


def test_init_statistics():
    cfg = ModelConfig(num_layers=4, hidden_size=512, num_attention_heads=8, vocab_size=1000,
                      max_position_embeddings=64, init_method_std=0.02, moe=MoEConfig(num_experts=[4]))
    model = build_model(cfg, ParallelState(device=torch.device("cpu")), seed=3)
    out_std = 0.02 / (2 * 4) ** 0.5
    params = dict(model.named_parameters())
    for name, p in params.items():
        p = p.detach()
        if name.endswith(("bias", "experts.b1", "experts.b2")):
            assert not p.any(), name
        elif "layernorm" in name:
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            want = out_std if name.endswith(("proj.weight", "fc2.weight", "experts.w2")) else 0.02
            assert abs(p.std().item() / want - 1) < (0.03 if p.numel() > 100_000 else 0.1), name
            assert abs(p.mean().item()) < 4 * want / p.numel() ** 0.5, name
    w = params["layers.0.mlp.mlp.fc1.weight"].detach().double() / 0.02  # 1M values of N(0, 1)
    assert abs((w.abs() < 1).double().mean().item() - 0.6827) < 0.003
    assert abs((w**4).mean().item() - 3.0) < 0.03
    experts = params["layers.1.mlp.experts.w1"].detach()
    assert not torch.equal(experts[0], experts[1])  # every expert its own stream
    assert not torch.equal(params["layers.0.attention.qkv.weight"][:40], params["layers.2.attention.qkv.weight"][:40])


_PEAK_SCRIPT = r"""
import json, resource, sys, torch
from megatron.config.schema import ModelConfig
from megatron.parallel.apply import build_model
from megatron.parallel.state import ParallelState
tp, rank = int(sys.argv[1]), int(sys.argv[2])
tiny = ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=8, vocab_size=64, max_position_embeddings=64)
build_model(tiny, ParallelState(device=torch.device("cpu")), seed=1)  # lazy imports, allocator: ~40 MB once
cfg = ModelConfig(num_layers=4, hidden_size=1024, num_attention_heads=8, vocab_size=8192, max_position_embeddings=64)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = build_model(cfg, ParallelState(device=torch.device("cpu"), tp_size=tp, tp_rank=rank), seed=1)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": peak - before, "local": sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def test_the_build_holds_the_local_shard_not_the_full_model():
    """A TP=2 build in a fresh process grows its peak RSS by about its shard (half the model), never the full
    model: nothing full is made, not even transiently (an unsharded build then a swap held both)."""
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")

    def run(tp):
        out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tp), "1"], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    full, shard = run(1), run(2)  # 235 MB of parameters at TP=1, 118 MB per TP=2 rank
    assert full["local"] > 200e6 and shard["local"] < 0.55 * full["local"]
    assert shard["growth"] < shard["local"] + 16e6, (shard, full)  # the shard plus the generator's blocks
    assert shard["growth"] < 0.6 * full["local"], (shard, full)
    assert full["growth"] < full["local"] + 16e6, full  # at TP=1, too, the model alone (no second copy)
