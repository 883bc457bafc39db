"""Is bf16 fast on this device? One rule for training, the demo, the benchmarks and the experiments.

On a CPU without bf16 units (x86 without AVX512-BF16 or AMX, e.g. an AVX2-only AMD EPYC) torch runs
bf16 matmuls through a slow fallback: measured 0.9 GFLOP/s against 121 GFLOP/s in fp32, and a bf16
training step about 38x slower than fp32. GPUs of compute capability 8.0+ (and CPUs with those units)
run bf16 at full speed.

The rule (:func:`bf16_is_fast`): on CUDA, ``torch.cuda.is_bf16_supported()``; on a CPU whose feature
flags are readable (Linux /proc/cpuinfo), the flags (``avx512_bf16`` / ``amx_bf16`` on x86, ``bf16`` on
Arm); otherwise a matmul probe of about a second comparing bf16 with fp32.

    python -m megatron.planning.precision_probe      # prints "bf16" or "fp32" (the reason on stderr)
"""
from __future__ import annotations

import sys
import time
from typing import Optional

import torch

X86_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
ARM_BF16_FLAGS = ("bf16",)
# bf16 slower than this multiple of fp32 in the probe counts as "no bf16 units"
SLOW_RATIO = 2.0


def cpu_flags(path: str = "/proc/cpuinfo") -> Optional[set]:
    """The CPU feature flags, or None where they cannot be read (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


def cpu_has_bf16_units(flags: Optional[set] = None) -> Optional[bool]:
    """True/False from the CPU's feature flags; None when they are unknown."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return None
    return any(f in flags for f in X86_BF16_FLAGS + ARM_BF16_FLAGS)


def bf16_matmul_slowdown(n: int = 128, budget_s: float = 0.5) -> float:
    """bf16 matmul time / fp32 matmul time for an n x n matmul on one thread: the fastest of the calls made
    in about ``budget_s`` for each."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g)
    b = torch.randn(n, n, generator=g)

    def rate(x, y):  # the fastest single call: robust to a loaded machine descheduling some of them
        x @ y  # warm-up
        best, reps, t_end = float("inf"), 0, time.perf_counter() + budget_s
        while reps < 3 or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - t0)
            reps += 1
        return best

    # one thread: a multi-threaded fp32 matmul on a loaded machine waits for its other threads (measured 20x
    # slower than single-threaded bf16 here), which says nothing about the arithmetic units
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return rate(a.bfloat16(), b.bfloat16()) / rate(a, b)
    finally:
        torch.set_num_threads(threads)


def bf16_is_fast(device: torch.device | str = "cpu", probe: bool = False) -> tuple[bool, str]:
    """(is bf16 at least as usable as fp32 here, the reason in a few words)."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"{torch.cuda.get_device_name(device)} {'supports' if ok else 'lacks'} bf16"
    units = None if probe else cpu_has_bf16_units()
    if units is not None:
        return units, ("the CPU has bf16 units (AVX512-BF16/AMX/Arm BF16)" if units
                       else "the CPU has no bf16 units (no AVX512-BF16/AMX)")
    ratio = bf16_matmul_slowdown()
    return ratio < SLOW_RATIO, f"a bf16 matmul ran {ratio:.1f}x the time of fp32 on this CPU"


def bf16_warning(device: torch.device | str = "cpu") -> Optional[str]:
    """One line of advice when bf16 was asked for on a device where it is slow; None when it is fine.

    Training calls this at start-up when --bf16 is set and prints the line it returns.
    """
    fast, why = bf16_is_fast(device)
    if fast:
        return None
    return (f"warning: --bf16 is very slow here ({why}; on such CPUs bf16 training ran ~38x slower "
            f"than fp32): drop --bf16 to train in fp32")


def default_device() -> str:
    """Where training runs without --use-cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def preferred_precision(device: torch.device | str | None = None) -> str:
    """"bf16" where bf16 is fast, else "fp32": the choice the demo, benchmarks and experiments make."""
    return "bf16" if bf16_is_fast(device or default_device())[0] else "fp32"


def main() -> None:
    fast, why = bf16_is_fast(default_device(), probe="--probe" in sys.argv)
    print(f"{'bf16' if fast else 'fp32'}: {why}", file=sys.stderr)
    print("bf16" if fast else "fp32")


if __name__ == "__main__":
    main()
