"""The CPU benchmarks in tools/bench run end to end at toy sizes, so that a change in the model cannot leave
them broken until the next time someone measures. They time nothing here; they check the printed tables."""
from __future__ import annotations

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench", script), *args],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    return res.stdout


def test_moe_layer_bench_prints_every_column():
    out = _run("moe_layer.py", "--tokens", "64", "--hidden", "32", "--experts", "4", "--repeats", "1",
               "--threads", "1", "--dtypes", "fp32")
    header = next(line for line in out.splitlines() if line.startswith("| fp32 |"))
    row = next(line for line in out.splitlines() if line.startswith("| E=4 |"))
    assert len(row.split("|")) == len(header.split("|")), (header, row)
    numbers = [float(x) for x in re.findall(r"\d+\.\d+", row)]
    assert len(numbers) >= 8 and all(x >= 0 for x in numbers) and numbers[0] > 0 and numbers[2] > 0, row  # ms > 0


def test_moe_decode_bench_layer_table():
    out = _run("moe_decode.py", "--repeats", "1", "--calls", "2", "--threads", "1", "--tokens", "1,8", "--layer-only")
    rows = [line for line in out.splitlines() if re.match(r"\| (1|8) \| [12] \|", line)]
    assert len(rows) >= 2, out


def test_kd_loss_bench_prints_a_row_per_vocabulary():
    out = _run("kd_loss.py", "--tokens", "64", "--hidden", "16", "--vocab", "128,300", "--repeats", "1")
    rows = [line for line in out.splitlines() if re.match(r"\| (128|300) \|", line)]
    assert len(rows) == 2, out
    for row in rows:
        numbers = [float(x) for x in re.findall(r"\d+\.\d+", row)]
        assert len(numbers) == 5 and all(x > 0 for x in numbers), row


def test_tp_token_split_bench_times_both_settings():
    out = _run("tp_token_split.py", "--repeats", "1", "--iters", "3", "--layers", "2", "--hidden", "32", "--seq", "32")
    rows = re.findall(r"^\| (token split \(default\)|replicated experts) \| ([0-9.]+) \|$", out, re.M)
    assert len(rows) == 2 and all(float(ms) > 0 for _, ms in rows), out
    assert re.search(r"replicated / split = [0-9.]+x", out), out


def test_memory_bench_records_every_phase_per_rank(tmp_path):
    """tools/bench/memory.py: a tiny GPT at DP=2 under torchrun (ZeRO-1): every phase of every rank measured, with
    its plan, and the save's bytes per rank counted."""
    import json

    out = tmp_path / "memory.json"
    text = _run("memory.py", "--modes", "zero1", "--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "512",
                "--seq", "32", "--steps", "2", "--work-dir", str(tmp_path), "--out", str(out))
    assert "| zero1 | optimizer-step | 1 |" in text and "largest measured / plan" in text, text
    res = json.loads(out.read_text())["results"]
    assert [r["mode"] for r in res] == ["zero1"]
    ranks = res[0]["ranks"]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        for ph in ("runtime", "build", "first-step", "steady-step", "fwd-bwd", "grad-reduce", "optimizer-step",
                   "save", "load"):
            assert r[ph] > 0, (ph, r[ph])
        for ph in ("build", "fwd-bwd", "grad-reduce", "optimizer-step", "save", "load"):
            assert r["plan"][ph]["total"] > r["runtime"], ph
        assert r["plan"]["mode"] == "zero1" and len(r["steps"]) == 2
        assert r["save-wchar"] > 0
    assert res[0]["checkpoint_bytes"] > 0
    if res[0]["bytes_per_rank_named"]:  # the sharded format names its files per rank
        assert all(r["save-bytes"] > 0 for r in ranks)


def test_pipeline_bench_quick_times_every_schedule():
    """tools/bench/pipeline.py --quick: P = 2 on 2 gloo processes, 1F1B / GPipe / interleaved side by side."""
    out = _run("pipeline.py", "--quick")
    rows = [line for line in out.splitlines() if re.match(r"\| 2 \| (2|4) \|", line)]
    assert len(rows) == 2, out
    for row, theory in zip(rows, (("0.33", "0.20"), ("0.20", "0.11"))):
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        assert len(cells) == 11, row
        assert all(float(cells[i]) > 0 for i in (2, 3, 5, 7)), row  # ideal and the three schedules' ms
        assert all(float(cells[i]) < 1 for i in (4, 6, 8)), row  # bubbles (noisy: no lower bound)
        assert tuple(cells[9:]) == theory, row
