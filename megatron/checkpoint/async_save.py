"""``--async-save``: the step loop goes on while the checkpoint's shards are written.

The save is split where the training state stops mattering: on the calling thread, every rank checks
the weights, copies its boxes (``sharded_format.staged``: this rank's shard of the model and Adam
state, nothing more) and writes its RNG file (the main rank also ``common.pt``); a background thread
then writes the shards through ``torch.distributed.checkpoint`` over a process group of its own (so
its collectives never interleave with the training's), and on the main rank, once every rank's
shards and the index are on disk, publishes the staging folder and only then names it in the
tracker. Until then the tracker names the previous checkpoint, so a process killed at any moment
leaves that one loadable, exactly as for a synchronous save.

The trainer asks :meth:`PendingSave.done` before each step and calls :meth:`PendingSave.wait` before
the next save and at exit; a failure (a full disk) is kept and reported there, never dropped.
"""
from __future__ import annotations

import threading
from typing import Callable


class PendingSave:
    """A checkpoint whose shards are being written by a background thread."""

    def __init__(self, iteration: int, path: str, write: Callable[[], None]):
        self.iteration, self.path = iteration, path
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, args=(write,), name=f"async-save-{iteration}", daemon=True)
        self._thread.start()

    def _run(self, write: Callable[[], None]) -> None:
        try:
            write()
        except BaseException as e:  # noqa: BLE001 - kept and reported by the training loop
            text = str(e).strip()
            self.error = text.splitlines()[0] if text else type(e).__name__

    def done(self) -> bool:
        """Whether this rank's part of the save has finished (successfully or not)."""
        return not self._thread.is_alive()

    def wait(self) -> str | None:
        """Block until this rank's part has finished; the error line, or None when it succeeded."""
        self._thread.join()
        return self.error
