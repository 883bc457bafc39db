"""Weights & Biases as a second sink for the TensorBoard scalars (Megatron-LM's --wandb-* flags).

:class:`WandbSink` is a metrics sink beside TensorBoard's (``scalar``, ``histogram``, ``text``,
``close``), so the Trainer writes each scalar, per-layer expert load included, to both. Only rank 0
writes. wandb is an optional dependency: giving ``--wandb-project`` without it installed is a
one-line error before any compute (``LoggingConfig.validate``). ``WANDB_MODE=offline`` writes the run to
``--wandb-save-dir`` only (sync it later with ``wandb sync``).
"""
from __future__ import annotations

import os
from typing import Optional

from megatron.training.metrics import MetricsSink


class WandbSink(MetricsSink):
    def __init__(self, logging_cfg, ps, config: Optional[dict] = None):
        self.run = None
        project = logging_cfg.wandb_project
        if not project or not ps.is_main:
            return
        import wandb  # optional dependency, imported only when --wandb-project is given

        save_dir = logging_cfg.wandb_save_dir or os.path.join(logging_cfg.tensorboard_dir or ".", "wandb")
        os.makedirs(save_dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(project=project, name=logging_cfg.wandb_exp_name, dir=save_dir, config=config or {})

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.run is not None:
            self.run.log({name: value}, step=step)

    def histogram(self, name: str, values, step: int) -> None:
        if self.run is not None:
            import numpy as np

            counts = np.asarray(values, dtype=np.float64)  # one bin per expert: its token count
            self.run.log({name: self._wandb.Histogram(np_histogram=(counts, np.arange(len(counts) + 1)))}, step=step)

    def text(self, name: str, text: str, step: int) -> None:
        pass  # the run's config is given to wandb.init

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
