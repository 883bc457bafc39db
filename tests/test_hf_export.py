"""export-hf round trips: every checkpoint kind loads in transformers with our logits, generate() equals our
greedy generation, AutoTokenizer gives our ids, lm-eval's own `hf` model scores like our adapter."""
import json
import os
import subprocess
import sys

import pytest
import torch

import pretrain_gpt_moe
from megatron.errors import UserError
from megatron.inference.generate import generate
from megatron.inference.load import load_model
from tests.conftest import ROOT, require_shared
from tests.runs import mock_args

transformers = pytest.importorskip("transformers")
from tools import checkpoint_util  # noqa: E402

RUN = ["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "3", "--seq-length", "32"]
KINDS = {
    "dense": [],
    "moe_top1": ["--num-experts", "4"],
    "moe_top2": ["--num-experts", "4", "--topk", "2"],
    "prmoe": ["--num-experts", "2", "4", "--mlp-type", "residual"],
    "residual_top2": ["--num-experts", "4", "--mlp-type", "residual", "--topk", "2"],
    # a large bias step so that the selection-only bias changes which experts are chosen
    "aux_free": ["--num-experts", "4", "--moe-router-type", "aux_free", "--moe-router-bias-update-rate", "0.05"],
}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    out = {}
    for name, extra in KINDS.items():
        ck = str(d / name)
        pretrain_gpt_moe.main(mock_args(RUN + extra + ["--save", ck]))
        out[name] = (ck, str(d / (name + "_hf")))
        checkpoint_util.main(["export-hf", "--load", ck, "--save", out[name][1]])
    # a Mixture-of-Students student: 2 layers, distilled from the 4-layer PR-MoE teacher
    ck = str(d / "mos")
    pretrain_gpt_moe.main(mock_args(RUN + ["--num-layers", "2", "--num-experts", "2", "--mlp-type", "residual", "--mos",
                                           "--load-teacher", out["prmoe"][0], "--save", ck]))
    out["mos_student"] = (ck, str(d / "mos_hf"))
    checkpoint_util.main(["export-hf", "--load", ck, "--save", out["mos_student"][1]])
    return out


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()


@pytest.mark.parametrize("kind", list(KINDS) + ["mos_student"])
def test_export_loads_in_transformers_with_our_logits(exports, kind):
    ck, out = exports[kind]
    hf = hf_model(out)
    cfg = json.load(open(os.path.join(out, "config.json")))
    if kind == "dense":
        assert type(hf).__name__ == "GPT2LMHeadModel"
    else:
        assert type(hf).__name__ == "MegatronMoEForCausalLM" and "auto_map" in cfg
        assert os.path.isfile(os.path.join(out, "modeling_megatron_moe.py"))
    ours = load_model(ck, "cpu").model
    tokens = torch.randint(0, 127, (3, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours.logits(tokens)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "moe_top2", "prmoe"])
def test_generate_with_kv_cache_equals_our_greedy_generation(exports, kind):
    ck, out = exports[kind]
    hf = hf_model(out)
    ours = load_model(ck, "cpu").model
    prompt = [5, 17, 99, 3, 42]
    expected = generate(ours, prompt, 12)
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, use_cache=True, eos_token_id=None,
                      pad_token_id=0)
    assert got[0, len(prompt):].tolist() == expected
    assert len(expected) == 12


def test_exported_directory_loads_in_a_process_without_megatron(exports, tmp_path):
    """The export travels: a fresh interpreter started elsewhere loads and runs it without importing our package
    (``megatron`` may be installed, e.g. editable, but the export's own code must not need it)."""
    _, out = exports["residual_top2"]
    ours = "any(k == 'megatron' or k.startswith('megatron.') for k in sys.modules)"
    code = (f"import sys, torch, transformers; assert not {ours};"
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True);"
            f"print(m(torch.tensor([[1, 2, 3]])).logits.shape); assert not {ours}, 'the export imported megatron'")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code, out], cwd=str(tmp_path), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torch.Size([1, 3, 128])" in r.stdout


def test_lm_eval_hf_model_scores_like_our_adapter(exports):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from megatron.evaluation.harness_model import MegatronMoELM

    ck, out = exports["moe_top2"]
    ours = MegatronMoELM(load=ck, micro_batch_size=2, device="cpu")
    requests = [(("", ""), [5, 6, 7, 8, 9], [12, 13]), (("", ""), [3], [4]), (("", ""), [1, 2, 3, 4], [5, 6, 7])]
    expected = ours._loglikelihood_tokens(requests, disable_tqdm=True)
    theirs = HFLM(pretrained=hf_model(out), backend="causal", batch_size=2, device="cpu", max_length=32,
                  tokenizer=_null_tokenizer())
    got = theirs._loglikelihood_tokens(requests, disable_tqdm=True)
    for (ll_a, g_a), (ll_b, g_b) in zip(expected, got):
        assert abs(ll_a - ll_b) < 1e-4 and g_a == g_b


def _null_tokenizer():
    """A transformers tokenizer whose ids are the numbers in the text (our NullTokenizer's rule)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {str(i): i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="127", pad_token="0")


def test_auto_tokenizer_gives_our_gpt2_ids(tmp_path):
    from megatron.hf.tokenizer_files import write_tokenizer_files
    from megatron.tokenizer import build_tokenizer

    vocab, merges = require_shared("gpt2", "gpt2-vocab.json"), require_shared("gpt2", "gpt2-merges.txt")
    write_tokenizer_files({"tokenizer_type": "GPT2BPETokenizer", "vocab_file": vocab, "merge_file": merges},
                          str(tmp_path), 1024)
    ours = build_tokenizer("GPT2BPETokenizer", vocab, merges)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    text = open(require_shared("corpus", "wikitext-2-raw", "valid.txt"), encoding="utf-8").read()[:20000]
    text += " Ünïcödé — 東京 🙂 don't  double  spaces\n\n"  # (both keep <|endoftext|> in text as a special token
    # only on transformers' side: we, like Megatron, tokenize it as plain text; documents are separated by id)
    assert theirs(text)["input_ids"] == ours.tokenize(text)
    assert theirs.eos_token_id == ours.eod


def test_auto_tokenizer_gives_our_sentencepiece_ids(tmp_path):
    from megatron.hf.tokenizer_files import write_tokenizer_files
    from megatron.tokenizer import build_tokenizer
    from megatron.tokenizer.sentencepiece_tokenizer import train_sentencepiece

    src = require_shared("corpus", "wikitext-2-raw", "valid.txt")
    model = train_sentencepiece([src], str(tmp_path / "sp"), vocab_size=500, input_sentence_size=20000)
    out = tmp_path / "tok"
    out.mkdir()
    write_tokenizer_files({"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": model}, str(out), 1024)
    ours = build_tokenizer("SentencePieceTokenizer", tokenizer_model=model)
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    lines = open(src, encoding="utf-8").read()[:20000].split("\n") + [" leading space", "trailing  ", "Ünï 東京 🙂"]
    for line in lines:
        assert theirs(line)["input_ids"] == ours.tokenize(line), line


def test_export_refuses_a_save_overlapping_the_load(exports):
    ck, _ = exports["dense"]
    before = sorted(os.listdir(ck))
    for save in (ck, os.path.join(ck, "hf"), os.path.dirname(ck)):
        with pytest.raises(UserError, match="--save .* overlaps --load"):
            checkpoint_util.main(["export-hf", "--load", ck, "--save", save, "--force"])
        with pytest.raises(UserError, match="--save .* overlaps --load"):
            checkpoint_util.main(["reshard", "--load", ck, "--save", save, "--target-expert-parallel-size", "1"])
    assert sorted(os.listdir(ck)) == before
    r = subprocess.run([sys.executable, "tools/checkpoint_util.py", "export-hf", "--load", ck, "--save", ck, "--force"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "overlaps --load" in r.stderr
