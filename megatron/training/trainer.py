"""The training driver: a :class:`Trainer` and ``pretrain(datasets_provider, model_provider, forward_step)``.

Model-specific code (``pretrain_gpt_moe.py``) supplies hooks; the Trainer owns the run in small
steps: :meth:`~Trainer.setup` (tokenizer, preflight, model, optimizer, resume, teacher, data,
metrics), :meth:`~Trainer.forward_backward` (the micro-batches of one step: the one place a
pipeline schedule would replace), :meth:`~Trainer.step` (gradient reduction, loss scaling,
clipping, the optimizer), :meth:`~Trainer.evaluate`, :meth:`~Trainer.log`, :meth:`~Trainer.save`
and :meth:`~Trainer.should_exit`.
"""
from __future__ import annotations

import contextlib
import gc
import math
import os
import random
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from megatron.checkpoint.async_save import PendingSave
from megatron.checkpoint.atomic import recover_and_clean
from megatron.checkpoint.formats import FORMAT_NAMES
from megatron.checkpoint.layout import TRACKER, locate_checkpoint
from megatron.checkpoint.load import load_checkpoint
from megatron.checkpoint.save import save_checkpoint
from megatron.config.schema import ModelConfig, pad_vocab_size
from megatron.errors import UserError
from megatron.model.gpt_model import GPTModel
from megatron.model.param_tags import is_expert
from megatron.optim.build import build_optimizer, shards_gradients
from megatron.optim.loss_scaler import build_loss_scaler
from megatron.optim.lr_scheduler import build_scheduler
from megatron.parallel.apply import build_grad_reducer, build_model
from megatron.parallel.collectives import all_reduce_sum, any_rank
from megatron.parallel.expert_parallel import time_exchanges
from megatron.parallel.fsdp import FSDPGradReducer, apply_fsdp2
from megatron.parallel.grad_sync import (
    clip_gradients,
    global_grad_norm,
    local_tensor,
    scale_gradients,
    sum_sequence_parallel_grads,
)
from megatron.parallel.pipeline.runner import PipelineRunner
from megatron.parallel.router_balance import update_router_biases
from megatron.parallel.state import ParallelState, destroy, initialize
from megatron.planning.model_stats import count_parameters, device_peak_tflops, flops_per_token
from megatron.tokenizer import registry as tokenizers
from megatron.training.agreement import agree_on_error, agree_on_settings, check_replicas
from megatron.training.arguments import parse_args
from megatron.training.curriculum import TruncatingIterator, build_curriculum, iterations_for_tokens, tokens_trained
from megatron.training.distillation import teacher_logits
from megatron.training.guard import NonFiniteGuard, SpikeGuard
from megatron.training.logging_utils import check_tensorboard_dir, print_rank0
from megatron.training.metrics import MetricsLogger, MetricsSink, TensorBoardSink, accumulate_moe
from megatron.training.moe_health import MoEHealthMonitor
from megatron.training.optimizer_stats import optimizer_state_stats
from megatron.training.preflight import check_batch_arithmetic, check_no_overwrite, check_save_dir, check_train_split
from megatron.training.schedule import BatchSchedule, MicroBatchIterator, train_schedule
from megatron.training.signals import SignalFlag
from megatron.training.step_output import as_step_output
from megatron.training.timers import Timers
from megatron.training.wandb_sink import WandbSink


@dataclass
class StepResult:
    logs: dict
    moe: list
    grad_norm: float
    skipped: bool  # the optimizer did not move (a non-finite norm or a spike)
    spike: str | None = None  # why the step was a spike (SpikeGuard), else None


def autocast_context(cfg, device):
    if cfg.precision.bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if cfg.precision.fp16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# under --sequence-parallel each TP rank logs its sequence shard's share of these (TokenDispatcher.loss_share)
SHARD_SHARES = ("moe loss",)


def _dp_mean(sums: dict, ps, count: int) -> dict:
    """Average string-keyed sums over DP ranks (TP ranks hold the same values, but for the shard shares of
    sequence parallelism, summed over TP) and ``count``."""
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=ps.device)
    all_reduce_sum(vec, ps, ps.dp_group)
    shares = [i for i, k in enumerate(keys) if k in SHARD_SHARES]
    if getattr(ps, "sequence_parallel", False) and shares:
        part = vec[shares]
        dist.all_reduce(part, group=ps.tp_group)
        vec[shares] = part
    return {k: float(v) / (count * ps.dp_size) for k, v in zip(keys, vec.tolist())}


class Trainer:
    """One training run. ``run()`` = ``setup()``, then steps until done or ``should_exit()``, then the
    final evaluation and save. ``sinks`` add metrics backends next to TensorBoard."""

    def __init__(self, cfg, ps: ParallelState, datasets_provider, model_provider, forward_step_fn,
                 teacher_provider=None, sinks: list[MetricsSink] | None = None):
        self.cfg, self.ps = cfg, ps
        self.datasets_provider, self.model_provider = datasets_provider, model_provider
        self.forward_step_fn, self.teacher_provider = forward_step_fn, teacher_provider
        self.extra_sinks = list(sinks or [])
        self.iteration = self.consumed = self.tokens = 0
        self.curriculum = None
        self.history, self.kd_history, self.norm_history = [], [], []
        self.skipped_total = 0
        self.teacher = self.teacher_ref = None
        self.kd_active = False  # distillation is on (every rank; under PP only the last stage holds the teacher)
        self.signal = None
        self.timers = Timers(enabled=False)  # setup_timers() decides
        self.wall_clock_breakdown = False
        self.pending_save: PendingSave | None = None  # --async-save: the save being written in the background
        self.async_group = None  # --async-save: the process group of the background writes
        self.pipeline: PipelineRunner | None = None  # --pipeline-model-parallel-size > 1: the schedule runner

    # ------------------------------------------------------------------------------------------
    # set-up

    def setup(self) -> None:
        cfg, ps = self.cfg, self.ps
        self.t_start = time.time()
        check_batch_arithmetic(cfg.train)
        cfg.validate_world(ps.world_size)
        self.setup_tokenizer()
        self.preflight_save_dir()
        if cfg.logging.tensorboard_dir:
            check_tensorboard_dir(cfg.logging.tensorboard_dir, ps)  # one line now, not a traceback at the first log
        self.setup_model_and_optimizer()
        self.report_parameters()
        self.schedule = BatchSchedule(cfg.train, ps.dp_size)
        self.train_iters, train_samples = train_schedule(cfg, self.schedule)
        self.curriculum = build_curriculum(cfg)
        if self.curriculum is not None and getattr(ps, "sequence_parallel", False):
            raise UserError("--sequence-parallel does not combine with the sequence-length curriculum yet (its "
                            "lengths must divide over the TP ranks): drop one of the two")
        if self.curriculum is not None and cfg.train.train_tokens is not None:  # shorter steps: more of them
            self.train_iters, train_samples = iterations_for_tokens(
                self.curriculum, self.schedule.global_batch, cfg.train.train_tokens, cfg.train.train_iters,
                cfg.train.train_samples)
        self.scheduler = build_scheduler(cfg.optimizer, cfg.model.seq_length, cfg.train.global_batch_size, train_samples)
        self.scaler = build_loss_scaler(cfg.precision)
        self.guard = NonFiniteGuard(cfg.train.max_skipped_iterations, cfg.precision.fp16)
        t = cfg.train
        self.spikes = SpikeGuard(t.loss_spike_factor, t.grad_norm_spike_factor, t.spike_warmup_iters,
                                 t.max_spike_iterations)
        self.load()
        self.scheduler.apply(self.optimizer)
        self.setup_teacher()
        gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
        self.eval_micro = gbs // (mbs * ps.dp_size)
        n_eval = cfg.train.eval_iters * gbs
        self.train_ds, self.valid_ds, self.test_ds = self.datasets_provider(cfg, [train_samples, n_eval, n_eval])
        check_train_split(self.train_ds, cfg.data, self.train_iters, cfg.train.skip_train)
        self.autocast = autocast_context(cfg, ps.device)
        self.setup_metrics()
        self.setup_timers()
        if cfg.train.exit_signal_handler:
            self.signal = SignalFlag().install()
        print_rank0(ps, f"> training for {self.train_iters} iterations ({train_samples} samples, global batch {gbs}, "
                        f"micro batch {mbs}); {self.metrics.fpt / 1e6:.1f} MFLOPs per token; "
                        f"startup {time.time() - self.t_start:.1f} s")

    def setup_tokenizer(self) -> None:
        cfg, ps = self.cfg, self.ps
        tokenizer = tokenizers.build_for_data_config(cfg.data, cfg.model.vocab_size)
        cfg.model.vocab_size = pad_vocab_size(tokenizer.vocab_size, cfg.data.make_vocab_size_divisible_by,
                                              cfg.parallel.tensor_model_parallel_size)
        limit = cfg.model.true_vocab_size
        if limit is not None and not tokenizer.vocab_size <= limit <= cfg.model.vocab_size:
            raise UserError(f"--true-vocab-size {limit} must lie between the tokenizer's vocabulary "
                            f"({tokenizer.vocab_size}) and the padded one ({cfg.model.vocab_size})")
        self.tokenizer = tokenizer
        print_rank0(ps, f"> world size {ps.world_size} (TP {ps.tp_size}, {f'PP {ps.pp_size}, ' if ps.pp_size > 1 else ''}"
                        f"DP {ps.dp_size}, EP {ps.ep_size}"
                        f"{', ZeRO-2 optimizer' if cfg.optimizer.zero_stage == 2 else ', ZeRO-1 optimizer' if cfg.optimizer.use_distributed_optimizer else ''}) on {ps.device}; "
                        f"vocab {tokenizer.vocab_size} padded to {cfg.model.vocab_size}")

    def preflight_save_dir(self) -> None:
        """--save: created, writable, with room for a checkpoint; orphans of killed saves removed (main rank)."""
        ck = self.cfg.checkpoint
        if not ck.save or self.cfg.train.skip_train:
            return
        message, lines = None, []
        if self.ps.is_main:
            try:
                check_save_dir(ck.save, self.cfg.model, not ck.no_save_optim,
                               sharded_over=self.ps.world_size if ck.ckpt_format == "torch_dist" else None)
                lines = recover_and_clean(ck.save)
                check_no_overwrite(ck.save, ck.load, ck.overwrite_checkpoints)
            except UserError as e:
                message = str(e)
        agree_on_error(message, self.ps)
        for line in lines:
            print_rank0(self.ps, line)

    def setup_model_and_optimizer(self) -> None:
        cfg, ps = self.cfg, self.ps
        set_seed(cfg.train.seed)
        layout = cfg.pipeline_layout() if ps.pp_size > 1 else None
        self.model = build_model(cfg.model, ps, seed=cfg.train.seed, module_fn=lambda: self.model_provider(cfg, ps),
                                 pipeline=layout)
        self.pipeline = None
        if layout is not None:
            if not isinstance(self.model, GPTModel):
                raise UserError(f"--pipeline-model-parallel-size {ps.pp_size}: pipeline stages are cut from a GPTModel; "
                                f"this script's model_provider returns a {type(self.model).__name__}")
            self.pipeline = PipelineRunner(self.model, layout, ps, cfg.model, cfg.kd, cfg.parallel.pipeline_schedule,
                                           teacher_logits)
            print_rank0(ps, f"> pipeline: {ps.pp_size} ranks, {self.pipeline.kind} schedule; {layout.describe()}")
        if cfg.optimizer.zero_stage == 2 and cfg.parallel.overlap_grad_reduce:
            raise UserError("--overlap-grad-reduce does not combine with --zero-stage 2 (its gradients are "
                            "reduce-scattered after the backward): drop one of the two")
        if cfg.optimizer.use_torch_fsdp2:  # ZeRO-3: dense sharded over DP, experts over EDP
            apply_fsdp2(self.model, ps)
            held = sum(local_tensor(p).numel() for p in self.model.parameters())
            print_rank0(ps, f"> FSDP2 (ZeRO-3): dense parameters sharded over DP {ps.dp_size}, experts over "
                            f"expert-DP {ps.edp_size}; rank 0 holds {held} of its "
                            f"{sum(p.numel() for p in self.model.parameters())} parameters"
                            + ("" if ps.distributed else " (one process: nothing to shard)"))
        self.optimizer = build_optimizer(self.model, cfg.optimizer, ps.device, ps)
        if cfg.optimizer.use_torch_fsdp2:
            self.grad_reducer = FSDPGradReducer(self.model)  # FSDP2 reduce-scatters in the backward
        else:
            self.grad_reducer = build_grad_reducer(self.model, ps, cfg.parallel.overlap_grad_reduce)
        if self.pipeline is not None and hasattr(self.grad_reducer, "arm"):
            self.pipeline.before_last_backward = self.grad_reducer.arm

    def report_parameters(self) -> None:
        counts = count_parameters(self.cfg.model)
        local = sum(p.numel() for p in self.model.parameters())
        local_expert = sum(p.numel() for p in self.model.parameters() if is_expert(p))
        print_rank0(self.ps, f"total parameters: {counts.total}")
        print_rank0(self.ps, f"active parameters: {counts.active}")
        print_rank0(self.ps, f"expert parameters: {counts.expert}")
        print_rank0(self.ps, f"parameters on rank 0: {local} (experts {local_expert})")

    def load(self) -> None:
        """Resume (or fine-tune) from --load; a directory without a checkpoint starts from scratch."""
        ck, ps = self.cfg.checkpoint, self.ps
        if not ck.load:
            return
        common = load_checkpoint(ck.load, self.model, self.optimizer, self.scheduler, self.scaler, self.cfg, ps,
                                 load_optim=not (ck.no_load_optim or ck.finetune),
                                 load_rng=not (ck.no_load_rng or ck.finetune))
        if common is None:
            print_rank0(ps, f"WARNING: no checkpoint in {ck.load} ({TRACKER} missing); starting from scratch")
        elif ck.finetune or ck.reset_iteration:
            print_rank0(ps, f"> loaded weights from {ck.load} (iteration {common['iteration']}); iteration reset to 0")
            if ck.finetune:
                self.scheduler.reset()
        else:
            self.iteration, self.consumed = int(common["iteration"]), int(common["consumed_samples"])
            self.tokens = int(common.get("tokens_trained", self.consumed * self.cfg.model.seq_length))
            if self.curriculum is not None and "curriculum" in common:
                self.curriculum.load_state_dict(common["curriculum"])
            print_rank0(ps, f"> resumed from {ck.load} at iteration {self.iteration} ({self.consumed} consumed samples)")

    def setup_teacher(self) -> None:
        """The frozen teacher while distillation lasts, else None."""
        cfg, ps, kd = self.cfg, self.ps, self.cfg.kd
        if not kd.enabled or cfg.train.skip_train:
            return
        if self.teacher_provider is None:
            raise UserError("--kd / --mos: this training script provides no teacher (pass teacher_provider to pretrain)")
        if kd.stop_iters is not None and self.iteration >= kd.stop_iters:
            print_rank0(ps, f"> iteration {self.iteration} is past --kd-stop-iters {kd.stop_iters}: no teacher, LM loss only")
            return
        self.kd_active = True
        if self.pipeline is not None and not self.pipeline.has_last:
            print_rank0(ps, f"> {'MoS' if kd.mos else 'KD'} teacher from {kd.load_teacher} on the last pipeline stage "
                            f"only (its logits are needed there)")
            return
        teacher = self.teacher_provider(cfg, ps)
        n = sum(p.numel() for p in teacher.parameters())
        tc = teacher.cfg
        print_rank0(ps, f"> {'MoS' if kd.mos else 'KD'} teacher from {kd.load_teacher}: {tc.num_layers} layers, hidden "
                        f"{tc.hidden_size}, experts {tc.moe.experts_per_layer(tc.num_layers)}, {n} parameters on this "
                        f"rank; frozen, eval mode; loss = {kd.alpha_ce} * lm + {kd.beta_ce} * T^2 KL (T = {kd.temperature})"
                        + (f" until iteration {kd.stop_iters}" if kd.stop_iters is not None else ""))
        self.teacher, self.teacher_ref = teacher, weakref.ref(teacher)

    def release_teacher(self) -> None:
        self.teacher, self.kd_active = None, False
        gc.collect()
        if self.ps.device.type == "cuda":
            torch.cuda.empty_cache()

    def setup_metrics(self) -> None:
        cfg, ps = self.cfg, self.ps
        compute_dtype = torch.bfloat16 if cfg.precision.bf16 else (torch.float16 if cfg.precision.fp16 else torch.float32)
        peak = cfg.logging.peak_tflops or device_peak_tflops(ps.device, compute_dtype)
        sinks = [TensorBoardSink(cfg.logging.tensorboard_dir, ps, cfg.logging.tensorboard_queue_size), WandbSink(cfg.logging, ps, cfg.to_dict())]
        sinks += self.extra_sinks
        lg = cfg.logging
        health = MoEHealthMonitor(lg.moe_health, lg.moe_health_window, lg.moe_collapse_share)
        self.metrics = MetricsLogger(ps, sinks, self.train_iters, cfg.model.seq_length, peak, flops_per_token(cfg.model),
                                     health)
        self.metrics.text("config", f"```\n{cfg.to_dict()}\n```", 0)

    def setup_timers(self) -> None:
        """Per-phase timers when the DeepSpeed JSON asks for ``wall_clock_breakdown`` (console line) or
        ``--log-timers-to-tensorboard`` (``<phase>-time`` scalars); otherwise no timing at all."""
        ds = self.cfg.deepspeed.read()
        self.wall_clock_breakdown = bool(ds is not None and ds.wall_clock_breakdown)
        enabled = self.wall_clock_breakdown or self.cfg.logging.log_timers_to_tensorboard
        self.timers = Timers(self.ps.device, enabled=enabled)
        self.time_all_to_all(True)

    def time_all_to_all(self, on: bool) -> None:
        """Time the expert-parallel all-to-alls (training steps only, not evaluation)."""
        if self.timers.enabled:
            time_exchanges(self.model, self.timers("all-to-all") if on else None)

    # ------------------------------------------------------------------------------------------
    # one step

    def forward_backward(self, data_iterator, num_micro: int):
        """Forward and backward of the step's micro-batches (gradient accumulation).

        Each micro-batch's ``loss_fn(output)`` gives a :class:`~megatron.training.step_output.StepOutput`
        (or a plain ``(loss, logs)`` tuple). Returns (per-key log sums averaged over micro-batches,
        accumulated MoE stats).
        """
        sums: dict = defaultdict(float)
        moe_acc: list = []
        teacher_kwarg = {} if self.teacher is None else {"teacher": self.teacher}  # hooks without KD need not accept it
        timers = self.timers
        if timers.enabled and data_iterator is not None:
            data_iterator = timers.timed_iterator("batch-generator", data_iterator)
        if self.pipeline is not None:  # the schedule runs the micro-batches (the built-in GPT step)
            with timers("forward-backward"), self.autocast():
                return self.pipeline.forward_backward(data_iterator, num_micro, self.scaler.scale, self.teacher,
                                                      kd=self.kd_active)
        timers("forward-backward").start()
        for micro in range(num_micro):
            if micro == num_micro - 1:
                self.grad_reducer.arm()
            with timers("forward-compute"), self.autocast():
                output, loss_fn = self.forward_step_fn(data_iterator, self.model, **teacher_kwarg)
                out = as_step_output(loss_fn(output))
            with timers("backward-compute"):
                (out.loss * (self.scaler.scale / num_micro)).backward()
            if out.moe_stats:
                moe_acc = accumulate_moe(moe_acc, out.moe_stats)
            for k, v in out.logs.items():
                sums[k] += float(v) / num_micro
        timers("forward-backward").stop()
        return sums, moe_acc

    def step(self, sums: dict, moe_acc: list) -> StepResult:
        """Reduce gradients, unscale, clip and step the optimizer unless the gradient norm is non-finite."""
        ps, opt = self.ps, self.optimizer
        sharded = shards_gradients(opt)  # ZeRO-2: each rank keeps only its shard of the gradients
        if sharded:
            with self.timers("grads-reduce-scatter"):
                opt.reduce_gradients()
        else:
            with self.timers("grads-all-reduce"):
                self.grad_reducer.finish()
                sum_sequence_parallel_grads(self.model, ps)  # after DP: the two sums commute
                if self.pipeline is not None:
                    self.pipeline.sum_tied_gradients()
        logs = _dp_mean(sums, ps, 1)  # before the update: the spike check reads the loss
        with self.timers("optimizer"):
            found_inf, grad_norm, spike = self.optimizer_step(sharded, logs.get("lm loss"))
        self.scaler.update(found_inf)
        return StepResult(logs=logs, moe=moe_acc, grad_norm=grad_norm, skipped=found_inf or spike is not None,
                          spike=spike)

    def optimizer_step(self, sharded: bool, loss=None) -> tuple[bool, float, str | None]:
        """Unscale, the gradient norm, clipping and the Adam step, skipped on a non-finite norm or a loss /
        grad-norm spike (SpikeGuard). Returns (non-finite, norm, spike reason or None)."""
        ps, model, opt = self.ps, self.model, self.optimizer
        if self.scaler.scale != 1.0:
            opt.scale_gradients(1.0 / self.scaler.scale) if sharded else scale_gradients(model, 1.0 / self.scaler.scale)
        grad_norm = opt.grad_norm() if sharded else global_grad_norm(model, ps)
        found_inf = not math.isfinite(grad_norm)
        spike = None if found_inf else self.spikes.check(loss, grad_norm)  # the same figures on every rank
        if not found_inf and spike is None:
            clip = self.cfg.optimizer.clip_grad
            if clip > 0:
                opt.clip_gradients(clip, grad_norm) if sharded else clip_gradients(model, clip, grad_norm)
            opt.step()
            update_router_biases(self.model, self.ps)  # aux-loss-free routers: loads summed over DP
        return found_inf, grad_norm, spike

    def train_step(self, data_iterator, num_micro: int) -> StepResult:
        for p in self.model.parameters():
            if p.grad is not None:
                local_tensor(p.grad).zero_()  # kept allocated (as Megatron's grad buffers): the experts' fused wgrad adds in place
        return self.step(*self.forward_backward(data_iterator, num_micro))

    # ------------------------------------------------------------------------------------------
    # evaluation, logging, saving, exit rules

    @torch.no_grad()
    def evaluate(self, split: str, dataset) -> dict:
        """Mean losses over ``--eval-iters`` global batches of a fixed set (the split's first samples); logged."""
        cfg, ps = self.cfg, self.ps
        self.model.eval()
        self.time_all_to_all(False)
        it = MicroBatchIterator(dataset, 0, cfg.train.micro_batch_size, ps.dp_rank, ps.dp_size)
        sums: dict = defaultdict(float)
        n = 0
        if self.pipeline is not None:
            n = cfg.train.eval_iters * self.eval_micro
            with self.autocast():
                sums = self.pipeline.evaluate(it, cfg.train.eval_iters, self.eval_micro)
        for _ in range(0 if self.pipeline is not None else cfg.train.eval_iters * self.eval_micro):
            with self.autocast():
                output, loss_fn = self.forward_step_fn(it, self.model)
                logs = as_step_output(loss_fn(output)).logs
            for k, v in logs.items():
                sums[k] += float(v)
            n += 1
        self.model.train()
        self.time_all_to_all(True)
        vals = _dp_mean(sums, ps, max(n, 1))
        self.metrics.log_eval(self.iteration, split, vals)
        return vals

    def log(self, res: StepResult, batch: int, seq_len: int) -> None:
        self.metrics.record_step(res.logs, res.moe, batch, seq_len)
        if self.iteration % self.cfg.train.log_interval == 0 or self.iteration == self.train_iters:
            extra = []
            if self.curriculum is not None:
                extra = [("curriculum seqlen", f"{seq_len:5d}")]
                self.metrics.scalar("curriculum-seqlen", seq_len, self.iteration)
            steps = self.metrics.iters
            self.metrics.log_interval(self.iteration, self.consumed, batch, self.optimizer.param_groups[0]["lr"],
                                      self.scaler.scale, res.grad_norm, self.skipped_total, self.model, extra)
            if self.timers.enabled:
                self.metrics.log_timers(self.iteration, self.timers, steps, console=self.wall_clock_breakdown,
                                        tensorboard=self.cfg.logging.log_timers_to_tensorboard)
            if self.cfg.logging.log_optimizer_states_to_tensorboard:
                for tag, value in optimizer_state_stats(self.optimizer, self.model, self.ps).items():
                    self.metrics.scalar(tag, value, self.iteration)

    def save(self) -> None:
        """A checkpoint of this iteration (replicas checked identical and weights finite first); with
        --async-save its shards are written in the background (one save in flight at a time)."""
        ck, ps = self.cfg.checkpoint, self.ps
        self.finish_pending_save()
        if self.spikes.streak:
            print_rank0(ps, f"> not saving at iteration {self.iteration}: the run is in a loss / grad-norm spike; the "
                            f"last checkpoint is kept")
            return
        check_replicas(self.model, ps, self.iteration)
        if ck.async_save and ps.distributed and self.async_group is None:
            self.async_group = dist.new_group(backend="gloo")  # every rank saves at the same iteration: collective
        out = save_checkpoint(ck.save, self.iteration, self.model, self.optimizer, self.scheduler, self.scaler,
                              self.cfg, ps, self.checkpoint_extra(), save_optim=not ck.no_save_optim,
                              fmt=FORMAT_NAMES[ck.ckpt_format], async_group=self.async_group,
                              asynchronous=ck.async_save)
        if isinstance(out, PendingSave):
            self.pending_save = out
            print_rank0(ps, f"> saving checkpoint at iteration {self.iteration} to {out.path} in the background")
        else:
            print_rank0(ps, f"> saved checkpoint at iteration {self.iteration} to {out}")

    def poll_pending_save(self) -> None:
        """Before a step: finish the background save once every rank's part is written (one collective)."""
        if self.pending_save is not None and not any_rank(not self.pending_save.done(), self.ps):
            self.finish_pending_save()

    def finish_pending_save(self) -> None:
        """Wait for the background save; its failure (on any rank) is a one-line error on every rank."""
        pending, self.pending_save = self.pending_save, None
        if pending is None:
            return
        error = pending.wait()
        agree_on_error(None if error is None else f"--async-save: the checkpoint of iteration {pending.iteration} "
                       f"was not saved: {error}", self.ps)
        print_rank0(self.ps, f"> saved checkpoint at iteration {pending.iteration} to {pending.path} (written in "
                             f"the background)")

    def checkpoint_extra(self) -> dict:
        """The loop's own state in the checkpoint: samples and tokens consumed, the curriculum's position."""
        extra = {"consumed_samples": self.consumed, "tokens_trained": self.tokens}
        if self.curriculum is not None:
            extra["curriculum"] = self.curriculum.state_dict()
        return extra

    def saved_this_iteration(self) -> bool:
        ck = self.cfg.checkpoint
        return bool(ck.save_interval and self.iteration % ck.save_interval == 0)

    def should_exit(self) -> str | None:
        """The reason to stop after this step (--exit-interval, --exit-duration-in-mins, SIGTERM), or None."""
        t = self.cfg.train
        reason = None
        if t.exit_interval and self.iteration % t.exit_interval == 0:
            reason = f"exit interval {t.exit_interval}"
        if t.exit_duration_in_mins is not None:
            over = (time.time() - self.t_start) / 60.0 > t.exit_duration_in_mins
            if any_rank(over, self.ps):
                reason = f"exit duration {t.exit_duration_in_mins} min"
        if self.signal is not None and any_rank(self.signal.received, self.ps):
            reason = "SIGTERM received (--exit-signal-handler)"
        return reason

    # ------------------------------------------------------------------------------------------
    # the run

    def train(self) -> str | None:
        """Steps until --train-iters or an exit rule; returns the exit reason (None when finished)."""
        cfg, ps, ck = self.cfg, self.ps, self.cfg.checkpoint
        mbs = cfg.train.micro_batch_size
        self.model.train()
        data_iter = MicroBatchIterator(self.train_ds, self.consumed, mbs, ps.dp_rank, ps.dp_size) \
            if self.train_ds is not None else None
        seq_len = cfg.model.seq_length
        if self.curriculum is not None and data_iter is not None:
            data_iter = TruncatingIterator(data_iter, seq_len)
        while self.iteration < self.train_iters and not cfg.train.skip_train:
            self.poll_pending_save()
            num_micro = self.schedule.num_micro_batches(self.consumed)
            batch = num_micro * mbs * ps.dp_size
            if self.curriculum is not None:
                seq_len = self.curriculum.update(self.iteration + 1)  # DeepSpeed counts steps from 1
                if data_iter is not None:
                    data_iter.seq_len = seq_len
            scale_before = self.scaler.scale
            res = self.train_step(data_iter, num_micro)
            self.iteration += 1
            self.consumed += batch
            self.tokens += tokens_trained(batch, seq_len)
            if not res.skipped:
                self.scheduler.step(batch, self.optimizer, tokens=tokens_trained(batch, seq_len))
            self.skipped_total += int(res.skipped)
            self.history.append(res.logs.get("lm loss", float("nan")))
            self.kd_history.append(res.logs.get("kd loss"))
            self.norm_history.append(res.grad_norm)
            if self.kd_active and cfg.kd.stop_iters is not None and self.iteration >= cfg.kd.stop_iters:
                self.release_teacher()  # staged KD: LM loss only from here on
                print_rank0(ps, f"> knowledge distillation stopped at iteration {self.iteration} (--kd-stop-iters); "
                                f"teacher freed, training on the LM loss only")
            self.log(res, batch, seq_len)
            self.guard.check(self.iteration, res.logs, res.grad_norm, res.skipped and res.spike is None, scale_before,
                             self.scaler)
            warning = self.spikes.after_step(self.iteration, res.logs.get("lm loss"), res.grad_norm, res.spike,
                                             res.skipped)
            if warning:
                print_rank0(ps, warning)
            if self.valid_ds is not None and cfg.train.eval_iters > 0 and self.iteration % cfg.train.eval_interval == 0 \
                    and self.iteration != self.train_iters:
                self.last_valid = self.evaluate("valid", self.valid_ds)
            if ck.save and self.saved_this_iteration():
                self.save()
            reason = self.should_exit()
            if reason:
                if ck.save and not self.saved_this_iteration():
                    self.save()
                self.finish_pending_save()
                print_rank0(ps, f"> exiting at iteration {self.iteration}: {reason}")
                return reason
        self.finish_pending_save()
        return None

    def result(self) -> dict:
        return {"iteration": self.iteration, "losses": self.history, "kd_losses": self.kd_history,
                "grad_norms": self.norm_history, "tokens_trained": self.tokens,
                "local_parameters": sum(p.numel() for p in self.model.parameters())}  # this rank's (dry run: per GPU)

    def run(self) -> dict:
        self.setup()
        self.last_valid = None
        try:
            train_t0 = time.time()
            reason = self.train()
            if reason:
                return {**self.result(), "valid": self.last_valid, "exit": reason}
            train_time = time.time() - train_t0
            self.release_teacher()
            result = {**self.result(), "train_time": train_time, "skipped": self.skipped_total,
                      "loss_scale": self.scaler.scale,
                      "teacher_released": self.teacher_ref is not None and self.teacher_ref() is None,
                      "teacher_held": self.teacher_ref is not None}  # built on this rank (PP: the last stage)
            cfg, ck = self.cfg, self.cfg.checkpoint
            if self.valid_ds is not None and cfg.train.eval_iters > 0:
                result["valid"] = self.evaluate("valid", self.valid_ds)
            if self.test_ds is not None and cfg.train.eval_iters > 0:
                result["test"] = self.evaluate("test", self.test_ds)
            if ck.save and self.iteration > 0 and not cfg.train.skip_train and not self.saved_this_iteration():
                self.save()
            self.finish_pending_save()
            return result
        finally:
            if self.pending_save is not None:  # an error stopped the run: let the save in flight complete
                self.pending_save.wait()
            self.metrics.close()
            if self.signal is not None:
                self.signal.restore()


def _layer_ep_sizes(cfg) -> list[int]:
    """The EP degrees of the run's MoE layers (PR-MoE: a layer with fewer experts than EP runs at EP = E), the
    KD / MoS teacher's included (it is built at the student's EP size)."""
    sizes = set(cfg.model.moe.layer_ep_sizes(cfg.model.num_layers))
    found = locate_checkpoint(cfg.kd.load_teacher, "--load-teacher") if cfg.kd.enabled and cfg.kd.load_teacher else None
    if found is not None and not cfg.train.skip_train:  # (a missing teacher is reported when it is built)
        teacher = ModelConfig.from_dict(found[1]["config"]["model"])
        ep = cfg.model.moe.expert_parallel_size
        sizes |= {min(ep, e) for i, e in enumerate(teacher.moe.experts_per_layer(teacher.num_layers))
                  if teacher.moe.is_moe_layer(i, e)}
    return sorted(sizes)


def pretrain(train_valid_test_datasets_provider, model_provider, forward_step_fn, argv=None, cfg=None,
             extra_args_provider=None, teacher_provider=None, sinks=None):
    """Parse flags, build everything, train, evaluate, save. Returns a dict of final figures.

    ``forward_step_fn(data_iterator, model)`` returns ``(output, loss_fn)``; ``loss_fn(output)`` returns a
    :class:`~megatron.training.step_output.StepOutput` (loss, logs, MoE stats) or a plain ``(loss, logs)``.
    ``teacher_provider(cfg, ps)`` builds the frozen teacher for --kd / --mos; ``forward_step_fn`` is then
    called with ``teacher=`` while distillation lasts (until --kd-stop-iters). ``sinks`` are extra
    :class:`MetricsSink` backends. Every rank first checks that all ranks hold the same settings.
    """
    if cfg is None:
        cfg = parse_args(argv, extra_args_provider)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    ps = initialize(cfg.parallel, cfg.model.moe.expert_parallel_size,
                    before_groups=lambda: agree_on_settings(cfg.to_dict(), world_size),
                    layer_ep_sizes=_layer_ep_sizes(cfg))
    try:
        trainer = Trainer(cfg, ps, train_valid_test_datasets_provider, model_provider, forward_step_fn,
                          teacher_provider, sinks)
        return trainer.run()
    finally:
        destroy(ps)
