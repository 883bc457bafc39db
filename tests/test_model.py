import pytest
import torch

from megatron.config.schema import ModelConfig, MoEConfig
from megatron.model.gpt_model import GPTModel
from megatron.planning.model_stats import count_parameters


@pytest.mark.parametrize("moe", [MoEConfig(), MoEConfig(num_experts=[4]), MoEConfig(num_experts=[2, 4], mlp_type="residual", topk=2),
                                 MoEConfig(num_experts=[4], expert_interval=1)])
def test_parameter_counts_match_the_built_model(moe):
    cfg = ModelConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128, moe=moe)
    model = GPTModel(cfg)
    counts = count_parameters(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.expert == sum(p.numel() for p in model.parameters() if getattr(p, "is_expert", False))
    assert counts.active <= counts.total


def test_moe_placement_every_other_layer_one_based():
    assert MoEConfig(num_experts=[8]).experts_per_layer(6) == [1, 8, 1, 8, 1, 8]
    assert MoEConfig(num_experts=[32, 32, 64]).experts_per_layer(6) == [1, 32, 1, 32, 1, 64]
    student = MoEConfig(num_experts=[32] * 8 + [64, 64]).experts_per_layer(21)
    assert [i for i, e in enumerate(student) if e > 1] == list(range(1, 21, 2))


def test_megatron_init_scales_output_layers():
    cfg = ModelConfig(num_layers=8, hidden_size=64, num_attention_heads=4, seq_length=16, vocab_size=128,
                      init_method_std=0.02, ffn_hidden_size=256)
    m = GPTModel(cfg)
    m.init_weights(0)
    fc1 = torch.cat([l.mlp.mlp.fc1.weight.flatten() for l in m.layers])
    fc2 = torch.cat([l.mlp.mlp.fc2.weight.flatten() for l in m.layers])
    assert fc1.std().item() == pytest.approx(0.02, rel=0.05)
    assert fc2.std().item() == pytest.approx(0.02 / 4.0, rel=0.05)  # 1 / sqrt(2 * 8)
    assert m.layers[0].mlp.mlp.fc1.bias.abs().sum() == 0


def test_causal_and_checkpointed_activations_match():
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=12, vocab_size=64,
                      hidden_dropout=0, attention_dropout=0, moe=MoEConfig(num_experts=[2], eval_capacity_factor=8.0))
    m = GPTModel(cfg)
    m.init_weights(0)
    m.eval()
    tok = torch.randint(0, 64, (2, 12))
    logits, _ = m.logits(tok)
    logits2, _ = m.logits(torch.cat([tok[:, :6], torch.randint(0, 64, (2, 6))], 1))
    torch.testing.assert_close(logits[:, :6], logits2[:, :6])  # the future does not leak
    m.train()
    m.cfg.moe.train_capacity_factor = 8.0
    loss, _ = m(tok, tok)
    loss.mean().backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.cfg.checkpoint_activations = True
    loss2, _ = m(tok, tok)
    loss2.mean().backward()
    torch.testing.assert_close(loss, loss2)
    for a, p in zip(g, m.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_kv_cache_generation_equals_full_forward():
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=64,
                      hidden_dropout=0, attention_dropout=0)
    m = GPTModel(cfg).eval()
    m.init_weights(0)
    tok = torch.randint(0, 64, (1, 10))
    full, _ = m.logits(tok)
    cache = m.new_cache()
    out, _ = m.decode(tok[:, :6], cache)
    steps = [out[:, -1]]
    for t in range(6, 10):
        o, _ = m.decode(tok[:, t:t + 1], cache)  # positions count on from the cache: t
        steps.append(o[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 5:9], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_output_cross_entropy_equals_linear_then_cross_entropy(dtype):
    from megatron.model.cross_entropy import linear_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 37, 16, generator=g).requires_grad_()
    w = (0.5 * torch.randn(100, 16, generator=g)).requires_grad_()
    labels = torch.randint(0, 100, (2, 37), generator=g)
    upstream = torch.randn(2, 37, generator=g)  # per-token weights, as a loss mask would give
    results = []
    for fused in (False, True):
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if fused:
                loss = linear_cross_entropy(h, w, labels)
            else:
                logits = torch.nn.functional.linear(h, w).float()
                loss = torch.nn.functional.cross_entropy(logits.view(74, -1), labels.view(-1), reduction="none").view(2, 37)
        (loss * upstream).sum().backward()
        results.append((loss.detach(), h.grad.clone(), w.grad.clone()))
    assert results[1][0].dtype == torch.float32
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6)


def test_model_takes_the_fused_loss_and_matches_logits_path():
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=12, vocab_size=64,
                      hidden_dropout=0, attention_dropout=0)
    m = GPTModel(cfg)
    m.init_weights(0)
    assert m._fused_output_loss()
    tok = torch.randint(0, 64, (2, 13))
    loss, _ = m(tok[:, :-1], tok[:, 1:])
    loss.mean().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    logits, _ = m.logits(tok[:, :-1])
    ref = m.loss_fn(logits, tok[:, 1:])
    ref.mean().backward()
    torch.testing.assert_close(loss, ref)
    for a, p in zip(grads, m.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_fused_output_cross_entropy_refuses_a_second_backward():
    from megatron.model.cross_entropy import linear_cross_entropy

    h = torch.randn(1, 4, 8, requires_grad=True)
    loss = linear_cross_entropy(h, torch.randn(16, 8), torch.randint(0, 16, (1, 4))).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        loss.backward()
