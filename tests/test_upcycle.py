"""Sparse upcycling: the upcycled MoE computes the dense function at step 0 and trains on."""
import pytest
import torch

import pretrain_gpt_moe
from megatron.errors import UserError
from megatron.inference.load import load_model
from tests.runs import mock_args
from tools import checkpoint_util

RUN = ["--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length", "32"]
EXACT = ["--hidden-dropout", "0", "--attention-dropout", "0"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    ck = str(tmp_path_factory.mktemp("dense") / "ck")
    pretrain_gpt_moe.main(mock_args(RUN + ["--train-iters", "3", "--save", ck]))
    return ck


def mean_loss(path, tokens):
    model = load_model(path, "cpu").model  # evaluation routing, no token dropped
    with torch.no_grad():
        loss, _ = model(tokens[:, :-1], labels=tokens[:, 1:])
    return float(loss.mean())


@pytest.mark.parametrize("flags", [["--num-experts", "4"], ["--num-experts", "4", "--topk", "2"],
                                   ["--num-experts", "2", "4", "--mlp-type", "residual"],
                                   ["--num-experts", "8", "--expert-interval", "1", "--topk", "2", "--mlp-type", "residual"]])
def test_upcycled_model_computes_the_dense_function(dense, tmp_path, flags):
    up = str(tmp_path / "up")
    checkpoint_util.main(["upcycle", "--load", dense, "--save", up] + flags)
    tokens = torch.randint(0, 127, (4, 33), generator=torch.Generator().manual_seed(1))
    a, b = mean_loss(dense, tokens), mean_loss(up, tokens)
    assert abs(a - b) < 1e-5, (a, b)
    assert load_model(up, "cpu").cfg.moe.enabled


def test_training_resumes_from_the_upcycled_checkpoint(dense, tmp_path):
    up = str(tmp_path / "up")
    checkpoint_util.main(["upcycle", "--load", dense, "--save", up, "--num-experts", "4"])
    cont = ["--train-iters", "3", "--finetune"] + EXACT
    d = pretrain_gpt_moe.main(mock_args(RUN + cont + ["--load", dense]))
    m = pretrain_gpt_moe.main(mock_args(RUN + cont + ["--load", up, "--num-experts", "4", "--disable-moe-token-dropping", "--save", str(tmp_path / "m")]))
    # the first step sees the same function and the same batch (top-1 training routing = argmax: expert 0)
    assert abs(d["losses"][0] - m["losses"][0]) < 1e-5 * abs(d["losses"][0])
    assert len(m["losses"]) == 3 and all(x == x for x in m["losses"])
    assert load_model(str(tmp_path / "m"), "cpu").iteration == 3
    # or go on where the dense run stopped (its iteration and consumed samples are kept), optimizer fresh
    assert load_model(up, "cpu").iteration == 3
    on = pretrain_gpt_moe.main(mock_args(RUN + EXACT + ["--train-iters", "5", "--load", up, "--no-load-optim",
                                                        "--no-load-rng", "--num-experts", "4"]))
    assert len(on["losses"]) == 2


def test_upcycle_errors(dense, tmp_path):
    with pytest.raises(UserError, match="--num-experts .*at least 2"):
        checkpoint_util.main(["upcycle", "--load", dense, "--save", str(tmp_path / "a"), "--num-experts", "1"])
    with pytest.raises(UserError, match="--num-experts has 3 values"):
        checkpoint_util.main(["upcycle", "--load", dense, "--save", str(tmp_path / "b"), "--num-experts", "2", "2", "2"])
    with pytest.raises(UserError, match="overlaps --load"):
        checkpoint_util.main(["upcycle", "--load", dense, "--save", dense, "--num-experts", "2"])
    up = str(tmp_path / "up")
    checkpoint_util.main(["upcycle", "--load", dense, "--save", up, "--num-experts", "2"])
    with pytest.raises(UserError, match="already has MoE layers"):
        checkpoint_util.main(["upcycle", "--load", up, "--save", str(tmp_path / "c"), "--num-experts", "2"])


LLAMA = ["--position-embedding-type", "rope", "--no-position-embedding", "--normalization", "RMSNorm", "--swiglu",
         "--disable-bias-linear", "--group-query-attention", "--num-query-groups", "2",
         "--untie-embeddings-and-output-weights"]


def test_llama_style_dense_upcycles_into_swiglu_experts_and_exports_as_mixtral(tmp_path):
    """A Llama-style dense checkpoint (SwiGLU, no biases) -> top-2 SwiGLU experts, each the dense MLP, the router
    randomly initialised: the dense function at step 0; the result exports as MixtralForCausalLM."""
    dense, up = str(tmp_path / "dense"), str(tmp_path / "up")
    pretrain_gpt_moe.main(mock_args(RUN + LLAMA + ["--train-iters", "2", "--save", dense]))
    checkpoint_util.main(["upcycle", "--load", dense, "--save", up, "--num-experts", "4", "--topk", "2",
                          "--expert-interval", "1"])
    tokens = torch.randint(0, 127, (4, 33), generator=torch.Generator().manual_seed(1))
    a, b = mean_loss(dense, tokens), mean_loss(up, tokens)
    assert abs(a - b) < 1e-5, (a, b)
    lm = load_model(up, "cpu")
    router = lm.model.layers[0].mlp.router.wg.weight
    assert lm.model.layers[0].mlp.experts.b1 is None and router.abs().sum() > 0  # random, not zero
    transformers = pytest.importorskip("transformers")
    from megatron.hf.export import write_export

    out = tmp_path / "export"
    out.mkdir()
    assert write_export(lm, str(out))["kind"] == "transformers MixtralForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, lm.model.logits(tokens).logits, rtol=1e-4, atol=1e-4)
