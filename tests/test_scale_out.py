"""Tensor parallelism and the ZeRO-1 sharded optimizer on real gloo process groups (CPU)."""
import os

import pytest
import torch

from megatron.checkpoint.dcp_reader import SafeReader
from megatron.parallel.tensor_parallel import VocabParallelCrossEntropy
from tests.dist_utils import run_distributed
from tests.runs import close, mock_args, train

# no dropout, no token dropping, no sampling, no clipping: layouts must agree to float rounding, in the
# losses and in the grad norms (a wrong gradient scale shows)
EXACT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--moe-train-capacity-factor", "8",
         "--moe-eval-capacity-factor", "8", "--disable-moe-top2-2nd-expert-sampling", "--use-cpu", "--clip-grad", "0"]
RUN = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4"]


# under TP the MoE layer splits its routed tokens over the TP ranks: with token dropping (capacity 1.0,
# top-1 with random token selection: both TP ranks draw the same numbers) and without
@pytest.mark.parametrize("moe", [[], ["--num-experts", "4", "--topk", "2"],
                                 ["--num-experts", "4", "--moe-train-capacity-factor", "1.0"],
                                 ["--num-experts", "4", "--topk", "2", "--disable-moe-token-dropping"],
                                 ["--num-experts", "4", "--topk", "2", "--disable-moe-tp-token-split"],
                                 # the expert gradients' TP sum through the other two gradient reducers
                                 ["--num-experts", "4", "--topk", "2", "--overlap-grad-reduce"],
                                 ["--num-experts", "4", "--topk", "2", "--zero-stage", "2"]],
                         ids=["dense", "moe", "moe-dropping", "moe-no-drop", "moe-replicated", "moe-overlap", "moe-zero2"])
def test_tp2_equals_tp1_losses_and_grad_norms(tmp_path, moe):
    argv = mock_args(EXACT + RUN + moe)
    single = train(0, argv)
    tp2 = run_distributed(train, 2, str(tmp_path), argv + ["--tensor-model-parallel-size", "2"])
    for r in tp2:
        close(r["losses"], single["losses"])
        close(r["grad_norms"], single["grad_norms"])
    close([tp2[0]["valid"]["lm loss"]], [single["valid"]["lm loss"]])


def test_vocab_parallel_cross_entropy_matches_torch(tmp_path):
    run_distributed(_vocab_parallel_ce_worker, 2, str(tmp_path))


def _vocab_parallel_ce_worker(rank):
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatron.parallel.state import build_groups

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ps = build_groups(rank, 2, 1, torch.device("cpu"), tp_size=2)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 5, 16, generator=g) * 4).requires_grad_()
    labels = torch.randint(0, 16, (2, 5), generator=g)
    ref = F.cross_entropy(logits.view(10, 16), labels.view(10), reduction="none").view(2, 5)
    ref.sum().backward()
    local = logits.detach()[..., rank * 8:(rank + 1) * 8].clone().requires_grad_()
    out = VocabParallelCrossEntropy(ps, rank * 8)(local, labels)
    out.sum().backward()
    torch.testing.assert_close(out, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local.grad, logits.grad[..., rank * 8:(rank + 1) * 8], rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()
    return True


def test_distributed_optimizer_equals_plain_adam(tmp_path):
    argv = mock_args(EXACT + RUN + ["--num-experts", "4", "--weight-decay", "0.1"])
    plain = run_distributed(train, 2, str(tmp_path / "plain"), argv + ["--moe-expert-parallel-size", "2"])
    zero = run_distributed(train, 2, str(tmp_path / "zero"), argv + ["--moe-expert-parallel-size", "2",
                                                                          "--use-distributed-optimizer"])
    close(zero[0]["losses"], plain[0]["losses"], rtol=1e-6)
    close(zero[0]["grad_norms"], plain[0]["grad_norms"], rtol=1e-6)
    one = train(0, argv + ["--zero-stage", "1"])  # the synonym, one process
    close(one["losses"], plain[0]["losses"])


@pytest.mark.slow
def test_tp2_x_ep2_x_dp2_with_zero_matches_one_process_and_resumes_at_tp1(tmp_path):
    ck = str(tmp_path / "ck")
    argv = mock_args(EXACT + ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "6",
                              "--num-experts", "4"])
    full = train(0, argv)["losses"]
    layout = ["--tensor-model-parallel-size", "2", "--moe-expert-parallel-size", "2", "--use-distributed-optimizer"]
    first = run_distributed(train, 4, str(tmp_path / "a"), argv + layout + ["--save", ck, "--exit-interval", "3"])
    close(first[0]["losses"], full[:3])
    resumed = train(0, argv + ["--load", ck])  # TP 1, EP 1, plain Adam, one process
    close(resumed["losses"], full[3:])
    index = SafeReader(os.path.join(ck, "iter_0000003", "shards")).read_metadata().state_dict_metadata
    assert tuple(index["model.word_embeddings.weight"].size) == (128, 32)  # stored at full (TP 1) shape
    assert tuple(index["model.layers.1.mlp.experts.w1"].size)[0] == 4  # every expert (EP 1)
    files = sorted(f for f in os.listdir(os.path.join(ck, "iter_0000003", "shards")) if f.endswith(".distcp"))
    assert files == [f"__{r}_0.distcp" for r in range(4)]  # every rank wrote its shard


def test_overlapped_grad_reduce_equals_the_blocking_one(tmp_path):
    # two micro-batches per step: only the last one's backward launches reductions
    argv = mock_args(EXACT + ["--micro-batch-size", "1", "--global-batch-size", "4", "--train-iters", "4",
                              "--num-experts", "4", "--moe-expert-parallel-size", "2"])
    blocking = run_distributed(train, 2, str(tmp_path / "a"), argv)
    overlap = run_distributed(train, 2, str(tmp_path / "b"), argv + ["--overlap-grad-reduce"])
    assert overlap[0]["losses"] == blocking[0]["losses"]
    assert overlap[0]["grad_norms"] == blocking[0]["grad_norms"]


def test_overlapped_grad_reduce_launches_buckets_during_backward(tmp_path):
    launched_in_backward, buckets = run_distributed(_overlap_worker, 2, str(tmp_path))[0]
    assert buckets >= 4 and launched_in_backward == buckets  # every bucket completed inside backward


def _overlap_worker(rank):
    import torch.distributed as dist

    from megatron.config.schema import ModelConfig, MoEConfig
    from megatron.model.gpt_model import GPTModel
    from megatron.parallel.overlapped_grad_reduce import OverlappedGradReducer
    from megatron.parallel.state import build_groups

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ps = build_groups(rank, 2, 1, torch.device("cpu"))
    model = GPTModel(ModelConfig(num_layers=4, vocab_size=128, moe=MoEConfig(num_experts=[4])))
    model.init_weights(1)  # the same weights on both ranks (the experts start uninitialised otherwise)
    reducer = OverlappedGradReducer(model, ps, bucket_bytes=20000)
    reducer.arm()
    g = torch.Generator().manual_seed(rank)
    loss, _ = model(torch.randint(0, 128, (2, 16), generator=g), torch.randint(0, 128, (2, 16), generator=g))
    loss.mean().backward()
    in_backward = len(reducer.launched)
    reducer.finish()
    for p in model.parameters():  # replicas agree after the reduction
        other = [torch.empty_like(p.grad) for _ in range(2)]
        dist.all_gather(other, p.grad.contiguous())
        assert torch.equal(other[0], other[1])
    dist.destroy_process_group()
    return in_backward, len(reducer.buckets)
