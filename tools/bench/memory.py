#!/usr/bin/env python3
"""Peak resident memory per rank and per phase of real training, against the dry run's plan.

    python tools/bench/memory.py [--modes plain zero1 zero2 fsdp2] [--dp 2] [--tp 1] [--ep 1 --experts 0]
                                 [--layers 12 --hidden 1024 --vocab 50304 --seq 128] [--steps 3]
                                 [--malloc mmap|glibc] [--out results.json]

Each mode runs in its own ``torchrun`` launch (gloo, CPU, ``--dp x --tp`` processes) of the trainer itself:
``megatron.training.Trainer`` with ``pretrain_gpt_moe.py``'s hooks and ``--mock-data``, ``--steps`` training
steps (micro-batch 1, so activations are small), the final checkpoint save through the trainer
(``save_checkpoint``: whatever format it writes) and a load of that checkpoint into the running trainer
(``load_checkpoint`` through ``Trainer.load``: weights, Adam state, scheduler, RNG). Modes: ``plain`` (torch
AdamW), ``zero1`` (``--use-distributed-optimizer``), ``zero2`` (``--zero-stage 2``), ``fsdp2``
(``--use-torch-fsdp2``; skipped with a message where this tree does not have the flag), ``sp`` (plain AdamW with
``--sequence-parallel``: compare with ``plain`` at ``--tp 2`` for the activations it saves).

Per rank and per phase the kernel's peak-RSS counter is reset (``5`` into ``/proc/self/clear_refs``) before
the phase and VmHWM read after it, so each figure is the peak of that phase alone, including what was
resident when it began:

    runtime          RSS before the model is built (python, torch, gloo, the tokenizer): the plan's "runtime"
                     line is this measurement, so plan = model plan + measured runtime
    build            Trainer.setup_model_and_optimizer (build_model, the optimizer, the gradient reducer)
    fwd-bwd          Trainer.forward_backward                 (first step and the steady steps apart)
    grad-reduce      Trainer.step up to the optimizer          (all-reduce / ZeRO-2 reduce-scatter)
    optimizer-step   Trainer.optimizer_step                   (unscale, norm, clip, Adam, ZeRO all-gather)
    first-step / steady-step   the largest of the three above in the first / the later steps
    save             Trainer.save (replica check, save_checkpoint) and the bytes this rank wrote
    load             Trainer.load (load_checkpoint into the live model and optimizer)

The plan is ``megatron.planning.dry_run.phase_plan`` of the same config for the same rank. GB = 1e9 bytes.
``--malloc mmap`` (default) runs the workers with ``MALLOC_MMAP_THRESHOLD_=131072`` so that a freed tensor
leaves the RSS at once (RSS follows what the code holds); ``--malloc glibc`` keeps the allocator's default,
whose dynamic threshold keeps freed blocks of up to 32 MB in the heap (then RSS also holds what earlier
phases freed). The bytes each rank wrote at save come from the checkpoint's per-rank file names (DCP's
``__{rank}_*.distcp``, the per-rank RNG files; the rest counts as rank 0's), or only the total when the
format does not name its files per rank; ``save-wchar`` in the JSON is what the process passed to write().
The table's ``measured / plan`` compares whole-process figures; ``above runtime`` compares what each side
puts above the runtime baseline (the stricter ratio). ``--out`` saves every figure as JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

MODES = {"plain": [], "zero1": ["--use-distributed-optimizer"], "zero2": ["--zero-stage", "2"],
         "fsdp2": ["--use-torch-fsdp2"], "sp": ["--sequence-parallel"]}
STEP_PHASES = ("fwd-bwd", "grad-reduce", "optimizer-step")
PHASES = ("runtime", "build", "first-step", "steady-step") + STEP_PHASES + ("save", "load")
PLANNED = {"build": ("build",), "first-step": STEP_PHASES, "steady-step": STEP_PHASES, "fwd-bwd": ("fwd-bwd",),
           "grad-reduce": ("grad-reduce",), "optimizer-step": ("optimizer-step",), "save": ("save",),
           "load": ("load",)}
GB = 1e9


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class PeakTracer:
    """``--trace-peak``: a thread that samples RSS every ``interval`` seconds and keeps the main thread's Python
    stack at the highest sample of the current phase (where a phase's peak is allocated; sampling can miss a
    short-lived peak, VmHWM cannot)."""

    def __init__(self, interval: float = 0.002):
        import threading

        self.interval, self.main = interval, threading.main_thread().ident
        self.best, self.stack, self.stacks = 0, [], {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.best, self.stack = 0, []

    def record(self, phase: str) -> None:
        self.stacks[phase] = {"rss": self.best, "stack": self.stack}

    def _run(self) -> None:
        import traceback

        while not self._stop.wait(self.interval):
            rss = _status("VmRSS")
            if rss > self.best:
                frame = sys._current_frames().get(self.main)
                self.best = rss
                if frame is not None:
                    self.stack = [f"{os.path.relpath(f.filename, ROOT) if f.filename.startswith(ROOT) else f.filename}:"
                                  f"{f.lineno} {f.name}" for f in traceback.extract_stack(frame)[-12:]]

    def stop(self) -> None:
        self._stop.set()


def _written() -> int:
    """Bytes this process has passed to write() so far (/proc/self/io wchar)."""
    with open("/proc/self/io") as f:
        return int(re.search(r"wchar:\s+(\d+)", f.read()).group(1))


def train_argv(a, mode: str, save_dir: str) -> list:
    argv = ["--num-layers", str(a.layers), "--hidden-size", str(a.hidden), "--num-attention-heads", str(a.heads),
            "--seq-length", str(a.seq), "--max-position-embeddings", str(a.seq), "--mock-data",
            "--vocab-size", str(a.vocab), "--micro-batch-size", "1", "--global-batch-size", str(a.dp),
            "--train-iters", str(a.steps), "--lr", "1e-4", "--clip-grad", "1.0", "--use-cpu",
            "--eval-iters", "0", "--log-interval", str(a.steps), "--save", save_dir,
            "--tensor-model-parallel-size", str(a.tp), "--hidden-dropout", "0", "--attention-dropout", "0"]
    if a.experts:
        argv += ["--num-experts", str(a.experts), "--expert-interval", str(a.expert_interval),
                 "--moe-expert-parallel-size", str(a.ep)]
    return argv + MODES[mode] + (a.train_args.split() if a.train_args else [])


def flag_available(a, mode: str) -> str | None:
    """None when this tree accepts the mode's flags, else why not (one line)."""
    from megatron.training.arguments import parse_args

    try:
        parse_args(train_argv(a, mode, "/tmp/unused"))
    except SystemExit:
        return f"{' '.join(MODES[mode])} is not an option of this tree (not landed yet)"
    except Exception as e:  # noqa: BLE001 - a UserError: the flag exists but is refused
        return f"{' '.join(MODES[mode])}: {e}"
    return None


# ----------------------------------------------------------------------------------------------------------
# one rank (under torchrun)

def worker(a) -> None:
    from functools import partial

    import torch

    import pretrain_gpt_moe as hooks
    from megatron.parallel.state import destroy, initialize
    from megatron.planning.dry_run import phase_plan
    from megatron.training.arguments import parse_args
    from megatron.training.trainer import Trainer

    torch.set_num_threads(a.threads)
    cfg = parse_args(train_argv(a, a.mode, a.save_dir))
    ps = initialize(cfg.parallel, cfg.model.moe.expert_parallel_size,
                    layer_ep_sizes=cfg.model.moe.layer_ep_sizes(cfg.model.num_layers))
    trainer = Trainer(cfg, ps, hooks.train_valid_test_datasets_provider, hooks.model_provider,
                      partial(hooks.forward_step, cfg), hooks.teacher_provider)
    rec: dict = {"steps": []}
    tracer = PeakTracer() if a.trace_peak else None

    def reset(phase_done: str | None = None) -> None:
        if tracer is not None:
            if phase_done:
                tracer.record(phase_done)
            tracer.reset()
        _reset_peak()

    def wrap(name, fn):
        orig = getattr(trainer, name)

        def wrapped(*args, **kwargs):
            return fn(orig, *args, **kwargs)
        setattr(trainer, name, wrapped)

    def build(orig):
        gc.collect()
        rec["runtime"] = _status("VmRSS")
        reset()
        out = orig()
        rec["build"] = _status("VmHWM")
        reset("build")
        rec["after-build"] = _status("VmRSS")
        return out

    def train_step(orig, *args, **kwargs):
        rec["steps"].append({})
        return orig(*args, **kwargs)

    def forward_backward(orig, *args, **kwargs):
        reset()
        out = orig(*args, **kwargs)
        rec["steps"][-1]["fwd-bwd"] = _status("VmHWM")
        reset(f"fwd-bwd-{len(rec['steps'])}")
        return out

    def step(orig, *args, **kwargs):
        reset()
        out = orig(*args, **kwargs)
        rec["steps"][-1]["optimizer-step"] = _status("VmHWM")
        reset(f"optimizer-step-{len(rec['steps'])}")
        return out

    def optimizer_step(orig, *args, **kwargs):
        rec["steps"][-1]["grad-reduce"] = _status("VmHWM")
        reset(f"grad-reduce-{len(rec['steps'])}")
        return orig(*args, **kwargs)

    def save(orig):
        ps.barrier()
        w0 = _written()
        reset()
        out = orig()
        rec["save"] = _status("VmHWM")
        reset("save")
        rec["save-wchar"] = _written() - w0
        return out

    wrap("setup_model_and_optimizer", build)
    wrap("train_step", train_step)
    wrap("forward_backward", forward_backward)
    wrap("step", step)
    wrap("optimizer_step", optimizer_step)
    wrap("save", save)
    try:
        trainer.run()
        ps.barrier()
        rec["files"] = checkpoint_files(a.save_dir)
        cfg.checkpoint.load = a.save_dir
        gc.collect()
        ps.barrier()
        reset()
        trainer.load()
        rec["load"] = _status("VmHWM")
        reset("load")
        rec["params-local"] = sum(p.numel() for p in trainer.model.parameters())
        ps.barrier()
    finally:
        destroy(ps)
    steps = rec["steps"]
    for ph in STEP_PHASES:
        rec[f"first-{ph}"] = steps[0][ph]
        rec[ph] = max(s[ph] for s in steps[1:]) if len(steps) > 1 else steps[0][ph]
    rec["first-step"] = max(steps[0][ph] for ph in STEP_PHASES)
    rec["steady-step"] = max(rec[ph] for ph in STEP_PHASES)
    rec["plan"] = phase_plan(cfg, ps.world_size, ps.rank, runtime_bytes=rec["runtime"])
    if tracer is not None:
        tracer.stop()
        rec["peak-stacks"] = tracer.stacks
    rec["rank"] = ps.rank
    with open(os.path.join(a.result_dir, f"rank_{ps.rank}.json"), "w") as f:
        json.dump(rec, f)


def checkpoint_files(save_dir: str) -> dict:
    """{relative path: bytes} of every file under the checkpoint folder."""
    out = {}
    for root, _, names in os.walk(save_dir):
        for n in names:
            path = os.path.join(root, n)
            out[os.path.relpath(path, save_dir)] = os.path.getsize(path)
    return out


def bytes_per_rank(files: dict, world: int) -> tuple[dict | None, int]:
    """(bytes written by each rank, from per-rank file names: DCP's ``__{rank}_*.distcp`` and ``rank_{r}`` RNG
    files; None when the format does not name its files per rank), total bytes."""
    total = sum(files.values())
    per = {r: 0 for r in range(world)}
    named = False
    for path, size in files.items():
        base = os.path.basename(path)
        m = re.match(r"__(\d+)_\d+\.distcp$", base)
        if m:
            named = True
            per[int(m.group(1))] += size
            continue
        m = re.search(r"rank_?(\d+)", base)
        if m and int(m.group(1)) < world:
            per[int(m.group(1))] += size
        else:
            per[0] += size  # common.pt, the shard index, the tracker: the main rank's
    return (per if named else None), total


# ----------------------------------------------------------------------------------------------------------
# the driver

def run_mode(a, mode: str) -> dict:
    world = a.dp * a.tp
    work = tempfile.mkdtemp(prefix=f"membench_{mode}_", dir=a.work_dir)
    save_dir, result_dir = os.path.join(work, "ckpt"), os.path.join(work, "result")
    os.makedirs(result_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           os.path.abspath(__file__), "--worker", "--mode", mode, "--save-dir", save_dir, "--result-dir", result_dir]
    for k in ("dp", "tp", "ep", "experts", "expert_interval", "layers", "hidden", "heads", "vocab", "seq", "steps",
              "threads"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(a, k))]
    if a.trace_peak:
        cmd.append("--trace-peak")
    if a.train_args:
        cmd.append(f"--train-args={a.train_args}")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=str(a.threads))
    if a.malloc == "mmap":  # freed blocks >= 128 KiB go back to the kernel at once: RSS follows live tensors
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    elif a.malloc == "glibc":
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.timeout)
    try:
        if res.returncode != 0:
            lines = res.stderr.splitlines()
            where = [i for i, ln in enumerate(lines) if re.match(r"\[rank\d+\]: \w*(Error|Exception|Fault)\b", ln)]
            why = ""
            if where:  # the exception line and the innermost frame above it
                i = where[0]
                frames = [lines[j].split(":", 1)[1].strip() for j in range(i - 1, -1, -1) if "File " in lines[j]]
                frame = next((f for f in frames if "/megatron/" in f), frames[0] if frames else "")
                why = f"{lines[i].split(':', 1)[1].strip()} at {frame}"
            raise RuntimeError(f"torchrun exited {res.returncode}: {why}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
        ranks = []
        for r in range(world):
            with open(os.path.join(result_dir, f"rank_{r}.json")) as f:
                ranks.append(json.load(f))
        per, total = bytes_per_rank(ranks[0]["files"], world)
        for r, rec in enumerate(ranks):
            rec["save-bytes"] = per[r] if per is not None else None
        return {"mode": mode, "world": world, "seconds": time.time() - t0, "ranks": ranks,
                "checkpoint_bytes": total, "bytes_per_rank_named": per is not None}
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


def plan_total(rec: dict, phase: str) -> int:
    return max(rec["plan"][p]["total"] for p in PLANNED[phase])


def table(results: list) -> list[str]:
    rows = ["| mode | phase | rank | measured GB | plan GB | measured / plan | above runtime: measured / plan |",
            "|---|---|---|---|---|---|---|"]
    for res in results:
        for ph in PHASES:
            for rec in res["ranks"]:
                meas, runtime = rec[ph], rec["runtime"]
                if ph == "runtime":
                    rows.append(f"| {res['mode']} | runtime | {rec['rank']} | {meas / GB:.2f} | (measured) | | |")
                    continue
                plan = plan_total(rec, ph)
                above = (meas - runtime) / max(plan - runtime, 1)
                extra = f" (wrote {rec['save-bytes'] / GB:.2f} GB)" if ph == "save" and rec.get("save-bytes") else ""
                rows.append(f"| {res['mode']} | {ph}{extra} | {rec['rank']} | {meas / GB:.2f} | {plan / GB:.2f} | "
                            f"{meas / plan:.2f} | {above:.2f} |")
    return rows


def summary(results: list) -> list[str]:
    """One row per mode: the largest rank's figure of each phase (measured / plan)."""
    cols = ("build", "fwd-bwd", "grad-reduce", "optimizer-step", "save", "load")
    rows = ["| mode | runtime | " + " | ".join(cols) + " | peak (any phase) | checkpoint bytes / rank |",
            "|---|---|" + "---|" * len(cols) + "---|---|"]
    for res in results:
        cells = []
        for ph in cols:
            worst = max(res["ranks"], key=lambda r: r[ph] / plan_total(r, ph))
            cells.append(f"{max(r[ph] for r in res['ranks']) / GB:.2f} / {max(plan_total(r, ph) for r in res['ranks']) / GB:.2f}"
                         f" ({worst[ph] / plan_total(worst, ph):.2f}x)")
        peak = max(max(r[ph] for ph in cols) for r in res["ranks"])
        written = ", ".join(f"{r['save-bytes'] / GB:.2f}" for r in res["ranks"]) if res["bytes_per_rank_named"] \
            else f"total {res['checkpoint_bytes'] / GB:.2f}"
        rt = max(r["runtime"] for r in res["ranks"])
        rows.append(f"| {res['mode']} | {rt / GB:.2f} | " + " | ".join(cells) + f" | {peak / GB:.2f} | {written} |")
    return rows


def acceptance(results: list, limit: float = 1.15) -> list[str]:
    """The issue's checks: measured <= ``limit`` x plan at the optimizer step, save and load (every rank), and each
    rank's peak RSS under ZeRO-1 below plain's."""
    out = []
    for res in results:
        worst = max((r[ph] / plan_total(r, ph), ph, r["rank"]) for r in res["ranks"]
                    for ph in ("optimizer-step", "save", "load"))
        out.append(f"{res['mode']}: largest measured / plan at optimizer-step, save, load: {worst[0]:.2f} ({worst[1]}, "
                   f"rank {worst[2]}) -> {'ok' if worst[0] <= limit else 'OVER ' + str(limit)}")
    by_mode = {res["mode"]: res for res in results}
    if "plain" in by_mode and "zero1" in by_mode:
        phases = [ph for ph in PHASES if ph != "runtime"]
        for r0, r1 in zip(by_mode["plain"]["ranks"], by_mode["zero1"]["ranks"]):
            p0, p1 = max(r0[ph] for ph in phases), max(r1[ph] for ph in phases)
            out.append(f"rank {r0['rank']}: peak RSS ZeRO-1 {p1 / GB:.2f} GB vs plain {p0 / GB:.2f} GB -> "
                       f"{'ok' if p1 < p0 else 'NOT below'}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["plain", "zero1", "zero2", "fsdp2"], choices=list(MODES))
    p.add_argument("--dp", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (with --experts)")
    p.add_argument("--experts", type=int, default=0, help="experts per MoE layer (0: dense)")
    p.add_argument("--expert-interval", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=50304)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="training steps (the first is reported apart)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--malloc", choices=["mmap", "glibc"], default="mmap",
                   help="mmap (default): MALLOC_MMAP_THRESHOLD_=131072 in the workers, so a freed tensor's pages leave "
                        "the RSS at once and each phase's peak is what the code holds; glibc: the allocator's default "
                        "(its dynamic threshold keeps freed blocks of up to 32 MB in the heap, so RSS also holds what "
                        "earlier phases freed)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--train-args", default="", help="more training flags, appended (e.g. \"--ckpt-format torch\")")
    p.add_argument("--trace-peak", action="store_true", help="sample RSS every 2 ms and keep, per phase and rank, the "
                   "Python stack at the highest sample (JSON: peak-stacks)")
    p.add_argument("--work-dir", default=None, help="where checkpoints are written (default: the system's temp)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and per-rank JSON")
    p.add_argument("--out", default=None, help="write every figure here as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--save-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result-dir", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a)
    from tools.bench.common import cpu_name

    results, skipped = [], {}
    for mode in a.modes:
        why = flag_available(a, mode)
        if why is not None:
            print(f"{mode}: skipped: {why}", flush=True)
            skipped[mode] = why
            continue
        try:
            res = run_mode(a, mode)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
            print(f"{mode}: FAILED: {e}", flush=True)
            skipped[mode] = "failed: " + str(e).strip().splitlines()[0]
            continue
        results.append(res)
        print(f"{mode}: done in {res['seconds']:.0f} s", flush=True)
    if not results:
        print("no mode ran: " + "; ".join(f"{m}: {why}" for m, why in skipped.items()), flush=True)
        return 1
    r0 = results[0]["ranks"][0]
    layout = f"DP {a.dp}" + (f" x TP {a.tp}" if a.tp > 1 else "") + (f", {a.experts} experts EP {a.ep}" if a.experts else "")
    head = (f"\n{cpu_name()}, {os.cpu_count()} CPUs; {a.layers} layers, hidden {a.hidden}, vocab {a.vocab}, seq {a.seq}, "
            f"micro-batch 1, fp32, {layout} (gloo), {a.steps} steps; {r0['params-local'] / 1e6:.0f}M parameters on rank 0; "
            f"checkpoint format {r0['plan']['format']}; peak RSS per phase (VmHWM reset before each), GB = 1e9 bytes; "
            f"plan = dry-run phase plan + the measured runtime\n")
    print(head)
    print("\n".join(summary(results)))
    print()
    print("\n".join(table(results)))
    print()
    print("\n".join(acceptance(results)))
    for mode, why in skipped.items():
        print(f"\n{mode}: not measured ({why})")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "cpu": cpu_name(), "results": results, "skipped": skipped}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
