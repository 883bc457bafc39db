"""Training: the :class:`Trainer` and Megatron's ``pretrain`` entry (see trainer.py)."""
from megatron.training.schedule import BatchSchedule, MicroBatchIterator, train_schedule
from megatron.training.trainer import StepResult, Trainer, autocast_context, pretrain, set_seed

__all__ = ["BatchSchedule", "MicroBatchIterator", "StepResult", "Trainer", "autocast_context", "pretrain", "set_seed",
           "train_schedule"]
