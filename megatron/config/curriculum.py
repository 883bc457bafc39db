"""The ``curriculum_learning`` block of a DeepSpeed config, read and checked (the schedule that uses it is
``megatron.training.curriculum``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from megatron.errors import UserError, check

SCHEDULES = ("fixed_linear", "fixed_root", "fixed_discrete")


@dataclass
class CurriculumConfig:
    """The ``curriculum_learning`` block of a DeepSpeed config (only ``curriculum_type: seqlen``)."""

    min_difficulty: int
    max_difficulty: int
    schedule_type: str = "fixed_linear"
    total_curriculum_step: Optional[int] = None  # fixed_linear / fixed_root
    difficulty_step: int = 8  # fixed_linear / fixed_root
    root_degree: Optional[float] = None  # fixed_root
    difficulty: list = field(default_factory=list)  # fixed_discrete
    max_step: list = field(default_factory=list)  # fixed_discrete

    @classmethod
    def from_block(cls, block: dict, where: str) -> "CurriculumConfig":
        """Read the JSON block; ``where`` names the file in error messages."""
        kind = block.get("curriculum_type", "seqlen")
        check(kind == "seqlen", f"{where}: curriculum_learning.curriculum_type {kind!r} is not supported: "
                                f"only \"seqlen\" (sequence-length curriculum) is")
        sched = block.get("schedule_config", {}) or {}
        if not isinstance(sched, dict):
            raise UserError(f"{where}: curriculum_learning.schedule_config must be an object")
        for key in ("min_difficulty", "max_difficulty"):
            check(key in block, f"{where}: curriculum_learning.{key} is missing")
        cfg = cls(min_difficulty=_int(block["min_difficulty"], "min_difficulty", where),
                  max_difficulty=_int(block["max_difficulty"], "max_difficulty", where),
                  schedule_type=str(block.get("schedule_type", "fixed_linear")),
                  total_curriculum_step=sched.get("total_curriculum_step"),
                  difficulty_step=sched.get("difficulty_step", 8), root_degree=sched.get("root_degree"),
                  difficulty=list(sched.get("difficulty", [])), max_step=list(sched.get("max_step", [])))
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "curriculum_learning") -> None:
        p = f"{where}: curriculum_learning"
        check(self.schedule_type in SCHEDULES,
              f"{p}.schedule_type {self.schedule_type!r} is not one of {', '.join(SCHEDULES)}")
        check(1 <= self.min_difficulty <= self.max_difficulty,
              f"{p}: min_difficulty {self.min_difficulty} must be in [1, max_difficulty {self.max_difficulty}]")
        if self.schedule_type == "fixed_discrete":
            check(len(self.difficulty) >= 1 and len(self.difficulty) == len(self.max_step) + 1,
                  f"{p}.schedule_config: fixed_discrete needs one more 'difficulty' entry than 'max_step' entries "
                  f"(got {len(self.difficulty)} and {len(self.max_step)})")
            check(all(isinstance(d, int) and 1 <= d <= self.max_difficulty for d in self.difficulty),
                  f"{p}.schedule_config.difficulty entries must be integers in [1, {self.max_difficulty}]")
            check(list(self.max_step) == sorted(self.max_step), f"{p}.schedule_config.max_step must be increasing")
            return
        check(isinstance(self.total_curriculum_step, int) and self.total_curriculum_step >= 1,
              f"{p}.schedule_config.total_curriculum_step must be an integer >= 1 (got {self.total_curriculum_step!r})")
        check(isinstance(self.difficulty_step, int) and self.difficulty_step >= 1,
              f"{p}.schedule_config.difficulty_step must be an integer >= 1 (got {self.difficulty_step!r})")
        if self.schedule_type == "fixed_root":
            check(isinstance(self.root_degree, (int, float)) and self.root_degree > 0,
                  f"{p}.schedule_config.root_degree must be > 0 for fixed_root (got {self.root_degree!r})")

    def check_seq_length(self, seq_length: int, where: str) -> None:
        check(self.max_difficulty <= seq_length,
              f"{where}: curriculum_learning.max_difficulty {self.max_difficulty} exceeds --seq-length {seq_length}: "
              f"lower it to at most --seq-length")


def _int(v, key: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise UserError(f"{where}: curriculum_learning.{key} must be an integer (got {v!r})")
    return v

