"""Named wall-clock timers for the phases of a training step, owned by the Trainer (no global state).

A :class:`Timers` hands out one :class:`Timer` per name, created on first use. A timer adds up the
time between ``start()`` and ``stop()`` (or a ``with`` block) until it is read with
``elapsed(reset=True)``; on a GPU both ends synchronize the device first, so the figure is the
time the work took, not the time it took to queue it. Disabled timers (``Timers(enabled=False)``)
cost nothing: every name maps to one shared no-op timer.

The names follow Megatron-LM's (written to TensorBoard as ``<name>-time``, seconds per
iteration): ``forward-backward`` (all micro-batches of a step), inside it ``forward-compute``
(which includes ``batch-generator``, the batch fetch, and the forward all-to-alls) and
``backward-compute``; ``all-to-all`` is the expert-parallel token exchange of dispatch and
combine, forward and backward (a part of forward-compute and backward-compute);
``grads-all-reduce`` / ``grads-reduce-scatter`` the data-parallel gradient reduction (ZeRO-2
reduce-scatters); ``optimizer`` unscaling, the gradient norm, clipping and the Adam step.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator, Optional

import torch

# the order of the console line and of the cross-rank reduction
PHASES = ("forward-backward", "forward-compute", "backward-compute", "batch-generator", "all-to-all",
          "grads-all-reduce", "grads-reduce-scatter", "optimizer")


class Timer:
    """Accumulated seconds between start() and stop(); ``count`` intervals since the last reset."""

    def __init__(self, name: str, device: Optional[torch.device] = None):
        self.name = name
        self.sync = device is not None and device.type == "cuda"
        self.device = device
        self.total = 0.0
        self.count = 0
        self._t0: Optional[float] = None

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        if self._t0 is not None:
            raise RuntimeError(f"timer {self.name!r} started twice")
        self._t0 = self._now()

    def stop(self) -> None:
        if self._t0 is None:
            raise RuntimeError(f"timer {self.name!r} stopped without a start")
        self.total += self._now() - self._t0
        self.count += 1
        self._t0 = None

    def elapsed(self, reset: bool = True) -> float:
        """Seconds accumulated (a running interval included up to now); zeroed when ``reset``."""
        out = self.total + (self._now() - self._t0 if self._t0 is not None else 0.0)
        if reset:
            self.total, self.count = 0.0, 0
            if self._t0 is not None:
                self._t0 = self._now()
        return out

    def __enter__(self) -> "Timer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _NoTimer(Timer):
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def elapsed(self, reset: bool = True) -> float:
        return 0.0


class Timers:
    """``timers(name)`` -> that name's :class:`Timer`; ``device`` decides whether ends synchronize a GPU."""

    def __init__(self, device: Optional[torch.device] = None, enabled: bool = True):
        self.device, self.enabled = device, enabled
        self._timers: dict[str, Timer] = {}
        self._off = _NoTimer("disabled")

    def __call__(self, name: str) -> Timer:
        if not self.enabled:
            return self._off
        if name not in self._timers:
            self._timers[name] = Timer(name, self.device)
        return self._timers[name]

    def names(self) -> list[str]:
        return list(self._timers)

    def used(self, name: str) -> bool:
        """Whether ``name`` ran since its last reset."""
        t = self._timers.get(name)
        return t is not None and t.count > 0

    def elapsed(self, names: Iterable[str], reset: bool = True) -> dict[str, float]:
        """Seconds of each name (0 for one never started)."""
        return {n: self._timers[n].elapsed(reset) if n in self._timers else 0.0 for n in names}

    def timed_iterator(self, name: str, iterator) -> Iterator:
        """``iterator`` whose every ``next()`` is timed under ``name`` (the batch fetch)."""
        return _TimedIterator(iterator, self(name))


class _TimedIterator:
    def __init__(self, iterator, timer: Timer):
        self.iterator, self.timer = iterator, timer

    def __iter__(self):
        return self

    def __next__(self):
        with self.timer:
            return next(self.iterator)
