"""import-hf / export-hf for the sparse MoE families (Mixtral, Qwen2-MoE with a dense first layer and a gated
shared expert, Qwen3-MoE), built here from tiny transformers configs (random weights, no download): our logits
(no token dropping) and greedy KV-cache generation equal transformers', the native export loads in
AutoModelForCausalLM with every tensor equal, import -> 3 steps at EP=2 on 2 gloo processes -> export gives our
logits in transformers; unsupported fields (and OLMoE, without the model's --qk-layernorm-full) are refused in
one line naming them."""
import json
import os

import pytest
import torch

from megatron.errors import UserError
from megatron.hf.native import export_native, import_hf_checkpoint
from megatron.inference.generate import generate
from megatron.inference.load import load_model
from tests.test_hf_families import padded_batch

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rms_norm_eps=1e-6, num_experts_per_tok=2, router_aux_loss_coef=0.02)
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_local_experts=8, intermediate_size=32, tie_word_embeddings=False)),
    # a dense first layer (mlp_only_layers), a gated shared expert, q/k/v biases, top-k not renormalised
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_hidden_layers=3, num_experts=8, intermediate_size=96, moe_intermediate_size=32,
                       shared_expert_intermediate_size=48, mlp_only_layers=[0], norm_topk_prob=False,
                       tie_word_embeddings=False)),
    # per-head qk-norm, head_dim 24 (nh * hd != hidden), renormalised top-k, tied output layer
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=8, intermediate_size=96, moe_intermediate_size=32, norm_topk_prob=True, head_dim=24,
                       tie_word_embeddings=True)),
    # qk-norm over the whole q / k projections, top-8 of 16 not renormalised
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(num_experts=16, num_experts_per_tok=8, intermediate_size=32, norm_topk_prob=False,
                   tie_word_embeddings=False, pad_token_id=0, eos_token_id=127)),
}


def tiny_hf(family, path, **over):
    config_cls, model_cls, extra = FAMILIES[family]
    cfg = config_cls(**{**TINY, **extra, **over})
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():  # non-trivial norms and a router with opinions (distinct top-k choices)
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 1.0)
            else:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return model


def imported(family, tmp_path, **over):
    src, ck = str(tmp_path / "hf"), str(tmp_path / "ck")
    hf = tiny_hf(family, src, **over)
    os.makedirs(ck)
    summary = import_hf_checkpoint(src, ck, ck, divisible_by=1)
    return hf, load_model(ck, "cpu"), summary


@pytest.mark.parametrize("family", list(FAMILIES))
def test_moe_import_logits_generation_and_native_export(family, tmp_path):
    hf, lm, summary = imported(family, tmp_path)
    assert summary["model_type"] == family
    k = hf.config.num_experts_per_tok
    assert "--disable-moe-token-dropping" in summary["flags"] and f"--moe-router-topk {k}" in summary["flags"]
    assert not lm.cfg.moe.token_dropping and lm.cfg.moe.loss_coeff == pytest.approx(0.02 * k)
    tokens, mask = padded_batch()
    with torch.no_grad():
        ours = lm.model.logits(tokens, token_mask=mask).logits
        theirs = hf(tokens, attention_mask=mask.long()).logits
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-4, atol=1e-4)
    prompt = [5, 17, 99, 3, 42]
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, use_cache=True, eos_token_id=None,
                      pad_token_id=0)
    assert generate(lm.model, prompt, 5) == got[0, len(prompt):].tolist()

    out = tmp_path / "export"
    out.mkdir()
    summary = export_native(lm.model, lm.cfg, str(out), eod=lm.tokenizer.eod, data_cfg=lm.config["data"])
    assert summary["model_type"] == family
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family][1].__name__] and "auto_map" not in config
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back) is FAMILIES[family][1]
    assert back.config.router_aux_loss_coef == pytest.approx(0.02)
    want, got = hf.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    with torch.no_grad():
        torch.testing.assert_close(back(tokens, attention_mask=mask.long()).logits,
                                   hf(tokens, attention_mask=mask.long()).logits, rtol=0, atol=0)


def _train_ep2(rank, argv):
    import pretrain_gpt_moe

    return pretrain_gpt_moe.main(argv)["losses"]


def test_import_train_at_ep2_export_gives_our_logits_in_transformers(tmp_path):
    """import Qwen2-MoE -> 3 steps at EP=2 (2 gloo processes) -> export-hf's writer -> transformers' logits."""
    from megatron.hf.export import write_export
    from tests.dist_utils import run_distributed
    from tests.runs import mock_args

    _, _, summary = imported("qwen2_moe", tmp_path)
    ck, trained, out = str(tmp_path / "ck"), str(tmp_path / "trained"), tmp_path / "export"
    argv = mock_args(summary["flags"].split() + [
        "--load", ck, "--finetune", "--save", trained, "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "3", "--hidden-dropout", "0", "--attention-dropout", "0",
        "--make-vocab-size-divisible-by", "1", "--moe-expert-parallel-size", "2"])
    losses = run_distributed(_train_ep2, 2, str(tmp_path / "run"), argv)[0]
    assert len(losses) == 3 and all(x == x for x in losses)
    lm = load_model(trained, "cpu")
    assert lm.iteration == 3
    out.mkdir()
    assert write_export(lm, str(out))["kind"] == "transformers Qwen2MoeForCausalLM"
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokens, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens, attention_mask=mask.long()).logits[mask],
                                   lm.model.logits(tokens, token_mask=mask).logits[mask], rtol=1e-4, atol=1e-4)


def _config_dir(tmp_path, config_cls, **fields):
    d = tmp_path / "cfg"
    d.mkdir(exist_ok=True)
    cfg = config_cls(**TINY).to_dict()
    cfg.update(fields)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("config_cls,fields,message", [
    (transformers.MixtralConfig, {"sliding_window": 4096}, "config.json sliding_window=4096 is not supported by the "
                                                          "mixtral import"),
    (transformers.MixtralConfig, {"router_jitter_noise": 0.1}, "router_jitter_noise=0.1"),
    (transformers.Qwen2MoeConfig, {"use_sliding_window": True}, "use_sliding_window=True is not supported by the "
                                                               "qwen2_moe import"),
    (transformers.Qwen3MoeConfig, {"use_sliding_window": True}, "use_sliding_window=True"),
    (transformers.Qwen3MoeConfig, {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    (transformers.OlmoeConfig, {"clip_qkv": 8.0}, "clip_qkv=8.0 is not supported"),
])
def test_unsupported_moe_config_is_one_line_naming_it(tmp_path, config_cls, fields, message):
    src = _config_dir(tmp_path, config_cls, **fields)
    with pytest.raises(UserError, match=message) as e:
        import_hf_checkpoint(src, str(tmp_path / "ck"), str(tmp_path / "ck"))
    assert "\n" not in str(e.value)


def test_fused_expert_tensors_import_too(tmp_path):
    """A directory holding transformers 5's in-memory layout (experts.gate_up_proj / down_proj, fused) imports
    like the per-expert one save_pretrained writes."""
    from safetensors.torch import save_file

    src, ck = str(tmp_path / "hf"), str(tmp_path / "ck")
    hf = tiny_hf("mixtral", src)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    os.makedirs(ck)
    import_hf_checkpoint(src, ck, ck, divisible_by=1)
    tokens, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(load_model(ck, "cpu").model.logits(tokens, token_mask=mask).logits[mask],
                                   hf(tokens, attention_mask=mask.long()).logits[mask], rtol=1e-4, atol=1e-4)
