"""import-hf / export-hf for the dense Llama-style families (Llama, Qwen2, Qwen3), built here from tiny
transformers configs (random weights, no download): our logits and greedy KV-cache generation equal
transformers', the native export loads in AutoModelForCausalLM with every tensor equal, bad input is one line."""
import json
import os

import pytest
import torch

from megatron.errors import UserError
from megatron.hf.native import export_native, import_hf_checkpoint
from megatron.inference.generate import generate, generate_greedy_batch
from megatron.inference.load import load_model

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    # tied output layer, q/k/v biases, a RoPE base of its own
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 50000.0})),
    # qk-norm, head_dim 24 (nh * hd != hidden)
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(tie_word_embeddings=False, head_dim=24)),
}


def tiny_hf(family, path, **over):
    config_cls, model_cls, extra = FAMILIES[family]
    cfg = config_cls(**{**TINY, **extra, **over})
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped or transposed tensor would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model


def imported(family, tmp_path, **over):
    src, ck = str(tmp_path / "hf"), str(tmp_path / "ck")
    hf = tiny_hf(family, src, **over)
    os.makedirs(ck)
    summary = import_hf_checkpoint(src, ck, ck, divisible_by=1)
    return hf, load_model(ck, "cpu"), summary


def padded_batch():
    """tokens [3, 12] and attention mask: a full row, a left-padded row, a right-padded row."""
    tokens = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, 9:] = False
    return tokens.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_gives_transformers_logits_and_greedy_generation(family, tmp_path):
    hf, lm, summary = imported(family, tmp_path)
    assert summary["model_type"] == family and "--swiglu" in summary["flags"]
    tokens, mask = padded_batch()
    with torch.no_grad():
        ours = lm.model.logits(tokens, token_mask=mask).logits
        theirs = hf(tokens, attention_mask=mask.long()).logits
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-4, atol=1e-4)
    prompt = [5, 17, 99, 3, 42]
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, use_cache=True, eos_token_id=None,
                      pad_token_id=0)
    assert generate(lm.model, prompt, 6) == got[0, len(prompt):].tolist()
    prompts = [[7, 8, 9, 10, 11, 12], [3, 4]]  # left-padded batch: positions counted per row
    ids = torch.tensor([[7, 8, 9, 10, 11, 12], [0, 0, 0, 0, 3, 4]])
    att = torch.tensor([[1] * 6, [0, 0, 0, 0, 1, 1]])
    got = hf.generate(ids, attention_mask=att, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert generate_greedy_batch(lm.model, prompts, 5) == got[:, 6:].tolist()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_is_the_native_class_with_every_tensor_equal(family, tmp_path):
    hf, lm, _ = imported(family, tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    summary = export_native(lm.model, lm.cfg, str(out), eod=lm.tokenizer.eod, data_cfg=lm.config["data"])
    assert summary["model_type"] == family
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family][1].__name__] and "auto_map" not in config
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back) is FAMILIES[family][1]
    want, got = hf.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    tokens, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens, attention_mask=mask.long()).logits,
                                   hf(tokens, attention_mask=mask.long()).logits, rtol=0, atol=0)


def test_sharded_safetensors_import_and_a_missing_shard_names_the_file(tmp_path):
    src = str(tmp_path / "hf")
    hf = tiny_hf("llama", src)
    hf.save_pretrained(src, max_shard_size="40KB")
    index = json.loads(open(os.path.join(src, "model.safetensors.index.json")).read())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    os.remove(os.path.join(src, "model.safetensors"))  # the unsharded file of the first save
    ck = str(tmp_path / "ck")
    os.makedirs(ck)
    import_hf_checkpoint(src, ck, ck, divisible_by=1)
    tokens, _ = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(load_model(ck, "cpu").model.logits(tokens).logits, hf(tokens).logits,
                                   rtol=1e-4, atol=1e-4)
    os.remove(os.path.join(src, shards[-1]))
    with pytest.raises(UserError, match=f"shard {shards[-1]} named by model.safetensors.index.json is missing"):
        import_hf_checkpoint(src, str(tmp_path / "ck2"), str(tmp_path / "ck2"))


def _config_dir(tmp_path, family, **fields):
    config_cls = FAMILIES[family][0]
    d = tmp_path / family
    d.mkdir(exist_ok=True)
    cfg = config_cls(**TINY).to_dict()
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("family,fields,message", [
    ("qwen2", {"use_sliding_window": True}, "config.json use_sliding_window=True is not supported by the qwen2 import"),
    ("qwen3", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types="),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_type 'llama3' .* is not supported"),
    ("llama", {"rope_parameters": None, "rope_scaling": {"type": "yarn", "factor": 4.0}},
     "rope_scaling type 'yarn'"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama", {"attention_bias": True}, "attention_bias=True with mlp_bias=False"),
    ("llama", {"quantization_config": {"quant_method": "fp8"}}, "field 'quantization_config' is not supported"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True is not supported"),
])
def test_unsupported_config_field_is_one_line_naming_it(tmp_path, family, fields, message):
    src = _config_dir(tmp_path, family, **fields)
    with pytest.raises(UserError, match=message) as e:
        import_hf_checkpoint(src, str(tmp_path / "ck"), str(tmp_path / "ck"))
    assert "\n" not in str(e.value)


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(UserError, match="'MistralForCausalLM' is not supported; import-hf supports gpt2 "
                                        r"\(GPT2LMHeadModel\), llama \(LlamaForCausalLM\), qwen2"):
        import_hf_checkpoint(str(d), str(tmp_path / "ck"), str(tmp_path / "ck"))


def test_import_train_export_gives_our_logits_in_transformers(tmp_path):
    """import -> 3 training steps with the block flags the import reports -> export-hf's writer -> transformers."""
    import pretrain_gpt_moe
    from megatron.hf.export import write_export
    from tests.runs import mock_args

    _, _, summary = imported("qwen3", tmp_path)
    ck, trained, out = str(tmp_path / "ck"), str(tmp_path / "trained"), tmp_path / "export"
    pretrain_gpt_moe.main(mock_args(summary["flags"].split() + [
        "--load", ck, "--finetune", "--save", trained, "--micro-batch-size", "2", "--train-iters", "3",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--make-vocab-size-divisible-by", "1"]))
    lm = load_model(trained, "cpu")
    assert lm.iteration == 3
    out.mkdir()
    assert write_export(lm, str(out))["kind"] == "transformers Qwen3ForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens, attention_mask=mask.long()).logits[mask],
                                   lm.model.logits(tokens, token_mask=mask).logits[mask], rtol=1e-4, atol=1e-4)


def _word_level_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(127)}
    vocab["</s>"] = 127
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>").save_pretrained(path)


def test_tokenizer_json_comes_along_both_ways(tmp_path):
    src, ck, out = str(tmp_path / "hf"), str(tmp_path / "ck"), tmp_path / "export"
    tiny_hf("llama", src)
    _word_level_tokenizer(src)
    os.makedirs(ck)
    assert import_hf_checkpoint(src, ck, ck, divisible_by=1)["tokenizer"] == "HuggingFaceTokenizer"
    lm = load_model(ck, "cpu")
    assert lm.tokenizer.tokenize("w5 w17 w99") == [5, 17, 99] and lm.tokenizer.eod == 127
    out.mkdir()
    summary = export_native(lm.model, lm.cfg, str(out), eod=lm.tokenizer.eod, data_cfg=lm.config["data"])
    assert "tokenizer.json" in summary["tokenizer"]
    theirs = transformers.AutoTokenizer.from_pretrained(str(out))
    assert theirs("w5 w17 w99")["input_ids"] == [5, 17, 99] and theirs.eos_token_id == 127


def test_gpt2_directories_still_import_through_the_dispatch(tmp_path):
    from tests.test_hf_import import tiny_gpt2

    src, ck = str(tmp_path / "hf"), str(tmp_path / "ck")
    hf = tiny_gpt2(src)
    os.makedirs(ck)
    assert import_hf_checkpoint(src, ck, ck, divisible_by=1)["model_type"] == "gpt2"
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_model(ck, "cpu").model.logits(tokens).logits, hf(tokens).logits,
                                   rtol=1e-5, atol=1e-5)
