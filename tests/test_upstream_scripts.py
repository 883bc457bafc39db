"""Megatron-DeepSpeed's twelve examples_deepspeed/MoE/ds_pretrain_gpt_*.sh launch scripts, with only
the launcher line changed: their flag sets (reconstructed here from the scripts' options, with the
DeepSpeed JSON their sed step writes) pass --dry-run with the paper's sizes, and train on CPU with
tiny sizes and a real --data-path."""
import json
import re

import pytest

import pretrain_gpt_moe
from megatron.config.compat.upstream_flags import translate_argv
from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.errors import UserError
from tests.conftest import require_shared, shared_path

SEQ = 2048
# script -> (layers, hidden, heads, global batch, lr, min lr, experts per MoE layer, mlp type, GPUs, cl, mos,
#            (total parameters the DeepSpeed-MoE paper and the scripts' names state, tolerance))
SCRIPTS = {
    "125M_MoE64": (12, 768, 12, 256, 4.5e-4, 4.5e-6, "64", "standard", 64, False, None, (1.9e9, 0.02)),
    "125M_dense_cl": (12, 768, 12, 2048, 2.4e-3, 6.0e-5, "1", "standard", 128, True, None, (125e6, 0.03)),
    "350M_dense": (24, 1024, 16, 256, 3.0e-4, 3.0e-5, "1", "standard", 64, False, None, (350e6, 0.02)),
    "350M_MoE128": (24, 1024, 16, 256, 2.0e-4, 2.0e-6, "128", "standard", 64, False, None, (13e9, 0.02)),
    "350M_PR-MoE32or64": (24, 1024, 16, 256, 3.0e-4, 1.0e-6, " ".join(["32"] * 10 + ["64"] * 2), "residual", 32,
                          False, None, (4.0e9, 0.03)),
    "350M_PR-MoE32or64_MoS": (21, 1024, 16, 256, 3.0e-4, 1.0e-6, " ".join(["32"] * 8 + ["64"] * 2), "residual", 32,
                              False, (24, " ".join(["32"] * 10 + ["64"] * 2)), (3.5e9, 0.02)),
    "1.3B_dense": (24, 2048, 16, 512, 2.0e-4, 2.0e-5, "1", "standard", 64, False, None, (1.3e9, 0.02)),
    "1.3B_dense_cl": (24, 2048, 16, 4096, 8.0e-4, 2.0e-5, "1", "standard", 128, True, None, (1.3e9, 0.02)),
    "1.3B_MoE128": (24, 2048, 16, 512, 1.2e-4, 1.0e-6, "128", "standard", 128, False, None, (52e9, 0.02)),
    "1.3B_PR-MoE64or128": (24, 2048, 16, 512, 1.2e-4, 1.0e-6, " ".join(["64"] * 10 + ["128"] * 2), "residual", 64,
                           False, None, (31e9, 0.02)),
    "1.3B_PR-MoE64or128_MoS": (21, 2048, 16, 512, 1.2e-4, 1.0e-6, " ".join(["64"] * 8 + ["128"] * 2), "residual", 64,
                               False, (24, " ".join(["64"] * 10 + ["128"] * 2)), (27e9, 0.02)),
    "6.7B_dense": (32, 4096, 32, 1024, 1.2e-4, 1.2e-5, "1", "standard", 128, False, None, (6.7e9, 0.02)),
}


def ds_config(path, gbs, mbs, zero=1, fp16=True, bf16=False, cl=None, prescale=False):
    """The JSON the scripts' sed step writes from ds_config_gpt_TEMPLATE.json."""
    cfg = {"train_batch_size": gbs, "train_micro_batch_size_per_gpu": mbs, "steps_per_print": 10,
           "zero_optimization": {"stage": zero}, "gradient_clipping": 1.0, "prescale_gradients": prescale,
           "fp16": {"enabled": fp16, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1,
                    "initial_scale_power": 11},
           "bf16": {"enabled": bf16},
           "curriculum_learning": {"enabled": cl is not None, "curriculum_type": "seqlen",
                                   "min_difficulty": (cl or (72, 0, 0))[0], "max_difficulty": (cl or (0, SEQ, 0))[1],
                                   "schedule_type": "fixed_linear",
                                   "schedule_config": {"total_curriculum_step": (cl or (0, 0, 100))[2],
                                                       "difficulty_step": 8}},
           "wall_clock_breakdown": True}
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def script_argv(name, tmp_path, data="/data/pile/pile_text_document", vocab="/data/gpt2-vocab.json",
                merges="/data/gpt2-merges.txt", mbs=4):
    """megatron_options + data_options + deepspeed_options as the script assembles them."""
    layers, hidden, heads, gbs, lr, min_lr, experts, mlp, gpus, cl, mos, _ = SCRIPTS[name]
    moe = experts != "1"
    first = int(experts.split()[0])
    ep_parallel = min(first, gpus) if moe else 1
    train_tokens = 300_000_000_000
    out = tmp_path / "output"
    argv = ["--override-opt_param-scheduler", "--adam-beta1", "0.9", "--adam-beta2", "0.95",
            "--tensor-model-parallel-size", "1", "--moe-expert-parallel-size", str(ep_parallel),
            "--num-experts", *experts.split(), "--moe-loss-coeff", "0.01", "--moe-train-capacity-factor", "1.0",
            "--moe-eval-capacity-factor", "1.0", "--moe-min-capacity", "4", "--init-method-std", "0.014",
            "--lr-decay-tokens", "300000000000", "--lr-warmup-tokens", "375000000", "--micro-batch-size", str(mbs),
            "--exit-duration-in-mins", "30000000", "--global-batch-size", str(gbs), "--num-layers", str(layers),
            "--hidden-size", str(hidden), "--num-attention-heads", str(heads), "--seq-length", str(SEQ),
            "--max-position-embeddings", str(SEQ), "--train-tokens", str(train_tokens),
            "--train-iters", str(train_tokens * 3 // gbs // SEQ), "--lr", str(lr), "--min-lr", str(min_lr),
            "--lr-decay-style", "cosine", "--split", "98,2,0", "--log-interval", "10", "--eval-interval", "100",
            "--eval-iters", "10", "--save-interval", "10000", "--weight-decay", "0.1", "--clip-grad", "1.0",
            "--hysteresis", "2", "--num-workers", "0", "--fp16", "--load", str(out / "ck"), "--save", str(out / "ck"),
            "--tensorboard-queue-size", "1", "--log-timers-to-tensorboard", "--log-batch-size-to-tensorboard",
            "--log-validation-ppl-to-tensorboard", "--tensorboard-dir", str(out / "tb"), "--checkpoint-activations"]
    if mlp == "residual":
        argv += ["--mlp-type", "residual"]
    if moe:
        argv += ["--create-moe-param-group"]
    if cl:
        argv += ["--log-optimizer-states-to-tensorboard"]
    if mos:
        t_layers, t_experts = mos
        argv += ["--mos", "--kd-beta-ce", "1", "--num-layers-teacher", str(t_layers), "--num-experts-teacher",
                 *t_experts.split(), "--hidden-size-teacher", str(hidden), "--num-attention-heads-teacher", str(heads),
                 "--load-teacher", str(out / "teacher_not_trained_yet")]
    argv += ["--vocab-file", vocab, "--merge-file", merges, "--data-path", data, "--data-impl", "mmap"]
    zero = 0 if cl else 1
    cl_cfg = (72, SEQ, 60_000_000_000 // (gbs * (72 + SEQ) // 2)) if cl else None
    js = ds_config(tmp_path / f"ds_config_{name}.json", gbs, mbs, zero=zero, cl=cl_cfg, prescale=bool(cl))
    argv += ["--deepspeed", "--deepspeed_config", js]
    if cl:
        argv += ["--zero-stage", str(zero)]
    argv += ["--pipeline-model-parallel-size", "1", "--no-pipeline-parallel", "--deepspeed-activation-checkpointing"]
    return argv, gpus


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_upstream_script_dry_run_prints_the_papers_sizes(name, tmp_path, capsys):
    argv, gpus = script_argv(name, tmp_path)
    pretrain_gpt_moe.main(argv + ["--dry-run", "--dry-run-world-size", str(gpus)])
    out = capsys.readouterr().out
    total = int(re.search(r"total parameters: (\d+)", out).group(1))
    want, tol = SCRIPTS[name][-1]
    assert abs(total - want) <= tol * want, (name, total)
    assert "memory plan per GPU" in out


# the PR-MoE scripts as published: --moe-expert-parallel-size is the GPU count (EP_PARALLEL_SIZE=$NUM_GPUS), above
# the smaller layers' expert counts, which then run at EP = E (their other ranks extra expert-DP replicas).
# name -> (NUM_GPUS, the stage and prescale their JSON gets: the 350M script seds ZERO_STAGE 0 and prescaling in,
# the MoS script takes the ZeRO-2 template)
PR_MOE_AS_PUBLISHED = {"350M_PR-MoE32or64": (64, 0, True), "1.3B_PR-MoE64or128_MoS": (128, 2, False)}


@pytest.mark.parametrize("name", sorted(PR_MOE_AS_PUBLISHED))
def test_pr_moe_scripts_at_their_gpu_count_plan_each_layer_at_its_ep_degree(name, tmp_path, capsys):
    gpus, zero, prescale = PR_MOE_AS_PUBLISHED[name]
    layers, hidden, _, gbs, *_ = SCRIPTS[name]
    argv, _ = script_argv(name, tmp_path)
    argv[argv.index("--moe-expert-parallel-size") + 1] = str(gpus)
    ds_config(tmp_path / f"ds_config_{name}.json", gbs, 4, zero=zero, prescale=prescale)
    res = pretrain_gpt_moe.main(argv + ["--dry-run", "--dry-run-world-size", str(gpus)])
    out = capsys.readouterr().out
    experts = [int(e) for e in SCRIPTS[name][6].split()]
    small, large = min(experts), max(experts)
    assert large == gpus
    # every MoE layer holds one expert per GPU: the smaller layers at EP = E with expert-DP GPUs / E
    assert f"{small} experts at EP {small} (below --moe-expert-parallel-size {gpus}: EP = E), 1 per GPU, " \
           f"expert-DP {gpus // small}" in out
    assert f"{large} experts at EP {large}, 1 per GPU, expert-DP 1" in out
    one_expert = 2 * hidden * 4 * hidden + 4 * hidden + hidden
    per_gpu = int(re.search(r"parameters on one GPU: +(\d+)", out).group(1))
    assert per_gpu == res["total"] - res["expert"] + len(experts) * one_expert
    layout = res["memory"]["expert_layout"]
    assert [x["ep"] for x in layout] == experts and all(x["local"] == 1 for x in layout)
    want, tol = SCRIPTS[name][-1]
    assert abs(res["total"] - want) <= tol * want


def test_translation_of_a_script_command_line(tmp_path):
    argv, _ = script_argv("350M_MoE128", tmp_path)
    tr = translate_argv(argv)
    a = tr.argv
    for gone in ("--no-pipeline-parallel", "--data-impl", "--num-workers", "--override-opt_param-scheduler"):
        assert gone not in a
    assert a[a.index("--pipeline-model-parallel-size") + 1] == "1"  # pipelining is native now: the flag stays
    assert a[:2] == ["--tokenizer-type", "GPT2BPETokenizer"]
    assert a[a.index("--zero-stage") + 1] == "1" and a[a.index("--initial-loss-scale") + 1] == "2048"
    assert tr.notes == []  # the JSON agrees with the flags and every field is acted on
    cfg = pretrain_gpt_moe_config(argv)
    lg = cfg.logging
    assert (lg.tensorboard_queue_size, lg.log_timers_to_tensorboard, lg.log_batch_size_to_tensorboard,
            lg.log_validation_ppl_to_tensorboard) == (1, True, True, True)
    assert cfg.model.checkpoint_activations and cfg.optimizer.use_distributed_optimizer
    assert cfg.deepspeed.deepspeed and cfg.deepspeed.read().curriculum is None
    assert (cfg.precision.fp16, cfg.precision.initial_loss_scale, cfg.precision.loss_scale_window) == (True, 2048, 500)


def pretrain_gpt_moe_config(argv):
    from megatron.training.arguments import parse_args

    return parse_args(argv + ["--dry-run"])


@pytest.mark.parametrize("argv, message", [
    (["--data-impl", "lazy"], "only the mmap format"),
    (["--deepspeed_config"], "--deepspeed_config needs a file"),
    (["--use-checkpoint-opt_param-scheduler"], "the learning-rate schedule always comes from the flags"),
])
def test_upstream_flags_that_cannot_apply_are_one_line(argv, message):
    with pytest.raises(UserError, match=re.escape(message)) as e:
        translate_argv(argv)
    assert "\n" not in str(e.value)


def test_megatron_lm_moe_names_are_aliases():
    from tests.runs import mock_args

    cfg = pretrain_gpt_moe_config(mock_args([
        "--num-experts", "4", "--train-iters", "1", "--moe-router-topk", "2", "--expert-model-parallel-size", "2",
        "--moe-aux-loss-coeff", "0.01", "--moe-expert-capacity-factor", "1.25", "--moe-token-dispatcher-type",
        "alltoall", "--moe-grouped-gemm", "--moe-z-loss-coeff", "0.001", "--moe-token-drop-policy", "position"]))
    moe = cfg.model.moe
    assert (moe.topk, moe.expert_parallel_size, moe.loss_coeff, moe.train_capacity_factor, moe.eval_capacity_factor,
            moe.z_loss_coeff, moe.token_drop_policy) == (2, 2, 0.01, 1.25, 1.25, 0.001, "position")


def test_json_accumulation_steps_checked_against_the_world(tmp_path):
    from megatron.training.arguments import parse_args
    from tests.runs import mock_args

    js = ds_config(tmp_path / "ds.json", 8, 2)
    cfg_json = json.loads(open(js).read())
    cfg_json["gradient_accumulation_steps"] = 2
    (tmp_path / "ds.json").write_text(json.dumps(cfg_json))
    cfg = parse_args(mock_args(["--train-iters", "1", "--deepspeed", "--deepspeed_config", js]))
    assert (cfg.train.global_batch_size, cfg.train.micro_batch_size) == (8, 2)
    cfg.validate_world(2)  # 2 x 2 x 2 = 8
    with pytest.raises(UserError, match=r"gradient_accumulation_steps 2 x micro batch 2 x data-parallel size 4 = 16"):
        cfg.validate_world(4)


def test_json_contradicting_a_typed_flag_is_one_line(tmp_path):
    argv, _ = script_argv("350M_dense", tmp_path)
    argv[argv.index("--global-batch-size") + 1] = "512"
    with pytest.raises(UserError, match=r"train_batch_size = 256 contradicts --global-batch-size 512"):
        pretrain_gpt_moe.main(argv + ["--dry-run"])


TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
        "--max-position-embeddings", "32", "--train-iters", "3", "--moe-expert-parallel-size", "1",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1", "--hidden-dropout", "0"]


def tiny_corpus(tmp_path, vocab=50257):
    prefix = str(tmp_path / "corpus_text_document")
    b = IndexedDatasetBuilder(prefix)
    for i in range(40):
        b.add_document([(i * 7919 + j * 104729) % vocab for j in range(50)])
    b.finalize()
    return prefix


def tiny_script_argv(name, tmp_path, experts, cl=None):
    """The script's flags with tiny sizes appended and the JSON its sed step writes for them (fp32 on CPU)."""
    vocab, merges = require_shared("gpt2", "gpt2-vocab.json"), shared_path("gpt2", "gpt2-merges.txt")
    tmp_path.mkdir(parents=True, exist_ok=True)
    argv, _ = script_argv(name, tmp_path, data=tiny_corpus(tmp_path), vocab=vocab, merges=merges, mbs=2)
    ds_config(tmp_path / f"ds_config_{name}.json", 4, 2, zero=0 if cl else 1, fp16=False, cl=cl)
    argv = [a for a in argv if a != "--fp16"]
    argv[argv.index("--global-batch-size") + 1] = "4"
    (tmp_path / "output" / "ck").mkdir(parents=True, exist_ok=True)
    return argv + TINY + ["--num-experts", experts, "--use-cpu"]


@pytest.mark.parametrize("name, experts", [("350M_dense", "1"), ("350M_MoE128", "4"), ("350M_PR-MoE32or64", "4"),
                                           ("125M_dense_cl", "1")])
def test_upstream_script_trains_tiny_on_cpu(name, experts, tmp_path):
    res = pretrain_gpt_moe.main(tiny_script_argv(name, tmp_path, experts, cl=(8, 32, 10) if "_cl" in name else None))
    assert len(res["losses"]) == 3 and all(l == l for l in res["losses"])
    assert res["losses"][-1] < res["losses"][0] + 0.5


def test_upstream_mos_script_trains_tiny_from_a_tiny_teacher(tmp_path):
    teacher = tiny_script_argv("350M_PR-MoE32or64", tmp_path / "t", "4")
    teacher[teacher.index("--save") + 1] = str(tmp_path / "teacher")
    pretrain_gpt_moe.main(teacher)
    student = tiny_script_argv("350M_PR-MoE32or64_MoS", tmp_path / "s", "4")
    res = pretrain_gpt_moe.main(student + ["--load-teacher", str(tmp_path / "teacher"), "--num-layers-teacher", "2",
                                           "--num-experts-teacher", "4", "--hidden-size-teacher", "64",
                                           "--num-attention-heads-teacher", "4"])
    assert len(res["losses"]) == 3 and len(res["kd_losses"]) == 3 and all(k > 0 for k in res["kd_losses"])


def test_migrating_guide_names_every_flag_the_scripts_use(tmp_path):
    import os

    from tests.conftest import ROOT

    guide = open(os.path.join(ROOT, "docs", "MIGRATING.md")).read()
    flags = {a for name in SCRIPTS for a in script_argv(name, tmp_path)[0] if a.startswith("--")}
    missing = sorted(f for f in flags if f"`{f}" not in guide)
    assert not missing, missing
    for field in ("train_batch_size", "train_micro_batch_size_per_gpu", "steps_per_print", "gradient_clipping",
                  "prescale_gradients", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale",
                  "zero_optimization.stage", "wall_clock_breakdown", "curriculum_learning", "total_curriculum_step",
                  "difficulty_step", "gradient_accumulation_steps"):
        assert field in guide, field
