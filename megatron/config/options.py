"""Options declared once: a dataclass field carries its flag, type, default, help and check.

    num_layers: int = option("--num-layers", 2, "transformer layers", check=(positive, "must be >= 1"))

is all it takes to add a flag: ``megatron/training/arguments.py`` generates the argparse parser from the
fields of :class:`~megatron.config.schema.Config` (one argument group per dataclass) and builds the
typed config back from the parsed values; ``validate()`` of each dataclass runs the per-option
checks first (:func:`check_options`), then its own cross-option checks. Fields without a flag
(derived or internal values) are not on the command line.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Iterator, Optional

from megatron.errors import UserError

_MISSING = dataclasses.MISSING
_type_of = type  # the builtin; option() has a parameter named like argparse's


def option(flag: str, default: Any = None, help: str = "", *, type: Optional[Callable] = None,
           nargs: Optional[str] = None, choices: Optional[list] = None, aliases: tuple = (),
           check: Optional[tuple[Callable[[Any], bool], str]] = None, convert: Optional[Callable] = None,
           action: Optional[str] = None, metavar: Optional[str] = None):
    """A dataclass field that is also a command-line option.

    flag      the Megatron flag name, e.g. ``--num-layers``; ``aliases`` are further names for it.
    default   the field default (a list is copied per instance); a bool default makes a switch:
              False -> ``store_true``; True -> ``store_false`` (flags such as ``--disable-...``).
    type      the argparse type (inferred from a non-None default when omitted).
    nargs     argparse nargs (inferred as "+" for a list default).
    check     (predicate, requirement): the value (when not None) must satisfy the predicate,
              else ``UserError("<flag> <requirement> (got <value>)")``.
    convert   applied to the parsed value before it is stored in the field (e.g. text -> pairs).
    """
    if not help:
        raise ValueError(f"option {flag} needs help text")
    if action is None and isinstance(default, bool):
        action = "store_false" if default else "store_true"
    if type is None and action is None and default is not None:
        sample = default[0] if isinstance(default, list) and default else default
        type = _type_of(sample)
    if nargs is None and isinstance(default, list):
        nargs = "+"
    meta = dict(flag=flag, aliases=tuple(aliases), help=help, type=type, nargs=nargs, choices=choices,
                check=check, convert=convert, action=action, metavar=metavar)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: __import__("copy").deepcopy(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def is_option(f: dataclasses.Field) -> bool:
    return "flag" in f.metadata


def _nested_type(f: dataclasses.Field):
    """The dataclass type of a nested-config field (one built by default_factory), else None."""
    if f.default_factory is not _MISSING and isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
        return f.default_factory
    return None


def iter_options(cls, prefix: str = "") -> Iterator[tuple[str, type, dataclasses.Field]]:
    """(dotted path, owning dataclass, field) of every option under ``cls``, depth first."""
    for f in dataclasses.fields(cls):
        sub = _nested_type(f)
        if sub is not None:
            yield from iter_options(sub, f"{prefix}{f.name}.")
        elif is_option(f):
            yield f"{prefix}{f.name}", cls, f


def _field_default(f: dataclasses.Field):
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return None if f.default is _MISSING else f.default


def add_options(parser: argparse.ArgumentParser, cls) -> dict[str, str]:
    """Add every option of ``cls`` (a dataclass tree) to ``parser``; returns {flag or alias: path}."""
    groups: dict[type, argparse._ArgumentGroup] = {}
    names: dict[str, str] = {}
    for path, owner, f in iter_options(cls):
        if owner not in groups:
            groups[owner] = parser.add_argument_group(getattr(owner, "OPTION_GROUP", owner.__name__))
        m = f.metadata
        kwargs: dict[str, Any] = dict(dest=path, default=_field_default(f), help=m["help"])
        if m["action"] is not None:
            kwargs["action"] = m["action"]
        else:
            for key in ("type", "nargs", "choices"):
                if m[key] is not None:
                    kwargs[key] = m[key]
            if m["choices"] is None:
                kwargs["metavar"] = m["metavar"] or m["flag"].lstrip("-").replace("-", "_").upper()
        groups[owner].add_argument(m["flag"], *m["aliases"], **kwargs)
        for name in (m["flag"], *m["aliases"]):
            names[name] = path
    return names


def build_config(cls, values: dict[str, Any], prefix: str = ""):
    """An instance of dataclass ``cls`` from {dotted path: parsed value}; ``convert`` is applied."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        sub = _nested_type(f)
        path = f"{prefix}{f.name}"
        if sub is not None:
            kwargs[f.name] = build_config(sub, values, f"{path}.")
        elif is_option(f) and path in values:
            v = values[path]
            convert = f.metadata["convert"]
            kwargs[f.name] = convert(v) if convert is not None and v is not None else v
    return cls(**kwargs)


def check_options(obj) -> None:
    """Run the per-option checks of dataclass instance ``obj`` (not of nested configs)."""
    for f in dataclasses.fields(obj):
        if not is_option(f):
            continue
        value = getattr(obj, f.name)
        choices = f.metadata["choices"]
        if choices is not None and value is not None and value not in choices:
            raise UserError(f"{f.metadata['flag']} must be one of {', '.join(map(str, choices))} (got {value!r})")
        if f.metadata["check"] is None:
            continue
        predicate, requirement = f.metadata["check"]
        values = value if isinstance(value, list) else [value]
        if value is not None and not all(v is not None and predicate(v) for v in values):
            raise UserError(f"{f.metadata['flag']} {requirement} (got {value})")


def flag_of(cls, name: str) -> str:
    """The flag of field ``name`` of dataclass ``cls`` (for messages that name it)."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["flag"]


# common checks
def positive(v) -> bool:
    return v >= 1 if isinstance(v, int) else v > 0


def non_negative(v) -> bool:
    return v >= 0


def unit_interval(v) -> bool:
    return 0.0 <= v < 1.0


def none_or_str(v: str) -> Optional[str]:
    """For string options where ``None`` / ``none`` / an empty string means unset (Megatron scripts pass them)."""
    return None if v in ("None", "none", "") else v
