import pytest

import pretrain_gpt_moe
from tests.runs import mock_args

BASE = ["--micro-batch-size", "2", "--global-batch-size", "2", "--num-experts", "4"]


def test_fp16_dynamic_loss_scaling_skips_overflowing_steps():
    out = pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "14", "--fp16", "--initial-loss-scale", str(2.0**24),
                                                  "--hysteresis", "1", "--loss-scale-window", "1000"]))
    assert out["skipped"] >= 1  # 2^24 overflows fp16 gradients
    assert out["loss_scale"] < 2.0**24  # and the scale backed off
    assert out["skipped"] < 14 and len(out["losses"]) == 14


def test_bf16_trains():
    out = pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "3", "--bf16"]))
    assert out["skipped"] == 0 and len(out["losses"]) == 3
    assert all(l == l for l in out["losses"])  # no NaN


def test_bf16_rule_reads_cpu_flags(tmp_path):
    from megatron.planning.precision_probe import bf16_is_fast, cpu_flags, cpu_has_bf16_units

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert cpu_flags(str(info)) == {"fpu", "sse2", "avx", "avx2", "fma"}
    assert cpu_has_bf16_units({"avx", "avx2"}) is False  # an AVX2-only EPYC: the slow fallback
    assert cpu_has_bf16_units({"avx512f", "avx512_bf16"}) is True
    assert cpu_has_bf16_units({"amx_bf16", "amx_tile"}) is True
    assert cpu_has_bf16_units({"fp", "asimd", "bf16"}) is True  # Arm
    assert cpu_flags(str(tmp_path / "absent")) is None
    fast, why = bf16_is_fast("cpu")
    assert fast == bool(cpu_has_bf16_units()) and why


def test_bf16_probe_agrees_with_the_flags_on_this_cpu():
    from megatron.planning.precision_probe import SLOW_RATIO, bf16_matmul_slowdown, cpu_has_bf16_units

    units = cpu_has_bf16_units()
    if units is None:
        pytest.skip("CPU flags unreadable here")
    ratio = bf16_matmul_slowdown(n=96, budget_s=0.2)
    assert ratio > 0
    if not units:  # no bf16 units: measured 28x slower than fp32 on an AVX2-only EPYC
        assert ratio > SLOW_RATIO


def test_bf16_warning_is_one_line_advising_fp32():
    from megatron.planning.precision_probe import bf16_warning, cpu_has_bf16_units, preferred_precision

    w = bf16_warning("cpu")
    if cpu_has_bf16_units():
        assert w is None and preferred_precision("cpu") == "bf16"
    else:
        assert "\n" not in w and "--bf16" in w and "fp32" in w
        assert preferred_precision("cpu") == "fp32"
