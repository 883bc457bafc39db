"""One training step (or evaluation) of a pipeline-parallel GPT on ``torch.distributed.pipelining``.

Every rank of a pipeline reads the same micro-batches (its DP rank's); stage 0 feeds the tokens in,
the last stage gets ``target`` = [labels; tokens] per sample (the tokens for a KD teacher's logits) and
computes the loss of each micro-batch there:

    loss = (alpha * lm + kd  |  lm) * scale / num_micro      (scale: the fp16 loss scale, else 1)

while every MoE layer's ``moe_loss`` rides on its stage's hidden states with the same factor
(``StageForward``), so the gradients are those of PP = 1's ``(lm + moe) * scale / num_micro``. The
schedule is torch's (``Schedule1F1B``, ``ScheduleInterleaved1F1B`` with virtual stages, ``ScheduleGPipe``),
built with static shapes (no shape-inference forward) and ``scale_grads=False`` (the loss is already
divided by the micro-batch count). After the data-parallel gradient reduction the tied word-embedding
gradients of the first and last stage are summed over the embedding group (``sum_tied_gradients``, called
by the trainer). With one stage per rank, ``before_last_backward`` (``--overlap-grad-reduce``: the reducer's
``arm``) runs before the stage's last micro-batch backward, which the schedule flags, so the gradient buckets
are reduced while that backward runs; with virtual stages the reduction runs after the schedule.

Logged values ("lm loss", "kd loss", "moe loss") and the MoE layers' load statistics are summed over
the pipeline group, so every rank logs, guards and decides on the same figures.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
from torch.distributed.pipelining.schedules import ScheduleLoopedBFS

from megatron.config.pipeline_layout import PipelineLayout
from megatron.model.moe.metrics import MoELoad
from megatron.model.param_tags import is_pipeline_tied_copy
from megatron.parallel.pipeline.stage_model import StageForward


class _Stage(PipelineStage):
    """torch's stage, calling ``before_last_backward`` (when set) before the step's last backward."""

    before_last_backward = None

    def backward_one_chunk(self, bwd_chunk_id, loss=None, full_backward=True, last_backward=False):
        if last_backward and self.before_last_backward is not None:
            self.before_last_backward()
        return super().backward_one_chunk(bwd_chunk_id, loss=loss, full_backward=full_backward,
                                          last_backward=last_backward)


SCHEDULES = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe, "Interleaved1F1B": ScheduleInterleaved1F1B}


class PipelineRunner:
    """The pipeline schedule of one rank over ``model`` (pruned by ``keep_stage_parts``)."""

    def __init__(self, model, layout: PipelineLayout, ps, model_cfg, kd_cfg=None, schedule: str | None = None,
                 teacher_logits=None):
        """``teacher_logits(teacher, tokens)`` -> [B, T, V]: the KD teacher's logits (needed with a teacher)."""
        self.model, self.layout, self.ps, self.model_cfg, self.kd_cfg = model, layout, ps, model_cfg, kd_cfg
        self.teacher_logits = teacher_logits
        self.stage_ids = layout.stages_of(ps.pp_rank)
        self.has_first, self.has_last = 0 in self.stage_ids, layout.num_stages - 1 in self.stage_ids
        self.kind = schedule or ("Interleaved1F1B" if layout.virtual > 1 else "1F1B")
        self.chunks = [StageForward(model, layout, s, model_cfg.moe, self._record, lambda: self._grad_scale)
                       for s in self.stage_ids]
        self._schedules: dict = {}
        self.before_last_backward = None  # set by the trainer: the overlapped gradient reducer's arm()
        self._grad_scale = 1.0
        self._teacher = None
        self._training = True
        self._sums: dict = defaultdict(float)
        self._moe: list = []

    # ---- per micro-batch hooks (called by the schedule)

    def _record(self, stats, aux: torch.Tensor) -> None:
        self._sums["moe loss"] += float(aux.detach())
        self._moe_step.append(stats)

    def _loss(self, h: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Last stage: hidden states [b, T, H], target [b, 2, T] (labels, tokens) -> the micro-batch's loss term."""
        labels, tokens = target[:, 0], target[:, 1]
        if self._teacher is not None:
            logits = self.teacher_logits(self._teacher, tokens)  # [b, T, V]
            ce, kd = self.model.head_distill(h, labels, logits, self.kd_cfg.temperature)
            lm = ce.mean()
            kd_term = self.kd_cfg.beta_ce * kd.mean()
            loss = self.kd_cfg.alpha_ce * lm + kd_term
            self._sums["kd loss"] += float(kd_term.detach())
        else:
            lm = self.model.head_loss(h, labels).mean()
            loss = lm
        self._sums["lm loss"] += float(lm.detach())
        return loss * self._grad_scale if self._training else loss

    # ---- schedules

    def _schedule(self, num_micro: int, mbs: int, seq: int, train: bool):
        key = (num_micro, mbs, seq, train)
        if key not in self._schedules:
            dev, H = self.ps.device, self.model_cfg.hidden_size
            stages = []
            for s, chunk in zip(self.stage_ids, self.chunks):
                # static shapes (no inference forward); activations carry gradients when training
                hidden = lambda: torch.zeros(mbs, seq, H, device=dev, requires_grad=train)  # noqa: E731
                x = torch.zeros(mbs, seq, dtype=torch.long, device=dev) if s == 0 else hidden()
                stage = _Stage(chunk, s, self.layout.num_stages, dev, input_args=(x,), output_args=(hidden(),),
                               group=self.ps.pp_group)
                if len(self.stage_ids) == 1:  # virtual stages: each one's last backward comes at another time
                    stage.before_last_backward = self.before_last_backward
                stages.append(stage)
            kind, pp = self.kind, self.layout.pp
            if kind == "1F1B" and num_micro < pp:
                kind = "GPipe"  # 1F1B needs at least one micro-batch per stage; GPipe computes the same
            if kind == "Interleaved1F1B" and num_micro % max(1, num_micro // pp):
                kind = "GPipe"  # torch's interleaved rounds must divide the micro-batches: the looped GPipe order
            if len(stages) == 1:
                cls = SCHEDULES["GPipe" if kind == "Interleaved1F1B" else kind]
                sched = cls(stages[0], n_microbatches=num_micro, loss_fn=self._loss, scale_grads=False)
            else:
                cls = ScheduleLoopedBFS if kind == "GPipe" else ScheduleInterleaved1F1B
                sched = cls(stages, n_microbatches=num_micro, loss_fn=self._loss, scale_grads=False)
            self._schedules[key] = sched
        return self._schedules[key]

    def _run(self, data_iterator, num_micro: int, train: bool):
        blocks = [np.asarray(next(data_iterator)) for _ in range(num_micro)]  # [mbs, T + 1] each
        mbs = blocks[0].shape[0]
        block = torch.from_numpy(np.concatenate(blocks)).to(self.ps.device)  # [num_micro * mbs, T + 1]
        tokens, labels = block[:, :-1].contiguous(), block[:, 1:].contiguous()  # [n * mbs, T] each
        sched = self._schedule(num_micro, mbs, tokens.shape[1], train)
        self._sums, self._moe_step, self._training = defaultdict(float), [], train
        args = (tokens,) if self.has_first else ()
        target = torch.stack([labels, tokens], 1) if self.has_last else None  # [n * mbs, 2, T]
        if train:
            sched.step(*args, target=target, return_outputs=False)
        else:
            sched.eval(*args, target=target, return_outputs=False)

    def forward_backward(self, data_iterator, num_micro: int, grad_scale: float, teacher=None, kd=None):
        """One step's micro-batches through the pipeline. Returns (log sums averaged over micro-batches, summed
        over the pipeline; MoE loads of every MoE layer of the model, in layer order). ``teacher``: the KD
        teacher on the last stage (None elsewhere); ``kd``: distillation is on (default: a teacher is given)."""
        self._grad_scale, self._teacher = grad_scale / num_micro, teacher
        self._run(data_iterator, num_micro, train=True)
        moe = self._gather_moe(self._accumulate(self._moe_step))
        return self._pipeline_sums(num_micro, teacher is not None if kd is None else kd), moe

    @torch.no_grad()
    def evaluate(self, data_iterator, batches: int, num_micro: int) -> dict:
        """Forward only over ``batches`` steps of ``num_micro`` micro-batches; the log sums over all the micro-batches
        (summed over the pipeline, not averaged)."""
        self._teacher = None
        total: dict = defaultdict(float)
        for _ in range(batches):
            self._run(data_iterator, num_micro, train=False)
            for k, v in self._sums.items():
                total[k] += v
        self._sums = total
        return self._pipeline_sums(1, False)

    # ---- reductions over the pipeline

    def _accumulate(self, stats: list) -> list:
        by_layer: dict = {}
        for s in stats:
            if s.layer in by_layer:
                by_layer[s.layer].add(s)
            else:
                by_layer[s.layer] = MoELoad.of(s)
        return [by_layer[k] for k in sorted(by_layer)]

    def _pipeline_sums(self, divide: int, kd: bool) -> dict:
        keys = ["lm loss"] + (["kd loss"] if kd else []) + (["moe loss"] if self.model_cfg.moe.enabled else [])
        vec = torch.tensor([self._sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=self.ps.device)
        dist.all_reduce(vec, group=self.ps.pp_group)
        return {k: float(v) / divide for k, v in zip(keys, vec.tolist())}

    def _gather_moe(self, local: list) -> list:
        """Every MoE layer's loads (this rank's DP share) from the stages that hold them, in layer order."""
        mine = [(a.layer, a.counts.cpu(), a.sums.cpu()) for a in local]
        everyone: list = [None] * self.ps.pp_size
        dist.all_gather_object(everyone, mine, group=self.ps.pp_group)
        dev = self.ps.device
        out = [MoELoad(layer, counts.to(dev), sums.to(dev)) for part in everyone for layer, counts, sums in part]
        return sorted(out, key=lambda a: a.layer)

    def sum_tied_gradients(self) -> None:
        """First stage's word-embedding gradient + last stage's (the tied output layer), on both; after the
        data-parallel reduction (the two sums commute, and an overlapped reduction copies its result back)."""
        if (self.ps.embedding_group is None or self.has_first == self.has_last
                or self.model_cfg.untie_embeddings_and_output_weights):  # an untied output layer: nothing shared
            return
        for p in self.model.word_embeddings.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=self.ps.embedding_group)

    def tied_copy_params(self) -> list:
        return [p for p in self.model.parameters() if is_pipeline_tied_copy(p)]
