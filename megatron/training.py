"""The generic training driver: ``pretrain(datasets_provider, model_provider, forward_step)``.

Model-specific code (``pretrain_gpt_moe.py``) supplies hooks; this module owns the loop:
micro-batches with gradient accumulation, gradient reduction over DP / EDP, fp16 loss scaling,
clipping, the LR schedule, evaluation, logging, checkpoints and exit conditions.
"""
from __future__ import annotations

import contextlib
import gc
import math
import random
import time
import weakref
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from megatron.arguments import parse_args
from megatron.checkpointing import load_checkpoint, save_checkpoint
from megatron.config import pad_vocab_size
from megatron.errors import UserError
from megatron.logging_utils import TensorBoard, fmt_eta, iteration_line, print_rank0, validation_line
from megatron.loss_scaler import build_loss_scaler
from megatron.lr_scheduler import build_scheduler
from megatron.model_stats import count_parameters, device_peak_tflops, flops_per_token
from megatron.model.moe.metrics import accumulate as _accumulate_moe, format_moe_line, summarize as summarize_moe
from megatron.optimizer import build_optimizer
from megatron.parallel.param_tags import is_expert
from megatron.parallel.router_balance import update_router_biases
from megatron.parallel.expert_parallel import apply_expert_parallel
from megatron.parallel.overlapped_grad_reduce import OverlappedGradReducer
from megatron.parallel.tensor_parallel import apply_tensor_parallel
from megatron.parallel.grad_sync import (
    all_reduce_sum, allreduce_gradients, any_rank, clip_gradients, global_grad_norm, scale_gradients,
)
from megatron.parallel_state import ParallelState, destroy, initialize
from megatron.tokenizer import build_tokenizer


# ----------------------------------------------------------------------------------------------
# batch schedule and data iteration


class BatchSchedule:
    """Global batch size as a function of consumed samples (``--rampup-batch-size``)."""

    def __init__(self, train_cfg, dp_size: int):
        self.gbs, self.mbs, self.dp = train_cfg.global_batch_size, train_cfg.micro_batch_size, dp_size
        self.rampup = train_cfg.rampup_batch_size

    def global_batch(self, consumed: int) -> int:
        if not self.rampup:
            return self.gbs
        start, incr, ramp_samples = self.rampup
        steps = max((self.gbs - start) // max(incr, 1), 1)
        per_step = ramp_samples / steps
        return min(self.gbs, start + int(consumed / per_step) * incr) if consumed < ramp_samples else self.gbs

    def num_micro_batches(self, consumed: int) -> int:
        return self.global_batch(consumed) // (self.mbs * self.dp)


def train_schedule(cfg, schedule: BatchSchedule) -> tuple[int, int]:
    """(train iterations, train samples) from --train-iters / --train-samples / --train-tokens."""
    t = cfg.train
    if t.train_iters is not None:
        return t.train_iters, t.train_iters * t.global_batch_size
    samples = t.train_samples if t.train_samples is not None else int(math.ceil(t.train_tokens / cfg.model.seq_length))
    iters, consumed = 0, 0
    while consumed < samples:
        consumed += schedule.global_batch(consumed)
        iters += 1
    return iters, consumed


class MicroBatchIterator:
    """Serves this DP rank's micro-batches: micro-step m of the global stream takes samples
    [start + m * mbs * dp + r * mbs, + mbs). Resumes exactly from ``consumed_samples``."""

    def __init__(self, dataset, consumed_samples: int, mbs: int, dp_rank: int, dp_size: int):
        self.dataset, self.mbs, self.dp_rank, self.dp_size = dataset, mbs, dp_rank, dp_size
        self.position = consumed_samples

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        start = self.position + self.dp_rank * self.mbs
        n = len(self.dataset)
        batch = np.stack([self.dataset[(start + j) % n] for j in range(self.mbs)])  # [mbs, seq + 1]
        self.position += self.mbs * self.dp_size
        return batch


# ----------------------------------------------------------------------------------------------
# one training step and evaluation


@dataclass
class StepResult:
    logs: dict
    moe: list
    grad_norm: float
    skipped: bool


def autocast_context(cfg, device):
    if cfg.precision.bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if cfg.precision.fp16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.float16)
    return contextlib.nullcontext


def train_step(forward_step_fn, data_iterator, model, optimizer, scaler, ps, cfg, num_micro: int, autocast,
               teacher=None, grad_reducer=None) -> StepResult:
    for p in model.parameters():
        p.grad = None
    sums: dict = defaultdict(float)
    moe_acc: list = []
    teacher_kwarg = {} if teacher is None else {"teacher": teacher}  # hooks without KD need not accept it
    for micro in range(num_micro):
        if grad_reducer is not None and micro == num_micro - 1:
            grad_reducer.arm()
        with autocast():
            output, loss_fn = forward_step_fn(data_iterator, model, **teacher_kwarg)
            loss, logs = loss_fn(output)
        (loss * (scaler.scale / num_micro)).backward()
        for k, v in logs.items():
            if k == "moe stats":
                moe_acc = _accumulate_moe(moe_acc, v)
            else:
                sums[k] += float(v) / num_micro
    if grad_reducer is not None:
        grad_reducer.finish()
    else:
        allreduce_gradients(model, ps)
    if scaler.scale != 1.0:
        scale_gradients(model, 1.0 / scaler.scale)
    grad_norm = global_grad_norm(model, ps)
    found_inf = not math.isfinite(grad_norm)
    if not found_inf:
        if cfg.optimizer.clip_grad > 0:
            clip_gradients(model, cfg.optimizer.clip_grad, grad_norm)
        optimizer.step()
        update_router_biases(model, ps)  # aux-loss-free routers: loads summed over DP
    scaler.update(found_inf)
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=ps.device)
    all_reduce_sum(vec, ps, ps.dp_group)  # TP ranks hold the same values: average over DP only
    logs = {k: float(v) / ps.dp_size for k, v in zip(keys, vec.tolist())}
    return StepResult(logs=logs, moe=moe_acc, grad_norm=grad_norm, skipped=found_inf)


@torch.no_grad()
def evaluate(forward_step_fn, dataset, model, ps, cfg, num_micro: int, autocast) -> dict:
    """Mean losses over ``--eval-iters`` global batches of a fixed set (the split's first samples)."""
    model.eval()
    it = MicroBatchIterator(dataset, 0, cfg.train.micro_batch_size, ps.dp_rank, ps.dp_size)
    sums: dict = defaultdict(float)
    n = 0
    for _ in range(cfg.train.eval_iters * num_micro):
        with autocast():
            output, loss_fn = forward_step_fn(it, model)
            _, logs = loss_fn(output)
        for k, v in logs.items():
            if k != "moe stats":
                sums[k] += float(v)
        n += 1
    model.train()
    keys = sorted(sums)
    vec = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=ps.device)
    all_reduce_sum(vec, ps, ps.dp_group)
    return {k: float(v) / (max(n, 1) * ps.dp_size) for k, v in zip(keys, vec.tolist())}


# ----------------------------------------------------------------------------------------------
# logging helpers


def moe_summary(moe_acc: list, ps, model=None) -> list:
    """Per-layer MoE load over the log interval, summed over the DP ranks (see megatron/model/moe/metrics.py)."""
    return summarize_moe(moe_acc, lambda t: all_reduce_sum(t, ps, ps.dp_group))


# ----------------------------------------------------------------------------------------------
# set-up


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def report_parameters(model, cfg, ps) -> None:
    counts = count_parameters(cfg.model)
    local = sum(p.numel() for p in model.parameters())
    local_expert = sum(p.numel() for p in model.parameters() if is_expert(p))
    print_rank0(ps, f"total parameters: {counts.total}")
    print_rank0(ps, f"active parameters: {counts.active}")
    print_rank0(ps, f"expert parameters: {counts.expert}")
    print_rank0(ps, f"parameters on rank 0: {local} (experts {local_expert})")


def setup_model_and_optimizer(model_provider, cfg, ps):
    set_seed(cfg.train.seed)
    model = model_provider(cfg, ps)
    model.init_weights(cfg.train.seed)
    model.to(ps.device)
    apply_tensor_parallel(model, ps)
    apply_expert_parallel(model, ps)
    optimizer = build_optimizer(model, cfg.optimizer, ps.device, ps)
    return model, optimizer


def setup_teacher(cfg, ps, teacher_provider, iteration: int):
    """The frozen teacher while distillation lasts, else None."""
    kd = cfg.kd
    if not kd.enabled or cfg.train.skip_train:
        return None
    if teacher_provider is None:
        raise UserError("--kd / --mos: this training script provides no teacher (pass teacher_provider to pretrain)")
    if kd.stop_iters is not None and iteration >= kd.stop_iters:
        print_rank0(ps, f"> iteration {iteration} is past --kd-stop-iters {kd.stop_iters}: no teacher, LM loss only")
        return None
    teacher = teacher_provider(cfg, ps)
    n = sum(p.numel() for p in teacher.parameters())
    tc = teacher.cfg
    print_rank0(ps, f"> {'MoS' if kd.mos else 'KD'} teacher from {kd.load_teacher}: {tc.num_layers} layers, hidden "
                    f"{tc.hidden_size}, experts {tc.moe.experts_per_layer(tc.num_layers)}, {n} parameters on this rank; "
                    f"frozen, eval mode; loss = {kd.alpha_ce} * lm + {kd.beta_ce} * T^2 KL (T = {kd.temperature})"
                    + (f" until iteration {kd.stop_iters}" if kd.stop_iters is not None else ""))
    return teacher


def pretrain(train_valid_test_datasets_provider, model_provider, forward_step_fn, argv=None, cfg=None,
             extra_args_provider=None, teacher_provider=None):
    """Parse flags, build everything, train, evaluate, save. Returns a dict of final figures.

    ``teacher_provider(cfg, ps)`` builds the frozen teacher for --kd / --mos; ``forward_step_fn`` is then
    called with ``teacher=`` while distillation lasts (until --kd-stop-iters).
    """
    if cfg is None:
        cfg = parse_args(argv, extra_args_provider)
    ps = initialize(cfg.parallel, cfg.model.moe.expert_parallel_size)
    try:
        return _pretrain(cfg, ps, train_valid_test_datasets_provider, model_provider, forward_step_fn, teacher_provider)
    finally:
        destroy(ps)


def _pretrain(cfg, ps: ParallelState, datasets_provider, model_provider, forward_step_fn, teacher_provider=None):
    t_start = time.time()
    cfg.validate_world(ps.world_size)
    if cfg.data.tokenizer_type == "NullTokenizer":
        tokenizer = build_tokenizer("NullTokenizer", vocab_size=cfg.model.vocab_size)
    else:
        tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.vocab_file, cfg.data.merge_file,
                                    cfg.data.tokenizer_model)
    cfg.model.vocab_size = pad_vocab_size(tokenizer.vocab_size, cfg.data.make_vocab_size_divisible_by,
                                          cfg.parallel.tensor_model_parallel_size)
    print_rank0(ps, f"> world size {ps.world_size} (TP {ps.tp_size}, DP {ps.dp_size}, EP {ps.ep_size}"
                    f"{', ZeRO-1 optimizer' if cfg.optimizer.use_distributed_optimizer else ''}) on {ps.device}; "
                    f"vocab {tokenizer.vocab_size} padded to {cfg.model.vocab_size}")
    model, optimizer = setup_model_and_optimizer(model_provider, cfg, ps)
    grad_reducer = OverlappedGradReducer(model, ps) if cfg.parallel.overlap_grad_reduce and ps.distributed else None
    report_parameters(model, cfg, ps)
    schedule = BatchSchedule(cfg.train, ps.dp_size)
    train_iters, train_samples = train_schedule(cfg, schedule)
    scheduler = build_scheduler(cfg.optimizer, cfg.model.seq_length, cfg.train.global_batch_size, train_samples)
    scaler = build_loss_scaler(cfg.precision)

    iteration, consumed = 0, 0
    ck = cfg.checkpoint
    if ck.load:
        common = load_checkpoint(ck.load, model, optimizer, scheduler, scaler, cfg, ps,
                                 load_optim=not (ck.no_load_optim or ck.finetune),
                                 load_rng=not (ck.no_load_rng or ck.finetune))
        if common is None:
            print_rank0(ps, f"WARNING: no checkpoint in {ck.load} ({'latest_checkpointed_iteration.txt'} missing); "
                            f"starting from scratch")
        elif ck.finetune or ck.reset_iteration:
            print_rank0(ps, f"> loaded weights from {ck.load} (iteration {common['iteration']}); iteration reset to 0")
            if ck.finetune:
                scheduler.num_samples = 0
        else:
            iteration, consumed = int(common["iteration"]), int(common["consumed_samples"])
            print_rank0(ps, f"> resumed from {ck.load} at iteration {iteration} ({consumed} consumed samples)")
    scheduler.apply(optimizer)
    teacher = setup_teacher(cfg, ps, teacher_provider, iteration)
    teacher_ref = weakref.ref(teacher) if teacher is not None else None

    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    eval_micro = gbs // (mbs * ps.dp_size)
    n_eval = cfg.train.eval_iters * gbs
    train_ds, valid_ds, test_ds = datasets_provider(cfg, [train_samples, n_eval, n_eval])
    autocast = autocast_context(cfg, ps.device)
    tb = TensorBoard(cfg.logging.tensorboard_dir, ps)
    if tb.writer is not None:
        tb.writer.add_text("config", f"```\n{cfg.to_dict()}\n```", 0)
    compute_dtype = torch.bfloat16 if cfg.precision.bf16 else (torch.float16 if cfg.precision.fp16 else torch.float32)
    peak = cfg.logging.peak_tflops or device_peak_tflops(ps.device, compute_dtype)
    fpt = flops_per_token(cfg.model)
    print_rank0(ps, f"> training for {train_iters} iterations ({train_samples} samples, global batch {gbs}, "
                    f"micro batch {mbs}); {fpt / 1e6:.1f} MFLOPs per token; startup {time.time() - t_start:.1f} s")

    def save(it, consumed_samples):
        path = save_checkpoint(ck.save, it, model, optimizer, scheduler, scaler, cfg, ps,
                               {"consumed_samples": consumed_samples}, save_optim=not ck.no_save_optim)
        print_rank0(ps, f"> saved checkpoint at iteration {it} to {path}")

    def run_eval(it, split, ds):
        vals = evaluate(forward_step_fn, ds, model, ps, cfg, eval_micro, autocast)
        line = validation_line(it, split, {k: v for k, v in vals.items() if k in ("lm loss", "moe loss")})
        print_rank0(ps, "-" * len(line) + "\n" + line + "\n" + "-" * len(line))
        tag = "validation" if split == "valid" else "test"
        if "lm loss" in vals:
            tb.scalar(f"lm loss {tag}", vals["lm loss"], it)
            tb.scalar(f"lm loss {tag} ppl", math.exp(min(vals["lm loss"], 20)), it)
        return vals

    model.train()
    data_iter = MicroBatchIterator(train_ds, consumed, mbs, ps.dp_rank, ps.dp_size) if train_ds is not None else None
    interval_sums: dict = defaultdict(float)
    interval_counts: dict = defaultdict(int)
    kd_history: list = []
    norm_history: list = []
    interval_iters = skipped_total = 0
    interval_moe: list = []
    interval_t0 = time.time()
    interval_tokens = 0
    last_valid = None
    history = []
    exit_reason = None
    train_t0 = time.time()
    while iteration < train_iters and not cfg.train.skip_train:
        num_micro = schedule.num_micro_batches(consumed)
        batch = num_micro * mbs * ps.dp_size
        res = train_step(forward_step_fn, data_iter, model, optimizer, scaler, ps, cfg, num_micro, autocast, teacher,
                         grad_reducer)
        iteration += 1
        consumed += batch
        if not res.skipped:
            scheduler.step(batch, optimizer)
        skipped_total += int(res.skipped)
        history.append(res.logs.get("lm loss", float("nan")))
        kd_history.append(res.logs.get("kd loss"))
        norm_history.append(res.grad_norm)
        for k, v in res.logs.items():
            interval_sums[k] += v
            interval_counts[k] += 1
        if teacher is not None and cfg.kd.stop_iters is not None and iteration >= cfg.kd.stop_iters:
            teacher = None  # staged KD: free the teacher, LM loss only from here on
            gc.collect()
            if ps.device.type == "cuda":
                torch.cuda.empty_cache()
            print_rank0(ps, f"> knowledge distillation stopped at iteration {iteration} (--kd-stop-iters); "
                            f"teacher freed, training on the LM loss only")
        interval_moe = _accumulate_moe(interval_moe, res.moe) if res.moe else interval_moe
        interval_iters += 1
        interval_tokens += batch * cfg.model.seq_length

        if iteration % cfg.train.log_interval == 0 or iteration == train_iters:
            dt = time.time() - interval_t0
            per_iter = dt / max(interval_iters, 1)
            tps = interval_tokens / max(dt, 1e-9)
            fields = [("consumed samples", f"{consumed:12d}"), ("elapsed time per iteration (ms)", f"{1000 * per_iter:.1f}"),
                      ("learning rate", f"{optimizer.param_groups[0]['lr']:.3E}"), ("global batch size", f"{batch:5d}")]
            for k in sorted(interval_sums):
                fields.append((k, f"{interval_sums[k] / interval_counts[k]:.6E}"))
            fields += [("loss scale", f"{scaler.scale:.1f}"), ("grad norm", f"{res.grad_norm:.3f}"),
                       ("number of skipped iterations", f"{skipped_total:3d}"), ("tokens per second", f"{tps:.1f}")]
            if peak:
                fields.append(("MFU (%)", f"{100 * fpt * tps / (peak * 1e12 * ps.world_size):.2f}"))
            fields.append(("ETA", fmt_eta(per_iter * (train_iters - iteration))))
            print_rank0(ps, iteration_line(iteration, train_iters, fields))
            tb.scalar("learning-rate", optimizer.param_groups[0]["lr"], iteration)
            tb.scalar("batch-size", batch, iteration)
            for k in interval_sums:
                tb.scalar(k, interval_sums[k] / interval_counts[k], iteration)
            tb.scalar("loss-scale", scaler.scale, iteration)
            tb.scalar("grad-norm", res.grad_norm, iteration)
            tb.scalar("iteration-time", per_iter, iteration)
            tb.scalar("tokens-per-second", tps, iteration)
            if interval_moe:
                summary = moe_summary(interval_moe, ps, model)
                print_rank0(ps, format_moe_line(summary))
                for s in summary:
                    for tag, value in s.scalars().items():
                        tb.scalar(tag, value, iteration)
                    tb.histogram(f"moe/layer{s.layer}/tokens-per-expert", s.counts, iteration)
            interval_sums.clear()
            interval_counts.clear()
            interval_moe = []
            interval_iters, interval_tokens = 0, 0
            interval_t0 = time.time()

        if valid_ds is not None and cfg.train.eval_iters > 0 and iteration % cfg.train.eval_interval == 0 \
                and iteration != train_iters:
            last_valid = run_eval(iteration, "valid", valid_ds)
        if ck.save and ck.save_interval and iteration % ck.save_interval == 0:
            save(iteration, consumed)
        if cfg.train.exit_interval and iteration % cfg.train.exit_interval == 0:
            exit_reason = f"exit interval {cfg.train.exit_interval}"
        if cfg.train.exit_duration_in_mins is not None:
            over = (time.time() - t_start) / 60.0 > cfg.train.exit_duration_in_mins
            if any_rank(over, ps):
                exit_reason = f"exit duration {cfg.train.exit_duration_in_mins} min"
        if exit_reason:
            if ck.save and not (ck.save_interval and iteration % ck.save_interval == 0):
                save(iteration, consumed)
            print_rank0(ps, f"> exiting at iteration {iteration}: {exit_reason}")
            tb.close()
            return {"iteration": iteration, "losses": history, "kd_losses": kd_history, "grad_norms": norm_history,
                    "valid": last_valid, "exit": exit_reason}

    train_time = time.time() - train_t0
    teacher = None
    gc.collect()
    result = {"iteration": iteration, "losses": history, "kd_losses": kd_history, "grad_norms": norm_history,
              "train_time": train_time,
              "skipped": skipped_total, "loss_scale": scaler.scale,
              "teacher_released": teacher_ref is not None and teacher_ref() is None}
    if valid_ds is not None and cfg.train.eval_iters > 0:
        result["valid"] = run_eval(iteration, "valid", valid_ds)
    if test_ds is not None and cfg.train.eval_iters > 0:
        result["test"] = run_eval(iteration, "test", test_ds)
    if ck.save and iteration > 0 and not cfg.train.skip_train:
        if not (ck.save_interval and iteration % ck.save_interval == 0):
            save(iteration, consumed)
    tb.close()
    return result
