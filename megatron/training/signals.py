"""``--exit-signal-handler``: SIGTERM (a preempted job) asks for a save at the end of the current step.

The handler only sets a flag; the trainer checks it after each step on every rank (one
all-reduce, so a signal delivered to one rank stops all of them at the same iteration), saves a
checkpoint and exits with status 0.
"""
from __future__ import annotations

import signal


class SignalFlag:
    def __init__(self, signum: int = signal.SIGTERM):
        self.signum, self.received, self._previous = signum, False, None

    def install(self) -> "SignalFlag":
        self._previous = signal.signal(self.signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None
