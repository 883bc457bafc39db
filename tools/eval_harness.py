#!/usr/bin/env python3
"""Zero-shot (or few-shot) evaluation of checkpoints through lm-evaluation-harness 0.4.

    python tools/eval_harness.py --load CKPT [CKPT ...] \\
        --task-list lambada,piqa,boolq,race,triviaqa,webqs --eval-data-dir EVAL_DIR \\
        [--limit N] [--micro-batch-size B] [--moe-eval-capacity-factor CF] --results-path out.json

The paper's six tasks are read from local files (no network); see the registry in
megatron/evaluation/local_tasks.py. Any other name is looked up in lm-eval's own task registry
(hellaswag, winogrande, arc_easy, ...), whose data lm-eval fetches through Hugging Face datasets:
offline, a task whose data is not cached fails with one line naming the dataset. Prints a markdown
table (one row per checkpoint, one column per task: accuracy, exact match for TriviaQA / WebQs) and
writes lm-eval's full results JSON, keyed by checkpoint.

Megatron-DeepSpeed's evaluation script's flags are accepted: ``--task_list``, ``--results_path``,
``--num_fewshot``, ``--eval_fp32`` (evaluate in fp32), ``--adaptive_seq_len`` (what we always do:
each batch is padded only to its longest request), and the model / parallelism flags it passes
only to satisfy Megatron's parser (the architecture comes from the checkpoint; one process holds
the whole model).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import tempfile
import time

from megatron.checkpoint.stored_config import read_checkpoint_config
from megatron.errors import UserError, run_cli
from megatron.evaluation.local_tasks import REGISTRY, TASKS, write_tasks
from megatron.inference.devices import check_device
from megatron.tokenizer import registry as tokenizers
from megatron.training.arguments import argument_parser

DEFAULT_DATA = os.environ.get("MEGATRON_MOE_EVAL_DATA", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data", "eval"))

# Megatron-DeepSpeed evaluation flags with no effect here: the checkpoint holds the architecture
_IGNORED_WITH_VALUE = ("--num-layers", "--hidden-size", "--num-attention-heads", "--seq-length",
                       "--max-position-embeddings", "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                       "--moe-expert-parallel-size", "--tokenizer-type", "--deepspeed_config", "--deepspeed-config")
_IGNORED_SWITCHES = ("--no-load-optim", "--no-load-rng", "--inference", "--deepspeed", "--no-pipeline-parallel",
                     "--disable-moe-token-dropping")


def parse(argv=None):
    p = argument_parser(description=__doc__)
    p.add_argument("--load", nargs="+", required=True, help="checkpoint directories (one table row each)")
    p.add_argument("--task-list", "--task_list", dest="task_list", default=",".join(TASKS),
                   help=f"comma-separated: {','.join(TASKS)} (local files) or any lm-eval task name")
    p.add_argument("--eval-data-dir", default=DEFAULT_DATA, help="folder with the local task folders (default %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (for a quick check)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=int, default=0,
                   help="examples shown before each question (the paper's numbers are zero-shot)")
    p.add_argument("--eval-fp32", "--eval_fp32", dest="eval_fp32", action="store_true",
                   help="cast the model to fp32 for evaluation")
    p.add_argument("--adaptive-seq-len", "--adaptive_seq_len", dest="adaptive_seq_len", action="store_true",
                   help="accepted: batches are always padded only to their longest request")
    p.add_argument("--moe-eval-capacity-factor", type=float, default=None,
                   help="drop tokens at this capacity factor (default: no token is dropped at evaluation)")
    p.add_argument("--results-path", "--results_path", dest="results_path", default=None,
                   help="write lm-eval's full results JSON here")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="for standard errors (0 skips them)")
    p.add_argument("--device", default=None)
    p.add_argument("--vocab-file"), p.add_argument("--merge-file"), p.add_argument("--tokenizer-model")
    for flag in _IGNORED_WITH_VALUE:
        p.add_argument(flag, dest="ignored_" + flag.strip("-").replace("-", "_"), default=None, help=argparse.SUPPRESS)
    for flag in _IGNORED_SWITCHES:
        p.add_argument(flag, dest="ignored_" + flag.strip("-").replace("-", "_"), action="store_true",
                       help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.tasks = [t.strip() for t in a.task_list.split(",") if t.strip()]
    if not a.tasks:
        raise UserError("--task-list is empty: give task names such as lambada,piqa")
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        v = getattr(a, "ignored_" + flag.strip("-").replace("-", "_"))
        if v not in (None, "1"):
            raise UserError(f"{flag} {v}: evaluation runs in one process holding the whole model; drop the flag "
                            f"(a checkpoint of any layout loads)")
    if a.micro_batch_size < 1:
        raise UserError("--micro-batch-size must be >= 1")
    if a.limit is not None and a.limit < 1:
        raise UserError("--limit must be >= 1")
    if a.num_fewshot < 0:
        raise UserError("--num-fewshot must be >= 0")
    if a.moe_eval_capacity_factor is not None and not (math.isfinite(a.moe_eval_capacity_factor)
                                                       and a.moe_eval_capacity_factor > 0):
        raise UserError(f"--moe-eval-capacity-factor must be > 0 (got {a.moe_eval_capacity_factor}); leave it out "
                        f"to drop no token")
    a.device = check_device(a.device)
    return a


def _split(a) -> None:
    a.local = [t for t in a.tasks if t in REGISTRY]
    a.foreign = [t for t in a.tasks if t not in REGISTRY]
    if a.local and not os.path.isdir(a.eval_data_dir):
        raise UserError(f"--eval-data-dir {a.eval_data_dir}: no such directory (the task folders of "
                        f"../shared/data/eval; or set $MEGATRON_MOE_EVAL_DATA)")
    if a.results_path and os.path.isdir(a.results_path):  # found only when writing, after the evaluation
        raise UserError(f"--results-path {a.results_path}: this is a directory; give a file name "
                        f"({os.path.join(a.results_path, 'results.json')}, say)")
    if a.results_path and os.path.dirname(a.results_path) and not os.path.isdir(os.path.dirname(a.results_path)):
        raise UserError(f"--results-path {a.results_path}: its directory does not exist")


def task_manager(task_dir: str, foreign: list):
    """lm-eval's TaskManager over our local YAMLs, plus lm-eval's own registry when a foreign task is asked."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=task_dir, include_defaults=bool(foreign))
    check_task_names(tm, foreign)
    check_task_data(tm, foreign)
    return tm


def check_task_names(tm, foreign: list) -> None:
    unknown = [t for t in foreign if t not in tm.all_tasks]
    if unknown:
        raise UserError(f"--task-list: unknown task(s) {', '.join(unknown)}: choose from {', '.join(TASKS)} "
                        f"(local files) or a task lm-eval lists with `lm-eval --tasks list`")


@contextlib.contextmanager
def _quiet_downloads():
    """Without the network, huggingface_hub logs every retry of a download on stderr (six lines before our one
    line); only errors are logged while a task's data is looked up."""
    loggers = [logging.getLogger(n) for n in ("huggingface_hub", "datasets", "fsspec", "urllib3", "filelock")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_task_data(tm, names: list) -> None:
    """Load each lm-eval task once, before any model is built: absent data is one line naming the dataset."""
    for name in names:
        try:
            with _quiet_downloads():
                tm.load([name])
        except Exception as e:  # noqa: BLE001 - any failure to fetch a task's data is reported in one line
            entry = tm.task_index.get(name)
            cfg = getattr(entry, "cfg", None) or {}
            ds = cfg.get("dataset_path")
            what = f"its dataset {ds}" + (f" ({cfg['dataset_name']})" if cfg.get("dataset_name") else "") if ds \
                else "its data"
            raise UserError(f"--task-list {name}: {what} is not available ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'}); download it once with "
                            f"network access (Hugging Face datasets cache), or drop the task") from None


def primary(results: dict, task: str):
    if task in REGISTRY:
        return results.get(REGISTRY[task].lm_eval_name, {}).get(REGISTRY[task].metric)
    r = results.get(task, {})
    for key in ("acc,none", "exact_match,none", "acc_norm,none"):
        if key in r:
            return r[key]
    nums = [v for k, v in r.items() if "stderr" not in k and isinstance(v, (int, float)) and k != "alias"]
    return nums[0] if nums else None


def column(task: str) -> str:
    return REGISTRY[task].paper_name if task in REGISTRY else task


def markdown_table(rows: dict, tasks) -> str:
    head = "| checkpoint | " + " | ".join(column(t) for t in tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 1)]
    for name, res in rows.items():
        vals = [primary(res, t) for t in tasks]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    return "\n".join(lines)


def evaluate_checkpoint(load, a, tm):
    import lm_eval
    import torch

    from megatron.evaluation.harness_model import MegatronMoELM

    lm = MegatronMoELM(load=load, micro_batch_size=a.micro_batch_size, moe_eval_capacity_factor=a.moe_eval_capacity_factor,
                       device=a.device, vocab_file=a.vocab_file, merge_file=a.merge_file, tokenizer_model=a.tokenizer_model,
                       dtype=torch.float32 if a.eval_fp32 else None)
    names = [REGISTRY[t].lm_eval_name if t in REGISTRY else t for t in a.tasks]
    out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=tm, limit=a.limit,
                                  num_fewshot=a.num_fewshot, bootstrap_iters=a.bootstrap_iters, log_samples=False,
                                  random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234,
                                  fewshot_random_seed=1234)
    return out, lm.lm.iteration


def main(argv=None) -> dict:
    a = parse(argv)
    _split(a)
    for load in a.load:
        _, common = read_checkpoint_config(load)  # fail early, before any evaluation runs
        kind = common["config"]["data"].get("tokenizer_type")
        tokenizers.check_overrides(kind, vocab_file=a.vocab_file, merge_file=a.merge_file,
                                   tokenizer_model=a.tokenizer_model)
        if not tokenizers.spec(kind).reads_text:
            raise UserError(f"--load {load}: this checkpoint was trained on --mock-data with no text tokenizer, so it "
                            f"cannot read the task texts; evaluate a checkpoint trained with a real tokenizer")
    all_results, rows = {}, {}
    with tempfile.TemporaryDirectory(prefix="megatron_moe_tasks_") as task_dir:
        counts = write_tasks(a.eval_data_dir, task_dir, a.local) if a.local else {}
        tm = task_manager(task_dir, a.foreign)
        print("> tasks: " + ", ".join(f"{column(t)} ({counts[t]} docs)" if t in counts else t for t in a.tasks)
              + (f"; first {a.limit} of each" if a.limit else "")
              + (f"; {a.num_fewshot}-shot" if a.num_fewshot else ""), flush=True)
        for load in a.load:
            t0 = time.perf_counter()
            out, iteration = evaluate_checkpoint(load, a, tm)
            n = sum(v.get("effective", v.get("original", 0)) for v in out.get("n-samples", {}).values())
            dt = time.perf_counter() - t0
            print(f"> {load} (iteration {iteration}): {n} documents in {dt:.1f} s ({n / dt:.2f} documents/s)", flush=True)
            all_results[load] = out
            rows[f"{load} (iter {iteration})"] = out["results"]
    table = markdown_table(rows, a.tasks)
    shots = "zero-shot" if not a.num_fewshot else f"{a.num_fewshot}-shot"
    print(f"\n{shots} accuracy (TriviaQA / WebQs: exact match)\n" + table)
    for t in a.local:
        if REGISTRY[t].note:
            print(f"note: {REGISTRY[t].note}")
    if a.results_path:
        from lm_eval.utils import handle_non_serializable

        tmp = a.results_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(all_results, f, indent=2, default=handle_non_serializable)
        os.replace(tmp, a.results_path)
        print(f"> results written to {a.results_path}")
    return {"table": table, "results": {k: v["results"] for k, v in all_results.items()}}


if __name__ == "__main__":
    run_cli(lambda: main() and 0)
