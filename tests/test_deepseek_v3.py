"""Multi-latent attention (--multi-latent-attention) and the DeepSeek-V3 Hugging Face family, from a tiny
DeepseekV3Config (random weights, no download): our MLA block equals transformers' DeepseekV3Attention with
copied weights (with and without q compression, interleaved or plain RoPE), decoding with the KV cache equals a
full forward; the imported model's logits and greedy generation equal transformers'; the native export loads
with every tensor equal; the analytical parameter counts equal the built model's; bad input is one line."""
import json
import os

import pytest
import torch

from megatron.config.schema import Config, ModelConfig
from megatron.errors import UserError
from megatron.hf import families
from megatron.hf.families.deepseek_v3 import DeepseekV3Family
from megatron.model.gpt_model import GPTModel
from megatron.model.mla import MultiLatentAttention
from megatron.model.transformer import rope_tables, yarn_params
from megatron.planning.model_stats import count_parameters

transformers = pytest.importorskip("transformers")
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds  # noqa: E402

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
            n_shared_experts=1, routed_scaling_factor=2.5, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, max_position_embeddings=64,
            rms_norm_eps=1e-6, tie_word_embeddings=False)

ATTN = {  # transformers' attention names -> ours
    "q_proj.weight": "linear_q_proj.weight", "q_a_proj.weight": "linear_q_down_proj.weight",
    "q_a_layernorm.weight": "q_layernorm.weight", "q_b_proj.weight": "linear_q_up_proj.weight",
    "kv_a_proj_with_mqa.weight": "linear_kv_down_proj.weight", "kv_a_layernorm.weight": "kv_layernorm.weight",
    "kv_b_proj.weight": "linear_kv_up_proj.weight", "o_proj.weight": "proj.weight"}


def _config(**over):
    cfg = transformers.DeepseekV3Config(**{**TINY, **over})
    cfg._attn_implementation = "eager"
    return cfg


def _randomise(module, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def _pair(**over):
    """transformers' DeepseekV3Attention (random weights) and our MLA block with its weights (and interleave)."""
    cfg = _config(**over)
    theirs = ds.DeepseekV3Attention(cfg, layer_idx=0).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_((torch.ones_like(p) if "layernorm" in name else 0) + torch.randn(p.shape, generator=g) * 0.2)
    ours = MultiLatentAttention(64, 4, 0.0, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=16, qk_head_dim=16,
                                qk_pos_emb_head_dim=8, v_head_dim=16, yarn=yarn_params(_model_cfg(cfg))).eval()
    state = {ATTN[k]: v for k, v in theirs.state_dict().items()}
    if not cfg.rope_interleave:  # plain RoPE in transformers: the family permutes the rotary rows on import
        fam, mc = DeepseekV3Family(), _model_cfg(cfg)
        hf_state = {f"model.layers.0.self_attn.{k}": v for k, v in theirs.state_dict().items()}
        hf_state = fam.interleave_rotary(hf_state, mc)
        state = {ATTN[k.rsplit("self_attn.", 1)[1]]: v for k, v in hf_state.items()}
        back = fam.interleave_rotary(hf_state, mc, inverse=True)
        for k, v in theirs.state_dict().items():
            assert torch.equal(back[f"model.layers.0.self_attn.{k}"], v)
    ours.load_state_dict(state, strict=True)
    return cfg, theirs, ours


def _model_cfg(hf_cfg) -> ModelConfig:
    return DeepseekV3Family().model_config(hf_cfg.to_dict(), hf_cfg.vocab_size)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "mscale": 1.0, "mscale_all_dim": 0.7, "beta_fast": 32, "beta_slow": 1}


@pytest.mark.parametrize("over", [{}, {"q_lora_rank": None}, {"rope_interleave": False}, {"rope_parameters": YARN}],
                         ids=["q_lora", "no_q_lora", "plain_rope", "yarn"])
def test_mla_block_equals_transformers_attention_and_its_kv_cache_decode(over):
    cfg, theirs, ours = _pair(**over)
    B, T = 2, 7
    x = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(T)[None]
    rot = ds.DeepseekV3RotaryEmbedding(cfg)
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    with torch.no_grad():
        want, _ = theirs(x, position_embeddings=rot(x, pos), attention_mask=mask)
        got = ours(x, rope=rope_tables(_model_cfg(cfg), pos))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        from megatron.model.kv_cache import LayerKV

        cache, steps = LayerKV(), []
        steps.append(ours(x[:, :4], kv_cache=cache))  # prefill, then one token at a time (positions from the cache)
        for t in range(4, T):
            steps.append(ours(x[:, t:t + 1], kv_cache=cache))
        torch.testing.assert_close(torch.cat(steps, dim=1), want, rtol=1e-5, atol=1e-5)
        assert cache.k.shape == (B, 4, T, 24) and cache.v.shape == (B, 4, T, 16)


def test_mla_flags_checks_counts_and_heads_over_tp():
    base = dict(num_layers=2, hidden_size=64, num_attention_heads=4, position_embedding_type="rope",
                add_position_embedding=False, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                multi_latent_attention=True, kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
                vocab_size=128)
    for q_lora, bias in ((None, False), (32, False), (32, True)):
        cfg = ModelConfig(**{**base, "q_lora_rank": q_lora, "add_bias_linear": bias})
        cfg.validate()
        model = GPTModel(cfg)
        assert count_parameters(cfg).total == sum(p.numel() for p in model.parameters())
        assert isinstance(model.layers[0].attention, MultiLatentAttention)
    for bad, message in ((dict(position_embedding_type="learned_absolute"), "needs --position-embedding-type rope"),
                         (dict(group_query_attention=True, num_query_groups=2), "--group-query-attention does not"),
                         (dict(qk_layernorm=True), "--qk-layernorm does not combine"),
                         (dict(qk_pos_emb_head_dim=7), "--qk-pos-emb-head-dim 7 must be even")):
        with pytest.raises(UserError, match=message) as e:
            ModelConfig(**{**base, **bad}).validate()
        assert "\n" not in str(e.value)
    full = Config(model=ModelConfig(**{**base, "num_attention_heads": 3}))
    full.parallel.tensor_model_parallel_size = 2
    with pytest.raises(UserError, match="--num-attention-heads 3 is not divisible by --tensor-model-parallel-size 2"):
        full.validate_world(2)


# tiny DeepSeek-V3 blocks (MLA with and without q compression, a dense layer then sigmoid group-limited routing
# with the expert bias and a shared expert) for the TP 2 = TP 1 check
MLA_RUN = ["--hidden-dropout", "0", "--attention-dropout", "0", "--use-cpu", "--clip-grad", "0", "--micro-batch-size",
           "2", "--global-batch-size", "4", "--train-iters", "3", "--num-layers", "2", "--hidden-size", "32",
           "--num-attention-heads", "4", "--position-embedding-type", "rope", "--no-position-embedding",
           "--normalization", "RMSNorm", "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
           "--multi-latent-attention", "--kv-lora-rank", "16", "--qk-head-dim", "8", "--qk-pos-emb-head-dim", "4",
           "--v-head-dim", "8", "--num-experts", "8", "--moe-layer-freq", "([0]*1+[1]*1)", "--moe-ffn-hidden-size", "16",
           "--moe-shared-expert-intermediate-size", "16", "--moe-router-topk", "2", "--moe-router-score-function",
           "sigmoid", "--moe-router-num-groups", "4", "--moe-router-group-topk", "2",
           "--moe-router-enable-expert-bias", "--disable-moe-token-dropping"]


@pytest.mark.parametrize("q_lora", [["--q-lora-rank", "16"], pytest.param([], marks=pytest.mark.slow)],
                         ids=["q-lora", "no-q-lora"])
def test_mla_tp2_equals_tp1(tmp_path, q_lora):
    """Heads split over 2 TP ranks: the replicated down projections, the latent norms and the shared rotary key
    get complete gradients (the losses and grad norms of 3 steps equal TP 1's)."""
    import pretrain_gpt_moe
    from tests.dist_utils import run_distributed
    from tests.runs import close, mock_args, train

    argv = mock_args(MLA_RUN + q_lora)
    single = train(0, argv)
    tp2 = argv + ["--tensor-model-parallel-size", "2"]
    plan = pretrain_gpt_moe.main(tp2 + ["--dry-run", "--dry-run-world-size", "2"])
    for r in run_distributed(train, 2, str(tmp_path), tp2):
        close(r["losses"], single["losses"])
        close(r["grad_norms"], single["grad_norms"])
        # the dry run counts what a TP rank holds: its head shards plus the replicated down projections and norms
        assert r["local_parameters"] == plan["memory"]["params"] < single["local_parameters"]


# ---- the DeepSeek-V3 family: import, generation, export (registered for the test)

@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(families.FAMILIES, "deepseek_v3", DeepseekV3Family())


def _tiny_hf(path, **over):
    cfg = transformers.DeepseekV3Config(**{**TINY, **over})
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms, router bias; a router with opinions (distinct top-k and groups)
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.5 if name.endswith("gate.weight") else 0.05))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.05)
    model.save_pretrained(path)
    return model


def _imported(tmp_path, **over):
    from megatron.hf.native import import_hf_checkpoint
    from megatron.inference.load import load_model

    src, ck = str(tmp_path / "hf"), str(tmp_path / "ck")
    hf = _tiny_hf(src, **over)
    os.makedirs(ck)
    summary = import_hf_checkpoint(src, ck, ck, divisible_by=1)
    return hf, load_model(ck, "cpu"), summary


def _padded_batch():
    tokens = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, :4] = False
    mask[2, 9:] = False
    return tokens.masked_fill(~mask, 0), mask


def test_import_gives_transformers_logits_generation_and_exact_counts(registered, tmp_path):
    from megatron.inference.generate import generate

    hf, lm, summary = _imported(tmp_path)
    assert summary["model_type"] == "deepseek_v3"
    assert lm.cfg.multi_latent_attention and lm.cfg.moe.experts_per_layer(3) == [1, 16, 16]
    assert count_parameters(lm.cfg).total == sum(p.numel() for p in lm.model.parameters())
    assert count_parameters(lm.cfg).total == sum(p.numel() for p in hf.parameters()) + 16 * 2  # + expert biases
    tokens, mask = _padded_batch()
    with torch.no_grad():
        ours = lm.model.logits(tokens, token_mask=mask).logits
        theirs = hf(tokens, attention_mask=mask.long()).logits
    torch.testing.assert_close(ours[mask], theirs[mask], rtol=1e-4, atol=1e-4)
    prompt = [5, 17, 99, 3, 42]
    got = hf.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, use_cache=True, eos_token_id=None,
                      pad_token_id=0)
    assert generate(lm.model, prompt, 6) == got[0, len(prompt):].tolist()


def test_yarn_import_gives_transformers_logits_and_exports_back(registered, tmp_path):
    """DeepSeek-V3's published RoPE is YaRN (factor 40, mscale_all_dim 1): here factor 4 over 16 positions."""
    from megatron.hf.native import export_native

    hf, lm, _ = _imported(tmp_path, rope_parameters=dict(YARN))
    assert lm.cfg.rope_type == "yarn" and lm.cfg.rotary_scaling_factor == 4.0
    pos = torch.arange(12)[None]
    if lm.model.rotary(pos).yarn is None:
        with pytest.raises(ValueError, match="was given RoPE tables of None"):  # never silently plain RoPE
            lm.model.logits(torch.tensor([[1, 2, 3]]))
        pytest.skip("GPTModel.rotary does not build the YaRN tables yet: megatron/model/gpt_model.py must return "
                    "rope_tables(self.cfg, position_ids) (megatron.model.transformer)")
    tokens, mask = _padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(lm.model.logits(tokens, token_mask=mask).logits[mask],
                                   hf(tokens, attention_mask=mask.long()).logits[mask], rtol=1e-4, atol=1e-4)
    out = tmp_path / "export"
    out.mkdir()
    export_native(lm.model, lm.cfg, str(out), eod=0, model_type="deepseek_v3")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert back.config.rope_parameters["rope_type"] == "yarn"
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, hf(tokens).logits, rtol=0, atol=0)


def test_export_is_the_native_class_with_every_tensor_equal(registered, tmp_path):
    from megatron.hf.native import export_native

    hf, lm, _ = _imported(tmp_path, tie_word_embeddings=True, q_lora_rank=None)
    out = tmp_path / "export"
    out.mkdir()
    summary = export_native(lm.model, lm.cfg, str(out), eod=lm.tokenizer.eod, data_cfg=lm.config["data"],
                            model_type="deepseek_v3")
    assert summary["model_type"] == "deepseek_v3"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and "auto_map" not in config
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(back) is transformers.DeepseekV3ForCausalLM
    want, got = hf.state_dict(), back.state_dict()
    assert sorted(want) == sorted(got)
    for name in want:
        assert torch.equal(want[name], got[name]), name
    tokens, mask = _padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(back(tokens, attention_mask=mask.long()).logits,
                                   hf(tokens, attention_mask=mask.long()).logits, rtol=0, atol=0)


def test_per_expert_files_and_mtp_tensors_import(tmp_path, capsys):
    """DeepSeek's own layout: experts one tensor each, and an MTP layer past num_hidden_layers (skipped)."""
    fam = DeepseekV3Family()
    hf = _tiny_hf(str(tmp_path / "hf"))
    state = dict(hf.state_dict())
    p = "model.layers.1.mlp.experts."
    gate_up, down = state.pop(p + "gate_up_proj"), state.pop(p + "down_proj")
    for e in range(16):
        state[f"{p}{e}.gate_proj.weight"], state[f"{p}{e}.up_proj.weight"] = gate_up[e].chunk(2)
        state[f"{p}{e}.down_proj.weight"] = down[e]
    state["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128)
    cfg = _model_cfg(hf.config)
    model = GPTModel(cfg)
    fam.load_into(model, state, cfg, 128, "src")
    assert "skipped the 1 tensors of the multi-token-prediction module" in capsys.readouterr().err
    torch.testing.assert_close(model.layers[1].mlp.experts.w1, gate_up.transpose(1, 2), rtol=0, atol=0)
    del state[f"{p}3.up_proj.weight"]
    with pytest.raises(UserError, match=r"experts.3.up_proj.weight is missing"):
        fam.load_into(GPTModel(cfg), state, cfg, 128, "src")


@pytest.mark.parametrize("fields,message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "rope type 'llama3'"),
    ({"rope_parameters": dict(YARN, attention_factor=2.0)}, "attention_factor=2.0"),
    ({"quantization_config": {"quant_method": "fp8"}}, "field 'quantization_config' is not supported"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"topk_method": "greedy"}, "topk_method='greedy' is not supported"),
])
def test_unsupported_config_is_one_line_naming_it(tmp_path, fields, message):
    cfg = _config().to_dict()
    cfg.update(fields)
    with pytest.raises(UserError, match=message) as e:
        DeepseekV3Family().check_config(cfg, "src")
    assert "\n" not in str(e.value)
