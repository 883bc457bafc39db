"""The paper's six zero-shot tasks as lm-eval 0.4 task configs over LOCAL files: a registry.

Each task is one :class:`EvalTask` record (files, converter, YAML body, headline metric, paper
name); adding a task is one ``register(EvalTask(...))`` call. A broken record in a data file is
one error naming the file and line.

``write_tasks(eval_data_dir, out_dir)`` converts the local files (layout: ../shared/data/README.md)
into clean jsonl under ``out_dir`` and writes one YAML per task whose ``data_files`` are ABSOLUTE
paths (lm-eval resolves relative ones against the working directory). The prompts, choices and
metrics follow lm-eval's standard definitions (lambada_openai, piqa, boolq, race, triviaqa, webqs),
adapted to the local formats: BoolQ labels are the strings "true"/"false"; RACE is one JSON file
per passage (one document per passage, its last question asked, the earlier ones shown answered,
as lm-eval's race); TriviaQA is a 3,000-question subsample (numbers are not comparable with the
full dev set); WebQuestions uses qText / answers.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

from megatron.errors import UserError


@dataclass(frozen=True)
class EvalTask:
    """One local task: where its files are, how they become lm-eval documents, and how it is scored.

    ``convert(src_dir)`` yields the documents (None: the first source file is used as it is);
    ``body`` is the lm-eval YAML after the data lines; ``metric`` is the key of the number the
    results table shows (``metric,filter`` as lm-eval reports it).
    """

    name: str
    paper_name: str
    sources: tuple
    split: str
    body: str
    metric: str
    convert: Optional[Callable] = None
    note: str = ""

    @property
    def lm_eval_name(self) -> str:
        """lm-eval name of our local variant (kept apart from lm-eval's own hub-backed tasks)."""
        return f"local_{self.name}"


REGISTRY: dict[str, EvalTask] = {}


def register(task: EvalTask) -> EvalTask:
    """Add a local task; ``--task_list`` then accepts its name."""
    REGISTRY[task.name] = task
    return task


def task_name(task: str) -> str:
    return REGISTRY[task].lm_eval_name


class _Record(dict):
    """A document read from a file; a missing field names the file and line."""

    where = ""

    def __missing__(self, key):
        raise UserError(f"{self.where}: field {key!r} is missing; fix or remove that record")


def _record(obj, where: str) -> _Record:
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}; fix or remove that record")
    r = _Record(obj)
    r.where = where
    return r


def _write_jsonl(path: str, rows) -> int:
    n = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(path + ".tmp", path)
    return n


def _read_jsonl(path: str):
    """Records of a jsonl file; a broken line is one error naming the file and line."""
    with open(path, encoding="utf-8", errors="strict") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno}); "
                                f"fix or remove that line") from None
            yield _record(obj, f"{path} line {n}")


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix that file") from None


def _piqa(src):
    docs = list(_read_jsonl(os.path.join(src, "piqa/valid.jsonl")))
    label_path = os.path.join(src, "piqa/valid-labels.lst")
    labels = []
    with open(label_path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                if line.strip() not in ("0", "1"):
                    raise UserError(f"{label_path} line {n}: expected a label 0 or 1, got {line.strip()[:40]!r}")
                labels.append(int(line))
    if len(docs) != len(labels):
        raise UserError(f"--eval-data-dir: piqa/valid.jsonl has {len(docs)} rows but valid-labels.lst {len(labels)}")
    for d, y in zip(docs, labels):
        yield {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y}


_BOOLQ_LABELS = {True: 1, False: 0, "true": 1, "false": 0}


def _boolq(src):
    for d in _read_jsonl(os.path.join(src, "boolq/val.jsonl")):
        label = d["label"]
        key = label if isinstance(label, bool) else label.strip().lower() if isinstance(label, str) else None
        if key not in _BOOLQ_LABELS:  # anything else was scored as "false" (and "maybe" counted right)
            raise UserError(f"{d.where}: label {_short(label)} is not true or false; fix or remove that record")
        yield {"passage": _text(d, "passage"), "question": _text(d, "question"), "label": _BOOLQ_LABELS[key]}


def _short(value, n: int = 40) -> str:
    """A value of a record for an error line: its JSON, escaped, at most ``n`` characters."""
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= n else text[:n] + "..."


def _text(d: _Record, key: str, words: int = 1) -> str:
    """Field ``key`` of ``d``, a string of at least ``words`` words (a template renders anything else wrongly)."""
    v = d[key]
    if not isinstance(v, str) or len(v.split()) < words:
        need = "a non-empty string" if words == 1 else f"a string of at least {words} words"
        raise UserError(f"{d.where}: field {key!r} is {_short(v)}, not {need}; fix or remove that record")
    return v


def _lambada(src):
    """LAMBADA as it is, each record checked: the template splits ``text`` into the context and the last word."""
    for d in _read_jsonl(os.path.join(src, "lambada/lambada_test.jsonl")):
        text = _text(d, "text", words=2)
        if not text.split(" ")[-1].strip() or not " ".join(text.split(" ")[:-1]).strip():
            raise UserError(f"{d.where}: field 'text' must end in a word after a space (the word to predict); "
                            f"fix or remove that record")
        yield dict(d)


def _race(src):
    letter = {"A": 0, "B": 1, "C": 2, "D": 3}
    for path in sorted(glob.glob(os.path.join(src, "race/test/high/*.txt"))):
        d = _record(_read_json(path), path)
        _text(d, "article")
        lists = [d[k] for k in ("questions", "options", "answers")]
        if not all(isinstance(x, list) for x in lists) or not lists[0] or len({len(x) for x in lists}) != 1:
            got = ", ".join(str(len(x)) if isinstance(x, list) else _short(x, 12) for x in lists)
            raise UserError(f"{path}: 'questions', 'options' and 'answers' must be lists of the same, non-zero "
                            f"length (got {got}); fix or remove that file")
        for i, (q, opts, ans) in enumerate(zip(*lists)):
            if ans not in letter:
                raise UserError(f"{path}: question {i}: answer {_short(ans)} is not A, B, C or D; fix or remove "
                                f"that file")
            if not isinstance(q, str) or not isinstance(opts, list) or len(opts) < 4 \
                    or not all(isinstance(o, str) for o in opts[:4]):
                raise UserError(f"{path}: question {i}: needs a question string and 4 option strings (got "
                                f"{_short(q, 20)}, {_short(opts, 40)}); fix or remove that file")
        problems = list(zip(*lists))
        text = "Article: " + d["article"] + "\n\n"
        for q, opts, ans in problems[:-1]:  # earlier questions shown with their answers (lm-eval race)
            if q[-6:] == "  _  .":
                text += q[:-5] + opts[letter[ans]] + "\n"
            else:
                text += "Question: " + q + "\n" + "Answer: " + opts[letter[ans]] + "\n"
        q, opts, ans = problems[-1]
        yield {"text": text + q, "choices": list(opts[:4]), "label": letter[ans]}


def _triviaqa(src):
    for d in _read_jsonl(os.path.join(src, "triviaqa/triviaqa_sm_sub.jsonl")):
        aliases = list(dict.fromkeys([d["answer"]] + list(d.get("aliases", []))))
        yield {"prompt": d["context"], "aliases": aliases}


def _webqs(src):
    path = os.path.join(src, "webquestions/test.json")
    docs = _read_json(path)
    if not isinstance(docs, list):
        raise UserError(f"{path}: expected a JSON list of questions")
    for i, d in enumerate(docs):
        d = _record(d, f"{path} question {i}")
        if not isinstance(d["answers"], list) or not d["answers"] or not all(isinstance(a, str) for a in d["answers"]):
            raise UserError(f"{d.where}: 'answers' is {_short(d['answers'])}, not a non-empty list of strings; fix or "
                            f"remove that question")
        answers = sorted(d["answers"])  # lm-eval webqs: drop aliases that have a strict prefix in the list
        kept = [answers[0]]
        for a in answers[1:]:
            if not a.startswith(kept[-1]):
                kept.append(a)
        yield {"question": d["qText"], "choices": kept, "gold": list(range(len(kept)))}


def _yaml(task: EvalTask, data_file: str) -> str:
    split = task.split
    return (f"task: {task.lm_eval_name}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {json.dumps(data_file)}\n"
            f"{split}_split: {split}\n" + task.body + "metadata:\n  version: 1.0\n")


_MC_ACC = "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"

register(EvalTask(
    "lambada", "LAMBADA", ("lambada/lambada_test.jsonl",), "test",
    "output_type: loglikelihood\n"
    "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
    "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
    "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
    "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
    metric="acc,none", convert=_lambada))
register(EvalTask(
    "piqa", "PIQA", ("piqa/valid.jsonl", "piqa/valid-labels.lst"), "validation",
    "output_type: multiple_choice\n"
    "doc_to_text: \"Question: {{goal}}\\nAnswer:\"\ndoc_to_target: label\n"
    "doc_to_choice: \"{{[sol1, sol2]}}\"\n"
    "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n",
    metric="acc,none", convert=_piqa))
register(EvalTask(
    "boolq", "BoolQ", ("boolq/val.jsonl",), "validation",
    "output_type: multiple_choice\n"
    "doc_to_text: \"{{passage}}\\nQuestion: {{question}}?\\nAnswer:\"\ndoc_to_target: label\n"
    "doc_to_choice: [\"no\", \"yes\"]\n" + _MC_ACC,
    metric="acc,none", convert=_boolq))
register(EvalTask(
    "race", "RACE-h", ("race/test/high",), "test",
    "output_type: multiple_choice\n"
    "doc_to_text: \"{{text}}\"\ndoc_to_target: label\ndoc_to_choice: \"{{choices}}\"\n" + _MC_ACC,
    metric="acc,none", convert=_race))
register(EvalTask(
    "triviaqa", "TriviaQA", ("triviaqa/triviaqa_sm_sub.jsonl",), "validation",
    "output_type: generate_until\n"
    "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{aliases}}\"\n"
    "generation_kwargs:\n  until:\n    - \"\\n\"\n    - \".\"\n    - \",\"\n  do_sample: false\n"
    "  temperature: 0.0\n  max_gen_toks: 32\n"
    "filter_list:\n  - name: remove_whitespace\n    filter:\n      - function: remove_whitespace\n"
    "      - function: take_first\n"
    "target_delimiter: \" \"\n"
    "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    "    ignore_case: true\n    ignore_punctuation: true\n",
    metric="exact_match,remove_whitespace", convert=_triviaqa,
    note="TriviaQA here is a 3,000-question subsample; its numbers are not comparable with the full dev set"))
register(EvalTask(
    "webqs", "WebQs", ("webquestions/test.json",), "test",
    "output_type: multiple_choice\n"
    "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: gold\n"
    "doc_to_choice: \"{{choices}}\"\n"
    "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
    metric="exact_match,none", convert=_webqs))
TASKS = tuple(REGISTRY)  # the paper's six, in its table order

def write_tasks(eval_data_dir: str, out_dir: str, tasks=TASKS) -> dict:
    """Convert the local files of ``tasks`` and write their YAMLs into ``out_dir``; returns task -> doc count."""
    src = os.path.abspath(eval_data_dir)
    out = os.path.abspath(out_dir)
    os.makedirs(out, exist_ok=True)
    counts = {}
    for name in tasks:
        if name not in REGISTRY:
            raise UserError(f"--task-list: unknown task {name!r}; choose from {', '.join(REGISTRY)}")
        task = REGISTRY[name]
        for rel in task.sources:
            if not os.path.exists(os.path.join(src, rel)):
                raise UserError(f"--eval-data-dir {eval_data_dir}: {rel} is missing (task {name}); "
                                f"point --eval-data-dir at the folder with the task directories")
        if task.convert is None:
            data_file = os.path.join(src, task.sources[0])
            counts[name] = sum(1 for _ in _read_jsonl(data_file))
        else:
            data_file = os.path.join(out, f"{name}.jsonl")
            counts[name] = _write_jsonl(data_file, task.convert(src))
        if counts[name] == 0:  # lm-eval would stop with a StopIteration traceback
            raise UserError(f"--eval-data-dir {eval_data_dir}: {', '.join(task.sources)} holds no records (task "
                            f"{name}); restore the file or drop the task from --task-list")
        with open(os.path.join(out, f"{task.lm_eval_name}.yaml"), "w") as f:
            f.write(_yaml(task, data_file))
    return counts
