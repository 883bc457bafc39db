"""Real multi-process torch.distributed (gloo) equivalences: DP, EP, DP x EP, resharded resume."""
import os

import pytest

from megatron.checkpoint.dcp_reader import SafeReader
from tests.dist_utils import run_distributed
from tests.runs import close, mock_args, train

# no token dropping (capacity large), no dropout: runs must agree to float rounding; no gradient clipping,
# so that a wrong gradient scale shows in the grad norms and the losses
EXACT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--moe-train-capacity-factor", "8",
         "--moe-eval-capacity-factor", "8", "--clip-grad", "0"]


def test_dp2_equals_dp1(tmp_path):
    argv = mock_args(EXACT + ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4"])
    one = train(0, argv)
    single = one["losses"]
    multi = run_distributed(train, 2, str(tmp_path), argv)
    close(multi[0]["losses"], single)
    close(multi[0]["grad_norms"], one["grad_norms"])
    assert multi[0]["losses"] == multi[1]["losses"]
    assert single[-1] < single[0]


@pytest.mark.parametrize("topk", [1, 2])
def test_ep2_equals_ep1(tmp_path, topk):
    # top-2's Gumbel-sampled 2nd expert draws from each rank's RNG stream: turn it off for exactness
    moe = ["--num-experts", "4", "--topk", str(topk), "--disable-moe-top2-2nd-expert-sampling"]
    base = EXACT + moe + ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4"]
    one = train(0, mock_args(base))
    ep2 = run_distributed(train, 2, str(tmp_path), mock_args(base + ["--moe-expert-parallel-size", "2"]))
    close(ep2[0]["losses"], one["losses"])
    close(ep2[0]["grad_norms"], one["grad_norms"])


@pytest.mark.parametrize("topk", [1, 2])
def test_no_drop_mode_under_ep_equals_ep1(tmp_path, topk):
    """No drop under EP: variable-size all-to-all of each expert's rows into the grouped kernel."""
    base = EXACT + ["--num-experts", "4", "--topk", str(topk), "--disable-moe-top2-2nd-expert-sampling",
                    "--disable-moe-token-dropping", "--micro-batch-size", "2", "--global-batch-size", "4",
                    "--train-iters", "3"]
    one = train(0, mock_args(base))
    ep2 = run_distributed(train, 2, str(tmp_path), mock_args(base + ["--moe-expert-parallel-size", "2"]))
    close(ep2[0]["losses"], one["losses"])
    close(ep2[0]["grad_norms"], one["grad_norms"])


@pytest.mark.slow
def test_dp2_x_ep2_on_4_processes_equals_1_process(tmp_path):
    base = EXACT + ["--num-experts", "4", "--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "3"]
    single = train(0, mock_args(base))["losses"]
    multi = run_distributed(train, 4, str(tmp_path), mock_args(base + ["--moe-expert-parallel-size", "2"]))
    close(multi[0]["losses"], single)


def test_reshard_resume_ep2_to_ep1(tmp_path):
    ck = str(tmp_path / "ck")
    base = EXACT + ["--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6"]
    full = train(0, mock_args(base))["losses"]
    first = run_distributed(train, 2, str(tmp_path / "r"), mock_args(base + [
        "--moe-expert-parallel-size", "2", "--save", ck, "--save-interval", "3", "--exit-interval", "3"]))
    close(first[0]["losses"], full[:3])
    index = SafeReader(os.path.join(ck, "iter_0000003", "shards")).read_metadata().state_dict_metadata
    assert [tuple(index[f"model.layers.{layer}.mlp.experts.w1"].size)[0] for layer in (1, 3)] == [4, 4]  # by global id
    assert sorted(f for f in os.listdir(os.path.join(ck, "iter_0000003", "shards")) if f.endswith(".distcp")) == \
        ["__0_0.distcp", "__1_0.distcp"]  # each EP rank wrote its own experts
    resumed = train(0, mock_args(base + ["--load", ck, "--no-load-rng"]))["losses"]
    close(resumed, full[3:])


def test_exact_resume_with_two_dp_processes(tmp_path):
    """Dropout and random token selection on: RNG, data position and optimizer state must all resume."""
    ck = str(tmp_path / "ck")
    base = ["--num-experts", "4", "--moe-train-capacity-factor", "0.5", "--hidden-dropout", "0.1",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "6"]
    full = run_distributed(train, 2, str(tmp_path / "a"), mock_args(base))
    run_distributed(train, 2, str(tmp_path / "b"), mock_args(base + ["--save", ck, "--exit-interval", "3"]))
    resumed = run_distributed(train, 2, str(tmp_path / "c"), mock_args(base + ["--load", ck]))
    assert resumed[0]["losses"] == full[0]["losses"][3:]


def test_ep2_equals_ep1_at_the_same_dp_with_dropping_sampling_and_dropout(tmp_path):
    """Capacity is per rank and the random draws (dropout, random token selection, Gumbel top-2) come
    from each rank's stream, so at equal DP the EP layout changes nothing, even with all noise on."""
    base = ["--num-experts", "4", "--topk", "2", "--moe-train-capacity-factor", "0.5", "--hidden-dropout", "0.1",
            "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4"]
    ep1 = run_distributed(train, 2, str(tmp_path / "ep1"), mock_args(base))
    ep2 = run_distributed(train, 2, str(tmp_path / "ep2"), mock_args(base + ["--moe-expert-parallel-size", "2"]))
    close(ep2[0]["losses"], ep1[0]["losses"])
