"""Flags of Megatron-DeepSpeed's launch scripts and Megatron-LM's MoE names, in our terms.

One table, :data:`UPSTREAM_FLAGS`, says for each upstream flag this framework does not declare
itself what it becomes here (flags that are plain aliases of one option are declared with it in
megatron/config/schema.py): an *alias* (the same meaning under two of our flags), *accepted* (nothing to
do here, with the reason), or *refused* (the meaning differs or cannot apply: one line naming our
equivalent). :func:`translate_argv` applies the table to a command line before it is parsed, and
reads ``--deepspeed_config FILE`` (megatron.config.compat.ds_config) into flags: a JSON value fills a flag that
was not typed, contradicts one that was (one-line error), and precision follows the JSON.
docs/MIGRATING.md lists the same table for people.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron.config.compat.ds_config import DeepSpeedConfig, read_deepspeed_config
from megatron.errors import UserError


@dataclass(frozen=True)
class UpstreamFlag:
    name: str
    kind: str  # "alias" | "accepted" | "refused"
    takes_value: bool
    ours: tuple = ()  # alias: our flag(s) receiving the value (a switch: our switch)
    why: str = ""  # accepted: why nothing needs doing; refused: what to use instead
    check: Optional[Callable[[str], Optional[str]]] = None  # value -> error text (None: fine)


def _only(*allowed: str, what: str) -> Callable[[str], Optional[str]]:
    def check(v: str) -> Optional[str]:
        return None if v in allowed else f"{what}, not {v!r}"
    return check


UPSTREAM_FLAGS = {f.name: f for f in [
    # DeepSpeed launcher / engine
    UpstreamFlag("--no-pipeline-parallel", "accepted", False, why="DeepSpeed's switch to its pipeline engine; "
                 "pipelining here follows --pipeline-model-parallel-size alone"),
    # Megatron-DeepSpeed data and scheduler flags
    UpstreamFlag("--data-impl", "accepted", True, why="datasets are always read as memory-mapped .bin/.idx",
                 check=_only("mmap", "infer", what="only the mmap format (.bin/.idx written by "
                                                   "tools/preprocess_data.py) is read: use --data-impl mmap")),
    UpstreamFlag("--num-workers", "accepted", True, why="samples are sliced from the memory-mapped file in the "
                 "training process; no loader workers are needed"),
    UpstreamFlag("--override-opt_param-scheduler", "accepted", False, why="our behaviour: on resume the learning-"
                 "rate schedule comes from the flags and only its position (samples consumed) from the checkpoint"),
    UpstreamFlag("--use-checkpoint-opt_param-scheduler", "refused", False,
                 why="--use-checkpoint-opt_param-scheduler: on resume the learning-rate schedule always comes from the "
                     "flags (only its position from the checkpoint): drop the flag and repeat the first run's schedule "
                     "flags"),
    # Megatron-LM implementation switches: one implementation here
    UpstreamFlag("--use-mcore-models", "accepted", False, why="there is one model implementation (Megatron-Core's "
                 "GPT layout); the switch chose it in Megatron-LM"),
    UpstreamFlag("--transformer-impl", "accepted", True, why="one implementation (torch modules)",
                 check=_only("local", "transformer_engine", what="--transformer-impl: local or transformer_engine")),
    UpstreamFlag("--no-masked-softmax-fusion", "accepted", False,
                 why="attention runs torch's scaled_dot_product_attention, which picks its fused kernel itself"),
    UpstreamFlag("--use-flash-attn", "accepted", False,
                 why="torch's scaled_dot_product_attention runs flash attention where the GPU and dtype allow"),
    UpstreamFlag("--no-bias-dropout-fusion", "accepted", False, why="no fused bias-dropout kernel here"),
    UpstreamFlag("--no-bias-gelu-fusion", "accepted", False, why="no fused bias-GeLU kernel here"),
    UpstreamFlag("--no-bias-swiglu-fusion", "accepted", False, why="no fused bias-SwiGLU kernel here"),
    UpstreamFlag("--no-rope-fusion", "accepted", False, why="RoPE is applied by torch ops (no fused kernel)"),
    UpstreamFlag("--no-gradient-accumulation-fusion", "accepted", False,
                 why="weight gradients accumulate through autograd (no fused wgrad kernel)"),
    UpstreamFlag("--overlap-param-gather", "accepted", False,
                 why="with --use-distributed-optimizer the updated parameters are all-gathered right after the "
                     "optimizer step, not overlapped with the next forward"),
    # Megatron-LM MoE names
    UpstreamFlag("--moe-expert-capacity-factor", "alias", True,
                 ("--moe-train-capacity-factor", "--moe-eval-capacity-factor")),
    UpstreamFlag("--moe-pad-expert-input-to-capacity", "accepted", False,
                 why="with a capacity, every expert's input is already padded to it"),
    UpstreamFlag("--moe-grouped-gemm", "accepted", False, why="the no-drop path already runs the experts as one "
                 "grouped matmul"),
]}


@dataclass
class Translation:
    argv: list
    notes: list = field(default_factory=list)  # warning lines to print once (rank 0)
    deepspeed: Optional[DeepSpeedConfig] = None


def _split_eq(argv: list) -> list:
    out = []
    for a in argv:
        if a.startswith("--") and "=" in a and a.split("=", 1)[0] in UPSTREAM_FLAGS_AND_DS:
            out.extend(a.split("=", 1))
        else:
            out.append(a)
    return out


_DS_CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed-config")
UPSTREAM_FLAGS_AND_DS = set(UPSTREAM_FLAGS) | set(_DS_CONFIG_FLAGS)
# our flags a DeepSpeed JSON can set: dest -> (flag, switch?, type)
_OUR_FLAGS = {
    "global_batch_size": ("--global-batch-size", False, int), "micro_batch_size": ("--micro-batch-size", False, int),
    "clip_grad": ("--clip-grad", False, float), "fp16": ("--fp16", True, bool), "bf16": ("--bf16", True, bool),
    "loss_scale": ("--loss-scale", False, float), "initial_loss_scale": ("--initial-loss-scale", False, float),
    "loss_scale_window": ("--loss-scale-window", False, int), "hysteresis": ("--hysteresis", False, int),
    "min_loss_scale": ("--min-loss-scale", False, float), "zero_stage": ("--zero-stage", False, int),
    "log_interval": ("--log-interval", False, int),
}


def _typed_flags(argv: list) -> dict:
    """dest -> value of our JSON-settable flags typed on the command line (the last one wins)."""
    by_flag = {flag: (dest, switch, kind) for dest, (flag, switch, kind) in _OUR_FLAGS.items()}
    out = {}
    for i, a in enumerate(argv):
        name, _, inline = a.partition("=")
        if name not in by_flag:
            continue
        dest, switch, kind = by_flag[name]
        if switch:
            out[dest] = True
            continue
        raw = inline if inline else (argv[i + 1] if i + 1 < len(argv) else None)
        try:
            out[dest] = kind(raw)
        except (TypeError, ValueError):
            raise UserError(f"{name} {raw!r} is not a valid {kind.__name__}") from None
    return out


def _apply_deepspeed(argv: list, path: str, tr: Translation) -> list:
    ds = read_deepspeed_config(path)
    values, notes = ds.resolve(_typed_flags(argv))
    tr.deepspeed, tr.notes = ds, tr.notes + notes
    for mode in ("fp16", "bf16"):  # the JSON decides precision: drop the switch it overrides
        if values.get(mode) is False:
            argv = [a for a in argv if a != f"--{mode}"]
    extra = []
    for dest, value in values.items():
        flag, switch, _ = _OUR_FLAGS[dest]
        if switch:
            if value and flag not in argv:
                extra.append(flag)
        elif value is not None:
            extra += [flag, str(int(value) if isinstance(value, float) and value.is_integer() and dest != "clip_grad"
                                else value)]
    if ds.curriculum is not None:
        ds.curriculum.check_seq_length(_seq_length(argv), f"--deepspeed_config {path}")
    return extra + argv  # the typed flags come last and win (they agree with the JSON by now)


def _seq_length(argv: list) -> int:
    for i, a in enumerate(argv):
        if a == "--seq-length" and i + 1 < len(argv):
            try:
                return int(argv[i + 1])
            except ValueError:
                break
        if a.startswith("--seq-length="):
            return int(a.split("=", 1)[1])
    return 1 << 30  # not typed: the parser's default applies; checked again once parsed


# Flags only Megatron-LM's scripts use: with them, an unset MoE layer layout means Megatron-LM's default (every
# layer an MoE layer, --moe-layer-freq 1), not Megatron-DeepSpeed's (--expert-interval 2, every other layer).
_MEGATRON_LM_MOE = ("--moe-router-topk", "--moe-router-load-balancing-type", "--expert-model-parallel-size",
                    "--moe-aux-loss-coeff", "--moe-grouped-gemm", "--moe-ffn-hidden-size")
_LAYER_LAYOUT = ("--moe-layer-freq", "--expert-interval")
# Megatron-DeepSpeed's MoE names (as typed, before translation): a command line with any of them keeps its
# default layout (every other layer), whatever Megatron-LM names it mixes in
_DEEPSPEED_MOE = ("--topk", "--moe-expert-parallel-size", "--mlp-type", "--moe-loss-coeff", "--moe-min-capacity",
                  "--moe-noisy-gate-policy", "--disable-moe-token-dropping", "--disable-moe-rts",
                  "--disable-moe-top2-2nd-expert-sampling", "--create-moe-param-group", "--moe-train-capacity-factor",
                  "--moe-eval-capacity-factor")


def _megatron_lm_layer_default(argv: list, tr: Translation, typed: list = ()) -> list:
    typed_names = {a.split("=", 1)[0] for a in typed if a.startswith("--")}
    names = typed_names | {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    if "--num-experts" not in names or names & set(_LAYER_LAYOUT) or not names & set(_MEGATRON_LM_MOE) \
            or typed_names & set(_DEEPSPEED_MOE):
        return argv
    tr.notes.append("Megatron-LM MoE flags without --moe-layer-freq: every layer is an MoE layer (Megatron-LM's "
                    "default; give --moe-layer-freq or --expert-interval to choose)")
    return argv + ["--moe-layer-freq", "1"]


def translate_argv(argv) -> Translation:
    """Upstream flags -> ours (see the module docstring); a refused flag raises a one-line UserError."""
    typed = list(argv)
    argv = _split_eq(typed)
    tr = Translation(argv=[])
    out, ds_path, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a in _DS_CONFIG_FLAGS:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"{a} needs a file: the DeepSpeed JSON the launch script writes")
            ds_path, i = argv[i + 1], i + 2
            continue
        spec = UPSTREAM_FLAGS.get(a)
        if spec is None:
            out.append(a)
            i += 1
            continue
        value = None
        if spec.takes_value:
            if i + 1 >= len(argv):
                raise UserError(f"{a} needs a value")
            value, i = argv[i + 1], i + 2
        else:
            i += 1
        if spec.check is not None and value is not None:
            problem = spec.check(value)
            if problem:
                raise UserError(problem)
        if spec.kind == "refused":
            raise UserError(spec.why or f"{a} is not supported here")
        if spec.kind == "alias":
            for target in spec.ours:
                out += [target] if value is None else [target, value]
    if ds_path is not None:
        out = _apply_deepspeed(out, ds_path, tr) + ["--deepspeed_config", ds_path]
    if "--vocab-file" in out and "--merge-file" in out and "--tokenizer-type" not in out and "--mock-data" not in out:
        out = ["--tokenizer-type", "GPT2BPETokenizer"] + out  # Megatron-DeepSpeed's scripts rely on this default
    tr.argv = _megatron_lm_layer_default(out, tr, typed)
    return tr
