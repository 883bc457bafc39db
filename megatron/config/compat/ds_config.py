"""A DeepSpeed JSON config (``--deepspeed --deepspeed_config FILE``) read into our settings.

Megatron-DeepSpeed's launch scripts write a JSON for DeepSpeed's engine next to their Megatron
flags. This framework has no DeepSpeed engine; the fields that describe training are mapped to the
flag they correspond to:

================================  =================================================
JSON field                        our setting
================================  =================================================
train_batch_size                  --global-batch-size
train_micro_batch_size_per_gpu    --micro-batch-size
gradient_accumulation_steps       checked: global = micro x accumulation x DP
gradient_clipping                 --clip-grad
fp16.enabled                      --fp16
fp16.loss_scale (0 = dynamic)     --loss-scale (None = dynamic)
fp16.initial_scale_power          --initial-loss-scale 2**power
fp16.loss_scale_window            --loss-scale-window
fp16.hysteresis                   --hysteresis
fp16.min_loss_scale               --min-loss-scale
bf16.enabled                      --bf16
zero_optimization.stage           --zero-stage (0 off, 1 sharded Adam, 2 + sharded gradients, 3 FSDP2)
prescale_gradients                accepted: gradients are averaged in fp32, before or after is equal
steps_per_print                   --log-interval when that flag is not given
wall_clock_breakdown              per-phase timers on the log line
curriculum_learning               sequence-length curriculum (megatron.config.curriculum, megatron.training.curriculum)
================================  =================================================

A JSON value that contradicts a flag given on the command line is a one-line error naming both
(precision excepted: the JSON decides it, as DeepSpeed's engine does, with a warning naming both).
A JSON value fills a flag that was not given. Fields not acted on are listed in one warning line.
DeepSpeed's own defaults for fp16 loss scaling (initial power 16, window 1000, hysteresis 2,
minimum 1) apply when ``fp16`` is enabled in the JSON and neither the JSON nor a flag sets them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from megatron.config.curriculum import CurriculumConfig
from megatron.errors import UserError, check

# JSON path -> (argparse dest of our flag, the flag as the user types it)
_FIELD_TO_FLAG = {
    "train_batch_size": ("global_batch_size", "--global-batch-size"),
    "train_micro_batch_size_per_gpu": ("micro_batch_size", "--micro-batch-size"),
    "gradient_clipping": ("clip_grad", "--clip-grad"),
    "fp16.enabled": ("fp16", "--fp16"),
    "fp16.loss_scale": ("loss_scale", "--loss-scale"),
    "fp16.initial_scale_power": ("initial_loss_scale", "--initial-loss-scale"),
    "fp16.loss_scale_window": ("loss_scale_window", "--loss-scale-window"),
    "fp16.hysteresis": ("hysteresis", "--hysteresis"),
    "fp16.min_loss_scale": ("min_loss_scale", "--min-loss-scale"),
    "bf16.enabled": ("bf16", "--bf16"),
    "zero_optimization.stage": ("zero_stage", "--zero-stage"),
    "steps_per_print": ("log_interval", "--log-interval"),
}
# fields we read that map to no flag
_ACTED_ON = {"gradient_accumulation_steps", "prescale_gradients", "wall_clock_breakdown", "curriculum_learning",
             "fp16", "bf16", "zero_optimization", "bf16.enabled"}
# DeepSpeed's defaults for fp16 dynamic loss scaling
_FP16_DEFAULTS = {"fp16.loss_scale": 0, "fp16.initial_scale_power": 16, "fp16.loss_scale_window": 1000,
                  "fp16.hysteresis": 2, "fp16.min_loss_scale": 1}
_PLACEHOLDER = re.compile(r"\b(CONFIG_[A-Z0-9_]+|ZERO_STAGE|PRESCALE_GRAD|LOG_INTERVAL)\b")


@dataclass
class DeepSpeedConfig:
    """What a DeepSpeed JSON says, in our terms."""

    path: str
    values: dict = field(default_factory=dict)  # argparse dest -> value from the JSON
    sources: dict = field(default_factory=dict)  # argparse dest -> "json.field = value" for messages
    soft: set = field(default_factory=set)  # dests whose value is a DeepSpeed default (a flag may differ)
    gradient_accumulation_steps: Optional[int] = None
    prescale_gradients: bool = False
    wall_clock_breakdown: bool = False
    curriculum: Optional[CurriculumConfig] = None
    unused: list = field(default_factory=list)  # dotted names of fields not acted on

    def warning(self) -> Optional[str]:
        """One line listing the fields not acted on, or None."""
        if not self.unused:
            return None
        return (f"warning: --deepspeed_config {self.path}: fields not acted on (no DeepSpeed engine here; "
                f"the flags decide): {', '.join(self.unused)}")

    def resolve(self, explicit: dict) -> tuple[dict, list]:
        """(the flag values the JSON sets, warning lines), given the flags typed on the command line.

        ``explicit`` maps argparse dests to the values of the flags the user typed. A JSON value
        that differs from one of them raises a one-line error naming both, except for precision:
        upstream, DeepSpeed's engine casts the model as its JSON says whatever ``--fp16`` says, so
        the JSON's ``fp16`` / ``bf16`` win, with a warning naming both.
        """
        out, notes = {}, []
        precision = {d: v for d, v in self.values.items() if d in ("fp16", "bf16")}
        typed = {d: explicit.get(d, False) for d in ("fp16", "bf16")}
        if precision and any(typed.values()):
            json_mode = "fp16" if precision.get("fp16") else "bf16" if precision.get("bf16") else "fp32"
            flag_mode = "fp16" if typed["fp16"] else "bf16"
            if json_mode != flag_mode:
                notes.append(f"warning: --deepspeed_config {self.path}: {json_mode} in the JSON overrides --{flag_mode} "
                             f"(as DeepSpeed's engine does); training runs in {json_mode}")
            out["fp16"], out["bf16"] = json_mode == "fp16", json_mode == "bf16"
        for dest, value in self.values.items():
            if dest in ("fp16", "bf16"):
                out.setdefault(dest, value)
                continue
            if dest in explicit:
                if dest in self.soft or _same(explicit[dest], value):
                    continue
                given = explicit[dest]
                raise UserError(f"--deepspeed_config {self.path}: {self.sources[dest]} contradicts "
                                f"{_flag_of(dest)} {given}: make them agree or drop one")
            out[dest] = value
        if self.unused:
            notes.append(self.warning())
        return out, notes

    def check_batch(self, global_batch: int, micro_batch: int, dp: int) -> None:
        """DeepSpeed's identity train_batch_size = micro batch x accumulation steps x data-parallel size."""
        gas = self.gradient_accumulation_steps
        if gas is None:
            return
        check(global_batch == micro_batch * gas * dp,
              f"--deepspeed_config {self.path}: gradient_accumulation_steps {gas} x micro batch {micro_batch} x "
              f"data-parallel size {dp} = {micro_batch * gas * dp} is not the global batch {global_batch}: "
              f"fix train_batch_size, the micro batch or the accumulation steps")

    def global_batch_from_accumulation(self, micro_batch: int, dp: int) -> Optional[int]:
        """The global batch when the JSON gives accumulation steps but no train_batch_size."""
        if self.gradient_accumulation_steps is None or "global_batch_size" in self.values:
            return None
        return micro_batch * self.gradient_accumulation_steps * dp


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def _flag_of(dest: str) -> str:
    for d, flag in _FIELD_TO_FLAG.values():
        if d == dest:
            return flag
    return "--" + dest.replace("_", "-")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, name + "."))
        else:
            out[name] = v
    return out


def _load_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"--deepspeed_config {path}: no such file (the launch script writes it from its "
                        f"TEMPLATE.json with sed; run that step or give the JSON's path)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--deepspeed_config {path}: cannot read it ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = ""
        m = _PLACEHOLDER.search(text.splitlines()[e.lineno - 1] if e.lineno - 1 < len(text.splitlines()) else "")
        if m:
            hint = f"; {m.group(1)} is a template placeholder the launch script's sed step replaces"
        raise UserError(f"--deepspeed_config {path}: line {e.lineno} column {e.colno}: not valid JSON ({e.msg}){hint}") from None
    if not isinstance(data, dict):
        raise UserError(f"--deepspeed_config {path}: the top level must be a JSON object")
    return data


def _typed(path: str, name: str, value: Any, kind) -> Any:
    """Type-check one JSON value (bool for flags, int, number)."""
    ok = {bool: isinstance(value, bool),
          int: isinstance(value, int) and not isinstance(value, bool) or (isinstance(value, float) and value.is_integer()),
          float: isinstance(value, (int, float)) and not isinstance(value, bool)}[kind]
    if not ok:
        want = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise UserError(f"--deepspeed_config {path}: {name} must be {want} (got {json.dumps(value)})")
    return int(value) if kind is int else (float(value) if kind is float else value)


def read_deepspeed_config(path: str) -> DeepSpeedConfig:
    """Parse and check the JSON; nothing is applied until :meth:`DeepSpeedConfig.resolve`."""
    data = _load_json(path)
    flat = _flatten(data)
    ds = DeepSpeedConfig(path=path)

    def put(name: str, value, soft: bool = False) -> None:
        dest = _FIELD_TO_FLAG[name][0]
        ds.values[dest] = value
        ds.sources[dest] = f"{name} = {json.dumps(value) if not isinstance(value, float) else value}"
        if soft:
            ds.soft.add(dest)

    for name, kind in (("train_batch_size", int), ("train_micro_batch_size_per_gpu", int), ("steps_per_print", int)):
        if name in flat:
            v = _typed(path, name, flat[name], kind)
            check(v >= 1, f"--deepspeed_config {path}: {name} must be >= 1 (got {v})")
            put(name, v, soft=name == "steps_per_print")
    if "gradient_accumulation_steps" in flat:
        ds.gradient_accumulation_steps = _typed(path, "gradient_accumulation_steps", flat["gradient_accumulation_steps"], int)
        check(ds.gradient_accumulation_steps >= 1, f"--deepspeed_config {path}: gradient_accumulation_steps must be >= 1")
    if "gradient_clipping" in flat:
        put("gradient_clipping", _typed(path, "gradient_clipping", flat["gradient_clipping"], float))
    fp16_on = _typed(path, "fp16.enabled", flat.get("fp16.enabled", False), bool)
    bf16_on = _typed(path, "bf16.enabled", flat.get("bf16.enabled", False), bool)
    check(not (fp16_on and bf16_on), f"--deepspeed_config {path}: fp16.enabled and bf16.enabled are both true: pick one")
    if "fp16.enabled" in flat:
        put("fp16.enabled", fp16_on)
    if "bf16.enabled" in flat:
        put("bf16.enabled", bf16_on)
    if fp16_on:
        for name, default in _FP16_DEFAULTS.items():
            given = name in flat
            raw = flat.get(name, default)
            if name == "fp16.loss_scale":
                scale = _typed(path, name, raw, float)
                check(scale >= 0, f"--deepspeed_config {path}: fp16.loss_scale must be >= 0 (0 = dynamic)")
                put(name, None if scale == 0 else scale, soft=not given)
            elif name == "fp16.initial_scale_power":
                put(name, 2.0 ** _typed(path, name, raw, int), soft=not given)
            elif name == "fp16.min_loss_scale":
                put(name, _typed(path, name, raw, float), soft=not given)
            else:
                put(name, _typed(path, name, raw, int), soft=not given)
    stage = flat.get("zero_optimization.stage")
    if stage is not None:
        stage = _typed(path, "zero_optimization.stage", stage, int)
        check(stage in (0, 1, 2, 3), f"--deepspeed_config {path}: zero_optimization.stage {stage} is not supported: "
                                     f"use 0, 1 (sharded Adam state), 2 (also sharded gradients) or 3 (also sharded "
                                     f"parameters: --use-torch-fsdp2)")
        put("zero_optimization.stage", stage)
    ds.prescale_gradients = _typed(path, "prescale_gradients", flat.get("prescale_gradients", False), bool)
    ds.wall_clock_breakdown = _typed(path, "wall_clock_breakdown", flat.get("wall_clock_breakdown", False), bool)
    cl = data.get("curriculum_learning")
    if cl is not None:
        if not isinstance(cl, dict):
            raise UserError(f"--deepspeed_config {path}: curriculum_learning must be an object")
        if _typed(path, "curriculum_learning.enabled", cl.get("enabled", False), bool):
            ds.curriculum = CurriculumConfig.from_block(cl, f"--deepspeed_config {path}")

    used = set(_FIELD_TO_FLAG) | _ACTED_ON
    if not fp16_on:  # loss-scaling fields of a disabled fp16 block are read (nothing to do) and not reported
        used |= set(_FP16_DEFAULTS)
    ds.unused = sorted(k for k in flat if k not in used and not k.startswith("curriculum_learning."))
    return ds
