"""Today's MoE families in our MoE layer: transformers' sparse MoE blocks (Mixtral, Qwen2-MoE with its gated
shared expert, Qwen3-MoE, OLMoE, DeepSeek-V3 with sigmoid scores, groups, expert bias, scaling and shared
experts) copied into an MoELayer with the matching flags give the same outputs (fp32, no dropping), on the
dispatched path and the small-batch decode path; SwiGLU / bias-free experts equal the loop oracle on every
kernel path; the Megatron-LM routing flags (pre-softmax, normalisation, groups, balancing losses, capacity);
--moe-layer-freq; EP=2 equals EP=1 for a sigmoid + groups + shared-expert layer on 2 gloo processes."""
import pytest
import torch

from megatron.config.moe import MoEConfig
from megatron.errors import UserError
from megatron.model.moe import hf_layouts
from megatron.model.moe.experts import StackedExperts
from megatron.model.moe.layer import MoELayer
from tests.dist_utils import run_distributed
from tests.moe_oracle import loop_experts, loop_moe_reference

transformers = pytest.importorskip("transformers")

H, F = 32, 16

# family -> (transformers block, its config kwargs, the flags we expect from hf_layouts.moe_options_from_hf_config)
FAMILIES = {
    "mixtral": ("mixtral.modeling_mixtral.MixtralSparseMoeBlock", "MixtralConfig",
                dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=F),
                dict(num_experts=[8], topk=2, router_load_balancing_type="aux_loss")),
    "qwen2_moe": ("qwen2_moe.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock", "Qwen2MoeConfig",
                  dict(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=F, shared_expert_intermediate_size=24,
                       norm_topk_prob=False, mlp_only_layers=[0]),
                  dict(num_experts=[8], topk=4, router_pre_softmax=True, shared_expert_intermediate_size=24,
                       shared_expert_gate=True, layer_freq="([0]*1+[1]*3)")),
    "qwen3_moe": ("qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock", "Qwen3MoeConfig",
                  dict(num_experts=16, num_experts_per_tok=8, moe_intermediate_size=F, norm_topk_prob=True,
                       decoder_sparse_step=2),
                  dict(num_experts=[16], topk=8, router_load_balancing_type="aux_loss", layer_freq="([0]*1+[1]*1+[0]*1+[1]*1)")),
    "olmoe": ("olmoe.modeling_olmoe.OlmoeSparseMoeBlock", "OlmoeConfig",
              dict(num_experts=16, num_experts_per_tok=8, intermediate_size=F, norm_topk_prob=False),
              dict(num_experts=[16], topk=8, router_pre_softmax=True)),
    "deepseek_v3": ("deepseek_v3.modeling_deepseek_v3.DeepseekV3MoE", "DeepseekV3Config",
                    dict(n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=F, n_shared_experts=1,
                         n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1),
                    dict(num_experts=[16], topk=4, router_score_function="sigmoid", router_num_groups=4,
                         router_group_topk=2, router_topk_scaling_factor=2.5, router_enable_expert_bias=True,
                         router_load_balancing_type="seq_aux_loss", shared_expert_intermediate_size=F,
                         layer_freq="([0]*1+[1]*3)")),
}
LAYERS = 4


def _hf_config(family):
    _, config_name, hf_kw, _ = FAMILIES[family]
    return getattr(transformers, config_name)(hidden_size=H, hidden_act="silu", num_hidden_layers=LAYERS, **hf_kw)


def _hf_block(family, seed=0):
    import importlib

    path = FAMILIES[family][0]
    module, cls = path.rsplit(".", 1)
    config = _hf_config(family)
    block = getattr(importlib.import_module(f"transformers.models.{module}"), cls)(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            std = 1.0 if name == "gate.weight" else 0.2  # a router with opinions: distinct top-k, groups
            t.copy_(torch.randn(t.shape, generator=g) * std)
    return block.eval()


def _our_layer(family, **overrides):
    """Our layer with the flags moe_options_from_hf_config derives from the family's config (checked against
    FAMILIES' expectations)."""
    block_config = _hf_config(family).to_dict()
    kw = hf_layouts.moe_options_from_hf_config(block_config)
    for key, want in FAMILIES[family][3].items():
        assert kw.get(key) == want, (family, key, kw.get(key), want)
    assert kw["moe_ffn_hidden_size"] == F and kw["token_dropping"] is False
    cfg = MoEConfig(**{**kw, **overrides})
    cfg.validate(LAYERS)
    return MoELayer(cfg, H, 4 * H, cfg.num_experts[0], layer_number=1, gated=True, bias=False)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_block_weights_give_the_same_output(family):
    """Copy a transformers MoE block's weights into our layer (hf_layouts): outputs equal within 1e-5 on the
    dispatched path (with gradients), the small-batch decode path, and back through the export mapping."""
    block = _hf_block(family)
    layer = _our_layer(family)
    sd = hf_layouts.moe_block_from_hf(block.state_dict())
    missing, unexpected = layer.load_state_dict(sd, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    layer.eval()
    x = torch.randn(2, 12, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = block(x.clone())
    xg = x.clone().requires_grad_()
    got, stats = layer(xg)  # grad enabled: the dispatched path
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    got.sum().backward()
    assert xg.grad is not None and torch.isfinite(stats.aux_loss)
    with torch.no_grad():  # a few tokens under no_grad: the small-batch decode path
        few = x[:1, :3]
        torch.testing.assert_close(layer(few)[0], block(few.clone()), rtol=1e-5, atol=1e-5)
    shared_prefix = "shared_expert." if family == "qwen2_moe" else "shared_experts."
    back = hf_layouts.moe_block_to_hf(layer.state_dict(), shared_prefix=shared_prefix)
    ref = block.state_dict()
    assert set(back) == set(ref)
    for k in ref:
        torch.testing.assert_close(back[k].to(ref[k].dtype), ref[k], rtol=0, atol=0, msg=k)


def test_published_configs_map_to_valid_flags_and_bad_ones_are_one_line():
    """transformers' default configs (the published sizes) map to flags that validate; DeepSeek-V3's three dense
    first layers are Megatron-LM's ([0]*3+[1]*58); what we do not implement is refused by name."""
    for name in ("MixtralConfig", "Qwen2MoeConfig", "Qwen3MoeConfig", "OlmoeConfig", "DeepseekV3Config"):
        config = getattr(transformers, name)().to_dict()
        kw = hf_layouts.moe_options_from_hf_config(config)
        MoEConfig(**kw).validate(config["num_hidden_layers"])
    ds = hf_layouts.moe_options_from_hf_config(transformers.DeepseekV3Config().to_dict())
    assert ds["layer_freq"] == "([0]*3+[1]*58)" and ds["router_num_groups"] == 8 and ds["topk"] == 8
    assert MoEConfig(**ds).router_type == "megatron_aux_free"
    mixtral = transformers.MixtralConfig().to_dict()
    for bad, msg in [({"model_type": "llama"}, "model_type 'llama' is not a sparse MoE family"),
                     ({"router_jitter_noise": 0.1}, "router_jitter_noise"), ({"hidden_act": "gelu"}, "hidden_act")]:
        with pytest.raises(UserError, match=msg):
            hf_layouts.moe_options_from_hf_config({**mixtral, **bad})


def test_mixtral_equals_the_deepspeed_top2_router_in_evaluation():
    """Mixtral's routing is DeepSpeed's top-2 (softmax, top-2, renormalised) in evaluation without dropping."""
    block = _hf_block("mixtral")
    cfg = MoEConfig(num_experts=[8], topk=2, token_dropping=False, moe_ffn_hidden_size=F)
    assert cfg.router_type == "topk"
    layer = MoELayer(cfg, H, 4 * H, 8, layer_number=0, gated=True, bias=False).eval()
    layer.load_state_dict(hf_layouts.moe_block_from_hf(block.state_dict()))
    x = torch.randn(1, 16, H, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(layer(x)[0], block(x.clone()), rtol=1e-5, atol=1e-5)


def test_per_expert_layout_round_trip():
    w1, w2 = torch.randn(4, H, 2 * F), torch.randn(4, F, H)
    gate, up, down = hf_layouts.experts_to_per_expert(w1, w2)
    assert gate[0].shape == (F, H) and down[0].shape == (H, F)
    a, b = hf_layouts.experts_from_per_expert(gate, up, down)
    assert torch.equal(a, w1) and torch.equal(b, w2)
    with pytest.raises(ValueError, match="experts.0.w1.weight"):
        hf_layouts.moe_block_from_hf({"gate.weight": torch.zeros(4, H), "experts.gate_up_proj": torch.zeros(4, 2 * F, H),
                                      "experts.down_proj": torch.zeros(4, H, F), "experts.0.w1.weight": torch.zeros(1)})


# ---- SwiGLU / bias-free experts against the loop oracle -------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_swiglu_experts_equal_loop_oracle_on_every_kernel_path(bias):
    torch.manual_seed(0)
    E, C = 4, 6
    for path in ("padded", "padded-fused", "grouped_mm", "grouped_mm-fused", "grouped-padded"):
        ex = StackedExperts(E, H, F, gated=True, bias=bias)
        ex.init_weights(0, 0, 0.2, 0.2)
        if bias:
            with torch.no_grad():
                ex.b1.normal_(0, 0.1), ex.b2.normal_(0, 0.1)
        ref = StackedExperts(E, H, F, gated=True, bias=bias)
        ref.load_state_dict(ex.state_dict())
        assert ex.w1.shape == (E, H, 2 * F) and (ex.b1 is None) == (not bias)
        if path.startswith("padded"):
            x = torch.randn(E, C, H)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya = ex.forward(xa, fused=path.endswith("fused"))
            yb = loop_experts(ref, xb)
        else:
            counts = torch.tensor([3, 0, 5, 2])
            x = torch.randn(int(counts.sum()), H)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            kernel = "padded" if path == "grouped-padded" else "grouped_mm"
            ya = ex.forward_grouped(xa, counts, kernel=kernel, fused=path.endswith("fused"))
            rows, start = [], 0
            for e, n in enumerate(counts.tolist()):
                rows.append(loop_experts(ref, xb[start:start + n][None].expand(E, n, H))[e])
                start += n
            yb = torch.cat(rows)
        g = torch.randn_like(ya)
        (ya * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5, msg=path)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5, msg=path)
        for (n, p), q in zip(ex.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=f"{path} {n}")


def test_fine_grained_layer_equals_loop_reference_with_shared_experts():
    """--moe-ffn-hidden-size, GeLU experts with biases, a gated GeLU shared expert: the layer equals the loop."""
    cfg = MoEConfig(num_experts=[8], topk=3, token_dropping=False, moe_ffn_hidden_size=8,
                    shared_expert_intermediate_size=12, shared_expert_gate=True, router_load_balancing_type="aux_loss")
    layer = MoELayer(cfg, H, 64, 8, layer_number=0)
    assert layer.experts.w1.shape == (8, H, 8) and layer.shared_experts.fc1.weight.shape == (12, H)
    torch.manual_seed(0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(20, H)
    y, _ = layer(x[None])
    torch.testing.assert_close(y[0], loop_moe_reference(layer, x), rtol=1e-5, atol=1e-5)


# ---- the Megatron-LM routing flags ----------------------------------------------------------------------------

def _router(**kw):
    from megatron.model.moe.routers import build_router

    cfg = MoEConfig(num_experts=[8], **kw)
    cfg.validate(2)
    r = build_router(H, 8, cfg)
    torch.nn.init.normal_(r.wg.weight, 0, 1.0)
    return r, cfg


def test_router_resolution_from_the_flags():
    assert MoEConfig(num_experts=[8]).router_type == "topk"
    assert MoEConfig(num_experts=[8], router_enable_expert_bias=True).router_type == "aux_free"
    assert MoEConfig(num_experts=[8], router_pre_softmax=True).router_type == "megatron"
    c = MoEConfig(num_experts=[8], router_score_function="sigmoid", router_type="aux_free")
    assert c.router_type == "megatron_aux_free" and c.router_enable_expert_bias
    assert MoEConfig(**{**c.__dict__}).router_type == "megatron_aux_free"  # a saved config reloads to itself


def test_softmax_normalised_and_pre_softmax_weights():
    torch.manual_seed(0)
    x = torch.randn(10, H)
    r, _ = _router(topk=3, router_load_balancing_type="aux_loss")
    routing = r(x)
    probs = torch.softmax(x @ r.wg.weight.t(), -1)
    top = probs.topk(3, dim=-1)
    assert torch.equal(routing.indices, top.indices)
    torch.testing.assert_close(routing.weights, top.values / top.values.sum(-1, keepdim=True))
    # Megatron-LM's form: softmax over the k top logits
    logits = x @ r.wg.weight.t()
    torch.testing.assert_close(routing.weights, torch.softmax(logits.topk(3, -1).values, -1))
    r2, _ = _router(topk=3, router_pre_softmax=True)
    r2.load_state_dict(r.state_dict())
    torch.testing.assert_close(r2(x).weights, top.values)  # not renormalised
    r3, _ = _router(topk=3, router_pre_softmax=True, router_norm_topk_prob=True, router_topk_scaling_factor=2.0)
    r3.load_state_dict(r.state_dict())
    torch.testing.assert_close(r3(x).weights, 2 * top.values / top.values.sum(-1, keepdim=True))


def test_sigmoid_groups_and_bias_choose_inside_the_best_groups():
    torch.manual_seed(0)
    r, _ = _router(topk=2, router_score_function="sigmoid", router_num_groups=4, router_group_topk=1,
                   router_enable_expert_bias=True)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 5.0]))  # group 3 wins every token's choice
    x = torch.randn(6, H)
    routing = r(x)
    assert set(routing.indices.reshape(-1).tolist()) == {6, 7}
    s = torch.sigmoid(x @ r.wg.weight.t())[:, 6:]
    torch.testing.assert_close(routing.weights.sort(-1).values, (s / s.sum(-1, keepdim=True)).sort(-1).values)
    assert torch.allclose(routing.probs.sum(-1), torch.ones(6))  # the balancing loss's scores sum to 1


def test_balancing_losses_are_one_when_balanced():
    from megatron.model.moe.routing import sequence_balancing_loss, switch_balancing_loss

    E, S = 4, 8  # top-2
    probs = torch.full((S, E), 1.0 / E)
    indices = torch.tensor([[0, 1], [2, 3]] * (S // 2))
    assert switch_balancing_loss(probs, indices).item() == pytest.approx(1.0)
    seq = torch.arange(S) // 4
    assert sequence_balancing_loss(probs, indices, seq).item() == pytest.approx(1.0)
    skew = torch.tensor([[0, 1]] * S)  # every token on experts 0 and 1
    assert sequence_balancing_loss(probs, skew, seq).item() == pytest.approx(1.0)  # uniform probs: still 1
    p2 = torch.tensor([[0.5, 0.5, 0, 0]] * S)  # ... and the probabilities agree: twice the balanced loss
    assert sequence_balancing_loss(p2, skew, seq).item() == pytest.approx(2.0)
    assert switch_balancing_loss(p2, skew).item() == pytest.approx(2.0)
    r, _ = _router(topk=2, router_load_balancing_type="none")
    assert r(torch.randn(5, H)).aux_loss.item() == 0


def test_megatron_router_under_a_capacity_drops_without_renormalising():
    cfg = MoEConfig(num_experts=[4], topk=2, router_load_balancing_type="aux_loss", eval_capacity_factor=0.5,
                    min_capacity=0)
    layer = MoELayer(cfg, H, F, 4, layer_number=0, gated=True, bias=False).eval()
    torch.manual_seed(0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(1, 16, H)
    y, stats = layer(x)
    assert stats.dropped.item() > 0
    nodrop = MoELayer(MoEConfig(**{**cfg.__dict__, "token_dropping": False}), H, F, 4, layer_number=0, gated=True,
                      bias=False).eval()
    nodrop.load_state_dict(layer.state_dict())
    routing = layer.router(x[0])
    kept = y[0]
    full = nodrop(x)[0][0]
    # a token keeps its kept choices' outputs at their original weights: the no-drop output minus the dropped ones
    for s in range(16):
        contrib = [routing.weights[s, j] * layer.experts.expert_forward(int(routing.indices[s, j]), x[0, s:s + 1])[0]
                   for j in range(2)]
        options = [torch.zeros(H), contrib[0], contrib[1], full[s]]
        assert any(torch.allclose(kept[s], o, atol=1e-5) for o in options), s


def test_fp64_router_and_padding_out_of_the_sequence_loss():
    """--moe-router-dtype fp64 routes like fp32 (fp32 outputs); with a padding mask, the per-sequence loss counts
    each row's real tokens only (rows of different lengths), as the unpadded rows do."""
    r32, _ = _router(topk=2, router_load_balancing_type="seq_aux_loss")
    r64, _ = _router(topk=2, router_load_balancing_type="seq_aux_loss", router_dtype="fp64")
    r64.load_state_dict(r32.state_dict())
    x = torch.randn(9, H)
    a, b = r32(x), r64(x)
    assert b.weights.dtype == torch.float32 and torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.weights, b.weights)
    cfg = MoEConfig(num_experts=[4], topk=2, token_dropping=False, router_load_balancing_type="seq_aux_loss",
                    router_score_function="sigmoid")
    layer = MoELayer(cfg, H, F, 4, layer_number=0, gated=True, bias=False)
    torch.manual_seed(0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    x = torch.randn(2, 6, H)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    _, stats = layer(x, token_mask=mask)
    probs_ids = torch.cat([torch.zeros(6, dtype=torch.long), torch.ones(3, dtype=torch.long)])
    real = torch.cat([x[0], x[1, :3]])
    want = layer.router(real, probs_ids).aux_loss
    torch.testing.assert_close(stats.aux_loss, want)
    solo = [layer.router(x[0]).aux_loss, layer.router(x[1, :3]).aux_loss]  # one sequence each: the switch loss
    torch.testing.assert_close(stats.aux_loss, (solo[0] + solo[1]) / 2)


def test_swiglu_experts_follow_bf16_autocast():
    layer = _our_layer("deepseek_v3")
    torch.manual_seed(0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.2)
    x = torch.randn(1, 10, H)
    want = layer(x)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)[0]
    assert got.dtype in (torch.bfloat16, torch.float32)
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.1)


# ---- --moe-layer-freq ------------------------------------------------------------------------------------------

def test_moe_layer_freq_integer_and_patterns():
    assert MoEConfig(num_experts=[4], layer_freq="1").experts_per_layer(3) == [4, 4, 4]
    assert MoEConfig(num_experts=[4], layer_freq="2").experts_per_layer(4) == [4, 1, 4, 1]  # Megatron-LM: i % N
    assert MoEConfig(num_experts=[4], expert_interval=2).experts_per_layer(4) == [1, 4, 1, 4]  # ours: (i+1) % n
    cfg = MoEConfig(num_experts=[4], layer_freq="([0]*1+[1]*3)")
    assert cfg.experts_per_layer(4) == [1, 4, 4, 4]
    cfg.validate(4)
    assert MoEConfig(num_experts=[2, 4], layer_freq="[0,1,1]").experts_per_layer(3) == [1, 2, 4]
    assert MoEConfig(num_experts=[1], layer_freq="[0,1]", force_layer=True).is_moe_layer(1, 1)
    with pytest.raises(UserError, match="--moe-layer-freq .* gives 3 layers but --num-layers is 4"):
        MoEConfig(num_experts=[4], layer_freq="[0,1,1]").validate(4)
    for bad in ("__import__('os')", "[0,2]", "[0]*", "[1]+"):
        with pytest.raises(UserError, match="--moe-layer-freq"):
            MoEConfig(num_experts=[4], layer_freq=bad).validate(4)
    with pytest.raises(UserError, match="--num-experts has 2 values .* --moe-layer-freq"):
        MoEConfig(num_experts=[4, 4], layer_freq="1").validate(3)


def test_megatron_routing_checks_are_one_line():
    cases = [
        (dict(router_num_groups=4), "go together"),
        (dict(router_num_groups=3, router_group_topk=1), "does not divide"),
        (dict(router_num_groups=4, router_group_topk=1, topk=3), "raise --moe-router-group-topk"),
        (dict(router_num_groups=2, router_group_topk=3), "exceeds --moe-router-num-groups"),
        (dict(shared_expert_gate=True), "needs --moe-shared-expert-intermediate-size"),
        (dict(shared_expert_intermediate_size=8, mlp_type="residual"), "choose one"),
        (dict(router_score_function="sigmoid", noisy_gate_policy="RSample", topk=1), "RSample"),
        (dict(router_score_function="tanh"), "--moe-router-score-function must be one of"),
    ]
    for kw, msg in cases:
        with pytest.raises(UserError, match=msg):
            MoEConfig(num_experts=[8], **{"topk": 2, **kw}).validate(2)


def test_flags_parse_from_the_command_line():
    from megatron.training.arguments import build_parser

    parser, names = build_parser()
    for flag in ("--moe-router-score-function", "--moe-router-pre-softmax", "--moe-router-topk-scaling-factor",
                 "--moe-router-num-groups", "--moe-router-group-topk", "--moe-router-enable-expert-bias",
                 "--moe-router-load-balancing-type", "--moe-router-dtype", "--moe-layer-freq",
                 "--moe-ffn-hidden-size", "--moe-shared-expert-intermediate-size", "--moe-shared-expert-gate",
                 "--moe-router-norm-topk-prob", "--moe-router-topk"):
        assert flag in names, flag
    ns = parser.parse_args(["--moe-router-norm-topk-prob", "false", "--moe-layer-freq", "([0]*3+[1]*58)"])
    assert getattr(ns, names["--moe-router-norm-topk-prob"]) is False
    assert getattr(ns, names["--moe-layer-freq"]) == "([0]*3+[1]*58)"
    ns = parser.parse_args(["--moe-router-load-balancing-type", "none", "--moe-router-dtype", "fp64"])
    assert getattr(ns, names["--moe-router-load-balancing-type"]) == "none"  # "none" is a value, not unset
    for bad in (["--moe-router-norm-topk-prob", "maybe"], ["--moe-router-load-balancing-type", "sinkhorn"]):
        with pytest.raises(UserError):
            parser.parse_args(bad)


# ---- expert parallelism ----------------------------------------------------------------------------------------

EP_KW = dict(num_experts=[8], topk=3, router_score_function="sigmoid", router_num_groups=4, router_group_topk=2,
             router_topk_scaling_factor=2.5, router_enable_expert_bias=True, shared_expert_intermediate_size=12,
             moe_ffn_hidden_size=F, router_load_balancing_type="seq_aux_loss", eval_capacity_factor=0.5, min_capacity=0)


def test_ep2_and_tp2_split_equal_one_process_for_sigmoid_groups_and_shared_experts(tmp_path):
    """EP=2 (all-to-all) and the TP=2 token split: outputs, the input, router, shared-expert and expert gradients,
    and the sequence balancing loss equal the one-process layer's, with and without a capacity."""
    results = run_distributed(_ep_worker, 2, str(tmp_path))
    for r in results:
        for name, (got, want) in r.items():
            torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5, msg=name)  # sums of ~100-sized terms


def _ep_worker(rank):
    import torch.distributed as dist

    from megatron.parallel.expert_parallel import AllToAllDispatcher, apply_expert_parallel
    from megatron.parallel.state import build_groups

    dist.init_process_group("gloo", rank=rank, world_size=2)
    pairs = {}
    ps = build_groups(rank, 2, 1, torch.device("cpu"), tp_size=2)  # EP 1 x TP 2: both ranks route the same tokens
    for dropping in (False, True):
        cfg = MoEConfig(token_dropping=dropping, **EP_KW)
        torch.manual_seed(0)
        full = MoELayer(cfg, H, 64, 8, layer_number=1, gated=True, bias=False)
        full.experts.init_weights(0, 1, 0.3, 0.3)
        for name, p in full.named_parameters():
            if not name.startswith("experts."):
                torch.nn.init.normal_(p, 0, 0.5)
        ep = MoELayer(cfg, H, 64, 8, layer_number=1, ep_rank=rank, ep_size=2, gated=True, bias=False)
        ep.experts.init_weights(0, 1, 0.3, 0.3)
        ep.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("experts.")}, strict=False)
        ep.set_dispatcher(AllToAllDispatcher(dist.group.WORLD, 2, 8, torch.device("cpu")))
        full.eval(), ep.eval()
        S = 24 if dropping else 24 + 8 * rank
        x = torch.randn(2, S // 2, H, generator=torch.Generator().manual_seed(rank + 1))
        g = torch.randn_like(x)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, sa = full(xa)
        yb, sb = ep(xb)
        ((ya * g).sum() + sa.aux_loss).backward()
        ((yb * g).sum() + sb.aux_loss).backward()
        for p in full.experts.parameters():
            dist.all_reduce(p.grad)
        sl = slice(4 * rank, 4 * rank + 4)
        case = "capacity" if dropping else "no-drop"
        assert (sa.dropped.item() > 0) == dropping
        got = {"y": (yb, ya), "x.grad": (xb.grad, xa.grad), "aux": (sb.aux_loss, sa.aux_loss),
               "router.grad": (ep.router.wg.weight.grad, full.router.wg.weight.grad),
               "shared.fc1.grad": (ep.shared_experts.fc1.weight.grad, full.shared_experts.fc1.weight.grad),
               "w1.grad": (ep.experts.w1.grad, full.experts.w1.grad[sl]),
               "w2.grad": (ep.experts.w2.grad, full.experts.w2.grad[sl])}
        for k, (a, b) in got.items():
            pairs[f"{case} {k}"] = (a.detach().clone(), b.detach().clone())

        tp = MoELayer(MoEConfig(token_dropping=dropping, **EP_KW), H, 64, 8, layer_number=1, gated=True, bias=False)
        tp.load_state_dict(full.state_dict())
        apply_expert_parallel(tp, ps)
        tp.eval()
        gen = torch.Generator().manual_seed(7)
        x = torch.randn(2, 12, H, generator=gen)  # the same tokens and output gradient on both TP ranks
        g = torch.randn(x.shape, generator=gen)
        full.zero_grad()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, sa = full(xa)
        yb, sb = tp(xb)
        ((ya * g).sum() + sa.aux_loss).backward()
        ((yb * g).sum() + sb.aux_loss).backward()
        for p in tp.experts.parameters():  # each TP rank's expert gradient covers its share of the tokens
            dist.all_reduce(p.grad, group=ps.tp_group)
        got = {"y": (yb, ya), "x.grad": (xb.grad, xa.grad), "router.grad": (tp.router.wg.weight.grad,
               full.router.wg.weight.grad), "shared.fc2.grad": (tp.shared_experts.fc2.weight.grad,
               full.shared_experts.fc2.weight.grad), "w1.grad": (tp.experts.w1.grad, full.experts.w1.grad)}
        for k, (a, b) in got.items():
            pairs[f"tp2 {case} {k}"] = (a.detach().clone(), b.detach().clone())
    dist.destroy_process_group()
    return pairs
