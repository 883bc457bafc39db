"""The NaN / inf guard: when a diverged run must stop instead of saving poisoned weights.

* A non-finite gradient norm skips the step (the optimizer does not move), as fp16 loss scaling
  always did. With fp16 dynamic loss scaling a skipped step is the scaler backing off and is not
  counted while the scale can still go down; otherwise every skipped step counts.
* ``--max-skipped-iterations N``: more than N counted skips in a row stop the run.
* bf16 / fp32 have no loss scale to lower, so a non-finite loss stops the run at once.
A stop is a :class:`TrainingFault` (one line naming the iteration, exit status 3); no checkpoint is
written after it, so the tracker keeps naming the last finite checkpoint.
"""
from __future__ import annotations

import math

from megatron.errors import TrainingFault


class NonFiniteGuard:
    def __init__(self, max_skipped: int, fp16: bool):
        self.max_skipped, self.fp16 = max_skipped, fp16
        self.consecutive = 0

    def check(self, iteration: int, logs: dict, grad_norm: float, skipped: bool, scaler_before: float, scaler) -> None:
        """Called after each step with the DP-averaged losses; raises TrainingFault to stop the run."""
        bad = {k: v for k, v in logs.items() if not math.isfinite(v)}
        if bad and not self.fp16:
            k, v = next(iter(bad.items()))
            raise TrainingFault(f"iteration {iteration}: {k} is {v} (a non-finite loss, which bf16/fp32 cannot recover "
                                f"from); the run stops and the last finite checkpoint is kept: lower --lr or "
                                f"--init-method-std, or check the data")
        if not skipped:
            self.consecutive = 0
            return
        if self.fp16 and hasattr(scaler, "min_scale") and scaler_before > scaler.min_scale:
            return  # the dynamic loss scaler is still backing off
        self.consecutive += 1
        if self.consecutive > self.max_skipped:
            raise TrainingFault(f"iteration {iteration}: {self.consecutive} steps in a row were skipped for a "
                                f"non-finite gradient norm ({grad_norm}), more than --max-skipped-iterations "
                                f"{self.max_skipped}; the run stops and the last finite checkpoint is kept")
