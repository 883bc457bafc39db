"""Llama-style blocks chosen by flags (RoPE, RMSNorm, SwiGLU, GQA, qk-norm, no biases, untied output layer):
options and their checks, exact parameter counts, pipeline stage parts, TP=2 equals TP=1."""
import pytest
import torch

from megatron.config.pipeline_layout import build_layout
from megatron.config.schema import ModelConfig
from megatron.errors import UserError
from megatron.model.fused import RMSNorm
from megatron.model.gpt_model import GPTModel
from megatron.parallel.pipeline.stage_model import keep_stage_parts
from megatron.planning.model_stats import count_parameters
from megatron.training.arguments import parse_args
from tests.dist_utils import run_distributed
from tests.runs import close, mock_args, train

LLAMA = ["--position-embedding-type", "rope", "--no-position-embedding", "--normalization", "RMSNorm", "--swiglu",
         "--disable-bias-linear", "--group-query-attention", "--num-query-groups", "2", "--qk-layernorm",
         "--untie-embeddings-and-output-weights", "--norm-epsilon", "1e-6", "--rotary-base", "500000"]
SPEC = dict(position_embedding_type="rope", add_position_embedding=False, normalization="RMSNorm", swiglu=True,
            add_bias_linear=False, group_query_attention=True, num_query_groups=2, qk_layernorm=True,
            untie_embeddings_and_output_weights=True)


def test_flags_build_the_llama_block():
    cfg = parse_args(mock_args(LLAMA + ["--lr", "1e-3", "--train-iters", "1"]))
    m = cfg.model
    assert (m.rope, m.learned_positions, m.normalization, m.swiglu, m.add_bias_linear, m.num_kv_heads) == \
           (True, False, "RMSNorm", True, False, 2)
    assert m.layernorm_epsilon == 1e-6 and m.rotary_base == 500000.0 and m.untie_embeddings_and_output_weights
    assert m.ffn_hidden_size == 64  # Megatron-LM's SwiGLU default int(8H/3 / 64) * 64 for H = 32
    model = GPTModel(m)
    model.init_weights(3)
    assert model.position_embeddings is None
    assert tuple(model.output_layer.weight.shape) == (128, 32)
    att = model.layers[0].attention
    assert att.qkv.bias is None and tuple(att.qkv.weight.shape) == ((4 + 2 * 2) * 8, 32)
    norms = [mod for mod in model.modules() if isinstance(mod, RMSNorm)]
    assert len(norms) == 4 * 4 + 1 and all(bool((n.weight == 1).all()) for n in norms)
    assert not torch.equal(model.output_layer.weight, model.word_embeddings.weight)


@pytest.mark.parametrize("fields,message", [
    (dict(num_query_groups=2), "--num-query-groups needs --group-query-attention"),
    (dict(group_query_attention=True), "--group-query-attention needs --num-query-groups"),
    (dict(group_query_attention=True, num_query_groups=3), "--num-query-groups 3 does not divide"),
    (dict(normalization="BatchNorm"), "--normalization must be one of LayerNorm, RMSNorm"),
    (dict(position_embedding_type="alibi"), "--position-embedding-type must be one of"),
    (dict(rotary_percent=0.0), r"--rotary-percent must be in \(0, 1\]"),
])
def test_bad_block_flags_are_one_line(fields, message):
    with pytest.raises(UserError, match=message):
        ModelConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, **fields).validate()


def test_tp_must_divide_the_query_groups():
    cfg = parse_args(mock_args(LLAMA + ["--lr", "1e-3", "--train-iters", "1", "--tensor-model-parallel-size", "4",
                                        "--num-attention-heads", "4"]))
    with pytest.raises(UserError, match="--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"):
        cfg.validate_world(4)


@pytest.mark.parametrize("spec", [SPEC, dict(SPEC, normalization="LayerNorm", add_bias_linear=True),
                                  dict(SPEC, add_qkv_bias=True, kv_channels=12, rotary_percent=0.5,
                                       untie_embeddings_and_output_weights=False, qk_layernorm=False),
                                  dict(add_position_embedding=False, swiglu=True)])
def test_parameter_counts_are_exact(spec):
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, num_layers=2, **spec)
    cfg.validate()
    assert sum(p.numel() for p in GPTModel(cfg).parameters()) == count_parameters(cfg).total


@pytest.mark.parametrize("untied", [True, False])
def test_pipeline_stage_parts(untied):
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, num_layers=4,
                      **dict(SPEC, untie_embeddings_and_output_weights=untied))
    layout = build_layout(4, 2, None, None, None)
    first, last = (GPTModel(cfg).to("meta") for _ in range(2))
    keep_stage_parts(first, layout, 0)
    keep_stage_parts(last, layout, 1)
    assert first.word_embeddings is not None and first.final_layernorm is None
    assert last.final_layernorm is not None and first.position_embeddings is None
    if untied:
        assert last.word_embeddings is None and first.output_layer is None
        assert last.output_layer.weight.shape == (128, 32)
    else:
        assert getattr(last.word_embeddings.weight, "pipeline_tied_copy", False)


def test_rope_decode_with_cache_equals_the_full_forward():
    cfg = ModelConfig(vocab_size=128, hidden_size=32, num_attention_heads=4, num_layers=2, hidden_dropout=0.0,
                      attention_dropout=0.0, **SPEC)
    model = GPTModel(cfg).eval()
    model.init_weights(5)
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model.logits(tokens).logits
        cache = model.new_cache()
        first = model.decode(tokens[:, :6], cache, all_logits=True).logits
        steps = [model.decode(tokens[:, t:t + 1], cache).logits for t in range(6, 9)]
    assert cache[0].k.shape == (2, 2, 9, 8)  # the grouped key heads are cached
    torch.testing.assert_close(torch.cat([first] + steps, dim=1), full, rtol=1e-5, atol=1e-5)


EXACT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--use-cpu", "--clip-grad", "0",
         "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3"]


def test_tp2_equals_tp1_llama_block(tmp_path):
    argv = mock_args(EXACT + LLAMA)
    single = train(0, argv)
    tp2 = run_distributed(train, 2, str(tmp_path), argv + ["--tensor-model-parallel-size", "2"])
    for r in tp2:
        close(r["losses"], single["losses"])
        close(r["grad_norms"], single["grad_norms"])


def test_pp2_equals_one_process_llama_block_tied(tmp_path):
    """RoPE tables made on every stage, GQA, qk-norm, SwiGLU through the pipeline (tied output layer: the untied
    one needs the runner to skip the tied-gradient sum, see stage_model.keep_stage_parts)."""
    flags = [f for f in LLAMA if f != "--untie-embeddings-and-output-weights"]
    argv = mock_args(EXACT + flags + ["--global-batch-size", "8", "--eval-interval", "3"])
    single = train(0, argv)
    pp2 = run_distributed(train, 2, str(tmp_path), argv + ["--pipeline-model-parallel-size", "2"])
    for r in pp2:
        close(r["losses"], single["losses"])
        close(r["grad_norms"], single["grad_norms"])
