"""Sparse and granular upcycling: the upcycled MoE computes the dense function at step 0 and trains on."""
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


@pytest.fixture(scope="module")
def llama_dense(tmp_path_factory):
    ck = str(tmp_path_factory.mktemp("llama") / "dense")
    pretrain_gpt_moe.main(mock_args(RUN + LLAMA + ["--train-iters", "2", "--save", ck]))
    return ck


def test_llama_style_dense_upcycles_into_swiglu_experts_and_exports_as_mixtral(llama_dense, tmp_path):
    """A Llama-style dense checkpoint (SwiGLU, no biases) -> top-2 SwiGLU experts, each the dense MLP, the router
    randomly initialised: the dense function at step 0; the result exports as MixtralForCausalLM."""
    dense, up = llama_dense, str(tmp_path / "up")
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


# ---- granular upcycling (--moe-upcycling-granularity G): E/G copies of the dense MLP, each cut into G experts

TOKENS = torch.randint(0, 127, (4, 33), generator=torch.Generator().manual_seed(1))


def logits(path):
    lm = load_model(path, "cpu")  # evaluation routing, no token dropped
    with torch.no_grad():
        return lm, lm.model.logits(TOKENS[:, :-1]).logits


def check_granular(dense, up, G, E, k):
    """The dense logits, the written config, the expert shapes and the router's copy structure."""
    lm_d, a = logits(dense)
    lm, b = logits(up)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    F = lm_d.cfg.ffn_hidden_size
    moe = lm.cfg.moe
    assert (moe.moe_ffn_hidden_size, moe.topk, lm.cfg.ffn_hidden_size) == (F // G, k, F)
    layers = [layer.mlp for layer in lm.model.layers if hasattr(layer.mlp, "router")]
    assert layers and all(m.num_experts == E for m in layers)
    for m in layers:
        assert m.experts.w2.shape == (E, F // G, lm.cfg.hidden_size)
        wg = m.router.wg.weight.view(E // G, G, -1)  # the G shards of a copy share its router row
        assert torch.equal(wg, wg[:, :1].expand_as(wg)) and not torch.equal(wg[0, 0], wg[1, 0])
    return lm


@pytest.mark.parametrize("G,E,k,flags", [(2, 8, 2, []), (4, 8, 8, ["--topk", "8", "--expert-interval", "1"]),
                                         (2, 4, 2, ["--mlp-type", "residual"])])
def test_granular_upcycle_computes_the_dense_function(dense, tmp_path, G, E, k, flags):
    """GeLU with biases: b1 is cut with its rows, w2 scaled by G, b2 kept; --topk defaults to G (one copy)."""
    up = str(tmp_path / "up")
    checkpoint_util.main(["upcycle", "--load", dense, "--save", up, "--num-experts", str(E),
                          "--moe-upcycling-granularity", str(G)] + flags)
    check_granular(dense, up, G, E, k)


def test_granular_llama_upcycle_computes_the_dense_function_and_exports_as_mixtral(llama_dense, tmp_path):
    """SwiGLU, bias-free: shard g takes the same rows of the gate and the up projection; top-2 = 1 of 4 copies
    (Mixtral's renormalised top-2, num_experts_per_tok 2, intermediate_size F/2)."""
    up = str(tmp_path / "up")
    checkpoint_util.main(["upcycle", "--load", llama_dense, "--save", up, "--num-experts", "8",
                          "--moe-upcycling-granularity", "2", "--expert-interval", "1"])
    lm = check_granular(llama_dense, up, 2, 8, 2)
    assert lm.model.layers[0].mlp.experts.b1 is None
    transformers = pytest.importorskip("transformers")
    from megatron.hf.export import write_export

    out = tmp_path / "export"
    out.mkdir()
    assert write_export(lm, str(out))["kind"] == "transformers MixtralForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert (back.config.intermediate_size, back.config.num_experts_per_tok) == (lm.cfg.ffn_hidden_size // 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(back(TOKENS).logits, lm.model.logits(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_training_resumes_from_the_granular_checkpoint(dense, tmp_path):
    up = str(tmp_path / "up")
    checkpoint_util.main(["upcycle", "--load", dense, "--save", up, "--num-experts", "8", "--topk", "4",
                          "--moe-upcycling-granularity", "2"])
    cont = ["--train-iters", "2", "--finetune"] + EXACT
    moe = ["--num-experts", "8", "--expert-interval", "2", "--topk", "4", "--moe-ffn-hidden-size", "64",
           "--disable-moe-token-dropping"]
    d = pretrain_gpt_moe.main(mock_args(RUN + cont + ["--load", dense]))
    m = pretrain_gpt_moe.main(mock_args(RUN + cont + moe + ["--load", up]))
    # the same function on the same batch at step 0 (top-4 in training is the top-4 of the router: two copies)
    assert abs(d["losses"][0] - m["losses"][0]) < 1e-5 * abs(d["losses"][0])
    assert len(m["losses"]) == 2 and all(x == x for x in m["losses"])


@pytest.mark.parametrize("flags,message", [
    (["--num-experts", "4", "--moe-upcycling-granularity", "0"], "--moe-upcycling-granularity 0: must be >= 1"),
    (["--num-experts", "6", "--moe-upcycling-granularity", "3"],
     "--moe-upcycling-granularity 3 does not divide the dense MLP width --ffn-hidden-size 128"),
    (["--num-experts", "6", "--moe-upcycling-granularity", "4"], r"--num-experts \[6\] is not a multiple of 4"),
    (["--num-experts", "4", "6", "--moe-upcycling-granularity", "4"], r"--num-experts \[6\] is not a multiple"),
    (["--num-experts", "8", "--moe-upcycling-granularity", "2", "--topk", "3"], "--topk 3 is not a multiple of 2"),
    (["--num-experts", "8", "--topk", "4"], "--topk 4: upcycling without --moe-upcycling-granularity"),
])
def test_granular_upcycle_errors(dense, tmp_path, flags, message):
    save = tmp_path / "x"
    with pytest.raises(UserError, match=message) as e:
        checkpoint_util.main(["upcycle", "--load", dense, "--save", str(save)] + flags)
    assert "\n" not in str(e.value) and not save.exists()


def test_granular_upcycle_refuses_unnormalised_routing(tmp_path):
    """Megatron-LM's pre-softmax routing without normalisation: the kept weights do not sum to 1."""
    dense = str(tmp_path / "dense")
    pretrain_gpt_moe.main(mock_args(RUN + ["--train-iters", "1", "--moe-router-pre-softmax", "--save", dense]))
    with pytest.raises(UserError, match="--moe-upcycling-granularity 2 needs top-k weights that sum to 1.*"
                                        "pre-softmax") as e:
        checkpoint_util.main(["upcycle", "--load", dense, "--save", str(tmp_path / "x"), "--num-experts", "4",
                              "--moe-upcycling-granularity", "2"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("router, topk", [(["--moe-router-load-balancing-type", "aux_loss"], "1"),
                                          (["--moe-router-load-balancing-type", "aux_loss"], "2"),
                                          (["--moe-router-pre-softmax"], "1")],
                         ids=["megatron-normalised-top1", "megatron-normalised-top2", "megatron-pre-softmax-top1"])
def test_plain_upcycle_with_megatron_lm_routing_computes_the_dense_function(tmp_path, router, topk):
    """A normalised top-1 weight is 1 (no E-fold scale); a pre-softmax top-1 weight is 1/E (zero router, E-fold)."""
    dense, up = str(tmp_path / "dense"), str(tmp_path / "up")
    pretrain_gpt_moe.main(mock_args(RUN + EXACT + ["--train-iters", "1", "--save", dense] + router))
    checkpoint_util.main(["upcycle", "--load", dense, "--save", up, "--num-experts", "4", "--topk", topk])
    assert type(load_model(up, "cpu").model.moe_layers()[0].router).__name__ == "MegatronRouter"
    tokens = torch.randint(0, 127, (4, 33), generator=torch.Generator().manual_seed(1))
    a, b = mean_loss(dense, tokens), mean_loss(up, tokens)
    assert abs(a - b) < 1e-5, (a, b)
