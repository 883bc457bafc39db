"""Timing helpers: interleaved repeats so that noisy machines affect all contenders alike."""
from __future__ import annotations

import platform
import statistics
import time


def interleaved_median(fns: dict, repeats: int = 5, warmup: int = 1) -> dict:
    """Run each callable ``warmup`` times, then ``repeats`` rounds of all of them; median seconds each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def cpu_name() -> str:
    """The CPU's model name (to print with every figure: machines differ between runs)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mean_train_step_seconds(rank: int, argv: list, skip: int = 2) -> float:
    """One process of a ``pretrain_gpt_moe.py`` run (under ``tests.dist_utils.run_distributed``): the mean
    wall time of its training steps after the first ``skip``."""
    import pretrain_gpt_moe
    from megatron.training import Trainer

    times = []
    orig = Trainer.train_step

    def timed(*a, **k):
        t0 = time.perf_counter()
        out = orig(*a, **k)
        times.append(time.perf_counter() - t0)
        return out
    Trainer.train_step = timed
    pretrain_gpt_moe.main(argv)
    return statistics.mean(times[skip:])
