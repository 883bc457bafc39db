"""The DeepSpeed JSON of Megatron-DeepSpeed's launch scripts, read field by field into our flags."""
import json

import pytest

from megatron.config.compat.ds_config import read_deepspeed_config
from megatron.errors import UserError


def ds_json(tmp_path, **over):
    """The fields Megatron-DeepSpeed's MoE template has, filled as its scripts' sed step fills them."""
    cfg = {
        "train_batch_size": 256, "train_micro_batch_size_per_gpu": 4, "steps_per_print": 10,
        "zero_optimization": {"stage": 1}, "gradient_clipping": 1.0, "prescale_gradients": False,
        "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1,
                 "initial_scale_power": 11},
        "bf16": {"enabled": False},
        "curriculum_learning": {"enabled": False, "curriculum_type": "seqlen", "min_difficulty": 80,
                                "max_difficulty": 2048, "schedule_type": "fixed_linear",
                                "schedule_config": {"total_curriculum_step": 100, "difficulty_step": 8}},
        "wall_clock_breakdown": True,
    }
    cfg.update(over)
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg, indent=2))
    return str(path)


def test_template_fields_map_to_flags(tmp_path):
    ds = read_deepspeed_config(ds_json(tmp_path))
    values, notes = ds.resolve({})
    assert values == {"global_batch_size": 256, "micro_batch_size": 4, "log_interval": 10, "zero_stage": 1,
                      "clip_grad": 1.0, "fp16": True, "bf16": False, "loss_scale": None,
                      "loss_scale_window": 500, "hysteresis": 2, "min_loss_scale": 1.0,
                      "initial_loss_scale": 2.0 ** 11}
    assert notes == [] and ds.curriculum is None and ds.wall_clock_breakdown and not ds.prescale_gradients


def test_agreeing_flags_pass_and_contradiction_names_both(tmp_path):
    ds = read_deepspeed_config(ds_json(tmp_path))
    values, _ = ds.resolve({"global_batch_size": 256, "micro_batch_size": 4, "hysteresis": 2, "clip_grad": 1})
    assert values["zero_stage"] == 1 and "global_batch_size" not in values
    with pytest.raises(UserError, match=r"train_batch_size = 256 contradicts --global-batch-size 512"):
        ds.resolve({"global_batch_size": 512})
    with pytest.raises(UserError, match=r"zero_optimization.stage = 1 contradicts --zero-stage 2"):
        ds.resolve({"zero_stage": 2})
    with pytest.raises(UserError, match=r"gradient_clipping = 1.0 contradicts --clip-grad 0.5"):
        ds.resolve({"clip_grad": 0.5})
    # steps_per_print only fills --log-interval when it is not typed
    assert ds.resolve({"log_interval": 1})[0].get("log_interval") is None


def test_precision_from_json_wins_with_a_warning(tmp_path):
    # Megatron-DeepSpeed's MoE-128 scripts type --fp16 and write bf16 into the JSON; DeepSpeed runs bf16
    ds = read_deepspeed_config(ds_json(tmp_path, fp16={"enabled": False}, bf16={"enabled": True}))
    values, notes = ds.resolve({"fp16": True})
    assert values["fp16"] is False and values["bf16"] is True and "loss_scale" not in values
    assert len(notes) == 1 and "bf16 in the JSON overrides --fp16" in notes[0]


def test_fp16_defaults_are_deepspeeds_and_soft(tmp_path):
    ds = read_deepspeed_config(ds_json(tmp_path, fp16={"enabled": True}))
    values, _ = ds.resolve({"initial_loss_scale": 4096.0})
    assert values["loss_scale_window"] == 1000 and values["hysteresis"] == 2 and values["loss_scale"] is None
    assert "initial_loss_scale" not in values  # the typed flag beats DeepSpeed's default 2**16
    assert ds.resolve({})[0]["initial_loss_scale"] == 2.0 ** 16
    static = read_deepspeed_config(ds_json(tmp_path, fp16={"enabled": True, "loss_scale": 128}))
    assert static.resolve({})[0]["loss_scale"] == 128.0


def test_unused_fields_in_one_warning_line(tmp_path):
    path = ds_json(tmp_path, zero_optimization={"stage": 2, "overlap_comm": True, "reduce_bucket_size": 2e8,
                                                "offload_optimizer": {"device": "cpu", "pin_memory": True}},
                   optimizer={"type": "AdamW", "params": {"lr": 2e-5}}, zero_allow_untested_optimizer=True)
    ds = read_deepspeed_config(path)
    values, notes = ds.resolve({})
    assert values["zero_stage"] == 2
    assert len(notes) == 1 and "\n" not in notes[0]
    for name in ("zero_optimization.overlap_comm", "zero_optimization.reduce_bucket_size",
                 "zero_optimization.offload_optimizer.device", "optimizer.type", "optimizer.params.lr",
                 "zero_allow_untested_optimizer"):
        assert name in notes[0]
    assert "train_batch_size" not in notes[0]


def test_gradient_accumulation_identity(tmp_path):
    ds = read_deepspeed_config(ds_json(tmp_path, gradient_accumulation_steps=8))
    ds.check_batch(256, 4, 8)
    with pytest.raises(UserError, match=r"gradient_accumulation_steps 8 x micro batch 4 x data-parallel size 4 = 128"):
        ds.check_batch(256, 4, 4)
    (tmp_path / "g").mkdir()
    no_total = json.loads(open(ds_json(tmp_path / "g", gradient_accumulation_steps=2)).read())
    del no_total["train_batch_size"]
    p = tmp_path / "g.json"
    p.write_text(json.dumps(no_total))
    assert read_deepspeed_config(str(p)).global_batch_from_accumulation(4, 2) == 16


def test_curriculum_block_is_read(tmp_path):
    cl = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 72, "max_difficulty": 2048,
          "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 20728, "difficulty_step": 8}}
    ds = read_deepspeed_config(ds_json(tmp_path, curriculum_learning=cl))
    c = ds.curriculum
    assert (c.min_difficulty, c.max_difficulty, c.schedule_type, c.total_curriculum_step, c.difficulty_step) == \
        (72, 2048, "fixed_linear", 20728, 8)


@pytest.mark.parametrize("text, message", [
    ('{"train_batch_size": CONFIG_BATCH_SIZE}', r"line 1 column 22: not valid JSON .*CONFIG_BATCH_SIZE is a template placeholder"),
    ('{\n "steps_per_print": 10,\n}', r"line 3 column 1: not valid JSON"),
    ('[1, 2]', r"the top level must be a JSON object"),
    ('{"train_batch_size": "256"}', r"train_batch_size must be an integer \(got \"256\"\)"),
    ('{"zero_optimization": {"stage": 4}}', r"zero_optimization.stage 4 is not supported"),
    ('{"fp16": {"enabled": true}, "bf16": {"enabled": true}}', r"fp16.enabled and bf16.enabled are both true"),
    ('{"curriculum_learning": {"enabled": true, "curriculum_type": "vocabularyrarity", "min_difficulty": 1, '
     '"max_difficulty": 2}}', r"curriculum_type 'vocabularyrarity' is not supported"),
    ('{"curriculum_learning": {"enabled": true, "min_difficulty": 64, "max_difficulty": 32, '
     '"schedule_config": {"total_curriculum_step": 10}}}', r"min_difficulty 64 must be in \[1, max_difficulty 32\]"),
])
def test_bad_json_is_one_line_naming_the_file(tmp_path, text, message):
    p = tmp_path / "bad.json"
    p.write_text(text)
    with pytest.raises(UserError, match=message) as e:
        read_deepspeed_config(str(p))
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"no such file \(the launch script writes it from its TEMPLATE.json"):
        read_deepspeed_config(str(tmp_path / "absent.json"))


def test_the_json_is_read_once_and_every_reader_gets_the_same_object(tmp_path, monkeypatch):
    from megatron.config import schema
    from megatron.config.compat import ds_config, upstream_flags
    from megatron.training.arguments import parse_args
    from tests.runs import mock_args

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2}))
    reads = []

    def counting_read(p):
        reads.append(p)
        return ds_config.read_deepspeed_config(p)

    monkeypatch.setattr(upstream_flags, "read_deepspeed_config", counting_read)
    monkeypatch.setattr(schema, "read_deepspeed_config", counting_read)
    cfg = parse_args(mock_args(["--train-iters", "1", "--deepspeed_config", str(path)]))
    cfg.validate_world(2)
    assert cfg.deepspeed.read() is cfg.deepspeed.read()
    assert reads == [str(path)]
    assert "_parsed" not in cfg.to_dict()["deepspeed"]
