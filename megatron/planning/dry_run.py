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
(parallelism-coordinated all-to-all), each MoE layer at its own EP degree ``e = min(EP, E)`` (PR-MoE: a
layer with fewer experts than ``--moe-expert-parallel-size`` holds E / e = 1 expert per rank, its other
ranks being extra expert-data-parallel replicas: expert-DP DP / e; :func:`expert_layout`). Activations
follow Korthikanti et al. 2022 ("Reducing activation recomputation"), with a flash / fused attention kernel (no [T, T] score tensor kept):
34·s·b·h bytes per layer at 2-byte precision (×2 in fp32), of which 24·s·b·h are divided by TP (no
sequence parallelism: layer-norm inputs and dropout masks stay whole); an MoE layer replaces the MLP's
19·s·b·h by 19·s·b·h·k·cf plus its dispatch buffers (4·s·b·h·k·cf), divided by TP (the token split). With activation
checkpointing only each layer's input (s·b·h elements) is kept, plus one layer's working set.
The logits add s·b·V elements at the compute precision, an fp32 copy and its fp32 gradient.
Without checkpointing the estimate is 0.78-1.18x the bytes autograd actually saves (plus the logits
gradient) on small dense / MoE, fp32 / bf16 configurations (tests/test_examples.py); with
checkpointing it includes one layer's recomputation, the peak during backward.

Per phase (:func:`phase_plan`, printed after the totals): the peak of build, forward-backward, gradient
reduction, optimizer step, checkpoint save and load on one rank, each as named lines — what is resident
then (weights, gradients, Adam state, each full or sharded as plain / ZeRO-1 / ZeRO-2 / FSDP2 shard them)
plus every transient the code allocates in that phase (buckets, chunks, foreach temporaries, FSDP2's
gathered units, the replica check before a save, the checkpoint format's staging and read buffers) and
a "runtime" line for the process itself. tools/bench/memory.py measures the same phases (peak RSS per
rank on CPU) against it.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from megatron.checkpoint import formats as checkpoint_formats
from megatron.checkpoint import full_tensor_format
from megatron.checkpoint.layout import TRACKER
from megatron.checkpoint.teacher_config import teacher_model_config
from megatron.config.schema import MoEConfig, pad_vocab_size
from megatron.errors import UserError
from megatron.model.param_tags import is_expert
from megatron.optim.distributed_optimizer import CHUNK
from megatron.parallel.apply import build_model
from megatron.parallel.grad_sync import BUCKET_BYTES
from megatron.parallel.state import ParallelState
from megatron.planning.model_stats import count_parameters, flops_per_token, local_sizes
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


def activation_bytes(cfg, checkpointing: bool, layers=None, in_flight: float = 1, logits_too: bool = True) -> int:
    """Activation memory of one micro-batch on one GPU (see the module docstring). Pipeline stages: only
    ``layers`` (0-based indices; default all), for ``in_flight`` micro-batches held at once by the schedule
    (:func:`pipeline_in_flight`), the logits only on the last stage (``logits_too``)."""
    m, moe = cfg.model, cfg.model.moe
    s, b, h, V = m.seq_length, cfg.train.micro_batch_size, m.hidden_size, m.vocab_size
    tp = cfg.parallel.tensor_model_parallel_size
    half = cfg.precision.fp16 or cfg.precision.bf16
    scale = 1.0 if half else 2.0  # the 34·s·b·h figure is for 2-byte activations
    ffn_ratio = m.ffn_hidden_size / (4 * h)
    # Korthikanti et al.'s split under TP without sequence parallelism: of the attention block's 15 (with both
    # layer norms) 8 are split over TP and 7 are not (LN inputs, the QKV input, a dropout mask); of the MLP's 19,
    # 16 are split and 3 are not. The MoE layer runs its experts on 1/TP of the routed tokens (the TP token split).
    # With sequence parallelism the unsplit parts are split too (34 / TP in all: Korthikanti et al.'s table 2),
    # and the MoE layer (residual part included) runs on the rank's 1/TP sequence shard.
    sp = tp > 1 and getattr(cfg.parallel, "sequence_parallel", False)
    split_moe = tp if sp or getattr(cfg.parallel, "moe_tp_token_split", True) else 1
    unsplit = tp if sp else 1  # what the attention block and the dense MLP keep whole without it
    dense_mlp = (3 / unsplit + 16 / tp) * ffn_ratio
    per_layer = []
    for i, e in enumerate(moe.experts_per_layer(m.num_layers)):
        if layers is not None and i not in layers:
            continue
        mlp = dense_mlp
        if e > 1:
            k_cf = min(moe.topk, e) * (moe.train_capacity_factor if moe.token_dropping else 1.0)
            mlp = (19 * ffn_ratio * k_cf + 4 * k_cf) / split_moe + (dense_mlp if moe.mlp_type == "residual" else 0)
        per_layer.append(s * b * h * (7 / unsplit + 8 / tp + mlp) * scale)
    elem = 2 if half else 4
    logits = s * b * V / tp * (elem + 4 + 4) if logits_too else 0
    if checkpointing:
        kept = in_flight * len(per_layer) * s * b * h * elem / unsplit + max(per_layer, default=0)  # layer inputs
    else:
        kept = in_flight * sum(per_layer)
    return int(kept + logits)


def pipeline_in_flight(schedule: str, pp: int, pp_rank: int, micro: int, virtual: int = 1) -> float:
    """Micro-batches whose activations pipeline rank ``pp_rank`` holds at its peak, in units of all its layers:
    1F1B min(m, P - p) (the first stage holds P), GPipe m (every forward before any backward), interleaved
    1F1B torch's warm-up count (v - 1) P + 2 (P - 1 - p) + 1 chunk micro-batches (at most m v), each a 1/v of
    the rank's layers."""
    if pp == 1:
        return 1
    if schedule == "GPipe":
        return micro
    if virtual > 1:
        return min(micro * virtual, (virtual - 1) * pp + 2 * (pp - 1 - pp_rank) + 1) / virtual
    return min(micro, pp - pp_rank)


def pipeline_schedule_name(cfg, micro: int) -> str:
    """The schedule the runner picks (megatron.parallel.pipeline.runner)."""
    par = cfg.parallel
    layout = cfg.pipeline_layout()
    kind = par.pipeline_schedule or ("Interleaved1F1B" if layout.virtual > 1 else "1F1B")
    if kind == "1F1B" and micro < layout.pp:
        return "GPipe"
    if kind == "Interleaved1F1B" and micro % max(1, micro // layout.pp):
        return "GPipe"
    return kind


def stage_parameters(cfg, pp_rank: int, tp: int = 1) -> tuple[int, int]:
    """(dense, expert) parameters of pipeline rank ``pp_rank``'s stages with every expert local (EP 1), on TP rank 0
    of ``tp``: the meta model sharded and pruned as training does (what stays whole under TP, e.g. MLA's down
    projections, the MoE layer's router and shared experts, counted whole; the last stage's tied copy of the
    embeddings included)."""
    layout = cfg.pipeline_layout() if cfg.parallel.pipeline_model_parallel_size > 1 else None
    ps = ParallelState(device=torch.device("meta"), pp_size=layout.pp if layout else 1, pp_rank=pp_rank, tp_size=tp)
    model = build_model(cfg.model, ps, pipeline=layout)
    expert = sum(p.numel() for p in model.parameters() if is_expert(p))
    return sum(p.numel() for p in model.parameters()) - expert, expert


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


def expert_layout(model_cfg, ep: int, dp: int, fold: int = 1) -> list[dict]:
    """Per MoE layer: ``layer`` (0-based), ``experts`` E, ``ep`` (its EP degree min(EP, E)), ``local`` (E / ep
    experts per rank), ``edp`` (its expert-DP size: DP / ep, times ``fold``, the TP ranks of the token split)
    and ``params`` (one expert's parameters, from the analytical count: every expert has the same size)."""
    moe = model_cfg.moe
    layers = [(i, e) for i, e in enumerate(moe.experts_per_layer(model_cfg.num_layers)) if moe.is_moe_layer(i, e)]
    one_expert = count_parameters(model_cfg).expert // max(sum(e for _, e in layers), 1)
    out = []
    for i, e in layers:
        degree = min(ep, e)
        out.append({"layer": i, "experts": e, "ep": degree, "local": e // degree,
                    "edp": max(dp // degree, 1) * fold, "params": one_expert})
    return out


def expert_elements(layout: list[dict], sharded: bool = False, layers=None) -> float:
    """Expert parameters on one rank: each layer's E / e local experts (``sharded``: divided by the layer's
    expert-DP size, a ZeRO / FSDP2 shard); ``layers``: a filter on the layout's entries."""
    return sum(x["local"] * x["params"] / (x["edp"] if sharded else 1) for x in layout
               if layers is None or layers(x))


def _fold(cfg) -> int:
    """TP ranks in each expert-DP group (the MoE token split), as parallel/state.py builds them."""
    tp = cfg.parallel.tensor_model_parallel_size
    return tp if getattr(cfg.parallel, "moe_tp_token_split", True) else 1


def _stage(cfg, world_size: int, pp_rank: int) -> dict:
    """What pipeline rank ``pp_rank`` holds and runs: ``dense`` parameters (full, before TP), its ``layers``,
    ``in_flight`` micro-batches of activations, whether it computes the logits (``last``), the ``schedule``."""
    tp, pp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size
    if pp == 1:
        dense = count_parameters(cfg.model).dense
        return {"dense": dense, "dense_local": stage_parameters(cfg, 0, tp)[0] if tp > 1 else dense, "layers": None,
                "in_flight": 1, "last": True, "schedule": None, "pp_rank": 0}
    layout = cfg.pipeline_layout()
    dp = max(world_size // (tp * pp), 1)
    micro = max(cfg.train.global_batch_size // (cfg.train.micro_batch_size * dp), 1)
    schedule = pipeline_schedule_name(cfg, micro)
    dense = stage_parameters(cfg, pp_rank)[0]
    return {"dense": dense, "layers": set(layout.layers_of(pp_rank)),
            "dense_local": stage_parameters(cfg, pp_rank, tp)[0] if tp > 1 else dense,
            "in_flight": pipeline_in_flight(schedule, pp, pp_rank, micro, layout.virtual),
            "last": layout.num_stages - 1 in layout.stages_of(pp_rank), "schedule": schedule, "pp_rank": pp_rank,
            "micro": micro}


def memory_plan(cfg, world_size: int, teacher_cfg=None, pp_rank: int = 0) -> dict:
    """Per-GPU bytes of weights, gradients, optimizer state and activations for this layout (under pipeline
    parallelism: for a rank of pipeline stage ``pp_rank``)."""
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    ep = cfg.model.moe.expert_parallel_size
    dp = max(world_size // (tp * pp), 1)
    stage = _stage(cfg, world_size, pp_rank)
    # experts are replicated over TP too; with the TP token split their optimizer state is sharded over it
    edp = max(dp // ep, 1) * _fold(cfg)
    layout = expert_layout(cfg.model, ep, dp, _fold(cfg))  # each MoE layer at its own EP degree (PR-MoE)
    if stage["layers"] is not None:
        layout = [x for x in layout if x["layer"] in stage["layers"]]
    dense_local = stage["dense_local"]  # this TP rank's shards plus what TP leaves whole
    expert_local = expert_elements(layout)
    expert_sharded = expert_elements(layout, sharded=True)
    params = dense_local + expert_local
    teacher = 0
    if teacher_cfg is not None and stage["last"]:  # frozen fp32 weights, same layout; no_grad logits, log-softmax
        # (under pipeline parallelism only the last stage holds the teacher: its logits are needed there)
        tc = count_parameters(teacher_cfg)
        m = cfg.model
        teacher_experts = expert_elements(expert_layout(teacher_cfg, ep, dp))
        teacher = 4 * (tc.dense / tp + teacher_experts) + 8 * m.seq_length * cfg.train.micro_batch_size * m.vocab_size / tp
    act = {ck: activation_bytes(cfg, ck, stage["layers"], stage["in_flight"], stage["last"]) for ck in (False, True)}
    return {
        "world": world_size, "tp": tp, "pp": pp, "ep": ep, "dp": dp, "edp": edp, "stage": stage,
        "params": int(params),
        "weights": int(4 * params),
        "grads": int(4 * params),
        "grads_sharded": int(4 * (dense_local / dp + expert_sharded)),
        "optimizer": int(8 * params),
        "optimizer_sharded": int(8 * (dense_local / dp + expert_sharded)),
        "expert_layout": layout,
        "activations": act[False],
        "activations_ckpt": act[True],
        "teacher": int(teacher),
    }


# The Python + torch process before any model exists (interpreter, torch and its kernels, gloo): measured
# 0.3-0.5 GB on CPU by tools/bench/memory.py, which puts its own measurement in this line. On a GPU the
# corresponding cost is the CUDA context and kernels (device memory; typically 0.3-0.6 GiB; not measured here).
RUNTIME_BYTES_CPU = int(0.45e9)
RUNTIME_BYTES_GPU = int(0.5 * GiB)

CHECKSUM_CHUNK = 1 << 20  # elements per float64 chunk of the replica check before a save (training.agreement)

PHASES = ("build", "fwd-bwd", "grad-reduce", "optimizer-step", "save", "load")


def _cfg_flag(cfg, name: str) -> bool:
    """A boolean option wherever the config declares it (an option another change may add: False if absent)."""
    for part in (cfg, getattr(cfg, "parallel", None), getattr(cfg, "optimizer", None), getattr(cfg, "checkpoint", None)):
        if part is not None and bool(getattr(part, name, False)):
            return True
    return False


def optimizer_mode(cfg) -> str:
    """plain | zero1 | zero2 | fsdp2 (``--use-torch-fsdp2``: parameters, gradients and Adam state sharded)."""
    if _cfg_flag(cfg, "use_torch_fsdp2"):
        return "fsdp2"
    if cfg.optimizer.zero_stage == 2:
        return "zero2"
    if cfg.optimizer.use_distributed_optimizer or cfg.optimizer.zero_stage == 1:
        return "zero1"
    return "plain"


def _checkpoint_format(cfg):
    """The format module a save of ``cfg`` writes: ``--ckpt-format`` where the config has it, else the default."""
    name = getattr(getattr(cfg, "checkpoint", None), "ckpt_format", None)
    names = getattr(checkpoint_formats, "FORMAT_NAMES", {})
    return names.get(name, checkpoint_formats.SAVED_FORMAT) if name else checkpoint_formats.SAVED_FORMAT


def _layout_of_rank(rank: int, tp: int, dp: int, ep: int) -> dict:
    """Megatron's layout (rank = d * TP + t; EP groups are blocks of EP DP-indices): this rank's coordinates."""
    t, d = rank % tp, (rank // tp) % dp
    return {"tp_rank": t, "dp_rank": d, "ep_rank": d % ep, "edp_rank": d // ep, "main": rank == 0}


def phase_plan(cfg, world_size: int, rank: int = 0, runtime_bytes: int | None = None) -> dict:
    """Per-phase peak bytes of one rank: {phase: {"lines": [(name, bytes)], "total": bytes}}, plus "mode" and
    "format". Each phase's lines are what is resident then plus the transients the code allocates in it:

    - resident state: weights (fp32), gradients (fp32; persistent buffers, zeroed in place each step, except
      ZeRO-2, which frees them at the reduce-scatter and rebuilds them in the next backward), Adam m and v
      (fp32), each full or sharded as the mode shards them: plain none; ZeRO-1 Adam over DP / expert-DP;
      ZeRO-2 also the gradients (a shard lives from the reduce-scatter to the step); FSDP2 (= ZeRO-3) all
      three, plus the parameters it all-gathers: the root block (embeddings, final LN, the tied output layer)
      stays unsharded from the forward to the end of the backward, with its full gradient before the
      reduce-scatter, and two transformer layers are gathered at a time (the current one and the prefetch);
    - build (shard-local: each rank materialises only its own TP shard and its experts; FSDP2 then shards
      that over DP unit by unit; the ZeRO optimizers copy the parameters into their contiguous buffer while
      the old storages live, then allocate the Adam shards: the larger of the two counts);
    - fwd-bwd: the activations of one micro-batch (:func:`activation_bytes`);
    - grad-reduce: plain / ZeRO-1 a flat bucket (``BUCKET_BYTES``, overshooting by up to one gradient: x2);
      ZeRO-2 the reduce-scatter bucket (DP x ``CHUNK`` elements) while the full gradients are still there
      (the gradient shard's pages fill as the full gradients are freed); FSDP2 reduces during backward;
    - optimizer-step: torch's foreach AdamW (plain, FSDP2) allocates sqrt(v) for every local parameter at
      once (one fp32 copy of what it updates); ZeRO-1/2 update ``CHUNK`` elements at a time (two chunk
      temporaries) and all-gather in place (NCCL) or, on gloo, chunk by chunk through a flat buffer of
      DP + 1 chunks;
    - save: the larger of the replica check before a save (float64 chunks of ``CHECKSUM_CHUNK`` elements and
      their squares; freed before the write) and what the checkpoint format stages: the full-tensor format
      (1) gathers the dense Adam state of the ZeRO shards and TP-gathers / copies the weights onto the
      writing ranks; the sharded format (2, torch.distributed.checkpoint) writes one piece at a time, copying
      a piece that is a view (ZeRO's parameters and Adam pieces) just before writing it, and torch.save
      serialises it through a buffer of its size: two of the largest piece in flight; an async save stages a
      copy of every box the rank holds;
    - load: the full-tensor format reads the whole dense model and its Adam state on every rank (then
      keeps this rank's part) and this rank's experts' files; a sharded format reads into the tensors in
      place: each stored tensor is deserialised, then copied (DCP's read loop still holds the previous one
      while it reads the next: two of the largest in flight).
    - a backward adds each new gradient into the persistent ``.grad`` (one parameter's new gradient in flight:
      the largest counted in fwd-bwd).

    ``runtime_bytes`` is the process's baseline before the model exists (a named line in every phase);
    default :data:`RUNTIME_BYTES_CPU` with ``--use-cpu``, else :data:`RUNTIME_BYTES_GPU`.
    """
    m = cfg.model
    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    ep = m.moe.expert_parallel_size
    dp = max(world_size // (tp * pp), 1)
    edp = max(dp // ep, 1) * _fold(cfg)
    stage = _stage(cfg, world_size, rank // (tp * dp))  # pipeline stage blocks of TP x DP ranks
    rank = rank % (tp * dp)
    layout = expert_layout(m, ep, dp, _fold(cfg))  # each MoE layer at its own EP degree (PR-MoE)
    if stage["layers"] is not None:
        layout = [x for x in layout if x["layer"] in stage["layers"]]
    mode = optimizer_mode(cfg)
    fmt = _checkpoint_format(cfg)
    full_format = fmt is full_tensor_format  # the one format that gathers full tensors onto writing ranks
    async_save = _cfg_flag(cfg, "async_save")
    cpu = bool(getattr(cfg.parallel, "use_cpu", False)) or getattr(cfg.parallel, "distributed_backend", None) == "gloo"
    if runtime_bytes is None:
        runtime_bytes = RUNTIME_BYTES_CPU if cpu else RUNTIME_BYTES_GPU
    where = _layout_of_rank(rank, tp, dp, ep)
    sizes = local_sizes(m, tp, ep)
    one_expert = 2 * m.hidden_size * m.ffn_hidden_size + m.ffn_hidden_size + m.hidden_size

    dense_full = stage["dense"]
    dense_l, expert_l = stage["dense_local"], expert_elements(layout)  # on this rank, unsharded
    params_l = dense_l + expert_l
    params_s = dense_l / dp + expert_elements(layout, sharded=True)  # its shard of the DP / expert-DP domains
    # the expert-DP rank 0 of each layer's degree writes that layer's experts (format 1) and gathers their Adam state
    written_experts = expert_elements(layout, layers=lambda x: where["dp_rank"] // x["ep"] == 0)
    chunk = 4 * CHUNK
    grads_full = ("gradients (fp32)", 4 * params_l)
    grads_shard = ("gradients (fp32, shard)", 4 * params_s)
    adam = ("Adam m, v (fp32)", 8 * params_l) if mode == "plain" else ("Adam m, v (fp32, shard)", 8 * params_s)
    weights = ("weights (fp32, FSDP2 shard)", 4 * params_s) if mode == "fsdp2" else ("weights (fp32)", 4 * params_l)
    # FSDP2 keeps the shard and allocates the unsharded parameter beside it. The root block (embeddings, tied
    # output layer) stays unsharded from the forward to the end of the backward, and its unsharded gradient exists
    # from the output layer's backward (the first, with every activation still held) to the end; a layer's
    # unsharded gradient and the reduce-scatter's flat input copy of it exist before its gradient shard is made
    fsdp_units = [("FSDP2 root block unsharded (params + grad)", 2 * 4 * sizes.embedding),
                  ("FSDP2 layers unsharded (two gathered + one's grad + reduce-scatter input)", 4 * 4 * sizes.largest_layer)]
    act = activation_bytes(cfg, m.checkpoint_activations, stage["layers"], stage["in_flight"], stage["last"])
    runtime = ("runtime (python + torch, before the model)", runtime_bytes)

    if mode in ("plain", "zero1"):
        resident = [weights, grads_full, adam]
    elif mode == "zero2":
        resident = [weights, adam]  # gradients freed at the reduce-scatter, the shard at the step
    else:
        resident = [weights, grads_shard, adam]

    plan = {}
    # build (shard-local)
    build = [runtime, weights]
    if mode in ("zero1", "zero2"):  # the buffer is filled while the old storages live, Adam allocated after
        build += [("ZeRO: the larger of the parameter buffer's copy (old storages freed after) and the Adam shards",
                   max(4 * params_l, 8 * params_s))]
    elif mode == "fsdp2":  # fully_shard shards the TP/EP-local model unit by unit after it is built
        build = [runtime, ("weights (fp32, TP/EP-local, before fully_shard)", 4 * params_l),
                 ("FSDP2 shard of one unit (allocated before the unit's full tensors are freed)",
                  4 * max(sizes.embedding, sizes.largest_layer) / dp)]
    plan["build"] = build
    # forward + backward of one micro-batch
    if mode == "zero2":
        fwd = [runtime, weights, ("gradients (fp32, built by the backward)", 4 * params_l), adam]
    else:
        fwd = [runtime] + resident
    largest_local = sizes.largest_param / (dp if mode == "fsdp2" else 1)
    fwd = fwd + [("activations (one micro-batch)" if pp == 1 else
                  f"activations ({stage['in_flight']:g} micro-batches in flight, {stage['schedule']})", act),
                 ("backward: a new gradient before it is added into .grad (the largest)", 4 * largest_local)]
    if mode == "fsdp2":
        fwd += fsdp_units
    plan["fwd-bwd"] = fwd
    # gradient reduction
    if mode in ("plain", "zero1"):
        plan["grad-reduce"] = [runtime] + resident + [("all-reduce bucket (flat copy)", 2 * BUCKET_BYTES)]
    elif mode == "zero2":
        plan["grad-reduce"] = [runtime, weights, ("gradients (fp32; freed as the reduce-scatter passes them, while "
                                                  "their shard is written)", 4 * params_l), adam,
                               ("reduce-scatter bucket (DP x CHUNK)", dp * chunk)]
    else:
        plan["grad-reduce"] = [runtime] + resident
    # optimizer step (norm, clip, Adam, ZeRO all-gather)
    if mode == "plain":
        opt = [runtime] + resident + [("foreach AdamW sqrt(v) temporaries", 4 * params_l)]
    elif mode == "fsdp2":
        opt = [runtime] + resident + [("foreach AdamW sqrt(v) temporaries (shard)", 4 * params_s)]
    else:
        base = [runtime, weights, grads_full if mode == "zero1" else grads_shard, adam]
        gather = (dp + 1) * chunk if cpu else 0
        opt = base + [("ZeRO update + all-gather chunks", 2 * chunk + gather)]
    plan["optimizer-step"] = opt
    # save: the replica check runs (and frees its temporaries) before the format writes: the larger of the two
    replicas = (dp > 1 or tp > 1 or (expert_l and edp > 1)) and mode != "fsdp2"  # FSDP2: shards are not compared
    check = 16 * min(largest_local, CHECKSUM_CHUNK) if replicas else 0
    if full_format:
        writer_dense = where["dp_rank"] == 0  # TP ranks of the first replica gather; rank 0 writes
        writer_expert = written_experts > 0 and where["tp_rank"] == 0
        zero = mode in ("zero1", "zero2")
        staged = 0.0
        if zero and writer_dense:
            staged += 8 * dense_l  # full_state: the dense domain's Adam m, v gathered onto dp_rank 0
        elif zero:
            staged += 2 * chunk
        if zero:
            staged += 8 * written_experts
        if writer_dense and (zero or tp > 1):
            staged += 4 * dense_full  # weights: ZeRO buffer views copied out / TP shards gathered
        if writer_dense and tp > 1:
            staged += 8 * dense_full  # Adam state TP-gathered
        if writer_expert and expert_l:
            staged += 12 * one_expert  # one expert's file: its weights and Adam state copied out
        what = f"format {fmt.VERSION} (full tensors) gathered / copied onto this rank"
    elif async_save:  # sharded_format.staged: a copy of every box this rank holds (its weights, its Adam state)
        staged = 4 * (params_s if mode == "fsdp2" else params_l) + 8 * (params_l if mode == "plain" else params_s)
        what = f"format {fmt.VERSION} --async-save: a staged copy of every box this rank holds"
    elif mode in ("zero1", "zero2", "plain"):
        # the sharded writer handles one piece at a time: a piece that is a view (ZeRO's parameters in the
        # buffer, Adam pieces in the shards) is copied out, and torch.save serialises it through a buffer of
        # its size (measured: about two of the largest piece in flight, plain included)
        staged = 2 * 4 * largest_local
        what = f"format {fmt.VERSION} (sharded): one piece at a time, its copy and serialisation buffer (the largest)"
    elif mode == "fsdp2":
        staged = 2 * 4 * largest_local
        what = f"format {fmt.VERSION} (sharded): FSDP2's padded shards copied out (two of the largest)"
    save = [runtime] + resident + [(f"save transient: the larger of the replica check before it (float64 copy + "
                                    f"square of the largest parameter, {_gib(check)}) and the {what} "
                                    f"({_gib(staged)})", max(check, staged))]
    plan["save"] = save
    # load (into the running trainer: everything above is resident)
    load = [runtime] + resident
    if full_format:
        load.append(("full dense model + Adam state read on every rank", 12 * dense_full))
        if expert_l:
            load.append(("this rank's expert files (Adam slices + their stack)", 4 * one_expert + 16 * expert_l))
    else:
        load.append(("stored tensors deserialised one by one, copied in place (DCP's read loop still holds the "
                     "previous one: two of the largest)", 2 * 4 * largest_local))
    plan["load"] = load
    out = {"mode": mode, "format": fmt.VERSION, "rank": rank + stage["pp_rank"] * tp * dp, "dp": dp, "tp": tp,
           "pp": pp, "pp_rank": stage["pp_rank"], "ep": ep, "edp": edp,
           "expert_layout": layout,
           "runtime": runtime_bytes, "save_parts": {"replica_check": int(check), "format_staging": int(staged)}}
    for k, lines in plan.items():
        lines = [(n, int(b)) for n, b in lines]
        out[k] = {"lines": lines, "total": sum(b for _, b in lines)}
    return out


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
    pp = cfg.parallel.pipeline_model_parallel_size
    plans = [memory_plan(cfg, world_size, tcfg, p) for p in range(pp)]  # one per pipeline stage
    plan = max(plans, key=lambda pl: sum(_plan_totals(cfg, pl)[:2]))  # the fullest stage
    m = cfg.model
    fpt = flops_per_token(m)
    fsdp2 = optimizer_mode(cfg) == "fsdp2"
    sharded_optim = cfg.optimizer.use_distributed_optimizer or cfg.optimizer.zero_stage in (1, 2) or fsdp2
    zero2 = cfg.optimizer.zero_stage == 2 or fsdp2
    steady, act, weights, grads, optim = _plan_totals(cfg, plan)
    lines = [
        f"> dry run: {m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads, ffn {m.ffn_hidden_size}, "
        f"seq {m.seq_length}, vocab {m.vocab_size}, experts per layer {m.moe.experts_per_layer(m.num_layers)}, "
        f"mlp-type {m.moe.mlp_type if m.moe.enabled else 'standard'}, top-{m.moe.topk}",
        f"total parameters: {counts.total}",
        f"active parameters: {counts.active}",
        f"expert parameters: {counts.expert}",
        f"dense parameters: {counts.dense}",
        f"training FLOPs per token: {fpt:.4e} (forward {fpt / 3:.4e})",
        f"> memory plan per GPU: world {world_size} = TP {plan['tp']} x "
        f"{f'PP {pp} x ' if pp > 1 else ''}DP {plan['dp']} (EP {plan['ep']}, "
        f"expert-DP {plan['edp']}), micro batch {cfg.train.micro_batch_size}"
        + (f"; pipeline stage {plan['stage']['pp_rank']} (the fullest)" if pp > 1 else ""),
        *_stage_lines(cfg, plans),
        f"  parameters on one GPU:      {plan['params']}",
        *expert_layout_lines(plan["expert_layout"], plan["ep"]),
        f"  weights (fp32):             {_gib(plan['weights'])}",
        f"  gradients (fp32):           {_gib(plan['grads'])} "
        f"(sharded over DP / expert-DP with --zero-stage 2: {_gib(plan['grads_sharded'])})",
        f"  Adam state (fp32 m, v):     {_gib(plan['optimizer'])} "
        f"(sharded over DP / expert-DP: {_gib(plan['optimizer_sharded'])})",
        f"  activations {'per micro-batch' if pp == 1 else 'in flight'}: {_gib(plan['activations'])} without "
        f"checkpointing, "
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
        f"({'FSDP2: sharded weights, gradients and optimizer' if fsdp2 else 'sharded optimizer and gradients' if zero2 else 'sharded optimizer' if sharded_optim else 'plain optimizer'}; "
        f"ZeRO-1 {_gib(steady - weights - optim - grads + plan['weights'] + plan['optimizer_sharded'] + plan['grads'] + act)}, "
        f"ZeRO-2 {_gib(steady - weights - optim - grads + plan['weights'] + plan['optimizer_sharded'] + plan['grads_sharded'] + act)})",
    ]
    phases = phase_plan(cfg, world_size, rank=plan["stage"]["pp_rank"] * plan["tp"] * plan["dp"])
    lines += phase_lines(phases)
    print("\n".join(lines), flush=True)
    return {"total": counts.total, "active": counts.active, "expert": counts.expert, "flops_per_token": fpt,
            "memory": plan, "memory_total": steady + act, "phases": phases}


def _plan_totals(cfg, plan: dict) -> tuple[int, int, int, int, int]:
    """(steady state, activations, weights, gradients, optimizer) bytes of a memory plan under this config's
    optimizer and checkpointing."""
    fsdp2 = optimizer_mode(cfg) == "fsdp2"
    sharded_optim = cfg.optimizer.use_distributed_optimizer or cfg.optimizer.zero_stage in (1, 2) or fsdp2
    zero2 = cfg.optimizer.zero_stage == 2 or fsdp2
    optim = plan["optimizer_sharded"] if sharded_optim else plan["optimizer"]
    grads = plan["grads_sharded"] if zero2 else plan["grads"]
    weights = plan["optimizer_sharded"] // 2 if fsdp2 else plan["weights"]
    act = plan["activations_ckpt"] if cfg.model.checkpoint_activations else plan["activations"]
    return weights + grads + optim + plan["teacher"], act, weights, grads, optim


def _stage_lines(cfg, plans: list[dict]) -> list[str]:
    """One line per pipeline stage (nothing without pipelining)."""
    if len(plans) == 1:
        return []
    layout = cfg.pipeline_layout()
    out = [f"  pipeline: {plans[0]['stage']['schedule']} schedule, {plans[0]['stage']['micro']} micro-batches per step; "
           f"{layout.describe()}"]
    for pl in plans:
        st = pl["stage"]
        extra = [w for w, on in (("embeddings", 0 in layout.stages_of(st["pp_rank"])), ("head + loss", st["last"])) if on]
        steady, act = _plan_totals(cfg, pl)[:2]
        out.append(f"  stage {st['pp_rank']}: {len(st['layers'])} layers{' + ' + ', '.join(extra) if extra else ''}, "
                   f"{pl['params']} parameters on one GPU, {st['in_flight']:g} micro-batches in flight, "
                   f"total {_gib(steady + act)}")
    return out


def expert_layout_lines(layout: list[dict], ep: int) -> list[str]:
    """The MoE layers' EP degrees, one line per (experts, degree) group (PR-MoE layers with fewer experts than
    --moe-expert-parallel-size run at EP = E, their other ranks extra expert-DP replicas)."""
    groups: dict = {}
    for x in layout:
        groups.setdefault((x["experts"], x["ep"], x["local"], x["edp"]), []).append(x["layer"])
    out = []
    for (e, degree, local, edp), layers in groups.items():
        note = f" (below --moe-expert-parallel-size {ep}: EP = E)" if degree < ep else ""
        out.append(f"  MoE layers {','.join(map(str, layers))} (0-based): {e} experts at EP {degree}{note}, "
                   f"{local} per GPU, expert-DP {edp}")
    return out


def phase_lines(phases: dict) -> list[str]:
    """The per-phase part of the dry-run report (see :func:`phase_plan`)."""
    mode = {"plain": "plain optimizer", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "fsdp2": "FSDP2 (ZeRO-3)"}[phases["mode"]]
    out = [f"> memory plan per phase, rank {phases['rank']} ({mode}, checkpoint format {phases['format']}): "
           f"peak of each phase = resident state + the transients the code allocates in it"]
    for ph in PHASES:
        parts = ", ".join(f"{name} {_gib(b)}" for name, b in phases[ph]["lines"] if b)
        out.append(f"  {ph + ':':16s}{_gib(phases[ph]['total'])}  = {parts}")
    peak = max(PHASES, key=lambda k: phases[k]["total"])
    out.append(f"  peak: {_gib(phases[peak]['total'])} at {peak}; runtime line: the process before the model "
               f"(CPU: python + torch; GPU: the CUDA context), an estimate unless measured")
    if phases["mode"] == "fsdp2":
        out.append("  build: each rank builds its TP / EP shard only (megatron.parallel.apply.build_model), then FSDP2 "
                   "shards it over DP; initialising the DP shard directly would bring the build down to the shard")
    return out
