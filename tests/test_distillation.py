"""Knowledge distillation / Mixture-of-Students: the KD loss, the teacher, staged KD, resume, EP."""
import pytest
import torch
import torch.nn.functional as F

import pretrain_gpt_moe
from megatron.errors import UserError
from megatron.model.kd_loss import kd_loss
from tests.dist_utils import run_distributed
from tests.runs import mock_args, train

NO_NOISE = ["--hidden-dropout", "0", "--attention-dropout", "0", "--disable-moe-token-dropping"]
RUN = ["--micro-batch-size", "2", "--global-batch-size", "4"]
TEACHER = ["--num-experts", "4", "--mlp-type", "residual"]  # 4 layers (TINY), PR-MoE style
STUDENT = ["--num-layers", "2", "--num-experts", "2", "--mlp-type", "residual"]


def make_teacher(path, iters=3):
    pretrain_gpt_moe.main(mock_args(RUN + TEACHER + ["--train-iters", str(iters), "--save", path]))
    return path


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_kd_loss_is_zero_for_identical_logits_and_positive_otherwise(T):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 11, generator=g) * 3
    assert kd_loss(x, x.clone(), T).abs().max() < 1e-6
    y = torch.randn(2, 5, 11, generator=g)
    kl = kd_loss(x, y, T)
    assert (kl > 0).all()
    # matches torch's KL divergence with the T^2 scale
    ref = F.kl_div(F.log_softmax(x / T, -1), F.log_softmax(y / T, -1), log_target=True, reduction="none").sum(-1) * T * T
    torch.testing.assert_close(kl, ref, rtol=1e-5, atol=1e-6)


def test_kd_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, t, 2.0), (s,))


def test_student_that_is_the_teacher_has_zero_kd_loss(tmp_path):
    # A teacher whose experts matter (std 0.3 weights, standard MoE: the experts are the whole MLP) and whose
    # stored eval capacity would drop most tokens (factor 0.25): a teacher that kept dropping would differ.
    heavy = ["--num-experts", "4", "--init-method-std", "0.3", "--moe-eval-capacity-factor", "0.25",
             "--moe-min-capacity", "0"]
    ck = str(tmp_path / "teacher")
    pretrain_gpt_moe.main(mock_args(RUN + heavy + ["--train-iters", "2", "--save", ck]))
    # the student starts from the teacher's weights (--finetune) and has its architecture
    out = pretrain_gpt_moe.main(mock_args(RUN + heavy + NO_NOISE + [
        "--train-iters", "1", "--load", ck, "--finetune", "--kd", "--load-teacher", ck, "--kd-temp", "2"]))
    assert abs(out["kd_losses"][0]) < 1e-5  # float rounding between the train and eval kernels
    assert out["losses"][0] > 1.0  # the LM loss itself is not zero


def test_teacher_keeps_every_token_whatever_its_capacity(tmp_path):
    from megatron.checkpoint.teacher_config import teacher_model_config
    from megatron.config.schema import KDConfig, ModelConfig

    ck = str(tmp_path / "teacher")
    pretrain_gpt_moe.main(mock_args(RUN + ["--num-experts", "4", "--moe-eval-capacity-factor", "0.25",
                                           "--train-iters", "1", "--save", ck]))
    tcfg = teacher_model_config(KDConfig(load_teacher=ck), ModelConfig(vocab_size=128, seq_length=16))
    assert tcfg.moe.token_dropping is False and tcfg.moe.eval_capacity_factor == 0.25
    asked = teacher_model_config(KDConfig(load_teacher=ck, teacher_capacity_factor=2.0),
                                 ModelConfig(vocab_size=128, seq_length=16))
    assert asked.moe.token_dropping is True and asked.moe.eval_capacity_factor == 2.0


def test_staged_kd_switches_the_loss_and_frees_the_teacher(tmp_path):
    ck = make_teacher(str(tmp_path / "teacher"))
    out = pretrain_gpt_moe.main(mock_args(RUN + STUDENT + [
        "--train-iters", "4", "--mos", "--load-teacher", ck, "--num-layers-teacher", "4", "--kd-stop-iters", "2"]))
    kd = out["kd_losses"]
    assert kd[0] > 0 and kd[1] > 0 and kd[2] is None and kd[3] is None
    assert out["teacher_released"]


def test_resume_across_the_kd_stop_point_reproduces_the_uninterrupted_run(tmp_path):
    ck = make_teacher(str(tmp_path / "teacher"))
    argv = mock_args(RUN + STUDENT + ["--train-iters", "5", "--mos", "--load-teacher", ck, "--kd-stop-iters", "3",
                                      "--moe-train-capacity-factor", "0.5"])  # dropout and token dropping on
    full = pretrain_gpt_moe.main(argv)
    s1 = str(tmp_path / "s1")  # stop before the KD stop point, resume with the teacher
    pretrain_gpt_moe.main(argv + ["--save", s1, "--exit-interval", "2"])
    before = pretrain_gpt_moe.main(argv + ["--load", s1])
    assert before["losses"] == full["losses"][2:] and before["kd_losses"] == full["kd_losses"][2:]
    s2 = str(tmp_path / "s2")  # stop after it, resume without building the teacher
    pretrain_gpt_moe.main(argv + ["--save", s2, "--exit-interval", "4"])
    after = pretrain_gpt_moe.main(argv + ["--load", s2])
    assert after["losses"] == full["losses"][4:] and after["kd_losses"] == [None]


@pytest.mark.parametrize("layout", [["--moe-expert-parallel-size", "2"], ["--tensor-model-parallel-size", "2"]],
                         ids=["ep2", "tp2"])
def test_kd_with_expert_or_tensor_parallel_2_equals_1_process(tmp_path, layout):
    ck = make_teacher(str(tmp_path / "teacher"))
    base = mock_args(RUN + STUDENT + NO_NOISE + ["--num-experts", "4", "--train-iters", "3", "--mos",
                                                 "--load-teacher", ck])
    ref = pretrain_gpt_moe.main(base)
    ep2 = run_distributed(train, 2, str(tmp_path / "ep2"), base + layout)
    assert len(ep2[0]["kd_losses"]) == 3 and ep2[0]["kd_losses"][0] > 0
    for a, b in zip(ep2[0]["kd_losses"] + ep2[0]["losses"], ref["kd_losses"] + ref["losses"]):
        assert abs(a - b) <= 1e-5 * abs(b) + 1e-7  # the KD term is ~1e-3 here: allow its absolute rounding


def test_teacher_flag_mismatch_and_missing_teacher_are_clear_errors(tmp_path):
    ck = make_teacher(str(tmp_path / "teacher"), iters=1)
    student = mock_args(RUN + STUDENT + ["--train-iters", "1", "--mos", "--load-teacher", ck])
    with pytest.raises(UserError, match=r"--num-layers-teacher 6 does not match the teacher checkpoint .*\(4\)"):
        pretrain_gpt_moe.main(student + ["--num-layers-teacher", "6"])
    with pytest.raises(UserError, match=r"--num-experts-teacher 8 does not match"):
        pretrain_gpt_moe.main(student + ["--num-experts-teacher", "8"])
    pretrain_gpt_moe.main(student + ["--num-experts-teacher", "4", "4", "--hidden-size-teacher", "32"])  # agrees
    with pytest.raises(UserError, match="--load-teacher .*no checkpoint there"):
        (tmp_path / "empty").mkdir()
        pretrain_gpt_moe.main(student[:-1] + [str(tmp_path / "empty")])
    with pytest.raises(UserError, match="--mos needs --load-teacher"):
        pretrain_gpt_moe.main(mock_args(RUN + STUDENT + ["--train-iters", "1", "--mos"]))
    with pytest.raises(UserError, match="vocabulary"):
        pretrain_gpt_moe.main([a if a != "128" else "256" for a in student])
