"""lm-eval's own ``hf`` model on an export and our adapter (``megatron-moe``) on the imported checkpoint give the
same loglikelihoods on one local task.

A tiny MoE (8 experts, top-2, random weights, no download) with a word-level tokenizer.json is imported with
``checkpoint_util import-hf``, exported back with ``export-hf`` (the native transformers class, the tokenizer files
carried along), and one list of lm-eval requests is scored by ``lm_eval.models.huggingface.HFLM`` on the export
(fp32, CPU, batched, padded) and by ``MegatronMoELM`` on the checkpoint. The requests come from a small
multiple-choice task written here (a context, then each choice as continuation, as lm-eval's ``multiple_choice``
output type asks; one choice is the model's own greedy continuation), one empty-context request and rolling
loglikelihoods of a text longer than the 64-position window. Per request the loglikelihoods agree to 1e-4 and
the is_greedy flags are equal.

Qwen3-MoE with a tokenizer without BOS (as Qwen's): full parity. Mixtral with a tokenizer that adds BOS (as
Llama's and Mistral's do): parity by default (both add BOS and use it as the empty-context / rolling prefix)
and with ``add_bos_token=False`` given to both.
"""
import pytest

from megatron.inference.generate import generate
from tests.test_hf_families import _word_level_tokenizer
from tests.test_hf_moe_families import tiny_hf

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

EOS, BOS = 127, 126
# (context, choices): word-level text over w0..w125, contexts of different lengths (batches are padded),
# continuations of 1 to 4 tokens
TASK = [
    ("w5 w17 w99 w3 w42 w8 w61", ["w12 w13", "w7", "w100 w101 w102 w103"]),
    ("w1", ["w2 w3 w4", "w9 w9"]),
    ("w20 w20 w20 w20 w20 w20 w20 w20 w20 w20 w20 w20 w20", ["w21 w22", "w20 w20 w20"]),
    ("w64 w32 w16", ["w8 w4 w2 w1", "w0"]),
    ("w77 w78 w79 w80 w81", ["w82 w83 w84", "w11 w12"]),
]
EMPTY_CONTEXT = ("", "w30 w31 w32")
# longer than the 64-position window: lm-eval scores it in rolling windows
ROLLING = [" ".join(f"w{(7 * i + 3) % 126}" for i in range(150)), "w1 w2 w3 w4 w5"]


def _bos_word_level_tokenizer(path):
    """w0..w125, <s> = 126 added in front of every encoding (a Llama-style post-processor), </s> = 127."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {f"w{i}": i for i in range(BOS)}
    vocab.update({"<s>": BOS, "</s>": EOS})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(path)


def _convert(d, family, write_tokenizer):
    from tools import checkpoint_util

    src, ck, out = d / "hf", d / "ck", d / "export"
    tiny_hf(family, str(src))
    write_tokenizer(str(src))
    assert checkpoint_util.main(["import-hf", "--load", str(src), "--save", str(ck)])["tokenizer"] == \
        "HuggingFaceTokenizer"
    checkpoint_util.main(["export-hf", "--load", str(ck), "--save", str(out)])
    assert (out / "tokenizer.json").is_file()  # the export carries the tokenizer files: HFLM reads them there
    return str(ck), str(out)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    return _convert(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe", _word_level_tokenizer)


@pytest.fixture(scope="module")
def mixtral_bos(tmp_path_factory):
    return _convert(tmp_path_factory.mktemp("mixtral"), "mixtral", _bos_word_level_tokenizer)


def _models(ck, export, **hf_kwargs):
    from lm_eval.models.huggingface import HFLM

    from megatron.evaluation.harness_model import MegatronMoELM

    theirs = HFLM(pretrained=export, device="cpu", dtype="float32", batch_size=4, **hf_kwargs)
    ours = MegatronMoELM(load=ck, micro_batch_size=4, device="cpu", **hf_kwargs)
    assert ours.lm.cfg.moe.enabled and not ours.lm.cfg.moe.token_dropping
    assert theirs.max_length == ours.max_length == 64
    return theirs, ours


def _task_args(ours):
    """The task's (context, continuation) pairs, plus the model's own 3-token greedy continuation of the first
    context (so that is_greedy is true somewhere)."""
    ctx = TASK[0][0]
    greedy = generate(ours.model, ours.tok_encode(ctx), 3)
    text = " ".join(f"w{t}" for t in greedy)
    assert len(greedy) == 3 and max(greedy) < BOS, greedy  # plain words: the text encodes back to these ids
    return [(c, " " + choice) for c, choices in TASK for choice in choices] + [(ctx, " " + text)]


def _instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _assert_same(reqs, want, got, abs_tol=1e-4):
    assert len(want) == len(got) == len(reqs)
    for r, (w_ll, w_greedy), (g_ll, g_greedy) in zip(reqs, want, got):
        assert g_ll == pytest.approx(w_ll, abs=abs_tol), r.args
        assert g_greedy == w_greedy, r.args


def test_hf_lm_eval_on_the_export_equals_our_adapter_on_the_import(qwen3_moe):
    theirs, ours = _models(*qwen3_moe)
    assert type(theirs.model).__name__ == "Qwen3MoeForCausalLM"
    args = _task_args(ours) + [EMPTY_CONTEXT]
    reqs = _instances("loglikelihood", args)
    # both sides see the same token ids: the same encoding, the same prefix token for the empty context
    encoded = [ours._encode_pair(c, x) for c, x in args if c]
    assert [theirs._encode_pair(c, x) for c, x in args if c] == encoded
    assert theirs.prefix_token_id == ours.prefix_token_id == EOS
    assert len({len(c) for c, _ in encoded}) >= 4 and max(len(x) for _, x in encoded) >= 4

    want = theirs.loglikelihood(reqs, disable_tqdm=True)
    got = ours.loglikelihood(reqs, disable_tqdm=True)
    _assert_same(reqs, want, got)
    assert len({round(ll, 3) for ll, _ in want}) == len(want)  # distinct, non-trivial scores
    assert any(g for _, g in want) and not all(g for _, g in want)

    rolling = _instances("loglikelihood_rolling", [(t,) for t in ROLLING])
    want = theirs.loglikelihood_rolling(rolling, disable_tqdm=True)
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == pytest.approx(want, abs=1e-3)  # sums of 150


def test_a_bos_tokenizer_gives_parity_without_hflms_bos(mixtral_bos):
    theirs, ours = _models(*mixtral_bos, add_bos_token=False)
    assert type(theirs.model).__name__ == "MixtralForCausalLM"
    reqs = _instances("loglikelihood", _task_args(ours))
    assert all(ctx[0] != BOS for ctx, _ in (theirs._encode_pair(*r.args) for r in reqs))
    _assert_same(reqs, theirs.loglikelihood(reqs, disable_tqdm=True), ours.loglikelihood(reqs, disable_tqdm=True))


def test_a_bos_tokenizer_gives_hflms_default_loglikelihoods(mixtral_bos):
    theirs, ours = _models(*mixtral_bos)
    reqs = _instances("loglikelihood", _task_args(ours) + [EMPTY_CONTEXT])
    # by default both add the tokenizer's BOS and prefix the empty context with it
    assert all(ctx[0] == BOS for ctx, _ in (ours._encode_pair(*r.args) for r in reqs if r.args[0]))
    assert theirs.prefix_token_id == ours.prefix_token_id == BOS
    _assert_same(reqs, theirs.loglikelihood(reqs, disable_tqdm=True), ours.loglikelihood(reqs, disable_tqdm=True))
    rolling = _instances("loglikelihood_rolling", [(t,) for t in ROLLING])
    assert ours.loglikelihood_rolling(rolling, disable_tqdm=True) == \
        pytest.approx(theirs.loglikelihood_rolling(rolling, disable_tqdm=True), abs=1e-3)
