"""Pipeline parallelism (torch.distributed.pipelining) on real gloo processes: every layout computes the
one-process run's losses and gradient norms (to fp32 rounding), checkpoints move between pipeline
layouts, and layouts that cannot work are one-line errors."""
import json
import os

import pytest
import torch

from megatron.config.pipeline_layout import build_layout
from megatron.errors import UserError
from megatron.model.moe.aux_loss import attach_aux_loss
from tests.dist_utils import run_distributed
from tests.runs import close, mock_args, train

# no dropout, no sampling, no clipping: layouts must agree to float rounding, in the losses and in the grad
# norms (a wrong gradient scale, a lost aux loss or a tied gradient left unsummed shows)
EXACT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--moe-eval-capacity-factor", "8",
         "--disable-moe-top2-2nd-expert-sampling", "--disable-moe-rts", "--use-cpu", "--clip-grad", "0"]
RUN = ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "5", "--eval-interval", "5"]
PP2 = ["--pipeline-model-parallel-size", "2"]

MODELS = {
    "dense-curriculum": ["DS_CURRICULUM"],  # the sequence-length curriculum: new shapes, new schedules
    "capacity-drops": ["--num-experts", "4", "--moe-train-capacity-factor", "1.0", "--moe-min-capacity", "0"],
    "top2-no-drop": ["--num-experts", "4", "--topk", "2", "--disable-moe-token-dropping", "--moe-z-loss-coeff", "1e-3"],
    "pr-moe-residual": ["--num-experts", "2", "4", "--mlp-type", "residual", "--moe-train-capacity-factor", "8"],
}


_SINGLE: dict = {}


def _single(argv):
    """The one-process run of ``argv`` (computed once per module: several layouts compare with it)."""
    key = tuple(argv)
    if key not in _SINGLE:
        _SINGLE[key] = train(0, argv)
    return _SINGLE[key]


def _agree(runs, single):
    for r in runs:
        close(r["losses"], single["losses"])
        close(r["grad_norms"], single["grad_norms"])
        close([r["valid"]["lm loss"]], [single["valid"]["lm loss"]])
        if "moe loss" in single["valid"]:
            close([r["valid"]["moe loss"]], [single["valid"]["moe loss"]])


@pytest.mark.parametrize("model", list(MODELS), ids=list(MODELS))
def test_pp2_equals_one_process(tmp_path, model):
    flags = MODELS[model]
    if "DS_CURRICULUM" in flags:
        ds = tmp_path / "ds.json"
        ds.write_text(json.dumps({"curriculum_learning": {
            "enabled": True, "curriculum_type": "seqlen", "min_difficulty": 4, "max_difficulty": 16,
            "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 4}}}))
        flags = ["--deepspeed", "--deepspeed_config", str(ds)]
    argv = mock_args(EXACT + RUN + flags)
    single = _single(argv)
    _agree(run_distributed(train, 2, str(tmp_path), argv + PP2), single)


@pytest.mark.parametrize("layout", [["--num-layers-per-virtual-pipeline-stage", "1"],
                                    ["--decoder-first-pipeline-num-layers", "1"],
                                    ["--pipeline-schedule", "GPipe"]],
                         ids=["interleaved", "uneven-first-stage", "gpipe"])
def test_schedules_and_uneven_stages_equal_one_process(tmp_path, layout):
    argv = mock_args(EXACT + RUN + MODELS["top2-no-drop"])
    single = _single(argv)
    _agree(run_distributed(train, 2, str(tmp_path), argv + PP2 + layout), single)


@pytest.mark.parametrize("layout", [["--moe-expert-parallel-size", "2", "--use-distributed-optimizer",
                                     "--overlap-grad-reduce"],
                                    ["--tensor-model-parallel-size", "2"]], ids=["pp2-ep2-dp2-zero1-overlap", "pp2-tp2"])
def test_pp2_with_ep_or_tp_on_four_processes_equals_one_process(tmp_path, layout):
    argv = mock_args(EXACT + RUN + MODELS["top2-no-drop"])
    single = _single(argv)
    _agree(run_distributed(train, 4, str(tmp_path), argv + PP2 + layout), single)


def test_checkpoints_move_between_pipeline_layouts(tmp_path):
    """PP=2 -> PP=1 and PP=1 -> PP=2 continue the uninterrupted run; PP=2 -> PP=2 is bit-exact."""
    argv = mock_args(EXACT + ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6"]
                     + MODELS["top2-no-drop"])
    full = train(0, argv)["losses"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    first = run_distributed(train, 2, str(tmp_path / "r1"), argv + PP2 + ["--save", a, "--exit-interval", "3"])
    close(first[0]["losses"], full[:3])
    close(train(0, argv + ["--load", a])["losses"], full[3:])  # PP 2 -> 1
    same = run_distributed(train, 2, str(tmp_path / "r2"), argv + PP2 + ["--load", a])
    uninterrupted = run_distributed(train, 2, str(tmp_path / "r3"), argv + PP2)
    assert same[0]["losses"] == uninterrupted[0]["losses"][3:]  # same layout: bit-exact
    train(0, argv + ["--save", b, "--exit-interval", "3"])
    close(run_distributed(train, 2, str(tmp_path / "r4"), argv + PP2 + ["--load", b])[0]["losses"], full[3:])  # 1 -> 2
    shards = sorted(f for f in os.listdir(os.path.join(a, "iter_0000003", "shards")) if f.endswith(".distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"]  # each stage wrote its own layers
    # evaluation / generation / serving load a PP-trained checkpoint in one process: the same weights as a PP 1 save
    from megatron.inference.load import load_model

    tokens = torch.arange(16)[None]
    pp_logits = load_model(a, "cpu").model.logits(tokens).logits
    assert torch.allclose(pp_logits, load_model(b, "cpu").model.logits(tokens).logits, atol=1e-5)  # b: PP 1, iter 3


def test_distillation_under_pipeline_parallelism(tmp_path):
    """A MoS student (2 layers) distilled from a 4-layer teacher, staged (KD stops after 2 of 3 steps): PP=2
    computes the one-process KD losses; only the last stage holds the teacher."""
    teacher = str(tmp_path / "teacher")
    base = EXACT + ["--micro-batch-size", "2", "--global-batch-size", "4"]
    train(0, mock_args(base + ["--train-iters", "2", "--save", teacher]))
    argv = mock_args(base + ["--train-iters", "3", "--num-layers", "2", "--mos", "--load-teacher", teacher,
                             "--num-layers-teacher", "4", "--kd-alpha-ce", "0.5", "--kd-beta-ce", "1.0",
                             "--kd-stop-iters", "2"])
    single = train(0, argv)
    assert single["kd_losses"][2] is None and single["teacher_held"]
    runs = run_distributed(train, 2, str(tmp_path / "pp"), argv + PP2)
    assert [r["teacher_held"] for r in sorted(runs, key=lambda r: r["rank"])] == [False, True]
    for r in runs:
        close(r["losses"], single["losses"])
        assert r["kd_losses"][2] is None
        close(r["kd_losses"][:2], single["kd_losses"][:2], rtol=1e-4)  # small values: fp32 rounding is larger
        close(r["grad_norms"], single["grad_norms"])


def test_aux_loss_rides_on_the_activations_with_the_main_loss_scale():
    """attach_aux_loss: the forward is the identity, the backward gives the aux loss ``grad_scale`` (as if
    ``grad_scale * aux`` had been added to the loss)."""
    w = torch.tensor(3.0, requires_grad=True)
    h = torch.ones(2, 2, requires_grad=True)
    aux = w * w  # d aux / dw = 2w = 6
    out = attach_aux_loss(h, aux, 0.25)
    assert torch.equal(out, h)
    out.sum().backward()
    assert float(w.grad) == pytest.approx(0.25 * 6)
    assert torch.equal(h.grad, torch.ones(2, 2))


@pytest.mark.parametrize("args, message", [
    ((7, 2), "7 layers do not split evenly over 2 stages"),
    ((8, 2, 3), "must be a multiple of 3 x --pipeline-model-parallel-size 2"),
    ((4, 2, None, 3, 2), "exceed --num-layers 4"),
    ((4, 1, 2), "need --pipeline-model-parallel-size > 1"),
    ((8, 2, 2, 1), "does not combine with --decoder-first/last-pipeline-num-layers"),
])
def test_layouts_that_cannot_work_are_one_line_errors(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_layout(*args)


def test_layouts():
    assert build_layout(8, 2).chunks == ((0, 4), (4, 8))
    interleaved = build_layout(8, 2, 2)
    assert interleaved.chunks == ((0, 2), (2, 4), (4, 6), (6, 8)) and interleaved.stages_of(1) == [1, 3]
    assert build_layout(10, 3, first=2, last=2).chunks == ((0, 2), (2, 8), (8, 10))


@pytest.mark.parametrize("flags, message", [
    (["--zero-stage", "2"], "--zero-stage 2 does not combine with --pipeline-model-parallel-size"),
    (["--ckpt-format", "torch"], "--ckpt-format torch does not combine"),
    (["--pipeline-schedule", "Interleaved1F1B"], "needs virtual stages"),
])
def test_unsupported_combinations_are_refused_before_training(flags, message):
    from megatron.training.arguments import parse_args

    with pytest.raises(UserError, match=message):
        parse_args(mock_args(PP2 + flags))


def test_dry_run_plans_each_stage(capsys):
    """--dry-run with PP: every stage's parameters (the last one's tied copy of the embeddings included) and the
    micro-batches its schedule keeps in flight (1F1B: P - p)."""
    from megatron.planning.dry_run import dry_run, pipeline_in_flight
    from megatron.training.arguments import parse_args

    cfg = parse_args(mock_args(["--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "16",
                                "--train-iters", "1", "--num-layers", "6"] + ["--pipeline-model-parallel-size", "3"]))
    out = dry_run(cfg, 3)
    stages = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  stage ")]
    assert len(stages) == 3 and "embeddings" in stages[0] and "head + loss" in stages[2]
    params = [int(line.split(", ")[1].split()[0]) for line in stages]
    tied_copy = 128 * 32  # vocab x hidden, on the last stage
    assert sum(params) - tied_copy == out["total"]  # every parameter on exactly one stage, plus the copy
    assert [pipeline_in_flight("1F1B", 3, p, 8) for p in range(3)] == [3, 2, 1]
    assert pipeline_in_flight("GPipe", 3, 0, 8) == 8
    assert pipeline_in_flight("Interleaved1F1B", 2, 0, 8, virtual=2) == (2 + 2 + 1) / 2
