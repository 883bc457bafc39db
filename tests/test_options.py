"""Options declared once: the parser is generated from the config dataclasses."""
import argparse
import dataclasses

import pytest

from megatron.config.options import iter_options
from megatron.config.schema import Config, ModelConfig, MoEConfig
from megatron.errors import UserError
from megatron.training.arguments import build_parser, parse_args

MINIMAL = ["--mock-data", "--vocab-size", "64", "--lr", "1e-3", "--train-iters", "1"]


def test_every_option_has_help_and_a_unique_flag():
    parser, names = build_parser()
    paths = [path for path, _, _ in iter_options(Config)]
    assert len(paths) == len(set(paths)) >= 100
    assert set(names.values()) == set(paths)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings


def test_defaults_of_the_parser_are_the_dataclass_defaults():
    cfg = parse_args(MINIMAL)
    ref = Config()
    for path, _, f in iter_options(Config):
        if path in ("model.vocab_size", "data.mock_data", "optimizer.lr", "train.train_iters", "data.tokenizer_type",
                    "dry_run_world_size", "model.ffn_hidden_size", "model.max_position_embeddings"):
            continue
        obj_cfg, obj_ref = cfg, ref
        *parents, name = path.split(".")
        for p in parents:
            obj_cfg, obj_ref = getattr(obj_cfg, p), getattr(obj_ref, p)
        assert getattr(obj_cfg, name) == getattr(obj_ref, name), path
    assert cfg.model.ffn_hidden_size == 4 * cfg.model.hidden_size


def test_values_reach_nested_fields_and_switches_invert():
    cfg = parse_args(MINIMAL + ["--num-experts", "4", "8", "--num-layers", "4", "--disable-moe-token-dropping",
                                "--recompute-activations", "--kd-temp", "2.0", "--moe-noisy-gate-policy", "None"])
    assert cfg.model.moe.num_experts == [4, 8]
    assert cfg.model.moe.token_dropping is False
    assert cfg.model.checkpoint_activations is True
    assert cfg.kd.temperature == 2.0
    assert cfg.model.moe.noisy_gate_policy is None
    assert "model.moe.num_experts" in cfg.flags_given and "model.checkpoint_activations" in cfg.flags_given
    assert "model.hidden_size" not in cfg.flags_given


def test_extra_args_provider_values_reach_the_caller():
    def extra(p: argparse.ArgumentParser):
        p.add_argument("--my-flag", type=int, default=3)
        return p

    assert parse_args(MINIMAL + ["--my-flag", "7"], extra).extra == {"my_flag": 7}
    assert parse_args(MINIMAL, extra).extra == {"my_flag": 3}


@pytest.mark.parametrize("argv,needle", [
    (["--num-layers", "0"], "--num-layers must be >= 1 (got 0)"),
    (["--hidden-dropout", "1.5"], "--hidden-dropout must be in [0, 1)"),
    (["--moe-noisy-gate-policy", "Gauss"], "--moe-noisy-gate-policy must be None, Jitter or RSample"),
    (["--num-experts", "4", "0"], "--num-experts values must be >= 1"),
    (["--lr-decay-style", "step"], "--lr-decay-style"),
    (["--kd-temp", "0", "--kd", "--load-teacher", "x"], "--kd-temp must be > 0"),
    (["--moe-loss-coeff", "1e38"], "--moe-loss-coeff must be in [0, 100]"),  # diverges with finite grad norms
    (["--moe-z-loss-coeff", "1e9"], "--moe-z-loss-coeff must be in [0, 100]"),
    (["--num-experts", "4", "--moe-expert-parallel-size", "3"], "do not divide one another"),
    (["--num-layers", "4", "--pipeline-model-parallel-size", "3"], "4 layers do not split evenly over 3 stages"),
])
def test_per_option_checks_name_the_flag(argv, needle):
    with pytest.raises(UserError) as e:
        parse_args(MINIMAL + argv)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_checks_also_apply_to_configs_built_in_code():
    with pytest.raises(UserError, match="--mlp-type must be one of standard, residual"):
        ModelConfig(moe=MoEConfig(num_experts=[4], mlp_type="pyramid")).validate()
    with pytest.raises(UserError, match="--expert-interval must be >= 1"):
        ModelConfig(moe=MoEConfig(expert_interval=0)).validate()


def test_stored_config_has_only_plain_values():
    d = parse_args(MINIMAL).to_dict()
    assert "extra" not in d and "flags_given" not in d
    assert dataclasses.is_dataclass(Config) and d["model"]["moe"]["num_experts"] == [1]


def test_mock_data_without_a_vocabulary_is_one_line_in_training_and_dry_run():
    from megatron.errors import UserError

    for extra in ([], ["--dry-run"]):
        with pytest.raises(UserError, match=r"^--mock-data needs --vocab-size \(or a real tokenizer via --tokenizer-type\)$"):
            parse_args(["--mock-data", "--lr", "1e-3", "--train-iters", "1", *extra])
    assert parse_args(MINIMAL).data.tokenizer_type == "NullTokenizer"


def test_model_family_is_a_registry_option_stored_with_the_architecture():
    parser, _ = build_parser()
    action = next(a for a in parser._actions if "--model-family" in a.option_strings)
    assert action.default == "gpt" and action.help.endswith("(one of: gpt)")
    with pytest.raises(UserError, match=r"^--model-family must be one of gpt \(got 'mamba'\)$"):
        parse_args(MINIMAL + ["--model-family", "mamba"])
    cfg = parse_args(MINIMAL)
    assert cfg.model.architecture()["model_family"] == "gpt"
    # a checkpoint stored before the field existed reads as the GPT family
    stored = {k: v for k, v in cfg.to_dict()["model"].items() if k != "model_family"}
    assert ModelConfig.from_dict(stored).model_family == "gpt"
