"""import-hf: a tiny transformers GPT-2 built here -> our checkpoint with the same logits -> training goes on."""
import json
import os
import subprocess
import sys

import pytest
import torch

import pretrain_gpt_moe
from megatron.errors import UserError
from megatron.inference.load import load_model
from tests.conftest import ROOT
from tests.runs import mock_args
from tools import checkpoint_util

transformers = pytest.importorskip("transformers")


def tiny_gpt2(path, safetensors=True):
    cfg = transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # non-trivial biases and norms, so a transposed or swapped tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    if not safetensors:
        torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
        os.remove(os.path.join(path, "model.safetensors"))
    return model


@pytest.mark.parametrize("safetensors", [True, False])
def test_import_gives_the_same_logits_and_trains_on(tmp_path, safetensors):
    src, ck = str(tmp_path / "hf"), str(tmp_path / "ck")
    hf = tiny_gpt2(src, safetensors)
    checkpoint_util.main(["import-hf", "--load", src, "--save", ck, "--make-vocab-size-divisible-by", "1"])
    lm = load_model(ck, "cpu")
    assert lm.iteration == 0
    tokens = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm.model.logits(tokens)[0], hf(tokens).logits, rtol=1e-5, atol=1e-5)
    out = pretrain_gpt_moe.main(mock_args(["--num-layers", "2", "--max-position-embeddings", "32",
                                           "--micro-batch-size", "2", "--train-iters", "3", "--load", ck, "--finetune",
                                           "--make-vocab-size-divisible-by", "1", "--save", str(tmp_path / "cont")]))
    assert len(out["losses"]) == 3 and all(x == x for x in out["losses"])


def test_padded_vocabulary_keeps_the_real_distribution_and_exports_unpadded(tmp_path):
    src, ck, out = str(tmp_path / "hf"), str(tmp_path / "ck"), str(tmp_path / "export")
    hf = tiny_gpt2(src)
    checkpoint_util.main(["import-hf", "--load", src, "--save", ck, "--make-vocab-size-divisible-by", "96"])
    lm = load_model(ck, "cpu")
    assert (lm.cfg.vocab_size, lm.cfg.true_vocab_size) == (192, 128)
    tokens = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = lm.model.logits(tokens)[0], hf(tokens).logits
    torch.testing.assert_close(ours[..., :128], theirs, rtol=1e-5, atol=1e-5)
    # the 64 zero padding rows take no probability: the log-probabilities are transformers'
    torch.testing.assert_close(ours.log_softmax(-1)[..., :128], theirs.log_softmax(-1), rtol=1e-5, atol=1e-5)
    checkpoint_util.main(["export-hf", "--load", ck, "--save", out])
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert back.config.vocab_size == 128
    for name, t in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], t, rtol=0, atol=0, msg=name)


def test_unsupported_architecture_is_one_line(tmp_path):
    src = tmp_path / "mistral"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(UserError, match=r"'MistralForCausalLM' is not supported; import-hf supports gpt2 \(GPT2LMHeadModel\)"):
        checkpoint_util.main(["import-hf", "--load", str(src), "--save", str(tmp_path / "ck")])
    r = subprocess.run([sys.executable, "tools/checkpoint_util.py", "import-hf", "--load", str(src), "--save",
                        str(tmp_path / "ck")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "gpt2 (GPT2LMHeadModel)" in r.stderr
    assert not os.path.exists(tmp_path / "ck")
