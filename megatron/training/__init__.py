"""Training: the :class:`Trainer` and Megatron's ``pretrain`` entry (see trainer.py); a loss function's
result is a :class:`StepOutput` (see step_output.py)."""
from megatron.training.schedule import BatchSchedule, MicroBatchIterator, train_schedule
from megatron.training.step_output import StepOutput, as_step_output
from megatron.training.trainer import StepResult, Trainer, autocast_context, pretrain, set_seed

__all__ = ["BatchSchedule", "MicroBatchIterator", "StepOutput", "StepResult", "Trainer", "as_step_output",
           "autocast_context", "pretrain", "set_seed", "train_schedule"]
