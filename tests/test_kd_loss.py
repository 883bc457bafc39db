"""The fused output step of distillation (projection + cross-entropy + T^2 KL in one autograd step) equals the
plain path (materialised logits, F.cross_entropy, kd_loss) in values and in the gradients of h and the weight."""
import pytest
import torch

from megatron.config.schema import ModelConfig
from megatron.model.gpt_model import GPTModel
from megatron.model.kd_loss import cross_entropy_and_kd, linear_cross_entropy_kd


def _both_paths(T, dtype=torch.float32, rows=37, vocab=100, teacher_dtype=torch.float32, scale=0.5):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, rows, 16, generator=g).requires_grad_()
    w = (scale * torch.randn(vocab, 16, generator=g)).requires_grad_()
    labels = torch.randint(0, vocab, (2, rows), generator=g)
    teacher = (3 * torch.randn(2, rows, vocab, generator=g)).to(teacher_dtype)
    before = teacher.clone()
    a, b = torch.randn(2, rows, generator=g), torch.rand(2, rows, generator=g)  # per-token weights (loss masks)
    results = []
    for fused in (False, True):
        h.grad = w.grad = None
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            if fused:
                ce, kl = linear_cross_entropy_kd(h, w, labels, teacher, T)
            else:
                ce, kl = cross_entropy_and_kd(torch.nn.functional.linear(h, w), labels, teacher, T)
        (a * ce + b * kl).sum().backward()
        results.append((ce.detach(), kl.detach(), h.grad.clone(), w.grad.clone()))
    assert torch.equal(teacher, before)  # the teacher's logits are read, never written
    return results


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_fused_kd_equals_plain_values_and_gradients(T):
    plain, fused = _both_paths(T)
    assert fused[0].dtype == fused[1].dtype == torch.float32
    assert (fused[1] > 0).all() and fused[1].max() > 0.5  # a real KL, not zero
    for x, y in zip(plain, fused):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=2e-5)


def test_fused_kd_spans_several_row_blocks():
    # 8192-wide rows: 32 rows a block, so 2 x 80 tokens cross block boundaries (and end on a partial block)
    plain, fused = _both_paths(1.0, rows=80, vocab=8192)
    for x, y in zip(plain, fused):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=2e-5)


def test_fused_kd_under_bf16_autocast_matches_plain():
    plain, fused = _both_paths(1.0, dtype=torch.bfloat16)
    for x, y in zip(plain, fused):
        torch.testing.assert_close(y, x, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("T", [1.5, 3.0])
def test_fused_kd_with_a_bf16_teacher_divides_in_fp32(T):
    # a bf16 teacher (autocast) at a temperature that is not a power of two: t / T must not round in bf16
    plain, fused = _both_paths(T, teacher_dtype=torch.bfloat16)
    for x, y in zip(plain, fused):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=2e-5)


def test_fused_kd_at_high_temperature_has_finite_gradients():
    # near-uniform softmax at T = 12 over 8192 entries: q^T underflows unless scaled by the row maximum first
    plain, fused = _both_paths(12.0, rows=8, vocab=8192, scale=0.05)
    assert all(torch.isfinite(t).all() for t in fused)
    for x, y in zip(plain, fused):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=2e-5)


def test_teacher_logits_of_minus_inf_give_a_finite_kl_in_both_paths():
    # a teacher that masks entries (a padded vocabulary) with -inf: probability 0 there, so they add nothing
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(1, 5, 8, generator=g), torch.randn(12, 8, generator=g)
    labels, teacher = torch.randint(0, 10, (1, 5), generator=g), torch.randn(1, 5, 12, generator=g)
    masked = teacher.clone()
    masked[..., 10:] = float("-inf")
    # the same KL as a teacher whose masked entries are so low that their probability is 0 in fp32
    expect = cross_entropy_and_kd(torch.nn.functional.linear(h, w), labels, teacher.index_fill(2, torch.tensor([10, 11]), -1e4), 2.0)
    for fused in (False, True):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        if fused:
            ce, kl = linear_cross_entropy_kd(hh, ww, labels, masked, 2.0)
        else:
            ce, kl = cross_entropy_and_kd(torch.nn.functional.linear(hh, ww), labels, masked, 2.0)
        (ce + kl).sum().backward()
        torch.testing.assert_close(kl, expect[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ce, expect[0])
        assert torch.isfinite(hh.grad).all() and torch.isfinite(ww.grad).all()


def test_fused_kd_rejects_teacher_logits_of_another_shape():
    h, w, labels = torch.randn(2, 3, 8), torch.randn(16, 8), torch.randint(0, 16, (2, 3))
    for bad in (torch.randn(6, 16), torch.randn(2, 3, 15), torch.randn(2, 3, 1)):
        with pytest.raises(ValueError, match="do not match the student's"):
            linear_cross_entropy_kd(h, w, labels, bad, 1.0)


def test_fused_kd_refuses_a_second_backward():
    h = torch.randn(1, 4, 8, requires_grad=True)
    ce, kl = linear_cross_entropy_kd(h, torch.randn(16, 8), torch.randint(0, 16, (1, 4)), torch.randn(1, 4, 16), 1.0)
    loss = (ce + kl).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        loss.backward()


def test_model_with_teacher_logits_takes_the_fused_step_and_matches_the_logits_path():
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=12, vocab_size=64,
                      hidden_dropout=0, attention_dropout=0)
    m = GPTModel(cfg)
    m.init_weights(0)
    tok = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    teacher = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(2))
    ce, _, kl = m.distill(tok[:, :-1], tok[:, 1:], teacher, 2.0)
    (ce.mean() + kl.mean()).backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    logits, _ = m.logits(tok[:, :-1])
    ref_ce, ref_kl = cross_entropy_and_kd(logits, tok[:, 1:], teacher, 2.0)
    (ref_ce.mean() + ref_kl.mean()).backward()
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(kl, ref_kl)
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
