#!/usr/bin/env python3
"""Zero-shot evaluation of checkpoints on the paper's six tasks through lm-evaluation-harness 0.4.

    python tools/eval_harness.py --load CKPT [CKPT ...] \\
        --task-list lambada,piqa,boolq,race,triviaqa,webqs --eval-data-dir ../shared/data/eval \\
        [--limit N] [--micro-batch-size B] [--moe-eval-capacity-factor CF] --results-path out.json

Tasks are read from local files (no network); see megatron/evaluation/local_tasks.py. Prints a
markdown table in the paper's layout (one row per checkpoint, one column per task: accuracy, exact
match for TriviaQA / WebQs) and writes lm-eval's full results JSON, keyed by checkpoint.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.arguments import argument_parser  # noqa: E402
from megatron.errors import UserError, run_cli  # noqa: E402
from megatron.evaluation.local_tasks import PAPER_NAMES, PRIMARY_METRIC, TASKS, task_name, write_tasks  # noqa: E402

DEFAULT_DATA = os.environ.get("MEGATRON_MOE_EVAL_DATA", os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "shared", "data", "eval"))


def parse(argv=None):
    p = argument_parser(description=__doc__)
    p.add_argument("--load", nargs="+", required=True, help="checkpoint directories (one table row each)")
    p.add_argument("--task-list", default=",".join(TASKS), help=f"comma-separated, from {','.join(TASKS)}")
    p.add_argument("--eval-data-dir", default=DEFAULT_DATA, help="folder with the six task folders (default %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each task (for a quick check)")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--moe-eval-capacity-factor", type=float, default=None,
                   help="drop tokens at this capacity factor (default: no token is dropped at evaluation)")
    p.add_argument("--results-path", default=None, help="write lm-eval's full results JSON here")
    p.add_argument("--bootstrap-iters", type=int, default=1000, help="for standard errors (0 skips them)")
    p.add_argument("--device", default=None)
    p.add_argument("--vocab-file"), p.add_argument("--merge-file"), p.add_argument("--tokenizer-model")
    a = p.parse_args(argv)
    a.tasks = [t.strip() for t in a.task_list.split(",") if t.strip()]
    bad = [t for t in a.tasks if t not in TASKS]
    if bad or not a.tasks:
        raise UserError(f"--task-list: unknown task(s) {', '.join(bad) or '(none given)'}; choose from {', '.join(TASKS)}")
    if a.micro_batch_size < 1:
        raise UserError("--micro-batch-size must be >= 1")
    if a.limit is not None and a.limit < 1:
        raise UserError("--limit must be >= 1")
    if not os.path.isdir(a.eval_data_dir):
        raise UserError(f"--eval-data-dir {a.eval_data_dir}: no such directory (the six task folders of "
                        f"../shared/data/eval; or set $MEGATRON_MOE_EVAL_DATA)")
    if a.results_path and os.path.dirname(a.results_path) and not os.path.isdir(os.path.dirname(a.results_path)):
        raise UserError(f"--results-path {a.results_path}: its directory does not exist")
    return a


def primary(results: dict, task: str):
    r = results.get(task_name(task), {})
    key = f"{PRIMARY_METRIC[task]},{'remove_whitespace' if task == 'triviaqa' else 'none'}"
    return r.get(key)


def markdown_table(rows: dict, tasks) -> str:
    head = "| checkpoint | " + " | ".join(PAPER_NAMES[t] for t in tasks) + " |"
    lines = [head, "|" + "---|" * (len(tasks) + 1)]
    for name, res in rows.items():
        vals = [primary(res, t) for t in tasks]
        lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    return "\n".join(lines)


def evaluate_checkpoint(load, a, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron.evaluation.harness_model import MegatronMoELM

    lm = MegatronMoELM(load=load, micro_batch_size=a.micro_batch_size, moe_eval_capacity_factor=a.moe_eval_capacity_factor,
                       device=a.device, vocab_file=a.vocab_file, merge_file=a.merge_file, tokenizer_model=a.tokenizer_model)
    tm = TaskManager(include_path=task_dir, include_defaults=False)
    out = lm_eval.simple_evaluate(model=lm, tasks=[task_name(t) for t in a.tasks], task_manager=tm, limit=a.limit,
                                  num_fewshot=0, bootstrap_iters=a.bootstrap_iters, log_samples=False,
                                  random_seed=1234, numpy_random_seed=1234, torch_random_seed=1234)
    return out, lm.lm.iteration


def main(argv=None) -> dict:
    a = parse(argv)
    for load in a.load:
        from megatron.inference import read_checkpoint_config

        _, common = read_checkpoint_config(load)  # fail early, before any evaluation runs
        if common["config"]["data"].get("tokenizer_type") == "NullTokenizer":
            raise UserError(f"--load {load}: this checkpoint was trained on --mock-data with no text tokenizer, so it "
                            f"cannot read the task texts; evaluate a checkpoint trained with a real tokenizer")
    all_results, rows = {}, {}
    with tempfile.TemporaryDirectory(prefix="megatron_moe_tasks_") as task_dir:
        counts = write_tasks(a.eval_data_dir, task_dir, a.tasks)
        print("> tasks: " + ", ".join(f"{PAPER_NAMES[t]} ({counts[t]} docs)" for t in a.tasks)
              + (f"; first {a.limit} of each" if a.limit else ""), flush=True)
        for load in a.load:
            t0 = time.perf_counter()
            out, iteration = evaluate_checkpoint(load, a, task_dir)
            n = sum(v.get("effective", v.get("original", 0)) for v in out.get("n-samples", {}).values())
            dt = time.perf_counter() - t0
            print(f"> {load} (iteration {iteration}): {n} documents in {dt:.1f} s ({n / dt:.2f} documents/s)", flush=True)
            all_results[load] = out
            rows[f"{load} (iter {iteration})"] = out["results"]
    table = markdown_table(rows, a.tasks)
    print("\nzero-shot accuracy (TriviaQA / WebQs: exact match)\n" + table)
    if "triviaqa" in a.tasks:
        print("note: TriviaQA here is a 3,000-question subsample; its numbers are not comparable with the full dev set")
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
