"""Every paper launch script passes --dry-run on CPU with no data, and its counts match the paper."""
import glob
import os
import re
import subprocess
import sys

import pytest

from megatron.config.schema import ModelConfig, MoEConfig
from megatron.planning.dry_run import built_counts, memory_plan
from megatron.planning.model_stats import count_parameters
from tests.conftest import ROOT

# script -> (paper size in parameters, tolerance). The 350M PR-MoE's "4B" holds the residual MLP as
# one of the 32 experts' worth; DeepSpeed's Residual-MoE (which we build) has 32 experts AND the MLP:
# 4.12B, 2.9% above (counting it as the SPEC's (E-1) formula does gives 4.01B).
PAPER = {
    "gpt_350M_dense": (350e6, 0.02), "gpt_1.3B_dense": (1.3e9, 0.02), "gpt_6.7B_dense": (6.7e9, 0.02),
    "gpt_350M_moe128": (13e9, 0.02), "gpt_1.3B_moe128": (52e9, 0.02), "gpt_6.7B_moe128": (None, None),
    "gpt_350M_prmoe": (4.0e9, 0.03), "gpt_1.3B_prmoe": (31e9, 0.02),
    "gpt_350M_mos": (3.5e9, 0.02), "gpt_1.3B_mos": (27e9, 0.02),
}
SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "examples_moe", "gpt_*.sh")))


def test_every_paper_script_is_in_the_table():
    assert SCRIPTS == sorted(PAPER)


def dry_run(script, *extra, env=None):
    r = subprocess.run(["bash", os.path.join(ROOT, "examples_moe", script + ".sh"), "--dry-run", *extra],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable, **(env or {})})
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_dry_run_counts_match_the_paper(script):
    out = dry_run(script)
    total = int(re.search(r"^total parameters: (\d+)$", out, re.M).group(1))
    active = int(re.search(r"^active parameters: (\d+)$", out, re.M).group(1))
    size, tol = PAPER[script]
    if size is not None:
        assert abs(total - size) <= tol * size, (script, total, size)
    assert active <= total and "memory plan per GPU" in out and "total (this configuration)" in out
    if "moe128" in script:  # top-1: a token passes through one expert, ~ the dense model's size
        dense = int(re.search(r"^active parameters: (\d+)$", dry_run(script.replace("moe128", "dense")), re.M).group(1))
        assert abs(active - dense) < 0.01 * dense


def test_extra_flags_pass_through_and_bad_layouts_are_caught():
    out = dry_run("gpt_350M_moe128", "--num-layers", "4")
    assert "> dry run: 4 layers" in out
    total = re.compile(r"total \(this configuration\): ([\d.]+) GiB")
    plain, zero = dry_run("gpt_1.3B_moe128"), dry_run("gpt_1.3B_moe128", "--use-distributed-optimizer")
    assert "(sharded optimizer;" in zero and float(total.search(zero).group(1)) < float(total.search(plain).group(1))
    r = subprocess.run(["bash", os.path.join(ROOT, "examples_moe", "gpt_350M_prmoe.sh"), "--dry-run",
                        "--moe-expert-parallel-size", "48"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable})
    # (a layer with fewer experts than the EP size runs at EP = its experts: 64 is fine for 32, 48 is not)
    assert r.returncode == 2 and "--moe-expert-parallel-size 48 and a layer's expert count 32 do not divide" in r.stderr


def test_meta_model_matches_the_analytical_count_and_memory_plan_scales():
    cfg = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=256, seq_length=32,
                      moe=MoEConfig(num_experts=[8], mlp_type="residual"))
    c = count_parameters(cfg)
    assert built_counts(cfg) == (c.total, c.expert)

    class Cfg:  # the parts of Config that memory_plan reads
        model = cfg
        parallel = type("P", (), {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1})()
        train = type("T", (), {"micro_batch_size": 2})()
        precision = type("Pr", (), {"fp16": True, "bf16": False})()

    one = memory_plan(Cfg, 1)
    cfg.moe.expert_parallel_size = 4
    four = memory_plan(Cfg, 4)
    assert one["weights"] == 4 * c.total and one["optimizer"] == 2 * one["weights"]
    assert four["params"] == c.dense + c.expert // 4
    assert four["optimizer_sharded"] < four["optimizer"]


def test_tiny_cpu_recipes_run_end_to_end(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "ITERS": "10", "DEMO_DIR": str(tmp_path / "demo"),
           "OMP_NUM_THREADS": "2"}
    for name in ("dense", "moe", "prmoe", "mos"):
        out_dir = str(tmp_path / name)
        r = subprocess.run(["bash", os.path.join(ROOT, "examples_moe", f"tiny_cpu_{name}.sh"), "--eval-iters", "1"],
                           capture_output=True, text=True, cwd=str(tmp_path),
                           env={**env, "OUTPUT_DIR": out_dir, "TEACHER_CHECKPOINT": str(tmp_path / "prmoe" / "checkpoints")})
        assert r.returncode == 0, r.stderr[-2000:]
        assert "validation loss at iteration 10" in r.stdout
        assert os.path.isfile(os.path.join(out_dir, "checkpoints", "iter_0000010", "common.pt"))
        if name == "mos":
            assert "knowledge distillation stopped at iteration 7" in r.stdout


@pytest.mark.parametrize("extra", [[], ["--bf16"], ["--num-experts", "8"], ["--num-experts", "8", "--bf16"]],
                         ids=["fp32", "bf16", "moe-fp32", "moe-bf16"])
def test_activation_estimate_tracks_the_tensors_autograd_saves(extra):
    """The plan's activations (no checkpointing) against the bytes autograd keeps for backward, measured."""
    import torch

    from megatron.model.gpt_model import GPTModel
    from megatron.planning.dry_run import activation_bytes, resolve_vocab_size
    from megatron.training.arguments import parse_args

    cfg = parse_args(["--num-layers", "4", "--hidden-size", "256", "--num-attention-heads", "8", "--seq-length", "256",
                      "--micro-batch-size", "4", "--lr", "1e-4", "--train-iters", "1", "--mock-data", "--vocab-size",
                      "4096", "--hidden-dropout", "0", "--attention-dropout", "0"] + extra)
    cfg.model.vocab_size = resolve_vocab_size(cfg)
    model = GPTModel(cfg.model)
    model.init_weights(1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    tokens = torch.randint(0, 4096, (4, 256), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.precision.bf16):
            model(tokens, tokens)
    measured = sum(v for k, v in saved.items() if k not in params)
    logits_grad = 4 * 4 * 256 * cfg.model.vocab_size  # fp32 gradient of the logits: in the plan, not saved
    ratio = activation_bytes(cfg, checkpointing=False) / (measured + logits_grad)
    print(f"estimate / measured = {ratio:.2f}")
    assert 0.75 <= ratio <= 1.33, ratio


# Hugging Face family recipes (examples_moe/*.sh sourcing hf_common.sh): script -> published (total, active)
# in billions and the precision the source states them to (each script names its source). Rounded, except the
# Qwen3 card's active figure, which truncates (3.353B is "3.3B" there).
HF_FAMILIES = {
    "mixtral_8x7b": (46.7, 12.9, 0.1),  # Mistral AI, "Mixtral of experts" announcement
    "qwen3_30b_a3b": (30.5, 3.3, 0.1),  # Qwen/Qwen3-30B-A3B model card
    "olmoe_1b_7b": (6.9, 1.3, 0.1),  # OLMoE paper (arXiv 2409.02060)
    "qwen2_57b_a14b": (57, 14, 1),  # Qwen/Qwen2-57B-A14B model card, Qwen2 report (arXiv 2407.10671)
    "deepseek_v3_671b": (671, 37, 1),  # DeepSeek-V3 technical report (arXiv 2412.19437): 671B, 37B activated
}


def _published(count, billions, step):
    unit = int(round(step * 1e9))
    return int(round(billions * 1e9 / unit)) in (round(count / unit), count // unit)


def test_every_hf_family_script_is_in_the_table():
    found = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "examples_moe", "*.sh"))
                   if "hf_common.sh" in open(p).read() and not p.endswith("hf_common.sh"))
    assert found == sorted(HF_FAMILIES)


@pytest.mark.parametrize("script", sorted(HF_FAMILIES))
def test_hf_family_dry_run_counts_match_the_published_sizes(script):
    out = dry_run(script)
    total = int(re.search(r"^total parameters: (\d+)$", out, re.M).group(1))
    active = int(re.search(r"^active parameters: (\d+)$", out, re.M).group(1))
    want_total, want_active, step = HF_FAMILIES[script]
    assert _published(total, want_total, step) and _published(active, want_active, step), (script, total, active)
    text = open(os.path.join(ROOT, "examples_moe", script + ".sh")).read()
    assert f"{total:,}" in text or f"{total / 1e9:.2f}B" in text  # the script's comment is current


# Tiny CPU variants of the families (examples_moe/tiny_cpu_<name>.sh sourcing tiny_family_common.sh): name ->
# (layers that are MoE, routed experts, top-k, expert width, checkpoint tensors that must have a shape (None: must be
# absent), stored config entries (model and model.moe merged)). Hidden size 64 in all.
TINY_FAMILIES = {
    "mixtral": ([0, 1], 8, 2, 224, {"model.layers.0.attention.qkv.weight": (128, 64),  # GQA: 4 heads of 16, 2 groups
                                    "model.layers.0.attention.q_layernorm.weight": None},
                {"num_query_groups": 2, "rotary_base": 1e6, "router_pre_softmax": False}),
    "qwen3_moe": ([0, 1], 16, 8, 32, {"model.layers.0.attention.q_layernorm.weight": (32,)},  # per head
                  {"num_query_groups": 2, "qk_layernorm_full": False, "router_pre_softmax": False}),
    "olmoe": ([0, 1], 64, 8, 32, {"model.layers.0.attention.q_layernorm.weight": (64,),  # the whole projection
                                  "model.layers.0.attention.k_layernorm.weight": (64,)},
              {"qk_layernorm_full": True, "router_pre_softmax": True, "z_loss_coeff": 0.001}),
    "qwen2_moe": ([0, 1], 64, 8, 48, {"model.layers.0.attention.qkv.bias": (128,),
                                      "model.layers.1.mlp.shared_experts.fc2.weight": (64, 384),
                                      "model.layers.1.mlp.shared_experts.gate.weight": (1, 64)},
                  {"router_pre_softmax": True, "shared_expert_gate": True}),
    "deepseek_v3": ([1, 2], 32, 8, 32, {"model.layers.0.mlp.router.wg.weight": None,  # the dense first layer
                                        "model.layers.0.mlp.mlp.fc2.weight": (64, 160),
                                        "model.layers.1.attention.linear_kv_down_proj.weight": (24, 64),  # 16 + 8
                                        "model.layers.1.attention.qkv.weight": None,
                                        "model.layers.2.mlp.router.expert_bias": (32,),
                                        "model.layers.2.mlp.shared_experts.fc2.weight": (64, 32)},
                    {"multi_latent_attention": True, "router_score_function": "sigmoid", "router_num_groups": 8,
                     "router_group_topk": 4, "router_topk_scaling_factor": 2.5, "router_enable_expert_bias": True,
                     "router_load_balancing_type": "seq_aux_loss"}),
}


def test_every_tiny_family_script_is_in_the_table():
    found = sorted(os.path.basename(p)[len("tiny_cpu_"):-3]
                   for p in glob.glob(os.path.join(ROOT, "examples_moe", "tiny_cpu_*.sh"))
                   if "tiny_family_common.sh" in open(p).read())
    assert found == sorted(TINY_FAMILIES)


@pytest.mark.parametrize("name", sorted(TINY_FAMILIES))
def test_tiny_cpu_family_trains_on_mock_data(tmp_path, name):
    """4 iterations, checkpoints at 2 and 4: the family's blocks are built (parameter counts, MoE layers, tensors),
    the loss is finite and every weight moves. The mock tokens are uniform over the vocabulary, so the loss sits at
    ln(512) from the first step on: there is nothing to learn, and a falling loss cannot be asked for."""
    import math

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    moe_layers, experts, topk, width, tensors, stored = TINY_FAMILIES[name]
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "ITERS": "4", "OUTPUT_DIR": str(out), "OMP_NUM_THREADS": "2"}
    r = subprocess.run(["bash", os.path.join(ROOT, "examples_moe", f"tiny_cpu_{name}.sh"), "--log-interval", "1",
                        "--save-interval", "2"], capture_output=True, text=True, cwd=str(tmp_path), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    log = r.stdout
    steps = re.findall(r"^ iteration +(\d+)/ +4 \|.*\| lm loss: (\S+) \|.*\| grad norm: (\S+) \| "
                       r"number of skipped iterations: +(\d+)", log, re.M)
    assert [int(s[0]) for s in steps] == [1, 2, 3, 4], log[-2000:]
    for _, loss, grad_norm, skipped in steps:
        assert abs(float(loss) - math.log(512)) < 0.1 and 0 < float(grad_norm) < 10 and skipped == "0", steps
    # every MoE layer routes (the load line names them), the experts are SwiGLU of the family's count and width
    assert re.findall(r"\| L(\d+): cv", log.split(" moe load ")[-1].splitlines()[0]) == [str(i) for i in moe_layers]
    count = {k: int(v) for k, v in re.findall(r"^(total|active|expert) parameters: (\d+)$", log, re.M)}
    one_expert = 3 * 64 * width
    assert count["expert"] == len(moe_layers) * experts * one_expert, count
    assert count["active"] == count["total"] - count["expert"] + len(moe_layers) * topk * one_expert, count
    ckpt = out / "checkpoints"
    common = torch.load(str(ckpt / "iter_0000004" / "common.pt"), weights_only=False)
    assert common["iteration"] == 4 and common["consumed_samples"] == 32
    cfg = {**common["config"]["model"], **common["config"]["model"]["moe"]}
    assert {k: cfg[k] for k in stored} == stored
    weights = []
    for it in (2, 4):
        dcp_to_torch_save(str(ckpt / f"iter_{it:07d}" / "shards"), str(tmp_path / f"{it}.pt"))
        state = torch.load(str(tmp_path / f"{it}.pt"), weights_only=False)
        weights.append({k: v for k, v in state.items() if k.startswith("model.")})
    for key, shape in tensors.items():
        assert (tuple(weights[1][key].shape) if key in weights[1] else None) == shape, key
    # the optimizer moved every weight from iteration 2 to 4 (experts, router, shared expert, expert bias too)
    assert sorted(weights[0]) == sorted(weights[1])
    assert [k for k in weights[0] if torch.equal(weights[0][k], weights[1][k])] == []
