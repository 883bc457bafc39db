#!/usr/bin/env python3
"""Checkpoint conversion and inspection.

    python tools/checkpoint_util.py inspect --load CKPT
    python tools/checkpoint_util.py export-hf --load CKPT --save OUT_DIR
    python tools/checkpoint_util.py import-hf --load HF_DIR --save CKPT
    python tools/checkpoint_util.py upcycle --load DENSE --save MOE --num-experts 8 [--expert-interval 2]
                                            [--mlp-type residual] [--topk 2] [--moe-upcycling-granularity G]
    python tools/checkpoint_util.py reshard --load CKPT --save OUT_DIR --target-expert-parallel-size N

export-hf: a dense checkpoint becomes a Hugging Face GPT-2 model that
``transformers.GPT2LMHeadModel.from_pretrained(OUT_DIR)`` loads with the same logits. An MoE, PR-MoE,
Residual-MoE or MoS-student checkpoint becomes a ``megatron_moe`` model (its configuration and modeling
code copied into OUT_DIR, ``auto_map`` in config.json) that
``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)`` loads, with the same logits
(evaluation routing, no token dropped) and ``generate()`` with the KV cache. Both write the tokenizer
files, so ``AutoTokenizer.from_pretrained(OUT_DIR)`` gives our token ids. --save may not overlap --load.

reshard: our checkpoints store every expert (weights and Adam state) under its global id, so one
saved at any EP size already loads at any other (training with --load and a new
--moe-expert-parallel-size reshards on the fly). The offline command checks that N divides every MoE
layer's expert count and writes a copy (atomically) whose stored config records EP N; the tensors are
copied unchanged. It exists for scripts that expect an explicit conversion step.
"""
from __future__ import annotations

import os
import shutil

from megatron.checkpoint.formats import format_of
from megatron.checkpoint.layout import COMMON_FILE
from megatron.checkpoint.stored_config import copy_checkpoint, read_checkpoint_config
from megatron.config.schema import ModelConfig
from megatron.errors import UserError, run_cli
from megatron.hf.export import write_export
from megatron.hf.native import import_hf_checkpoint
from megatron.hf.upcycle import upcycle_checkpoint
from megatron.inference.load import load_model
from megatron.planning.model_stats import count_parameters
from megatron.training.arguments import argument_parser


def parse(argv=None):
    p = argument_parser(description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=type(p))
    s = sub.add_parser("inspect", help="print config, iteration, parameter counts and files")
    s.add_argument("--load", required=True)
    s = sub.add_parser("export-hf", help="write safetensors + config.json (dense: a transformers GPT-2 model)")
    s.add_argument("--load", required=True)
    s.add_argument("--save", required=True)
    s.add_argument("--force", action="store_true", help="overwrite a non-empty --save directory")
    s = sub.add_parser("import-hf", help="a transformers directory (gpt2, llama, qwen2, qwen3) -> our checkpoint at "
                       "iteration 0")
    s.add_argument("--load", required=True, help="transformers directory: config.json + model.safetensors (or "
                   "model.safetensors.index.json and its shards) or pytorch_model.bin (+ tokenizer files)")
    s.add_argument("--save", required=True)
    s.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary like training will (padding rows are zero); 1 keeps it unpadded")
    s = sub.add_parser("upcycle", help="a dense checkpoint -> an MoE checkpoint computing the same function")
    s.add_argument("--load", required=True)
    s.add_argument("--save", required=True)
    s.add_argument("--num-experts", type=int, nargs="+", required=True, help="experts per MoE layer: one value or "
                   "one per MoE layer (PR-MoE)")
    s.add_argument("--expert-interval", type=int, default=2)
    s.add_argument("--mlp-type", choices=["standard", "residual"], default="standard")
    s.add_argument("--topk", type=int, default=None, help="experts chosen per token: 1 or 2 (default 1); with "
                   "--moe-upcycling-granularity G the fine-grained MoE's k, a multiple of G (default G)")
    s.add_argument("--moe-upcycling-granularity", type=int, default=1, help="granular upcycling (Megatron-LM's): "
                   "each expert is 1/G of the dense MLP (--moe-ffn-hidden-size F/G), --num-experts E = G x copies")
    s = sub.add_parser("reshard", help="copy a checkpoint for another expert-parallel size")
    s.add_argument("--load", required=True)
    s.add_argument("--save", required=True)
    s.add_argument("--target-expert-parallel-size", type=int, required=True)
    return p.parse_args(argv)


def _prepare_out(path: str, force=None) -> str:
    """``force``: None where the command has no --force (then the refusal does not offer it)."""
    if os.path.exists(path) and os.listdir(path) and not force:
        raise UserError(f"--save {path} exists and is not empty: choose a new directory"
                        f"{'' if force is None else ' (or --force to replace it)'}; nothing was written")
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, "." + os.path.basename(os.path.abspath(path)) + ".tmp")
    try:
        os.makedirs(parent, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    except OSError as e:  # a file in the path, a read-only or full file system
        raise UserError(f"--save {path}: cannot create the directory ({e.strerror or e}); choose another "
                        f"--save") from None
    return tmp


def _publish(tmp: str, path: str) -> None:
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def _write_and_publish(load: str, save: str, write, force=None):
    """``write(tmp_dir)`` fills a temporary folder that replaces ``save`` only when complete; returns its result."""
    _refuse_overlap(load, save)
    tmp = _prepare_out(save, force)
    try:
        result = write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, save)
    return result


def inspect(a) -> dict:
    path, common = read_checkpoint_config(a.load)
    cfg = ModelConfig.from_dict(common["config"]["model"])
    counts = count_parameters(cfg)
    files = format_of(common, os.path.join(path, COMMON_FILE)).describe_files(path)
    print(f"checkpoint: {path}\niteration: {common['iteration']}\nconsumed samples: {common.get('consumed_samples')}")
    print(f"model: {cfg.num_layers} layers, hidden {cfg.hidden_size}, heads {cfg.num_attention_heads}, ffn "
          f"{cfg.ffn_hidden_size}, vocab {cfg.vocab_size}, max positions {cfg.max_position_embeddings}")
    print(f"experts per layer: {cfg.moe.experts_per_layer(cfg.num_layers)} (mlp-type "
          f"{cfg.moe.mlp_type if cfg.moe.enabled else 'standard'}, top-{cfg.moe.topk}); saved with EP "
          f"{cfg.moe.expert_parallel_size}, loadable at any EP size dividing every layer's experts")
    print(f"total parameters: {counts.total}\nactive parameters: {counts.active}\nexpert parameters: {counts.expert}")
    print(f"files: {files['files']} ({files['detail']}), {files['bytes'] / 2**20:.1f} MiB; "
          f"optimizer state: {'yes' if files['optimizer_state'] else 'no'}")
    print(f"tokenizer: {common['config']['data'].get('tokenizer_type')}")
    return {"iteration": common["iteration"], "total": counts.total, "active": counts.active, "files": files["files"]}


def _refuse_overlap(load: str, save: str) -> None:
    """--save equal to --load, inside it, or containing it would replace the checkpoint being read."""
    lo, sv = os.path.realpath(load), os.path.realpath(save)
    if sv == lo or lo.startswith(sv + os.sep) or sv.startswith(lo + os.sep):
        raise UserError(f"--save {save} overlaps --load {load}: choose a --save directory outside the checkpoint "
                        f"(the source checkpoint is never modified)")


def export_hf(a) -> dict:
    try:
        import safetensors  # noqa: F401  (optional dependency: only export-hf needs it)
    except ImportError:
        raise UserError("export-hf needs the safetensors package: pip install safetensors") from None
    _refuse_overlap(a.load, a.save)
    lm = load_model(a.load, "cpu")
    summary = _write_and_publish(a.load, a.save, lambda tmp: write_export(lm, tmp), a.force)
    print(f"> exported iteration {lm.iteration} of {a.load} to {a.save}: {summary['kind']}; {summary['tensors']} "
          f"tensors; tokenizer: {summary['tokenizer']}")
    return {"path": a.save, "moe": lm.cfg.moe.enabled}


def import_hf(a) -> dict:
    if a.make_vocab_size_divisible_by < 1:
        raise UserError("--make-vocab-size-divisible-by must be >= 1")
    summary = _write_and_publish(a.load, a.save,
                                 lambda tmp: import_hf_checkpoint(a.load, tmp, a.save, a.make_vocab_size_divisible_by))
    print(f"> imported {a.load} -> {a.save} (iteration 0, {summary['layers']} layers, padded vocabulary "
          f"{summary['vocab']}, tokenizer {summary['tokenizer']}); train on with --load {a.save} --finetune"
          f"{summary['note']}")
    if summary["flags"]:
        print(f"> its block flags (pass them when training on it): {summary['flags']}")
    return summary


def upcycle(a) -> dict:
    summary = _write_and_publish(a.load, a.save, lambda tmp: upcycle_checkpoint(
        a.load, tmp, a.num_experts, a.expert_interval, a.mlp_type, a.topk, a.moe_upcycling_granularity))
    granular = (f", granularity {summary['granularity']} (--moe-ffn-hidden-size {summary['expert_ffn_hidden_size']})"
                if summary["granularity"] > 1 else "")
    print(f"> upcycled {a.load} (iteration {summary['from_iteration']}) -> {a.save}: experts per layer "
          f"{summary['experts_per_layer']}, mlp-type {a.mlp_type}, top-{summary['topk']}{granular}; train on with the "
          f"same MoE flags and "
          f"--load {a.save} --no-load-optim --no-load-rng (data goes on) or --finetune (from iteration 0)")
    return summary


def reshard(a) -> dict:
    path, common = read_checkpoint_config(a.load)
    cfg = ModelConfig.from_dict(common["config"]["model"])
    n = a.target_expert_parallel_size
    if n < 1:
        raise UserError("--target-expert-parallel-size must be >= 1")
    bad = sorted({e for e in cfg.moe.experts_per_layer(cfg.num_layers) if e > 1 and e % n})
    if bad:
        raise UserError(f"--target-expert-parallel-size {n} does not divide the expert count(s) {bad} of this "
                        f"checkpoint: choose a divisor of every layer's experts")
    _refuse_overlap(a.load, a.save)
    tmp = _prepare_out(a.save)
    common["config"]["model"]["moe"]["expert_parallel_size"] = n
    copy_checkpoint(path, common, tmp)
    _publish(tmp, a.save)
    print(f"> {a.load} (iteration {common['iteration']}, EP {cfg.moe.expert_parallel_size}) -> {a.save} (EP {n})")
    return {"path": a.save, "ep": n}


def main(argv=None):
    a = parse(argv)
    save = getattr(a, "save", None)
    if save is not None and os.path.exists(save) and not os.path.isdir(save):
        raise UserError(f"--save {save} is a file, not a directory; choose a new directory (the file is kept)")
    return {"inspect": inspect, "export-hf": export_hf, "import-hf": import_hf, "upcycle": upcycle,
            "reshard": reshard}[a.command](a)


if __name__ == "__main__":
    run_cli(lambda: main() and 0)
