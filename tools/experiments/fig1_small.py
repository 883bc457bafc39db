#!/usr/bin/env python3
"""The paper's claims in miniature on the Gutenberg corpus: Fig. 1 (MoE vs a 4x larger dense model),
PR-MoE, and Mixture-of-Students, each arm an ordinary ``pretrain_gpt_moe.py`` run.

    python tools/experiments/fig1_small.py --out exp_fig1 --preset cpu      # this study on 2 CPU cores
    python tools/experiments/fig1_small.py --out exp_fig1 --preset full     # >= 10M tokens per arm
    python tools/experiments/fig1_small.py --out exp_quick --quick          # a few minutes (CI)

Arms (S = the small dense model; every arm sees the same token stream, ``--seed`` aside):
  dense_S, dense_S_seed2 (noise), dense_4S (2x hidden = ~4x parameters per token, as 350M -> 1.3B),
  moe8 / moe32 (S + top-1 experts on every other layer, capacity 1.0, aux loss 0.01),
  prmoe (S + Residual-MoE with fewer experts in the first MoE layer than in the last two),
  mos_kd (a student with one layer fewer, distilled from prmoe with staged KD: stopped at 70%),
  student_nokd (the same student, LM loss only).

Resumable: each arm saves checkpoints into OUT/runs/<arm>/ckpt and is restarted with ``--load`` on the
same directory when the script is run again; finished arms are skipped. Every command line is written to
OUT/runs/<arm>/cmd.txt. At the end: zero-shot on the paper's six tasks (tools/eval_harness.py), then
OUT/report.md (tables) and OUT/*.svg (validation loss vs tokens and vs training FLOPs).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field

from plotting import svg_plot  # this script's folder is on sys.path

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.environ.get("MEGATRON_MOE_DATA", os.path.join(ROOT, "..", "shared", "data"))

# Sizes per preset. tokens = training tokens per arm; S has `layers` x `hidden`.
PRESETS = {
    "quick": dict(layers=6, hidden=32, heads=2, seq=64, mbs=4, gbs=4, iters=8, eval_every=4, eval_iters=2,
                  lr=1e-3, vocab=1024, text_mb=2, zeroshot_limit=4, tasks="lambada,piqa", final_eval_iters=4),
    "cpu": dict(layers=6, hidden=128, heads=4, seq=256, mbs=16, gbs=16, iters=360, eval_every=60, eval_iters=20,
                lr=1e-3, vocab=8192, text_mb=0, zeroshot_limit=500, tasks="lambada,piqa,boolq,race,triviaqa,webqs", final_eval_iters=40),
    "full": dict(layers=6, hidden=128, heads=4, seq=256, mbs=16, gbs=32, iters=1220, eval_every=122, eval_iters=40,
                 lr=2e-3, vocab=8192, text_mb=0, zeroshot_limit=1000, tasks="lambada,piqa,boolq,race,triviaqa,webqs"),
}
# arms scored against the dense S -> 4S gap (besides the ablations)
GAP_ARMS = ("moe8", "moe32", "prmoe", "mos_kd", "student_nokd")
MOE_COMMON = ["--expert-interval", "2", "--topk", "1", "--moe-loss-coeff", "0.01", "--moe-train-capacity-factor",
              "1.0", "--moe-eval-capacity-factor", "1.0", "--moe-min-capacity", "4"]


@dataclass
class Arm:
    name: str
    label: str
    layers: int
    hidden_mult: int = 1
    experts: list = field(default_factory=list)   # per MoE layer; [] = dense
    residual: bool = False
    seed_offset: int = 0
    teacher: str | None = None                     # arm whose checkpoint distils this one (MoS)
    after: str | None = None                       # start only when this arm is done
    extra: list = field(default_factory=list)      # further flags (the targeted ablations)


def arms(p) -> list[Arm]:
    L = p["layers"]
    moe_layers = L // 2
    student_layers = L - 1
    # the Fig. 1 core (S, 4S, MoE-32) first, so that a study stopped part-way has its main comparison
    return [
        Arm("dense_4S", "dense 4S (2x hidden)", L, hidden_mult=2),
        Arm("dense_S", "dense S", L),
        Arm("moe32", "S + MoE-32", L, experts=[32] * moe_layers),
        Arm("prmoe", f"PR-MoE (Residual, {' '.join(map(str, _pr_experts(moe_layers)))})", L,
            experts=_pr_experts(moe_layers), residual=True),
        Arm("moe8", "S + MoE-8", L, experts=[8] * moe_layers),
        Arm("mos_kd", f"MoS student ({student_layers} layers, KD)", student_layers,
            experts=_pr_experts(student_layers // 2, last=16), residual=True, teacher="prmoe", after="prmoe"),
        Arm("student_nokd", f"student ({student_layers} layers, no KD)", student_layers,
            experts=_pr_experts(student_layers // 2, last=16), residual=True),
        Arm("dense_S_seed2", "dense S, seed 2", L, seed_offset=1),
    ]


def ablations(p) -> list[Arm]:
    """Targeted runs (``--ablations``): what moves MoE-32's gain at this scale."""
    L = p["layers"]
    lr2x = ["--lr", f"{2 * p['lr']:g}", "--min-lr", f"{2 * p['lr'] / 10:g}"]  # the same schedule, doubled
    return [
        Arm("moe32_nodrop", "S + MoE-32, no token dropping", L, experts=[32] * (L // 2),
            extra=["--disable-moe-token-dropping"]),
        Arm("moe32_top2", "S + MoE-32, top-2", L, experts=[32] * (L // 2), extra=["--topk", "2"]),
        Arm("moe32_lr2x", f"S + MoE-32, peak LR {2 * p['lr']:g}", L, experts=[32] * (L // 2), extra=lr2x),
        Arm("dense_S_lr2x", f"dense S, peak LR {2 * p['lr']:g}", L, extra=lr2x),
        # twice the sparse share of the model: experts on all layers, not every other one
        Arm("moe32_every", "S + MoE-32 on every layer", L, experts=[32] * L, extra=["--expert-interval", "1"]),
    ]


def _pr_experts(moe_layers: int, first: int = 8, last: int = 16) -> list[int]:
    """PR-MoE's pyramid: the last two MoE layers get `last` experts, earlier ones `first`."""
    return [first] * max(moe_layers - 2, 0) + [last] * min(moe_layers, 2)


# ---------------------------------------------------------------------------------------------- data
def run(cmd, **kw):
    print("+", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def prepare(out: str, p: dict) -> dict:
    src = os.path.join(DATA, "corpus", "gutenberg")
    if not os.path.isfile(os.path.join(src, "train.txt")):
        sys.exit(f"error: {src}/train.txt not found: set MEGATRON_MOE_DATA to the shared data folder")
    d = os.path.join(out, "data")
    os.makedirs(d, exist_ok=True)
    texts = {}
    for split in ("train", "valid"):
        path = os.path.join(src, f"{split}.txt")
        if p["text_mb"]:  # quick mode: a slice, so preprocessing takes seconds
            sliced = os.path.join(d, f"{split}.txt")
            if not os.path.isfile(sliced):
                with open(path, "rb") as f, open(sliced + ".tmp", "wb") as g:
                    g.write(f.read(p["text_mb"] * 1_000_000 // (1 if split == "train" else 8)))
                os.replace(sliced + ".tmp", sliced)
            path = sliced
        texts[split] = path
    spm = os.path.join(d, f"spm{p['vocab']}")
    py = sys.executable
    if not os.path.isfile(spm + ".model"):
        sample = os.path.join(d, "tokenizer_sample.txt")
        with open(texts["train"], "rb") as f, open(sample, "wb") as g:
            g.write(f.read(20_000_000))  # 20 MB is plenty for an 8k vocabulary
        run([py, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", sample, "--model-prefix", spm,
             "--vocab-size", str(p["vocab"])])
        os.remove(sample)
    prefixes = {}
    for split, path in texts.items():
        prefix = os.path.join(d, f"gut_{split}")
        if not os.path.isfile(prefix + "_text_document.idx"):
            run([py, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", path, "--output-prefix", prefix,
                 "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", spm + ".model", "--append-eod",
                 "--workers", "2", "--quiet"])
        prefixes[split] = prefix + "_text_document"
    return dict(spm=spm + ".model", **prefixes)


# ---------------------------------------------------------------------------------------------- runs
def precision_flags() -> list[str]:
    """bf16 only where this machine runs it faster than fp32 (measured once by the probe)."""
    from megatron.planning.precision_probe import preferred_precision

    return ["--bf16"] if preferred_precision() == "bf16" else []


def arm_flags(arm: Arm, p: dict, data: dict, out: str, seed: int) -> list[str]:
    h = p["hidden"] * arm.hidden_mult
    flags = ["--num-layers", str(arm.layers), "--hidden-size", str(h), "--num-attention-heads", str(p["heads"] * arm.hidden_mult),
             "--seq-length", str(p["seq"]), "--max-position-embeddings", str(p["seq"]),
             "--micro-batch-size", str(p["mbs"]), "--global-batch-size", str(p["gbs"]), "--train-iters", str(p["iters"]),
             # the paper's schedule shape: linear warm-up, cosine decay to 1/10; AdamW beta2 0.95, wd 0.1, clip 1
             "--lr", f"{p['lr']:g}", "--min-lr", f"{p['lr'] / 10:g}", "--lr-decay-style", "cosine",
             "--lr-warmup-iters", str(max(1, p["iters"] // 20)),
             "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--weight-decay", "0.1", "--clip-grad", "1.0",
             "--init-method-std", "0.02", "--hidden-dropout", "0", "--attention-dropout", "0",
             "--train-data-path", data["train"], "--valid-data-path", data["valid"],
             "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", data["spm"],
             "--log-interval", str(max(1, p["eval_every"] // 3)), "--eval-interval", str(p["eval_every"]),
             "--eval-iters", str(p["eval_iters"]), "--seed", str(seed + arm.seed_offset),
             "--save", os.path.join(out, "runs", arm.name, "ckpt"), "--load", os.path.join(out, "runs", arm.name, "ckpt"),
             "--save-interval", str(p["eval_every"]), "--tensorboard-dir", os.path.join(out, "runs", arm.name, "tb")]
    if arm.experts:
        flags += ["--num-experts", *map(str, arm.experts), *MOE_COMMON]
        if arm.residual:
            flags += ["--mlp-type", "residual"]
    flags += arm.extra  # later flags win
    if arm.teacher:
        flags += ["--mos", "--load-teacher", os.path.join(out, "runs", arm.teacher, "ckpt"), "--kd-alpha-ce", "1",
                  "--kd-beta-ce", "1", "--kd-temp", "1.0", "--kd-stop-iters", str(p["iters"] * 7 // 10)]
    return precision_flags() + flags


def is_done(out: str, arm: Arm) -> bool:
    return os.path.isfile(os.path.join(out, "runs", arm.name, "done.json"))


def launch(arm: Arm, p: dict, data: dict, out: str, seed: int, threads: int):
    d = os.path.join(out, "runs", arm.name)
    os.makedirs(d, exist_ok=True)
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py")] + arm_flags(arm, p, data, out, seed)
    with open(os.path.join(d, "cmd.txt"), "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    log = open(os.path.join(d, "train.log"), "a")
    print(f"[{time.strftime('%H:%M:%S')}] start {arm.name} ({threads} threads)", flush=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time()


def all_arms(p) -> list[Arm]:
    return arms(p) + (ablations(p) if p.get("ablations") else [])


def train_all(out: str, p: dict, data: dict, seed: int, parallel: int, only: set | None) -> None:
    todo = [a for a in all_arms(p) if (only is None or a.name in only) and not is_done(out, a)]
    threads = max(1, (os.cpu_count() or 2) // parallel)
    running = {}
    while todo or running:
        for a in list(todo):
            if len(running) >= parallel:
                break
            if a.after and not is_done(out, next(x for x in all_arms(p) if x.name == a.after)):
                continue
            todo.remove(a)
            running[a.name] = (a, *launch(a, p, data, out, seed, threads))
        if not running:
            sys.exit(f"error: {[a.name for a in todo]} wait for arms that are not done; run without --only")
        time.sleep(2)
        for name, (a, proc, log, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            log.close()
            del running[name]
            if proc.returncode != 0:
                for q in running.values():
                    q[1].terminate()
                sys.exit(f"error: arm {name} failed (exit {proc.returncode}); see {out}/runs/{name}/train.log")
            summary = summarize(out, a, p)
            summary["wall_s_last_launch"] = round(time.time() - t0, 1)
            with open(os.path.join(out, "runs", name, "done.json"), "w") as f:
                json.dump(summary, f, indent=1)
            print(f"[{time.strftime('%H:%M:%S')}] done {name}: validation loss {summary['final_valid_loss']:.4f}",
                  flush=True)


def measure_speed(out: str, p: dict, data: dict, seed: int, iters: int, rounds: int) -> dict:
    """Tokens/s of every arm measured side by side: short runs (no checkpoints) one after another with all cores,
    in alternating order over ``rounds``; the median of each arm's second-half iteration times. An arm need not be
    trained (speed depends on its shape only); a MoS arm needs its teacher's checkpoint, of any iteration."""
    from megatron.checkpoint.layout import TRACKER

    names = [a for a in all_arms(p) if not a.teacher or os.path.isfile(
        os.path.join(out, "runs", a.teacher, "ckpt", TRACKER))]
    times: dict = {a.name: [] for a in names}
    for r in range(rounds):
        for a in (names if r % 2 == 0 else names[::-1]):
            flags = _without(arm_flags(a, p, data, out, seed), {"--save", "--load", "--save-interval", "--tensorboard-dir",
                                                                "--train-iters", "--log-interval", "--eval-iters"})
            cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py")] + flags + [
                "--train-iters", str(iters), "--log-interval", str(iters // 2), "--eval-iters", "1"]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1)))
            ms = re.findall(r"elapsed time per iteration \(ms\): ([0-9.]+)", res.stdout + res.stderr)
            if res.returncode != 0 or not ms:
                sys.exit(f"error: speed run of {a.name} failed: {(res.stdout + res.stderr)[-500:]}")
            times[a.name].append(float(ms[-1]))
            print(f"speed {a.name}: {ms[-1]} ms / iteration", flush=True)
    speed = {n: p["gbs"] * p["seq"] / (sorted(t)[len(t) // 2] / 1000.0) for n, t in times.items()}
    with open(os.path.join(out, "speed.json"), "w") as f:
        json.dump({"tokens_per_s": speed, "iters": iters, "rounds": rounds, "threads": os.cpu_count()}, f, indent=1)
    return speed


def final_eval(out: str, p: dict, data: dict, seed: int) -> dict:
    """Every finished arm's last checkpoint on the same validation samples (the whole validation set, or the
    preset's ``final_eval_iters`` batches of it), drawn with the base seed, so that arms trained with other
    seeds are scored on identical text."""
    from megatron.data.indexed_dataset import IndexedDataset

    tokens = int(sum(IndexedDataset(data["valid"]).sizes))
    iters = min(max(1, tokens // (p["gbs"] * p["seq"]) - 1), p.get("final_eval_iters") or 10**9)
    losses = {}
    for a in all_arms(p):
        path = os.path.join(out, "runs", a.name, "final_eval.json")
        if not is_done(out, a):
            continue
        if not os.path.isfile(path):
            flags = _without(arm_flags(a, p, data, out, seed), {"--save", "--tensorboard-dir", "--eval-iters", "--seed",
                                                                "--mos", "--load-teacher", "--kd-alpha-ce", "--kd-beta-ce",
                                                                "--kd-temp", "--kd-stop-iters"})
            cmd = [sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py")] + flags + [
                "--skip-train", "--eval-iters", str(iters), "--seed", str(seed)]
            res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1)))
            found = re.findall(r"validation loss at iteration \d+ \| lm loss value: ([0-9.E+-]+)", res.stdout + res.stderr)
            if res.returncode != 0 or not found:
                sys.exit(f"error: final evaluation of {a.name} failed: {(res.stdout + res.stderr)[-800:]}")
            with open(path, "w") as f:
                json.dump({"valid_loss": float(found[-1]), "tokens": iters * p["gbs"] * p["seq"]}, f)
            print(f"final eval {a.name}: {float(found[-1]):.4f} over {iters * p['gbs'] * p['seq']} tokens", flush=True)
        losses[a.name] = json.load(open(path))["valid_loss"]
    return losses


def _without(flags: list[str], names: set) -> list[str]:
    """``flags`` minus the options in ``names`` and their values."""
    out, skip = [], False
    for f in flags:
        if f.startswith("--"):
            skip = f in names
        if not skip:
            out.append(f)
    return out


# ---------------------------------------------------------------------------------------------- results
def read_curve(out: str, name: str) -> list[tuple[int, float]]:
    """Validation lm loss per iteration from the arm's TensorBoard files (the last write per step wins,
    so a killed-and-resumed run counts each evaluation once)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(out, "runs", name, "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    by_step = {e.step: e.value for e in acc.Scalars("lm loss validation")}
    return sorted(by_step.items())


def tokens_per_second(out: str, name: str) -> float:
    """Median of the log lines' tokens/s (the first line of each launch includes start-up)."""
    vals = []
    with open(os.path.join(out, "runs", name, "train.log")) as f:
        for line in f:
            m = re.search(r"tokens per second: ([0-9.]+)", line)
            if m:
                vals.append(float(m.group(1)))
    vals.sort()
    return vals[len(vals) // 2] if vals else float("nan")


def model_numbers(arm: Arm, p: dict, vocab: int) -> dict:
    """Parameters (total / active per token) and training FLOPs per token (3 x forward: 2 per multiply-add
    of every matmul a token passes through, attention scores and values included)."""
    h, s, L = p["hidden"] * arm.hidden_mult, p["seq"], arm.layers
    attn, mlp = 4 * h * h + 4 * h, 8 * h * h + 5 * h
    emb = vocab * h + s * h
    total = active = emb + L * (attn + 4 * h) + 2 * h
    flag = lambda name, default: int(arm.extra[arm.extra.index(name) + 1]) if name in arm.extra else default  # noqa: E731
    interval, k = flag("--expert-interval", 2), flag("--topk", 1)
    moe_at = [i for i in range(L) if (i + 1) % interval == 0][: len(arm.experts)] if arm.experts else []
    mm_active = 0
    for i in range(L):
        if i in moe_at:
            e = arm.experts[moe_at.index(i)]
            total += e * mlp + h * e + (mlp + 2 * h + 2 if arm.residual else 0)
            active += k * mlp + h * e + (mlp + 2 * h + 2 if arm.residual else 0)
            mm_active += 8 * h * h * (k + (1 if arm.residual else 0)) + h * e
        else:
            total += mlp
            active += mlp
            mm_active += 8 * h * h
    fwd = 2 * (L * 4 * h * h + mm_active + vocab * h) + L * 2 * 2 * s * h  # + QK^T and AV per token
    return dict(params_total=total, params_active=active, train_flops_per_token=3 * fwd)


def summarize(out: str, arm: Arm, p: dict) -> dict:
    curve = read_curve(out, arm.name)
    return dict(arm=arm.name, label=arm.label, curve=curve, final_valid_loss=curve[-1][1] if curve else float("nan"),
                tokens_per_s=tokens_per_second(out, arm.name))


def zero_shot(out: str, p: dict, data: dict, names: list[str]) -> dict:
    path = os.path.join(out, "zeroshot.json")
    table = os.path.join(out, "zeroshot.md")
    if not os.path.isfile(table):
        loads = [os.path.join(out, "runs", n, "ckpt") for n in names]
        with open(table + ".tmp", "w") as f:
            run([sys.executable, os.path.join(ROOT, "tools", "eval_harness.py"), "--load", *loads,
                 "--task-list", p["tasks"], "--eval-data-dir", os.path.join(DATA, "eval"), "--limit",
                 str(p["zeroshot_limit"]), "--micro-batch-size", "16", "--results-path", path], stdout=f)
        os.replace(table + ".tmp", table)
    with open(table) as f:
        return {"table": f.read()}


def gap_over_tokens(done: dict, p: dict, tok_per_iter: int) -> list[str]:
    """Markdown lines: the fraction of the dense S -> 4S gap each arm closes at every training-time evaluation
    (the same validation samples for every arm trained with the base seed), to show whether it grows with tokens."""
    s_curve, big = dict(done["dense_S"][1]["curve"]), dict(done["dense_4S"][1]["curve"])
    its = sorted(set(s_curve) & set(big))
    names = [n for n in GAP_ARMS + tuple(a.name for a in ablations(p)) if n in done and done[n][0].seed_offset == 0]
    if not its or not names:
        return []
    lines = ["", "Fraction of the S -> 4S gap closed at each training-time evaluation:", "",
             "| arm | " + " | ".join(f"{it * tok_per_iter / 1e6:.2f}M tok" for it in its) + " |",
             "|---|" + "---|" * len(its),
             "| gap S - 4S (nats) | " + " | ".join(f"{s_curve[it] - big[it]:.3f}" for it in its) + " |"]
    for n in names:
        c = dict(done[n][1]["curve"])
        cells = [f"{(s_curve[it] - c[it]) / (s_curve[it] - big[it]):.2f}" if it in c and s_curve[it] != big[it] else "-"
                 for it in its]
        lines.append(f"| {done[n][0].label} | " + " | ".join(cells) + " |")
    return lines


def report(out: str, p: dict, seed: int) -> str:
    from megatron.config.schema import pad_vocab_size

    vocab = pad_vocab_size(p["vocab"], 128)  # the trainer's padding (--make-vocab-size-divisible-by 128)
    tok_per_iter = p["gbs"] * p["seq"]
    rows, curves_tok, curves_flops, curves_abl = [], {}, {}, {}
    speed_path = os.path.join(out, "speed.json")
    speed = json.load(open(speed_path))["tokens_per_s"] if os.path.isfile(speed_path) else {}
    abl_names = {a.name for a in ablations(p)}
    done = {a.name: (a, json.load(open(os.path.join(out, "runs", a.name, "done.json"))))
            for a in all_arms(p) if is_done(out, a)}
    for name, (a, s) in done.items():
        n = model_numbers(a, p, vocab)
        teacher_fwd = 0.0
        if a.teacher and a.teacher in done:
            teacher_fwd = model_numbers(done[a.teacher][0], p, vocab)["train_flops_per_token"] / 3 * 0.7  # KD for 70%
        flops_tok = n["train_flops_per_token"] + teacher_fwd
        if name in abl_names or name in ("dense_S", "dense_S_seed2", "dense_4S", "moe32"):
            curves_abl[a.label] = [(it * tok_per_iter, v) for it, v in s["curve"]]
        if name not in abl_names:
            curves_tok[a.label] = [(it * tok_per_iter, v) for it, v in s["curve"]]
            curves_flops[a.label] = [(it * tok_per_iter * flops_tok, v) for it, v in s["curve"]]
        s = dict(s, tokens_per_s=speed.get(name, s["tokens_per_s"]))
        fe = os.path.join(out, "runs", name, "final_eval.json")
        if os.path.isfile(fe):
            s["final_valid_loss"] = json.load(open(fe))["valid_loss"]
        rows.append((a, s, n, flops_tok))
    lines = [f"Preset `{p['name']}`: {p['iters']} iterations x {tok_per_iter} tokens = "
             f"{p['iters'] * tok_per_iter / 1e6:.2f}M training tokens per arm; S = {p['layers']} layers x hidden "
             f"{p['hidden']}, seq {p['seq']}, vocabulary {p['vocab']} (padded {vocab}); seed {seed}.", "",
             "| arm | params total | active / token | train GFLOPs / token | tokens/s | final valid loss | PPL |",
             "|---|---|---|---|---|---|---|"]
    for a, s, n, f in rows:
        lines.append(f"| {a.label} | {n['params_total'] / 1e6:.2f}M | {n['params_active'] / 1e6:.2f}M | "
                     f"{f / 1e9:.3f} | {s['tokens_per_s']:.0f} | {s['final_valid_loss']:.4f} | "
                     f"{math.exp(s['final_valid_loss']):.1f} |")
    final = {a.name: s["final_valid_loss"] for a, s, _, _ in rows}
    if "dense_S" in final and "dense_4S" in final:
        gap = final["dense_S"] - final["dense_4S"]
        lines += ["", f"Gap dense S -> dense 4S at equal tokens: {gap:.4f} nats. Fraction of it closed:", "",
                  "| arm | valid loss | fraction of the S -> 4S gap closed |", "|---|---|---|"]
        for name in GAP_ARMS + ("dense_S_seed2",) + tuple(a.name for a in ablations(p)):
            if name in final and abs(gap) > 0:
                lines.append(f"| {done[name][0].label} | {final[name]:.4f} | {(final['dense_S'] - final[name]) / gap:.2f} |")
    if "dense_S" in done and "dense_4S" in done:
        lines += gap_over_tokens(done, p, tok_per_iter)
    if "dense_S_seed2" in final and "dense_S" in final:
        lines += ["", f"Seed noise (dense S, two seeds): |difference| = {abs(final['dense_S'] - final['dense_S_seed2']):.4f} nats."]
    svg_plot(curves_tok, os.path.join(out, "fig1_loss_vs_tokens.svg"), "Gutenberg: validation loss vs tokens",
             xlabel="training tokens")
    svg_plot(curves_flops, os.path.join(out, "fig1_loss_vs_flops.svg"), "Gutenberg: validation loss vs training FLOPs",
             xlabel="training FLOPs (log)", logx=True)
    moe_rows = [(a, s, n) for a, s, n, _ in rows 
                if a.layers == p["layers"] and not a.seed_offset and (a.experts or a.name in ("dense_S", "dense_4S"))]
    if len(moe_rows) > 2:  # PR-MoE's parameters vs quality against standard MoE (and the dense pair)
        svg_plot({a.label: [(n["params_total"], s["final_valid_loss"])] for a, s, n in moe_rows},
                 os.path.join(out, "fig1_params_vs_loss.svg"), "Gutenberg: parameters vs final validation loss",
                 xlabel="total parameters (log)", ylabel="final validation loss", logx=True, markers=True)
    if len(curves_abl) > 3:
        svg_plot(curves_abl, os.path.join(out, "fig1_ablations.svg"), "Gutenberg: what moves MoE-32's gain",
                 xlabel="training tokens")
    evals = [json.load(open(os.path.join(out, "runs", n, "final_eval.json"))) for n in done
             if os.path.isfile(os.path.join(out, "runs", n, "final_eval.json"))]
    if evals:
        lines += ["", f"Final validation loss: each arm's last checkpoint on the same {evals[0]['tokens']:,} validation "
                  "tokens (drawn with the base seed), not the training-time evaluations."]
    lines += ["", "tokens/s: " + ("measured side by side (speed.json: short runs, all cores, alternating order)"
                                  if speed else "median of the training logs' tokens/s (arms ran two at a time, "
                                  "1 thread each, on a shared machine: not comparable across arms)")]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (data, runs, report); reused to resume")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--quick", action="store_true", help="the same as --preset quick (a few minutes)")
    ap.add_argument("--iters", type=int, help="override the preset's training iterations per arm")
    ap.add_argument("--parallel", type=int, default=2, help="arms trained at once (threads split between them)")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--only", help="comma-separated arm names (default: all)")
    ap.add_argument("--skip-zeroshot", action="store_true")
    ap.add_argument("--zeroshot-limit", type=int, help="documents per task (default: the preset's)")
    ap.add_argument("--ablations", action="store_true", help="also train the targeted ablation arms (moe32_*)")
    ap.add_argument("--speed", action="store_true", help="measure every arm's tokens/s side by side (a quiet machine)")
    ap.add_argument("--speed-iters", type=int, default=12)
    ap.add_argument("--speed-rounds", type=int, default=2)
    a = ap.parse_args(argv)
    p = dict(PRESETS["quick" if a.quick else a.preset], name="quick" if a.quick else a.preset, ablations=a.ablations)
    if a.iters:
        p["iters"] = a.iters
    if a.zeroshot_limit:
        p["zeroshot_limit"] = a.zeroshot_limit
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "preset.json"), "w") as f:
        json.dump(p, f, indent=1)
    data = prepare(a.out, p)
    only = set(a.only.split(",")) if a.only else None
    train_all(a.out, p, data, a.seed, a.parallel, only)
    final_eval(a.out, p, data, a.seed)
    if a.speed:
        measure_speed(a.out, p, data, a.seed, a.speed_iters, a.speed_rounds)
    if not a.skip_zeroshot:
        names = [x.name for x in arms(p) if is_done(a.out, x)]
        print(zero_shot(a.out, p, data, names)["table"])
    print(report(a.out, p, a.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
