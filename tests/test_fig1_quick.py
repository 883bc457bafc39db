"""The Fig. 1 / PR-MoE / MoS study end to end in its --quick mode: every arm trains, the report and the
plots are written, and a second invocation resumes instead of retraining."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, SHARED_DATA, require_shared

ARMS = ["prmoe", "dense_4S", "moe32", "moe8", "dense_S", "mos_kd", "student_nokd", "dense_S_seed2"]


def _run(out, *extra):
    env = dict(os.environ, PYTHONPATH=ROOT, MEGATRON_MOE_DATA=SHARED_DATA)
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "experiments", "fig1_small.py"), "--quick",
                           "--out", str(out), *extra], capture_output=True, text=True, env=env, timeout=900)


@pytest.mark.slow
def test_fig1_quick_end_to_end_and_resume(tmp_path):
    require_shared("corpus", "gutenberg", "train.txt")
    require_shared("eval")
    out = tmp_path / "fig1"
    r = _run(out)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = (out / "report.md").read_text()
    for arm in ARMS:
        done = json.loads((out / "runs" / arm / "done.json").read_text())
        assert math.isfinite(done["final_valid_loss"]) and 5.0 < done["final_valid_loss"] < 8.0, (arm, done)
        assert done["curve"][-1][0] == 8  # the last evaluation is at the last iteration
        cmd = (out / "runs" / arm / "cmd.txt").read_text()
        assert "pretrain_gpt_moe.py" in cmd and "--train-data-path" in cmd
    assert "--mos --load-teacher" in (out / "runs" / "mos_kd" / "cmd.txt").read_text()
    assert "--mlp-type residual" in (out / "runs" / "prmoe" / "cmd.txt").read_text()
    assert len(re.findall(r"^\| .* \| [0-9.]+M \| [0-9.]+M \|", report, re.M)) == len(ARMS)
    assert "fraction of the S -> 4S gap closed" in report and "Seed noise" in report
    for svg in ("fig1_loss_vs_tokens.svg", "fig1_loss_vs_flops.svg"):
        assert (out / svg).read_text().count("<polyline") == len(ARMS)
    # parameters vs quality: the 6-layer models, one point each (dense S, 4S, MoE-8, MoE-32, PR-MoE)
    assert (out / "fig1_params_vs_loss.svg").read_text().count("<circle") == 5
    assert "LAMBADA" in (out / "zeroshot.md").read_text()
    # Resume: an arm whose completion marker is gone restarts from its checkpoint and trains nothing more.
    (out / "runs" / "moe8" / "done.json").unlink()
    before = json.loads((out / "runs" / "dense_S" / "done.json").read_text())
    r = _run(out, "--skip-zeroshot", "--speed", "--speed-iters", "4", "--speed-rounds", "1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    speed = json.loads((out / "speed.json").read_text())["tokens_per_s"]
    assert sorted(speed) == sorted(ARMS) and min(speed.values()) > 0, speed
    assert "measured side by side" in (out / "report.md").read_text()
    assert "start moe8" in r.stdout and "start dense_S " not in r.stdout
    log = (out / "runs" / "moe8" / "train.log").read_text()
    assert "loaded checkpoint" in log.lower() or "resum" in log.lower(), log[-1500:]
    assert json.loads((out / "runs" / "moe8" / "done.json").read_text())["final_valid_loss"] == pytest.approx(
        json.loads((out / "runs" / "moe8" / "done.json").read_text())["curve"][-1][1])
    assert json.loads((out / "runs" / "dense_S" / "done.json").read_text()) == before
