"""Per-layer expert-parallel degrees (PR-MoE): layers with fewer experts than --moe-expert-parallel-size run at
EP = E, their other ranks extra expert-data-parallel replicas.

A PR-MoE model with layers of 2 and 4 experts at EP 4 on 4 gloo processes (the 2-expert layers at EP 2, EDP 2;
the 4-expert layers at EP 4, EDP 1) trains as the same model at EP 1 in one process: losses and gradient norms
(a gradient reduced over the wrong group, or an expert counted twice in the norm, shows) through the capacity
and the no-drop dispatchers, top-1 and top-2, the three gradient reducers (blocking, overlapped, ZeRO-2's
reduce-scatter), ZeRO-1 and FSDP2; checkpoints move between EP 4 and EP 1 both ways, in both formats. One
4-process launch runs every distributed variant (each a full training run through the entry point).
"""
import os

import pytest
import torch
import torch.distributed as dist

from megatron.config.schema import ModelConfig
from megatron.parallel.state import build_groups
from megatron.planning.dry_run import expert_elements, expert_layout
from tests.dist_utils import free_port, run_distributed
from tests.runs import close, mock_args, train

# no dropout, no gate noise, no clipping: layouts agree to float rounding in the losses and the grad norms
EXACT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--disable-moe-top2-2nd-expert-sampling", "--use-cpu",
         "--clip-grad", "0", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "4"]
PR_MOE = ["--expert-interval", "1", "--num-experts", "2", "2", "4", "4"]  # 4 layers: EP degrees 2, 2, 4, 4
CAPACITY = ["--moe-train-capacity-factor", "8", "--moe-eval-capacity-factor", "8"]  # the capacity path, no drop
NO_DROP = ["--disable-moe-token-dropping"]
EP4 = ["--moe-expert-parallel-size", "4"]

CASES = {  # name -> (flags of the model at EP 1 and EP 4, flags of the EP 4 run only)
    "top1-capacity-overlap": (CAPACITY + ["--topk", "1"], ["--overlap-grad-reduce"]),
    "top2-nodrop-zero2": (NO_DROP + ["--topk", "2"], ["--zero-stage", "2"]),
    "top2-capacity-zero1": (CAPACITY + ["--topk", "2"], ["--use-distributed-optimizer"]),
    "top1-nodrop-allgather-fsdp2": (NO_DROP + ["--topk", "1"], ["--moe-token-dispatcher-type", "allgather",
                                                               "--use-torch-fsdp2"]),
}


def _argv(case):
    return mock_args(EXACT + PR_MOE + CASES[case][0])


def _groups_worker(rank):
    """The EP / EDP groups of each degree at DP 4, EP 4: which ranks hold the same 2-expert-layer experts."""
    dist.init_process_group("gloo", rank=rank, world_size=4)
    ps = build_groups(rank, 4, 4, torch.device("cpu"), layer_ep_sizes=[2, 4])
    g2 = ps.expert_groups(2)
    out = {"ep2": dist.get_process_group_ranks(g2.ep_group), "edp2": dist.get_process_group_ranks(g2.edp_group),
           "ep4": dist.get_process_group_ranks(ps.ep_group), "edp4": ps.edp_size}
    dist.destroy_process_group()
    return out


def _variants_worker(rank, runs, ports):
    """Every distributed variant in this one set of 4 processes, one training run after the other (each run
    starts and ends its process group: a fresh rendezvous port for each)."""
    out = {}
    for (name, argv), port in zip(runs, ports):
        os.environ["MASTER_PORT"] = str(port)
        out[name] = train(rank, argv)
    return out


def test_pr_moe_at_ep4_equals_ep1_and_checkpoints_move_between_them(tmp_path):
    ck_ep1 = str(tmp_path / "ck_ep1")  # saved at EP 1 (plain Adam, format 2), resumed at EP 4 (ZeRO-1)
    ck_ep4 = str(tmp_path / "ck_ep4")  # saved at EP 4 with ZeRO-1 (format 2), resumed at EP 1
    ck_ep4_torch = str(tmp_path / "ck_ep4_torch")  # saved at EP 4 in format 1, resumed at EP 1
    ref = {c: train(0, _argv(c)) for c in CASES}
    zero_case = "top2-capacity-zero1"
    train(0, _argv(zero_case) + ["--save", ck_ep1, "--exit-interval", "2"])
    runs = [(c, _argv(c) + EP4 + CASES[c][1]) for c in CASES]
    runs += [("save-torch", _argv(zero_case) + EP4 + ["--save", ck_ep4_torch, "--ckpt-format", "torch",
                                                      "--exit-interval", "2"]),
             ("save-zero1", _argv(zero_case) + EP4 + ["--use-distributed-optimizer", "--save", ck_ep4,
                                                      "--exit-interval", "2"]),
             ("resume-from-ep1", _argv(zero_case) + EP4 + ["--use-distributed-optimizer", "--load", ck_ep1])]
    ports = [free_port() for _ in runs]
    out = run_distributed(_variants_worker, 4, str(tmp_path / "runs"), runs, ports, timeout=900)
    for c in CASES:
        for r in range(4):  # every rank reports the same figures
            close(out[r][c]["losses"], ref[c]["losses"])
            close(out[r][c]["grad_norms"], ref[c]["grad_norms"])
        assert len(ref[c]["losses"]) == 4 and ref[c]["grad_norms"][0] > 0
    full = ref[zero_case]
    close(out[0]["save-zero1"]["losses"], full["losses"][:2])
    close(out[0]["save-torch"]["losses"], full["losses"][:2])
    close(out[0]["resume-from-ep1"]["losses"], full["losses"][2:])
    close(out[0]["resume-from-ep1"]["grad_norms"], full["grad_norms"][2:])
    for ck in (ck_ep4, ck_ep4_torch):  # EP 4 -> one process at EP 1, plain Adam
        resumed = train(0, _argv(zero_case) + ["--load", ck])
        close(resumed["losses"], full["losses"][2:])
        close(resumed["grad_norms"], full["grad_norms"][2:])
    # format 1 wrote each expert once, by its global id: 2 per 2-expert layer, 4 per 4-expert layer
    experts = sorted(os.listdir(os.path.join(ck_ep4_torch, "iter_0000002", "experts")))
    assert len(experts) == 2 + 2 + 4 + 4
    assert "layer_000_expert_0001.pt" in experts and "layer_003_expert_0003.pt" in experts


def test_expert_groups_of_a_lower_degree_split_the_ep_group(tmp_path):
    out = run_distributed(_groups_worker, 4, str(tmp_path))
    assert [o["ep2"] for o in out] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert [o["edp2"] for o in out] == [[0, 2], [1, 3], [0, 2], [1, 3]]
    assert all(o["ep4"] == [0, 1, 2, 3] and o["edp4"] == 1 for o in out)


@pytest.mark.parametrize("world, ep, want", [(64, 64, {32: (32, 1, 2), 64: (64, 1, 1)})])
def test_dry_run_counts_each_layer_at_its_own_degree(world, ep, want):
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=128)
    cfg.moe.num_experts = [32, 64]
    cfg.moe.expert_parallel_size = ep
    layout = expert_layout(cfg, ep, world)
    assert {x["experts"]: (x["ep"], x["local"], x["edp"]) for x in layout} == want
    one = 2 * 32 * 128 + 128 + 32
    assert expert_elements(layout) == 2 * one  # one expert of each layer per rank
    assert expert_elements(layout, sharded=True) == one / 2 + one
