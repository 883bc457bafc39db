"""CUDA-only checks: bf16 training, the grouped GEMM expert path, fused AdamW, nccl collectives and the
ZeRO reduce-scatter. Each skips with its reason where CUDA (or a second GPU) is absent; the last test
runs tools/bench/gpu.py's code on CPU so that the benchmark cannot rot between GPU loans."""
import copy
import os

import pytest
import torch

import pretrain_gpt_moe
from megatron.config.schema import ModelConfig, MoEConfig
from megatron.model.gpt_model import GPTModel
from megatron.model.moe.experts import StackedExperts
from tests.dist_utils import run_distributed
from tests.runs import close, mock_args

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")
needs_2_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2,
                                  reason="needs 2 CUDA GPUs (nccl puts one rank on each)")


@needs_cuda
def test_bf16_training_on_gpu_learns():
    out = pretrain_gpt_moe.main(mock_args(["--micro-batch-size", "4", "--global-batch-size", "4", "--num-experts", "4",
                                           "--train-iters", "20", "--bf16"]))
    assert out["skipped"] == 0 and all(l == l for l in out["losses"])
    assert out["losses"][-1] < out["losses"][0] - 0.1


@needs_cuda
def test_gpu_loss_and_grads_match_cpu_in_fp32():
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256,
                      hidden_dropout=0, attention_dropout=0, moe=MoEConfig(num_experts=[4], train_capacity_factor=4.0))
    cpu = GPTModel(cfg)
    cpu.init_weights(0)
    gpu = copy.deepcopy(cpu).cuda()
    tok = torch.randint(0, 256, (2, 33))
    losses = []
    for m, t in ((cpu, tok), (gpu, tok.cuda())):
        loss, _ = m(t[:, :-1], t[:, 1:])
        loss.mean().backward()
        losses.append(loss.detach().cpu())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for a, b in zip(cpu.parameters(), gpu.parameters()):
        torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-3, atol=1e-5)


@needs_cuda
@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_padded_batched_experts(dtype):
    if dtype == torch.float32 and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm on CUDA needs bf16 below compute capability 9.0")
    torch.manual_seed(0)
    experts = StackedExperts(4, 64, 128).cuda()
    experts.init_weights(0, 1, 0.02, 0.02)
    counts = torch.tensor([5, 0, 17, 10], device="cuda")
    x = torch.randn(int(counts.sum()), 64, device="cuda")
    outs = []
    for kernel in ("grouped_mm", "padded"):
        experts.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            y = experts.forward_grouped(xi, counts, kernel=kernel)
        y.float().square().sum().backward()
        outs.append((y.float(), xi.grad, [p.grad.clone() for p in experts.parameters()]))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0][0], outs[1][0], **tol)
    torch.testing.assert_close(outs[0][1], outs[1][1], **tol)
    for a, b in zip(outs[0][2], outs[1][2]):
        torch.testing.assert_close(a, b, **tol)


@needs_cuda
def test_fused_adamw_matches_foreach():
    torch.manual_seed(0)
    params = [torch.randn(37, 19, device="cuda"), torch.randn(101, device="cuda")]
    runs = []
    for kw in ({"fused": True}, {"foreach": True}):
        ps = [p.clone().requires_grad_() for p in params]
        opt = torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, **kw)
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, device="cuda", generator=g)
            opt.step()
        runs.append(ps)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _nccl_collectives(rank):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=2, device_id=torch.device("cuda", rank))
    x = torch.arange(4, dtype=torch.float32, device="cuda") + 10 * rank
    dist.all_reduce(x)
    a2a = torch.empty(4, device="cuda")
    dist.all_to_all_single(a2a, torch.arange(4, dtype=torch.float32, device="cuda") + 10 * rank)
    rs = torch.empty(2, device="cuda")  # ZeRO: each rank keeps the sum of its own half of the gradient
    dist.reduce_scatter_tensor(rs, torch.arange(4, dtype=torch.float32, device="cuda") * (rank + 1))
    out = {"all_reduce": x.cpu(), "all_to_all": a2a.cpu(), "reduce_scatter": rs.cpu()}
    dist.destroy_process_group()
    return out


@needs_2_gpus
def test_nccl_all_reduce_all_to_all_and_zero_reduce_scatter(tmp_path):
    r = run_distributed(_nccl_collectives, 2, str(tmp_path))
    for rank in (0, 1):
        assert r[rank]["all_reduce"].tolist() == [10.0, 12.0, 14.0, 16.0]
        assert r[rank]["reduce_scatter"].tolist() == [3.0 * (2 * rank), 3.0 * (2 * rank + 1)]
    assert r[0]["all_to_all"].tolist() == [0.0, 1.0, 10.0, 11.0]
    assert r[1]["all_to_all"].tolist() == [2.0, 3.0, 12.0, 13.0]


def _train(rank, argv):
    os.environ["LOCAL_RANK"] = str(rank)
    return pretrain_gpt_moe.main(argv)["losses"]


@needs_2_gpus
def test_nccl_data_parallel_zero_matches_one_gpu(tmp_path):
    base = mock_args(["--micro-batch-size", "2", "--global-batch-size", "4", "--num-experts", "4", "--train-iters", "4"])
    one = pretrain_gpt_moe.main(base)["losses"]
    two = run_distributed(_train, 2, str(tmp_path), base + ["--use-distributed-optimizer",
                                                            "--moe-expert-parallel-size", "2"])[0]
    close(two, one, rtol=1e-4)


def test_gpu_bench_runs_its_code_on_cpu():
    from tools.bench import gpu

    rows = gpu.main(["--smoke"])
    assert set(rows) == {"dense", "MoE-4"}
    assert all(r["sec"] > 0 and r["tflops"] > 0 for r in rows.values())
