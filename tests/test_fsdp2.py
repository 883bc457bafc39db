"""ZeRO-3 through FSDP2 (``--use-torch-fsdp2``, ``--zero-stage 3``, the DeepSpeed JSON's stage 3): through the real
entry point its losses and gradient norms equal plain AdamW's at DP=1 on the same global batch (dense sharded
over DP, experts over expert-DP; with expert parallelism too); the parameters, gradients and Adam state are
DTensor shards over the right groups; bad combinations are one-line errors."""
import json

import pytest
import torch

from megatron.errors import UserError
from tests.dist_utils import run_distributed
from tests.runs import close, mock_args, train

# 4 experts, so that EP=2 leaves 2 per rank; clipping engaged (the norms are ~1), several steps
BASE = ["--num-layers", "2", "--hidden-dropout", "0", "--attention-dropout", "0", "--num-experts", "4", "--moe-train-capacity-factor", "8",
        "--moe-eval-capacity-factor", "8", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "3",
        "--eval-iters", "0", "--clip-grad", "0.5"]


@pytest.fixture(scope="module")
def reference():
    """Plain torch AdamW in one process (DP=1): 4 micro-batches of the same global batch."""
    return train(0, mock_args(BASE))


def _check(runs, ref):
    assert max(ref["grad_norms"]) > 0.5  # clipping engaged
    for r in runs:  # every rank logs the same DP-averaged figures
        close(r["losses"], ref["losses"])
        close(r["grad_norms"], ref["grad_norms"])


def test_fsdp2_dp2_equals_plain_adam(tmp_path, reference):
    _check(run_distributed(train, 2, str(tmp_path / "r"), mock_args(BASE + ["--use-torch-fsdp2"])), reference)


@pytest.mark.parametrize("layout", [
    # TP 2 x EP 2 x DP 2: dense TP-local tensors sharded over DP 2; experts over expert-DP 2 (the two TP ranks:
    # the MoE layer splits its tokens over TP), their gradients summed there and divided by DP 2
    ["--tensor-model-parallel-size", "2", "--moe-expert-parallel-size", "2"],
    # DP 4 x EP 2: experts over expert-DP 2 (gradients summed there, divided by DP 4), dense over DP 4
    pytest.param(["--moe-expert-parallel-size", "2"], marks=pytest.mark.slow),
], ids=["tp2-ep2-dp2", "dp4-ep2"])
def test_fsdp2_world4_with_expert_parallel(tmp_path, reference, layout):
    """--zero-stage 3 (selects FSDP2) at world 4 (~50 s on 2 cores)."""
    _check(run_distributed(train, 4, str(tmp_path / "r"), mock_args(BASE + ["--zero-stage", "3"] + layout)), reference)


def _plain_and_fsdp2(rank, steps):
    """At EP=1 and EP=2 (world 2; expert-DP 2 and 1): the same model built twice, one sharded by FSDP2, trained
    side by side on the same batches through the Trainer's pieces (loss scaling, gradient reduction, norm,
    clipping, AdamW). Returns per EP size the losses and norms of both, the largest difference of the final
    weights, and what each FSDP2 parameter became."""
    from torch.distributed.tensor import DTensor

    from megatron.model.param_tags import is_expert
    from megatron.optim.build import build_optimizer
    from megatron.parallel.apply import build_model
    from megatron.parallel.fsdp import FSDPGradReducer, apply_fsdp2
    from megatron.parallel.grad_sync import allreduce_gradients, clip_gradients, global_grad_norm, scale_gradients
    from megatron.parallel.state import build_groups, initialize
    from megatron.training.arguments import parse_args

    out = {}
    for ep in (1, 2):
        cfg = parse_args(mock_args(BASE + ["--use-torch-fsdp2", "--moe-expert-parallel-size", str(ep)]))
        cfg.model.vocab_size = 128
        ps = initialize(cfg.parallel, ep) if ep == 1 else build_groups(rank, 2, ep, torch.device("cpu"))
        plain = build_model(cfg.model, ps, seed=3)
        sharded = apply_fsdp2(build_model(cfg.model, ps, seed=3), ps)
        cfg.optimizer.use_torch_fsdp2 = False
        plain_opt = build_optimizer(plain, cfg.optimizer, ps.device, ps)
        cfg.optimizer.use_torch_fsdp2 = True
        opt = build_optimizer(sharded, cfg.optimizer, ps.device, ps)
        res = {"plain": [], "fsdp2": []}
        for step in range(steps):
            g = torch.Generator().manual_seed(100 * step + ps.dp_rank)
            micro = [torch.randint(0, 128, (2, 17), generator=g) for _ in range(2)]
            for key, model, o in (("plain", plain, plain_opt), ("fsdp2", sharded, opt)):
                o.zero_grad(set_to_none=False)
                total = 0.0
                for m, tokens in enumerate(micro):
                    torch.manual_seed(1000 * step + 10 * m + ps.rank)  # the same routing noise in both models
                    per_token, stats = model(tokens[:, :-1], tokens[:, 1:])
                    loss = per_token.mean() + 0.01 * torch.stack([s.aux_loss for s in stats]).sum()
                    (loss * (1024.0 / len(micro))).backward()  # a static loss scale of 1024
                    total += float(loss) / len(micro)
                if key == "plain":
                    allreduce_gradients(model, ps)
                else:
                    FSDPGradReducer(model).finish()
                scale_gradients(model, 1.0 / 1024)
                norm = global_grad_norm(model, ps)
                clip_gradients(model, 0.5, norm)
                o.step()
                res[key].append((total, norm))
        diff = 0.0
        shards = dict(sharded.named_parameters())
        for name, p in plain.named_parameters():
            diff = max(diff, float((p.detach() - shards[name].full_tensor().detach()).abs().max()))
        layout = {}
        for name, p in sharded.named_parameters():
            state = opt.state.get(p, {})
            layout[name] = dict(
                dtensor=isinstance(p, DTensor), grad_dtensor=isinstance(p.grad, DTensor), expert=is_expert(p),
                mesh=p.device_mesh.size() if isinstance(p, DTensor) else None, shape=tuple(p.shape),
                local=tuple(p.to_local().shape) if isinstance(p, DTensor) else None,
                state_local=tuple(state["exp_avg"].to_local().shape) if "exp_avg" in state else None)
        out[ep] = dict(res, diff=diff, layout=layout)
    return out


def test_sharded_training_steps_equal_plain_and_everything_is_a_shard(tmp_path):
    steps = 3
    ranks = run_distributed(_plain_and_fsdp2, 2, str(tmp_path / "r"), steps)
    for ep in (1, 2):
        r = ranks[0][ep]
        assert max(n for _, n in r["plain"]) > 0.5  # clipping engaged
        for (loss_a, norm_a), (loss_b, norm_b) in zip(r["plain"], r["fsdp2"]):
            assert loss_b == pytest.approx(loss_a, rel=1e-6), (ep, r)
            assert norm_b == pytest.approx(norm_a, rel=1e-5), (ep, r)
        assert r["fsdp2"][0][1] == ranks[1][ep]["fsdp2"][0][1]  # one global norm on every rank
        # weights ~0.02, three Adam steps of lr 3e-3 move them ~1e-2: measured 1e-6 apart (the per-micro-batch
        # reduce-scatter sums in another order than the all-reduce of the accumulated gradient)
        assert r["diff"] < 1e-5 and ranks[1][ep]["diff"] < 1e-5, (ep, r["diff"], ranks[1][ep]["diff"])
        params = r["layout"]
        assert any(p["expert"] for p in params.values()) and any(not p["expert"] for p in params.values())
        for name, p in params.items():
            assert p["dtensor"] and p["grad_dtensor"], name
            assert p["mesh"] == (2 // ep if p["expert"] else 2), name  # experts over expert-DP, dense over DP
            assert p["local"][0] == -(-p["shape"][0] // p["mesh"]), name  # dim 0 split
            assert p["state_local"] == p["local"], name  # the Adam moments are shards too
        w1 = next(p for n, p in params.items() if n.endswith("experts.w1"))
        assert w1["shape"][0] == 4 // ep  # the [E_local, H, F] stack, E_local split over expert-DP


BAD = [
    (["--use-torch-fsdp2", "--use-distributed-optimizer"], "--use-torch-fsdp2 (ZeRO-3) does not combine with --use-distributed-optimizer"),
    (["--use-torch-fsdp2", "--zero-stage", "2"], "--use-torch-fsdp2 (ZeRO-3) contradicts --zero-stage 2"),
    (["--zero-stage", "3", "--use-distributed-optimizer"], "does not combine with --use-distributed-optimizer"),
    (["--use-torch-fsdp2", "--overlap-grad-reduce"], "--overlap-grad-reduce does not combine with --use-torch-fsdp2"),
]


@pytest.mark.parametrize("extra,needle", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_combination_is_one_line(extra, needle):
    from megatron.training.arguments import parse_args

    with pytest.raises(UserError) as e:
        parse_args(mock_args(BASE + extra))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_zero_stage_3_and_deepspeed_json_stage_3_select_fsdp2(tmp_path):
    from megatron.training.arguments import parse_args

    assert parse_args(mock_args(BASE + ["--zero-stage", "3"])).optimizer.use_torch_fsdp2
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                                "zero_optimization": {"stage": 3}}))
    cfg = parse_args(mock_args(BASE + ["--deepspeed", "--deepspeed_config", str(path)]))
    assert cfg.optimizer.zero_stage == 3 and cfg.optimizer.use_torch_fsdp2
    assert not cfg.optimizer.use_distributed_optimizer
