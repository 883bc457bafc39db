"""--true-vocab-size: the padding rows of a padded vocabulary (zero after import-hf) get no probability. The
logits of the padding ids are masked in scoring and in the loss (the fused loss and the vocab-parallel one),
TP 2 computes TP 1's masked losses, and a tokenizer larger than the limit is one line."""
import pytest
import torch
import torch.nn.functional as F

from megatron.config.schema import ModelConfig
from megatron.errors import UserError
from megatron.model.gpt_model import GPTModel
from tests.dist_utils import run_distributed
from tests.runs import close, mock_args, train

# ids 0..99 (the NullTokenizer of --vocab-size 100), padded to 128, the last 28 rows masked
PADDED = ["--vocab-size", "100", "--make-vocab-size-divisible-by", "64", "--hidden-dropout", "0",
          "--attention-dropout", "0", "--use-cpu", "--clip-grad", "0", "--micro-batch-size", "2",
          "--global-batch-size", "4", "--train-iters", "3"]


def _model(limit):
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, num_layers=2, hidden_dropout=0.0,
                      attention_dropout=0.0, true_vocab_size=limit)
    model = GPTModel(cfg).eval()
    model.init_weights(3)
    return model


def test_masked_logits_and_loss_are_the_unpadded_models():
    tokens = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    labels = tokens.roll(-1, 1)
    masked, plain = _model(100), _model(None)
    with torch.no_grad():
        logits = masked.logits(tokens).logits  # [2, 10, 128]
        full = plain.logits(tokens).logits
        assert torch.equal(logits[..., :100], full[..., :100])
        assert torch.softmax(logits, -1)[..., 100:].max() == 0
        want = F.cross_entropy(full[..., :100].reshape(-1, 100), labels.reshape(-1), reduction="none")
        torch.testing.assert_close(masked(tokens, labels).loss.reshape(-1), want, rtol=1e-5, atol=1e-5)
        unmasked = plain(tokens, labels).loss.reshape(-1)
    assert (unmasked - want).abs().min() > 1e-4  # the padding rows took probability without the mask


def test_tp2_equals_tp1_with_a_masked_padding(tmp_path):
    argv = mock_args(PADDED + ["--true-vocab-size", "100"])
    single = train(0, argv)
    plain = train(0, mock_args(PADDED))
    assert abs(single["losses"][0] - plain["losses"][0]) > 1e-4  # the mask changed the loss
    for r in run_distributed(train, 2, str(tmp_path), argv + ["--tensor-model-parallel-size", "2"]):
        close(r["losses"], single["losses"])
        close(r["grad_norms"], single["grad_norms"])


def test_a_limit_below_the_tokenizer_is_one_line():
    import pretrain_gpt_moe

    with pytest.raises(UserError, match=r"--true-vocab-size 90 must lie between the tokenizer's vocabulary \(100\)"):
        pretrain_gpt_moe.main(mock_args(PADDED + ["--true-vocab-size", "90"]))
