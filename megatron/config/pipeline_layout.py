"""Which layers each pipeline stage holds.

``P = --pipeline-model-parallel-size`` ranks each hold one stage (1F1B, GPipe) or ``V`` virtual stages
(``--num-layers-per-virtual-pipeline-stage``: the interleaved 1F1B schedule). Stages are numbered in
model order, ``s = v * P + p`` being virtual stage ``v`` of pipeline rank ``p`` (Megatron's and
torch.distributed.pipelining's placement), so rank 0 holds stage 0 (the embeddings) and rank P - 1
the last stage (final layer norm, tied output layer, loss).

Layers split evenly over the stages; ``--decoder-first-pipeline-num-layers`` /
``--decoder-last-pipeline-num-layers`` give the first / last stage another count (they also run the
embedding and the head) and split the rest evenly over the middle stages.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.errors import UserError


@dataclass(frozen=True)
class PipelineLayout:
    pp: int  # pipeline ranks
    chunks: tuple[tuple[int, int], ...]  # per stage s (model order): its layers [start, end)

    @property
    def num_stages(self) -> int:
        return len(self.chunks)

    @property
    def virtual(self) -> int:
        """Stages per pipeline rank."""
        return self.num_stages // self.pp

    def stages_of(self, pp_rank: int) -> list[int]:
        """The stages pipeline rank ``pp_rank`` holds, in model order."""
        return [v * self.pp + pp_rank for v in range(self.virtual)]

    def layers_of(self, pp_rank: int) -> list[int]:
        return [i for s in self.stages_of(pp_rank) for i in range(*self.chunks[s])]

    def rank_of_layer(self, layer: int) -> int:
        for s, (a, b) in enumerate(self.chunks):
            if a <= layer < b:
                return s % self.pp
        raise ValueError(f"layer {layer} is in no stage")

    def describe(self) -> str:
        return ", ".join(f"stage {s} (rank {s % self.pp}): layers {a}-{b - 1}" if b > a else f"stage {s}: no layers"
                         for s, (a, b) in enumerate(self.chunks))


def _split(n: int, parts: int, what: str) -> list[int]:
    if parts == 0:
        if n:
            raise UserError(f"{what}: {n} layers are left for no stage; the first and last stage counts must add "
                            f"up to --num-layers with --pipeline-model-parallel-size 2")
        return []
    if n % parts or n // parts == 0:
        raise UserError(f"{what}: {n} layers do not split evenly over {parts} stages: change --num-layers, "
                        f"--pipeline-model-parallel-size, or give the first / last stage another count with "
                        f"--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers")
    return [n // parts] * parts


def build_layout(num_layers: int, pp: int, layers_per_virtual_stage: Optional[int] = None,
                 first: Optional[int] = None, last: Optional[int] = None) -> PipelineLayout:
    """The stages' layers; a layout that cannot work is a one-line UserError naming the flags."""
    if pp == 1:
        if layers_per_virtual_stage or first is not None or last is not None:
            raise UserError("--num-layers-per-virtual-pipeline-stage / --decoder-first/last-pipeline-num-layers need "
                            "--pipeline-model-parallel-size > 1")
        return PipelineLayout(1, ((0, num_layers),))
    if layers_per_virtual_stage:
        if first is not None or last is not None:
            raise UserError("--num-layers-per-virtual-pipeline-stage does not combine with "
                            "--decoder-first/last-pipeline-num-layers yet: use one of the two")
        n = layers_per_virtual_stage
        if num_layers % n or (num_layers // n) % pp:
            raise UserError(f"--num-layers-per-virtual-pipeline-stage {n}: --num-layers {num_layers} must be a multiple "
                            f"of {n} x --pipeline-model-parallel-size {pp} = {n * pp}")
        counts = [n] * (num_layers // n)
    else:
        head = [first] if first is not None else []
        tail = [last] if last is not None else []
        given = sum(head) + sum(tail)
        middle = pp - len(head) - len(tail)
        if given > num_layers:
            raise UserError(f"--decoder-first/last-pipeline-num-layers ({given} layers) exceed --num-layers {num_layers}")
        counts = head + _split(num_layers - given, middle, f"--pipeline-model-parallel-size {pp}") + tail
    chunks, start = [], 0
    for c in counts:
        chunks.append((start, start + c))
        start += c
    return PipelineLayout(pp, tuple(chunks))
