"""Round 4: adversarial probes of Issue 27's features (Llama2Tokenizer / GPTSentencePieceTokenizer, --true-vocab-size,
the lm-eval adapter's BOS, granular upcycling, Megatron-LM's every-layer MoE default). Each test keeps one fault.

Two of the faults were fixed outside the probed files: the plain KD path keeps only the --true-vocab-size columns
(megatron/model/gpt_model.py) and a checkpoint's --true-vocab-size is compared with the flags
(megatron/checkpoint/checks.py)."""
import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

import pretrain_gpt_moe
from megatron.config.compat.upstream_flags import translate_argv
from megatron.errors import UserError
from tests.conftest import ROOT
from tests.runs import TINY, mock_args
from tools import checkpoint_util

WORDS = ["the", "expert", "router", "token", "layer", "model", "mixture", "of", "gate", "capacity"]


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


@pytest.fixture(scope="module")
def sp_models(tmp_path_factory):
    """Llama-2 pieces (unk 0, <s> 1, </s> 2), a model without BOS, one without EOS (and no <|endoftext|>)."""
    import sentencepiece as spm

    from megatron.tokenizer.sentencepiece_tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("sp")
    text = d / "text.txt"
    text.write_text("\n".join(" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(12)) for i in range(400)))
    out = {"llama": train_sentencepiece([str(text)], str(d / "llama"), vocab_size=300), "text": str(text)}
    for name, bos, eos in (("nobos", -1, 1), ("noeos", 1, -1)):
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(d / name), vocab_size=280, bos_id=bos,
                                       eos_id=eos, unk_id=0, pad_id=-1, minloglevel=2, byte_fallback=True)
        out[name] = str(d / f"{name}.model")
    return out


# ---------------------------------------------------------------------------------------------- 1. tokenizers


def test_sentencepiece_files_without_bos_eos_or_model_are_one_line(sp_models):
    from megatron.tokenizer import build_tokenizer

    with pytest.raises(UserError, match="has no BOS piece.*use --tokenizer-type SentencePieceTokenizer"):
        build_tokenizer("Llama2Tokenizer", tokenizer_model=sp_models["nobos"])
    assert build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_models["nobos"]).bos is None
    # was: eod silently the unknown piece's id 0 (piece_to_id of a missing "<|endoftext|>"), so --append-eod
    # ended every document with <unk>
    for kind in ("Llama2Tokenizer", "GPTSentencePieceTokenizer", "SentencePieceTokenizer"):
        with pytest.raises(UserError, match=r"has neither an EOS piece nor <\|endoftext\|>") as e:
            build_tokenizer(kind, tokenizer_model=sp_models["noeos"])
        assert "\n" not in str(e.value) and sp_models["noeos"] in str(e.value)
        with pytest.raises(UserError, match=f"--tokenizer-model {sp_models['text']}: cannot be read as"):
            build_tokenizer(kind, tokenizer_model=sp_models["text"])  # a text file, not a model


def test_preprocess_llama2_starts_each_document_with_one_bos(sp_models, tmp_path):
    from megatron.data.indexed_dataset import IndexedDataset
    from megatron.tokenizer import build_tokenizer

    tok = build_tokenizer("Llama2Tokenizer", tokenizer_model=sp_models["llama"])
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps({"text": t}) for t in ["the expert router", "", "gate"]) + "\n")
    prefix = str(tmp_path / "out")
    r = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input", str(src), "--output-prefix", prefix,
                        "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp_models["llama"], "--workers", "1",
                        "--append-eod"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stderr
    docs = IndexedDataset(prefix + "_text_document")
    got = [[int(x) for x in docs[i]] for i in range(len(docs))]
    # the empty document stays empty (no lone BOS / EOS); BOS once in front, EOS once at the end
    assert got == [[1] + tok.tokenize("the expert router") + [2], [1] + tok.tokenize("gate") + [2]]


@pytest.fixture(scope="module")
def llama2_export(sp_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("l2")
    ck, ex = str(d / "ck"), str(d / "export")
    _quiet(pretrain_gpt_moe.main, TINY + ["--mock-data", "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                                          sp_models["llama"], "--train-iters", "1", "--micro-batch-size", "2",
                                          "--global-batch-size", "2", "--max-position-embeddings", "16",
                                          "--num-layers", "1", "--save", ck])
    _quiet(checkpoint_util.main, ["export-hf", "--load", ck, "--save", ex])
    return ck, ex


TEXTS = ["the expert router", " leading space", "", "<s>the gate", "gate </s> the", "two  spaces\nlayer"]


def test_llama2_export_and_adapter_encode_as_hflm(llama2_export):
    """Was: SentencePiece decodes <s> to "", so every string "started with the BOS text" and the adapter never
    added BOS, while lm-eval's hf model on the export always did; and the export read "<s>" / "</s>" inside a
    text as special tokens where SentencePiece (training) reads characters."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from megatron.evaluation.harness_model import MegatronMoELM
    from megatron.inference.load import load_model

    ck, ex = llama2_export
    lm = load_model(ck, "cpu")
    theirs = transformers.AutoTokenizer.from_pretrained(ex)
    assert theirs("the gate")["input_ids"] == [1] + lm.tokenizer.tokenize("the gate")  # BOS exactly once
    assert theirs("gate </s> the", add_special_tokens=False)["input_ids"] == lm.tokenizer.tokenize("gate </s> the")
    for add_bos in (None, "True", "false"):
        kwargs = {} if add_bos is None else {"add_bos_token": add_bos == "True"}
        hf = HFLM(pretrained=ex, device="cpu", batch_size=1, **kwargs)
        ours = MegatronMoELM(loaded=lm, add_bos_token=add_bos)
        assert ours.prefix_token_id == hf.prefix_token_id == 1
        for text in TEXTS:
            assert ours.tok_encode(text) == hf.tok_encode(text), (add_bos, text)
        assert (ours.tok_encode("the gate")[0] == 1) == (add_bos != "false")


def test_add_bos_token_argument_values():
    from megatron.evaluation.harness_model import _bool_arg

    assert [_bool_arg("add_bos_token", v) for v in (None, "", "None", True, "True", "TRUE", "1", False, "false",
                                                    "0")] == [None, None, None, True, True, True, True, False, False,
                                                              False]
    with pytest.raises(UserError, match=r"--model_args add_bos_token=yes: not a switch; give add_bos_token=True"):
        _bool_arg("add_bos_token", "yes")  # was: silently False


@pytest.mark.parametrize("bos", [None, "<nope>", {"content": "<s>"}])
def test_hf_tokenizer_bos_null_or_unknown(tmp_path, bos):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from megatron.evaluation.harness_model import MegatronMoELM
    from megatron.tokenizer.huggingface_tokenizer import HuggingFaceTokenizer

    vocab = {"a": 0, "b": 1, "<s>": 2, "</s>": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": bos, "eos_token": "</s>"}))
    t = HuggingFaceTokenizer(str(tmp_path))
    adapter = MegatronMoELM.__new__(MegatronMoELM)
    adapter.tokenizer_, adapter.add_bos_token = t, None
    want_bos = 2 if isinstance(bos, dict) else None
    assert (t.bos, t.eod, adapter.prefix_token_id) == (want_bos, 3, 3 if want_bos is None else 2)
    assert adapter.tok_encode("b a") == [1, 0]  # no post-processor: nothing added
    assert adapter.tok_encode("<s> b") == [2, 1]


# ---------------------------------------------------------------------------------------------- 2. --true-vocab-size


def _padded_model(limit, plain_output=False):
    from megatron.config.schema import ModelConfig
    from megatron.model.gpt_model import GPTModel, TiedOutputLayer

    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, num_layers=1, hidden_dropout=0.0,
                      attention_dropout=0.0, true_vocab_size=limit, max_position_embeddings=64)
    model = GPTModel(cfg).eval()
    model.init_weights(3)
    if plain_output:  # the materialised-logits path (as the vocab-parallel layer under TP takes)
        model.output_layer = type("PlainOutput", (TiedOutputLayer,), {})()
        model.output_layer.vocab_limit = limit
    with torch.no_grad():  # padding rows the unmasked model would pick: 50 x the mean of the chosen rows
        top = model.logits(torch.arange(10)[None]).logits[0, :, :100].argmax(-1)
        model.word_embeddings.weight[100:] = 50 * model.word_embeddings.weight[top].mean(0)
    return model


def test_generation_never_emits_a_padded_id():
    from megatron.inference.generate import generate, generate_greedy_batch

    g = torch.Generator().manual_seed(0)
    for limit, padded in ((None, True), (100, False)):
        m = _padded_model(limit)
        out = generate(m, list(range(10)), 12) + generate(m, [3, 4], 12, temperature=1.0, generator=g) + \
            generate(m, [5], 12, temperature=0.3, top_p=0.9, generator=g) + \
            sum(generate_greedy_batch(m, [[1, 2, 3], [7]], 8), [])
        assert (max(out) >= 100) == padded, out


def test_kd_plain_path_with_true_vocab_size_is_finite_and_equals_the_fused_path():
    torch.manual_seed(0)
    fused, plain = _padded_model(100), _padded_model(100, plain_output=True)
    h = torch.randn(2, 5, 32)
    labels = torch.randint(0, 100, (2, 5))
    teacher = torch.randn(2, 5, 128)  # a teacher without --true-vocab-size: its padding ids have probability
    for temperature in (1.0, 0.4):  # was: KL ~1e37 at T = 1, inf / NaN at T < 0.5
        with torch.no_grad():
            ce_f, kl_f = fused.head_distill(h, labels, teacher, temperature)
            ce_p, kl_p = plain.head_distill(h, labels, teacher, temperature)
        torch.testing.assert_close(kl_p, kl_f, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ce_p, ce_f, rtol=1e-4, atol=1e-4)


def test_finetune_without_the_imported_true_vocab_size_is_refused(tmp_path):
    from tests.test_hf_import import tiny_gpt2

    src, ck = str(tmp_path / "hf"), str(tmp_path / "ck")
    tiny_gpt2(src)
    summary = _quiet(checkpoint_util.main, ["import-hf", "--load", src, "--save", ck,
                                            "--make-vocab-size-divisible-by", "96"])
    assert summary["flags"] == "--true-vocab-size 128"
    base = ["--num-layers", "2", "--max-position-embeddings", "32", "--micro-batch-size", "2", "--train-iters", "1",
            "--load", ck, "--finetune", "--make-vocab-size-divisible-by", "96"]
    # was: trained on with the 64 zero padding rows taking probability (loss 5.26 instead of 4.91)
    with pytest.raises(UserError, match="--true-vocab-size 128"):
        _quiet(pretrain_gpt_moe.main, mock_args(base))


# ---------------------------------------------------------------------------------------------- 4. upcycling


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    ck = str(tmp_path_factory.mktemp("dense") / "ck")
    _quiet(pretrain_gpt_moe.main, mock_args(["--micro-batch-size", "2", "--global-batch-size", "2", "--seq-length",
                                             "32", "--train-iters", "1", "--save", ck]))
    return ck


@pytest.mark.parametrize("flags,message", [
    (["--moe-upcycling-granularity", "1.5"], "argument --moe-upcycling-granularity: invalid int value: '1.5'"),
    (["--moe-upcycling-granularity", "-2"], "--moe-upcycling-granularity -2: must be >= 1"),
])
def test_upcycle_cli_refusals_are_one_line(dense, tmp_path, flags, message):
    save = tmp_path / "x"
    r = subprocess.run([sys.executable, "tools/checkpoint_util.py", "upcycle", "--load", dense, "--save", str(save),
                        "--num-experts", "4"] + flags, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and message in r.stderr, r.stderr
    assert not save.exists()


def test_upcycle_granularity_above_the_width_and_existing_save(dense, tmp_path):
    with pytest.raises(UserError, match="--moe-upcycling-granularity 256 does not divide the dense MLP width "
                                        "--ffn-hidden-size 128"):
        checkpoint_util.main(["upcycle", "--load", dense, "--save", str(tmp_path / "a"), "--num-experts", "256",
                              "--moe-upcycling-granularity", "256"])
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    # was: "... (or --force)", a flag upcycle does not take (argparse then refused it)
    with pytest.raises(UserError) as e:
        checkpoint_util.main(["upcycle", "--load", dense, "--save", str(mine), "--num-experts", "4",
                              "--moe-upcycling-granularity", "2"])
    assert str(e.value) == f"--save {mine} exists and is not empty: choose a new directory; nothing was written"
    assert os.listdir(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep"
    moe = tmp_path / "moe"
    _quiet(checkpoint_util.main, ["upcycle", "--load", dense, "--save", str(moe), "--num-experts", "4", "6",
                                  "--moe-upcycling-granularity", "2"])  # PR-MoE: one count per MoE layer
    with pytest.raises(UserError, match="this checkpoint already has MoE layers; upcycle starts from a dense one"):
        checkpoint_util.main(["upcycle", "--load", str(moe), "--save", str(tmp_path / "b"), "--num-experts", "4",
                              "--moe-upcycling-granularity", "2"])
    assert not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- 5. upstream flags


@pytest.mark.parametrize("argv,every_layer", [
    (["--num-experts", "8", "--moe-router-topk", "2"], True),
    (["--num-experts=8", "--moe-router-topk=2", "--moe-expert-capacity-factor", "1.0"], True),
    (["--num-experts", "8", "--topk", "2"], False),
    # was: Megatron-LM's every-layer default on Megatron-DeepSpeed lines that also name an LM-style flag
    (["--num-experts", "8", "--topk", "2", "--moe-aux-loss-coeff", "0.01"], False),
    (["--num-experts", "8", "--moe-expert-parallel-size=2", "--moe-grouped-gemm"], False),
    (["--num-experts", "8", "--mlp-type", "residual", "--moe-router-topk", "2"], False),
    (["--num-experts", "8", "--expert-interval", "1", "--moe-router-topk", "2"], False),
])
def test_megatron_lm_layer_default_only_for_megatron_lm_lines(argv, every_layer):
    tr = translate_argv(argv)
    assert (tr.argv[-2:] == ["--moe-layer-freq", "1"]) == every_layer
    assert len(tr.notes) == int(every_layer)


def test_transformer_impl_bad_value_is_one_line():
    for argv in (["--transformer-impl", "bogus"], ["--transformer-impl=bogus"]):
        with pytest.raises(UserError) as e:
            translate_argv(argv)
        assert str(e.value) == "--transformer-impl: local or transformer_engine, not 'bogus'"
    assert translate_argv(["--transformer-impl=local"]).argv == []
