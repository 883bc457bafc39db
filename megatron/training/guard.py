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


class SpikeGuard:
    """Divergence before NaN: a loss or gradient-norm spike skips the step; a run of them stops the run.

    A step whose LM loss exceeds ``--loss-spike-factor`` times the running mean of the accepted steps' losses,
    or whose gradient norm exceeds ``--grad-norm-spike-factor`` times theirs, is a spike: the optimizer does
    not move, nothing is saved while the spike lasts, and a warning names the figures. The running means are
    exponential (weight 0.9 on the past) over accepted steps only, and checks start after
    ``--spike-warmup-iters`` accepted steps. More than ``--max-spike-iterations`` spikes in a row stop the
    run (TrainingFault, exit 3) with the tracker on the last checkpoint saved before them. A factor of 0
    disables that check.
    """

    BETA = 0.9

    def __init__(self, loss_factor: float, grad_factor: float, warmup: int, max_spikes: int):
        self.loss_factor, self.grad_factor, self.warmup, self.max_spikes = loss_factor, grad_factor, warmup, max_spikes
        self.loss_mean = self.grad_mean = None
        self.accepted = 0
        self.streak = 0

    def check(self, loss, grad_norm: float) -> str | None:
        """Why this step is a spike (one phrase), or None; ``loss`` may be None (no LM loss logged)."""
        if self.accepted < self.warmup:
            return None
        if self.loss_factor > 0 and loss is not None and self.loss_mean and loss > self.loss_factor * self.loss_mean:
            return (f"lm loss {loss:.4g} is {loss / self.loss_mean:.1f}x its running mean {self.loss_mean:.4g} "
                    f"(--loss-spike-factor {self.loss_factor:g})")
        if self.grad_factor > 0 and self.grad_mean and grad_norm > self.grad_factor * self.grad_mean:
            return (f"grad norm {grad_norm:.4g} is {grad_norm / self.grad_mean:.1f}x its running mean "
                    f"{self.grad_mean:.4g} (--grad-norm-spike-factor {self.grad_factor:g})")
        return None

    def after_step(self, iteration: int, loss, grad_norm: float, spike: str | None, skipped: bool) -> str | None:
        """Update the running means with an accepted step, or count a spike; returns the warning line of a spike,
        and raises TrainingFault when more than ``max_spikes`` came in a row."""
        if spike is None:
            self.streak = 0
            if not skipped and math.isfinite(grad_norm):
                b = self.BETA
                if loss is not None and math.isfinite(loss):
                    self.loss_mean = loss if self.loss_mean is None else b * self.loss_mean + (1 - b) * loss
                self.grad_mean = grad_norm if self.grad_mean is None else b * self.grad_mean + (1 - b) * grad_norm
                self.accepted += 1
            return None
        self.streak += 1
        if self.streak > self.max_spikes:
            raise TrainingFault(f"iteration {iteration}: {self.streak} spikes in a row, more than --max-spike-iterations "
                                f"{self.max_spikes} (last: {spike}); the run diverged, so it stops and the last "
                                f"checkpoint before the spikes is kept: lower --lr or raise --clip-grad's effect, or "
                                f"check the data")
        return f"WARNING: iteration {iteration}: {spike}: step skipped, nothing saved ({self.streak} in a row)"
