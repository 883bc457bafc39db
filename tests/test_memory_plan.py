"""The dry run's per-phase memory plan (megatron/planning/dry_run.py phase_plan): every phase printed, each
phase the sum of its named lines, and the modes ordered as their sharding says."""
import os
import re
import subprocess
import sys

import pytest

from megatron.planning.dry_run import PHASES, phase_plan, resolve_vocab_size
from megatron.training.arguments import parse_args
from tests.conftest import ROOT

GPT_200M = ["--num-layers", "12", "--hidden-size", "1024", "--num-attention-heads", "16", "--seq-length", "128",
            "--max-position-embeddings", "128", "--mock-data", "--vocab-size", "50304", "--micro-batch-size", "1",
            "--global-batch-size", "2", "--lr", "1e-4", "--train-iters", "3", "--use-cpu"]
MODES = {"plain": [], "zero1": ["--use-distributed-optimizer"], "zero2": ["--zero-stage", "2"],
         "fsdp2": ["--use-torch-fsdp2"]}


def _cfg(extra):
    cfg = parse_args(GPT_200M + extra)
    cfg.model.vocab_size = resolve_vocab_size(cfg)
    return cfg


def _has_fsdp2() -> bool:
    try:
        parse_args(GPT_200M + MODES["fsdp2"])
    except SystemExit:
        return False
    return True


def test_dry_run_prints_every_phase():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py"), *GPT_200M,
                        "--use-distributed-optimizer", "--dry-run", "--dry-run-world-size", "2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert "> memory plan per phase, rank 0 (ZeRO-1" in r.stdout
    for ph in PHASES:
        line = re.search(rf"^  {ph}:\s+([\d.]+) GiB  = (.*)$", r.stdout, re.M)
        assert line and float(line.group(1)) > 0, (ph, r.stdout)
        assert "runtime" in line.group(2) and "weights" in line.group(2)
    assert re.search(r"^  peak: [\d.]+ GiB at ", r.stdout, re.M)


def test_each_phase_is_the_sum_of_its_lines_and_holds_the_transients():
    plan = phase_plan(_cfg(MODES["zero2"]), 2, runtime_bytes=123)
    assert plan["mode"] == "zero2" and plan["dp"] == 2
    for ph in PHASES:
        lines = plan[ph]["lines"]
        assert plan[ph]["total"] == sum(b for _, b in lines) and ("runtime (python + torch, before the model)", 123) in lines
    names = {ph: " ".join(n for n, _ in plan[ph]["lines"]) for ph in PHASES}
    assert "activations" in names["fwd-bwd"] and "reduce-scatter bucket" in names["grad-reduce"]
    assert "ZeRO update + all-gather chunks" in names["optimizer-step"] and "replica check" in names["save"]


def test_sharding_orders_the_modes():
    modes = [m for m in MODES if m != "fsdp2" or _has_fsdp2()]
    plans = {m: phase_plan(_cfg(MODES[m]), 2) for m in modes}
    step = {m: p["optimizer-step"]["total"] for m, p in plans.items()}
    peak = {m: max(p[ph]["total"] for ph in PHASES) for m, p in plans.items()}
    assert step["zero2"] < step["zero1"] < step["plain"]
    assert peak["zero1"] < peak["plain"] and peak["zero2"] < peak["zero1"]
    if "fsdp2" in plans:
        assert plans["fsdp2"]["mode"] == "fsdp2" and step["fsdp2"] < step["zero2"]
    one = phase_plan(_cfg(MODES["zero1"]), 1)  # one rank: nothing to shard (Adam whole), no replica to check
    assert ("Adam m, v (fp32, shard)", plans["plain"]["optimizer-step"]["lines"][3][1]) in one["optimizer-step"]["lines"]
    assert one["save_parts"]["replica_check"] == 0 and plans["plain"]["save_parts"]["replica_check"] > 0
    # the sharded writer handles one piece at a time (its copy and its serialisation buffer), whatever the mode:
    # no longer a copy of everything a ZeRO rank writes
    assert plans["plain"]["save_parts"]["format_staging"] == plans["zero1"]["save_parts"]["format_staging"] > 0
    assert plans["zero1"]["save_parts"]["format_staging"] < plans["zero1"]["optimizer-step"]["total"] / 4


@pytest.mark.parametrize("script", ["gpt_6.7B_dense", "gpt_1.3B_moe128"])
def test_paper_scripts_print_the_phase_plan(script):
    r = subprocess.run(["bash", os.path.join(ROOT, "examples_moe", script + ".sh"), "--dry-run"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stderr
    for ph in PHASES:
        assert re.search(rf"^  {ph}:\s+[\d.]+ GiB", r.stdout, re.M), (ph, r.stdout)


def test_the_plan_uses_the_replica_checks_chunk():
    from megatron.planning import dry_run
    from megatron.training import agreement

    assert dry_run.CHECKSUM_CHUNK == agreement.CHECKSUM_CHUNK
