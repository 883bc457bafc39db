"""``--dry-run``: build the model on the meta device, print its size, FLOPs and per-GPU memory plan.

No data, no process group, no GPU: a launch script is checked on a laptop in seconds. The
parameter counts come from the built (meta) model and are cross-checked against the analytical
counts of :mod:`megatron.planning.model_stats`.

Memory plan (per GPU, bytes): weights are fp32 master parameters (4 B; autocast casts per op),
gradients fp32 (4 B), Adam moments fp32 (8 B, divided by the data-parallel size for dense
parameters and by the expert-data-parallel size for experts when the optimizer is sharded:
``--use-distributed-optimizer`` / ``--zero-stage 1``). With ``--zero-stage 2`` the gradients are
sharded the same way: after the reduce-scatter each rank keeps only its shard's averaged
gradient (DeepSpeed's ZeRO-2 accounting). Here the full gradients are built by the backward and
freed at the reduce-scatter, as the activations are freed, so the plan counts the gradient shard.
Dense parameters split over TP ranks; experts split over EP ranks and are replicated over TP
(parallelism-coordinated all-to-all). Activations follow Korthikanti et al. 2022 ("Reducing
activation recomputation"), with a flash / fused attention kernel (no [T, T] score tensor kept):
34·s·b·h bytes per layer at 2-byte precision (×2 in fp32), divided by TP; an MoE layer replaces
the MLP's 19·s·b·h by 19·s·b·h·k·cf plus its dispatch buffers (4·s·b·h·k·cf). With activation
checkpointing only each layer's input (s·b·h elements) is kept, plus one layer's working set.
The logits add s·b·V elements at the compute precision, an fp32 copy and its fp32 gradient.
Without checkpointing the estimate is 0.78-1.18x the bytes autograd actually saves (plus the logits
gradient) on small dense / MoE, fp32 / bf16 configurations (tests/test_examples.py); with
checkpointing it includes one layer's recomputation, the peak during backward.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from megatron.checkpoint.layout import TRACKER
from megatron.checkpoint.teacher_config import teacher_model_config
from megatron.config.schema import MoEConfig, pad_vocab_size
from megatron.errors import UserError
from megatron.model.param_tags import is_expert
from megatron.parallel.apply import build_model
from megatron.parallel.state import ParallelState
from megatron.planning.model_stats import count_parameters, flops_per_token
from megatron.tokenizer import registry as tokenizers

GiB = 1024**3


def resolve_vocab_size(cfg) -> int:
    """Padded vocabulary for a dry run: --vocab-size, else what the tokenizer's registry record tells (GPT-2's
    50257, with no --tokenizer-type too; a SentencePiece model's size when the file exists)."""
    d = cfg.data
    tp = cfg.parallel.tensor_model_parallel_size
    raw = cfg.model.vocab_size or tokenizers.dry_run_vocab_size(d)
    if not raw:
        raise UserError("--dry-run cannot tell the vocabulary size: give --vocab-size N (or an existing --tokenizer-model)")
    return pad_vocab_size(raw, d.make_vocab_size_divisible_by, tp)


def built_counts(model_cfg) -> tuple[int, int]:
    """(total, expert) parameters of the model built on the meta device with every expert local."""
    model = build_model(model_cfg, ParallelState(device=torch.device("meta")))  # every expert local, no storage
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for p in model.parameters() if is_expert(p))
    return total, expert


def activation_bytes(cfg, checkpointing: bool) -> int:
    """Activation memory of one micro-batch on one GPU (see the module docstring)."""
    m, moe = cfg.model, cfg.model.moe
    s, b, h, V = m.seq_length, cfg.train.micro_batch_size, m.hidden_size, m.vocab_size
    tp = cfg.parallel.tensor_model_parallel_size
    half = cfg.precision.fp16 or cfg.precision.bf16
    scale = 1.0 if half else 2.0  # the 34·s·b·h figure is for 2-byte activations
    ffn_ratio = m.ffn_hidden_size / (4 * h)
    per_layer = []
    for e in moe.experts_per_layer(m.num_layers):
        mlp = 19 * ffn_ratio
        if e > 1:
            k_cf = min(moe.topk, e) * (moe.train_capacity_factor if moe.token_dropping else 1.0)
            mlp = mlp * k_cf + 4 * k_cf + (19 * ffn_ratio if moe.mlp_type == "residual" else 0)
        per_layer.append(s * b * h * (15 + mlp) * scale / tp)
    elem = 2 if half else 4
    logits = s * b * V / tp * (elem + 4 + 4)
    if checkpointing:
        kept = len(per_layer) * s * b * h * elem + max(per_layer)
    else:
        kept = sum(per_layer)
    return int(kept + logits)


def teacher_config(cfg):
    """The --kd / --mos teacher's ModelConfig: from its checkpoint when it exists, else from the teacher flags."""
    kd = cfg.kd
    if kd.load_teacher and os.path.isfile(os.path.join(kd.load_teacher, TRACKER)):
        return teacher_model_config(kd, cfg.model)
    over = kd.teacher_overrides()
    moe_keys = {k: over.pop(k) for k in list(over) if k in MoEConfig.__dataclass_fields__}
    if "hidden_size" in over and "ffn_hidden_size" not in over:
        over["ffn_hidden_size"] = 4 * over["hidden_size"]
    tcfg = dataclasses.replace(cfg.model, **over, moe=dataclasses.replace(cfg.model.moe, **moe_keys))
    tcfg.validate()
    return tcfg


def memory_plan(cfg, world_size: int, teacher_cfg=None) -> dict:
    """Per-GPU bytes of weights, gradients, optimizer state and activations for this layout."""
    counts = count_parameters(cfg.model)
    tp = cfg.parallel.tensor_model_parallel_size
    ep = cfg.model.moe.expert_parallel_size
    dp = max(world_size // tp, 1)
    # experts are replicated over TP too; with the TP token split their optimizer state is sharded over it
    edp = max(dp // ep, 1) * (tp if getattr(cfg.parallel, "moe_tp_token_split", True) else 1)
    dense_local = counts.dense / tp
    expert_local = counts.expert / ep
    params = dense_local + expert_local
    teacher = 0
    if teacher_cfg is not None:  # frozen fp32 weights, same layout; no_grad activations: logits and log-softmax
        tc = count_parameters(teacher_cfg)
        m = cfg.model
        teacher = 4 * (tc.dense / tp + tc.expert / ep) + 8 * m.seq_length * cfg.train.micro_batch_size * m.vocab_size / tp
    return {
        "world": world_size, "tp": tp, "ep": ep, "dp": dp, "edp": edp,
        "params": int(params),
        "weights": int(4 * params),
        "grads": int(4 * params),
        "grads_sharded": int(4 * (dense_local / dp + expert_local / edp)),
        "optimizer": int(8 * params),
        "optimizer_sharded": int(8 * (dense_local / dp + expert_local / edp)),
        "activations": activation_bytes(cfg, checkpointing=False),
        "activations_ckpt": activation_bytes(cfg, checkpointing=True),
        "teacher": int(teacher),
    }


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def dry_run(cfg, world_size: int) -> dict:
    """Print the dry-run report; returns its figures."""
    cfg.model.vocab_size = resolve_vocab_size(cfg)
    cfg.validate_world(world_size)
    counts = count_parameters(cfg.model)
    total, expert = built_counts(cfg.model)
    if (total, expert) != (counts.total, counts.expert):  # a bug, not a user mistake
        raise AssertionError(f"built model has {total} / {expert} parameters, analytical count {counts.total} / {counts.expert}")
    tcfg = teacher_config(cfg) if cfg.kd.enabled else None
    plan = memory_plan(cfg, world_size, tcfg)
    m = cfg.model
    fpt = flops_per_token(m)
    sharded_optim = cfg.optimizer.use_distributed_optimizer or cfg.optimizer.zero_stage in (1, 2)
    zero2 = cfg.optimizer.zero_stage == 2
    optim = plan["optimizer_sharded"] if sharded_optim else plan["optimizer"]
    grads = plan["grads_sharded"] if zero2 else plan["grads"]
    steady = plan["weights"] + grads + optim + plan["teacher"]
    act = plan["activations_ckpt"] if m.checkpoint_activations else plan["activations"]
    lines = [
        f"> dry run: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, ffn {m.ffn_hidden_size}, "
        f"seq {m.seq_length}, vocab {m.vocab_size}, experts per layer {m.moe.experts_per_layer(m.num_layers)}, "
        f"mlp-type {m.moe.mlp_type if m.moe.enabled else 'standard'}, top-{m.moe.topk}",
        f"total parameters: {counts.total}",
        f"active parameters: {counts.active}",
        f"expert parameters: {counts.expert}",
        f"dense parameters: {counts.dense}",
        f"training FLOPs per token: {fpt:.4e} (forward {fpt / 3:.4e})",
        f"> memory plan per GPU: world {world_size} = TP {plan['tp']} x DP {plan['dp']} (EP {plan['ep']}, "
        f"expert-DP {plan['edp']}), micro batch {cfg.train.micro_batch_size}",
        f"  parameters on one GPU:      {plan['params']}",
        f"  weights (fp32):             {_gib(plan['weights'])}",
        f"  gradients (fp32):           {_gib(plan['grads'])} "
        f"(sharded over DP / expert-DP with --zero-stage 2: {_gib(plan['grads_sharded'])})",
        f"  Adam state (fp32 m, v):     {_gib(plan['optimizer'])} "
        f"(sharded over DP / expert-DP: {_gib(plan['optimizer_sharded'])})",
        f"  activations per micro-batch: {_gib(plan['activations'])} without checkpointing, "
        f"{_gib(plan['activations_ckpt'])} with --checkpoint-activations",
    ]
    if tcfg is not None:
        tc = count_parameters(tcfg)
        lines.insert(6, f"teacher: {tcfg.num_layers} layers, hidden {tcfg.hidden_size}, experts per layer "
                        f"{tcfg.moe.experts_per_layer(tcfg.num_layers)}, {tc.total} parameters "
                        f"({100.0 * counts.total / tc.total:.1f}% of it in the student); training FLOPs per token with "
                        f"the teacher's forward: {fpt + flops_per_token(tcfg, training=False):.4e}")
        lines.append(f"  teacher (fp32, frozen) + its logits: {_gib(plan['teacher'])}")
    lines += [
        f"  total (this configuration): {_gib(steady + act)} "
        f"({'sharded optimizer and gradients' if zero2 else 'sharded optimizer' if sharded_optim else 'plain optimizer'}; "
        f"ZeRO-1 {_gib(steady - optim - grads + plan['optimizer_sharded'] + plan['grads'] + act)}, "
        f"ZeRO-2 {_gib(steady - optim - grads + plan['optimizer_sharded'] + plan['grads_sharded'] + act)})",
    ]
    print("\n".join(lines), flush=True)
    return {"total": counts.total, "active": counts.active, "expert": counts.expert, "flops_per_token": fpt,
            "memory": plan, "memory_total": steady + act}
