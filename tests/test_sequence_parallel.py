"""--sequence-parallel on real gloo processes: with the residual stream split along the sequence over 2 TP
ranks (norms, dropout, MoE layers on 1/TP of the tokens) a run computes the one-process run's losses and
gradient norms (dense GPT, a Llama-style block with GQA, qk-norm and a gated shared expert, PR-MoE residual,
and EP 2 x TP 2 x DP 2 with ZeRO-1 and overlapped gradient reduction), the balancing losses are each shard's
weighted 1/TP, and what it does not combine with is one line."""
import pytest

from megatron.errors import UserError
from tests.dist_utils import run_distributed
from tests.runs import close, mock_args, train

EXACT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--use-cpu", "--clip-grad", "0", "--micro-batch-size",
         "2", "--global-batch-size", "4", "--train-iters", "3", "--seq-length", "16"]
SP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
# no balancing loss: it is computed per sequence shard under sequence parallelism (as per data-parallel rank)
NO_AUX = ["--disable-moe-token-dropping", "--moe-loss-coeff", "0"]
LLAMA = ["--position-embedding-type", "rope", "--no-position-embedding", "--normalization", "RMSNorm", "--swiglu",
         "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", "2",
         "--qk-layernorm", "--disable-bias-linear"]
MODELS = {
    "dense-gpt": [],
    "llama-shared-expert": LLAMA + NO_AUX + ["--num-experts", "4", "--moe-shared-expert-intermediate-size", "32",
                                             "--moe-shared-expert-gate"],
    "pr-moe-residual": NO_AUX + ["--num-experts", "2", "4", "--mlp-type", "residual"],
}


def _agree(runs, single):
    for r in runs:
        close(r["losses"], single["losses"])
        close(r["grad_norms"], single["grad_norms"])


@pytest.mark.parametrize("model", [pytest.param(m, marks=[pytest.mark.slow] if m != "llama-shared-expert" else [])
                                   for m in MODELS], ids=list(MODELS))
def test_sp_tp2_equals_one_process(tmp_path, model):
    argv = mock_args(EXACT + MODELS[model])
    runs = run_distributed(train, 2, str(tmp_path), argv + SP2)
    single = train(0, argv)
    _agree(runs, single)
    # a TP rank holds half the matrices but every norm, bias and router whole
    assert runs[0]["local_parameters"] < single["local_parameters"]


def test_sp_with_ep2_dp2_zero1_and_overlapped_reduction_equals_one_process(tmp_path):
    argv = mock_args(EXACT + ["--num-experts", "4", "--moe-loss-coeff", "0", "--moe-train-capacity-factor", "8"])
    runs = run_distributed(train, 4, str(tmp_path), argv + SP2 + ["--moe-expert-parallel-size", "2",
                                                                   "--use-distributed-optimizer",
                                                                   "--overlap-grad-reduce"])
    _agree(runs, train(0, argv))


def test_balancing_loss_is_the_mean_over_the_shards(tmp_path):
    """With the aux loss on, the first step's LM loss is the one-process one (the aux loss does not enter the
    forward) and the logged moe loss, the shards' 1/TP-weighted losses summed over TP, is close to the
    whole-sequence one (the same estimator on half the tokens each) without being it."""
    argv = mock_args(EXACT + ["--num-experts", "4", "--disable-moe-token-dropping", "--moe-loss-coeff", "0.1",
                              "--eval-interval", "1", "--train-iters", "1"])
    single = train(0, argv)
    runs = run_distributed(train, 2, str(tmp_path), argv + SP2)
    for r in runs:
        close(r["losses"][:1], single["losses"][:1])
        moe, want = r["valid"]["moe loss"], single["valid"]["moe loss"]
        assert moe == pytest.approx(want, rel=0.05) and moe != pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("flags, message", [
    (["--seq-length", "15"], "--seq-length 15 is not divisible by --tensor-model-parallel-size 2"),
    (["--pipeline-model-parallel-size", "2"], "does not combine with --pipeline-model-parallel-size > 1"),
    (["--multi-latent-attention", "--position-embedding-type", "rope"], "does not combine with --multi-latent"),
    (["--zero-stage", "2"], "does not combine with --zero-stage 2"),
])
def test_what_sequence_parallelism_does_not_combine_with_is_one_line(flags, message):
    from megatron.training.arguments import parse_args

    with pytest.raises(UserError, match=message) as e:
        parse_args(mock_args(EXACT + SP2 + flags))
    assert "\n" not in str(e.value)


def test_at_tp1_sequence_parallel_is_a_no_op():
    argv = mock_args(EXACT)
    close(train(0, argv + ["--sequence-parallel"])["losses"], train(0, argv)["losses"])
