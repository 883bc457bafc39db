"""ZeRO-2 (sharded gradients + sharded Adam state) equals plain AdamW on all-reduced gradients under
DP=2, in losses and gradient norms, and its optimizer state resumes at DP=1."""
import copy

import torch

from tests.dist_utils import run_distributed
from tests.runs import mock_args

STEPS = 3
ARGS = ["--hidden-dropout", "0", "--attention-dropout", "0", "--num-experts", "4", "--moe-train-capacity-factor", "8",
        "--micro-batch-size", "2", "--train-iters", "1", "--lr", "1e-2", "--clip-grad", "0.5", "--weight-decay", "0.1"]


def _setup(ep_size=1):
    from megatron.config.schema import ParallelConfig, pad_vocab_size
    from megatron.model.gpt_model import GPTModel
    from megatron.parallel.state import initialize
    from megatron.training.arguments import parse_args

    cfg = parse_args(mock_args(ARGS))
    cfg.model.vocab_size = pad_vocab_size(128, 128)
    ps = initialize(ParallelConfig(use_cpu=True), ep_size)
    model = GPTModel(cfg.model)
    model.init_weights(3)
    return cfg, ps, model


def _batch(step, dp_rank, vocab=128):
    g = torch.Generator().manual_seed(100 * step + dp_rank)
    block = torch.randint(0, vocab, (2, 17), generator=g)
    return block[:, :-1], block[:, 1:]


def _loss(model, tokens, labels):
    torch.manual_seed(int(tokens[0, 0]))  # the same router randomness in every copy of the model
    per_token, stats = model(tokens, labels)
    return per_token.mean() + 0.01 * torch.stack([s.aux_loss for s in stats]).sum()


def _plain_step(model, opt, cfg, ps, tokens, labels):
    from megatron.parallel.grad_sync import allreduce_gradients, clip_gradients, global_grad_norm

    model.zero_grad(set_to_none=True)
    loss = _loss(model, tokens, labels)
    loss.backward()
    allreduce_gradients(model, ps)
    norm = global_grad_norm(model, ps)
    clip_gradients(model, cfg.optimizer.clip_grad, norm)
    opt.step()
    return float(loss.detach()), norm


def _zero2_step(model, opt, cfg, tokens, labels, loss_scale=1.0):
    model.zero_grad(set_to_none=True)
    loss = _loss(model, tokens, labels)
    (loss * loss_scale).backward()
    opt.reduce_gradients()
    assert all(p.grad is None for p in model.parameters())  # only the shard's gradient is kept
    opt.scale_gradients(1.0 / loss_scale)
    norm = opt.grad_norm()
    opt.clip_gradients(cfg.optimizer.clip_grad, norm)
    opt.step()
    return float(loss.detach()), norm


def _worker(rank):
    from megatron.optim.build import build_optimizer
    from megatron.optim.zero2 import ShardedGradients

    cfg, ps, model = _setup()
    plain_model, zero_model = model, copy.deepcopy(model)
    plain_opt = build_optimizer(plain_model, cfg.optimizer, ps.device)
    zero_opt = ShardedGradients(zero_model, cfg.optimizer, ps)
    out = {"plain": [], "zero2": [], "shard_numel": sum(g.exp_avg.numel() for g in zero_opt.domains)}
    for step in range(STEPS):
        tokens, labels = _batch(step, ps.dp_rank)
        out["plain"].append(_plain_step(plain_model, plain_opt, cfg, ps, tokens, labels))
        out["zero2"].append(_zero2_step(zero_model, zero_opt, cfg, tokens, labels, loss_scale=1024.0))
    out["max_param_diff"] = max(float((a - b).abs().max()) for a, b in zip(plain_model.parameters(),
                                                                          zero_model.parameters()))
    names = {p: n for n, p in zero_model.named_parameters()}
    out["state"] = {names[p]: st for p, st in zero_opt.state_by_param().items()}  # collective: every rank
    out["weights"] = copy.deepcopy(zero_model.state_dict())
    # one more DP=2 step, to compare with the same step resumed at DP=1
    tokens, labels = _batch(STEPS, ps.dp_rank)
    _zero2_step(zero_model, zero_opt, cfg, tokens, labels)
    out["after"] = copy.deepcopy(zero_model.state_dict())
    return out


def test_zero2_equals_plain_adam_under_dp2_and_resumes_at_dp1(tmp_path):
    r0, r1 = run_distributed(_worker, 2, str(tmp_path))
    for r in (r0, r1):
        for (lp, np_), (lz, nz) in zip(r["plain"], r["zero2"]):
            assert abs(lp - lz) <= 1e-6 * abs(lp) and abs(np_ - nz) <= 1e-5 * np_, (r["plain"], r["zero2"])
        assert r["max_param_diff"] < 1e-6  # measured: 0.0 (the same arithmetic, element for element)
    assert r0["plain"][0][1] > 0.5  # clipping was active on the first step
    assert [n for _, n in r0["zero2"]] == [n for _, n in r1["zero2"]]  # one global norm
    assert r0["zero2"][-1][0] != r0["zero2"][0][0]
    total = sum(v.numel() for v in r0["weights"].values())
    assert r0["shard_numel"] + r1["shard_numel"] == total  # each rank holds half of the state

    # resume the DP=2 optimizer state in one process (ZeRO-2 at DP=1): the next step equals DP=2's
    from megatron.config.schema import pad_vocab_size
    from megatron.model.gpt_model import GPTModel
    from megatron.optim.zero2 import ShardedGradients
    from megatron.parallel.state import ParallelState
    from megatron.training.arguments import parse_args

    cfg = parse_args(mock_args(ARGS))
    cfg.model.vocab_size = pad_vocab_size(128, 128)
    model = GPTModel(cfg.model)
    model.load_state_dict(r0["weights"])
    opt = ShardedGradients(model, cfg.optimizer, ParallelState())
    opt.load_state_by_param({p: r0["state"][n] for n, p in model.named_parameters()})
    tokens = torch.cat([_batch(STEPS, 0)[0], _batch(STEPS, 1)[0]])
    labels = torch.cat([_batch(STEPS, 0)[1], _batch(STEPS, 1)[1]])
    # DP=2 averages two per-rank means (equal token counts) = the mean over the joint batch; the MoE aux
    # loss is per-rank, so compare with the mean of the two ranks' losses computed separately
    model.zero_grad(set_to_none=True)
    loss = sum(_loss(model, tokens[i * 2:(i + 1) * 2], labels[i * 2:(i + 1) * 2]) for i in (0, 1)) / 2
    loss.backward()
    opt.reduce_gradients()
    opt.clip_gradients(cfg.optimizer.clip_grad, opt.grad_norm())
    opt.step()
    diff = max(float((model.state_dict()[k] - v).abs().max()) for k, v in r0["after"].items())
    assert diff < 1e-6, diff
