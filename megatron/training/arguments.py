"""The only place that uses argparse: Megatron-named flags -> a validated :class:`Config`.

The training parser is generated from the option fields of ``megatron.config.schema`` (each option is
declared once there, see ``megatron/config/options.py``). Flag names and defaults follow Megatron-LM /
Megatron-DeepSpeed so existing launch scripts work. ``parse_args(argv)`` returns a ``Config``;
nothing else reads flags.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from megatron.config.compat.upstream_flags import translate_argv
from megatron.config.options import add_options, build_config
from megatron.config.schema import Config
from megatron.errors import UserError, check
from megatron.model.families import MODEL_FAMILIES
from megatron.model.moe.routers import ROUTERS
from megatron.parallel.expert_parallel import TOKEN_DISPATCHERS
from megatron.tokenizer import registry as tokenizers

# Options whose value names a registry entry: the help lists the keys and the value is checked here,
# above the config layer, which cannot see the registries.
REGISTRY_OPTIONS = {"model.model_family": MODEL_FAMILIES, "model.moe.router_type": ROUTERS,
                    "model.moe.token_dispatcher_type": TOKEN_DISPATCHERS, "data.tokenizer_type": tokenizers.REGISTRY}

class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" where a default is set (not for switches or unset values)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, True, [], argparse.SUPPRESS) and action.option_strings:
            text += f" (default: {' '.join(map(str, action.default)) if isinstance(action.default, list) else action.default})"
        return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise UserError(f"{message} (see --help)")


def argument_parser(**kwargs) -> argparse.ArgumentParser:
    """The parser for the tools' own command lines: mistakes raise UserError (one line, no usage dump)."""
    kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
    kwargs.setdefault("allow_abbrev", False)
    return _Parser(**kwargs)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """The training parser, generated from ``Config``; also {flag or alias: config path}."""
    p = _Parser(description="Megatron-style GPT + DeepSpeed-MoE pretraining", allow_abbrev=False,
                formatter_class=_HelpFormatter)
    names = add_options(p, Config)
    for action in p._actions:
        if action.dest in REGISTRY_OPTIONS:
            action.help = f"{action.help} (one of: {', '.join(REGISTRY_OPTIONS[action.dest])})"
    return p, names


def check_registry_options(cfg: Config) -> None:
    """The values that name registry entries are known (and a tokenizer's file flags are given)."""
    family = cfg.model.model_family
    check(family in MODEL_FAMILIES, f"--model-family must be one of {', '.join(MODEL_FAMILIES)} (got {family!r})")
    router = cfg.model.moe.router_type
    check(router in ROUTERS, f"--moe-router-type must be one of {', '.join(ROUTERS)} (got {router!r})")
    dispatcher = cfg.model.moe.token_dispatcher_type
    check(dispatcher in TOKEN_DISPATCHERS,
          f"--moe-token-dispatcher-type must be one of {', '.join(TOKEN_DISPATCHERS)} (got {dispatcher!r})")
    d = cfg.data
    if d.mock_data and not cfg.model.vocab_size and (d.tokenizer_type is None or tokenizers.needs_vocab_size(d.tokenizer_type)):
        raise UserError("--mock-data needs --vocab-size (or a real tokenizer via --tokenizer-type)")
    if not cfg.dry_run:
        tokenizers.check_data_config(d.tokenizer_type, vocab_file=d.vocab_file, merge_file=d.merge_file,
                                     tokenizer_model=d.tokenizer_model)


def _flags_given(argv: Sequence[str], names: dict[str, str]) -> tuple[str, ...]:
    """Config paths of the options that appear on the command line (under any of their names)."""
    given = []
    for a in argv:
        path = names.get(a.split("=", 1)[0])
        if path is not None and path not in given:
            given.append(path)
    return tuple(given)


def parse_args(argv: Optional[Sequence[str]] = None, extra_args_provider=None) -> Config:
    """Parse Megatron flags into a validated Config. Raises UserError on bad input.

    ``extra_args_provider(parser) -> parser`` may add the caller's own flags; their values are in
    ``cfg.extra`` (dest -> value).
    """
    upstream = translate_argv(sys.argv[1:] if argv is None else argv)  # upstream flags and the DeepSpeed JSON
    if os.environ.get("RANK", "0") == "0":
        for note in upstream.notes:
            print(note, file=sys.stderr, flush=True)
    argv = upstream.argv
    parser, names = build_parser()
    if extra_args_provider is not None:
        parser = extra_args_provider(parser) or parser
    values = vars(parser.parse_args(argv))
    ours = set(names.values())
    cfg = build_config(Config, {k: v for k, v in values.items() if k in ours})
    cfg.extra = {k: v for k, v in values.items() if k not in ours}
    cfg.flags_given = _flags_given(argv, names)
    cfg.deepspeed.adopt(upstream.deepspeed)  # the JSON is read once, here, and handed to every reader
    cfg.validate()
    check_registry_options(cfg)
    return cfg
