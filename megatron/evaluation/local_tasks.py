"""The paper's six zero-shot tasks as lm-eval 0.4 task configs over LOCAL files.

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

from megatron.errors import UserError

TASKS = ("lambada", "piqa", "boolq", "race", "triviaqa", "webqs")
PAPER_NAMES = {"lambada": "LAMBADA", "piqa": "PIQA", "boolq": "BoolQ", "race": "RACE-h", "triviaqa": "TriviaQA",
               "webqs": "WebQs"}
SOURCES = {  # task -> files under the eval data dir
    "lambada": ["lambada/lambada_test.jsonl"],
    "piqa": ["piqa/valid.jsonl", "piqa/valid-labels.lst"],
    "boolq": ["boolq/val.jsonl"],
    "race": ["race/test/high"],
    "triviaqa": ["triviaqa/triviaqa_sm_sub.jsonl"],
    "webqs": ["webquestions/test.json"],
}
PRIMARY_METRIC = {"lambada": "acc", "piqa": "acc", "boolq": "acc", "race": "acc", "triviaqa": "exact_match",
                  "webqs": "exact_match"}


def task_name(task: str) -> str:
    """lm-eval name of our local variant (kept apart from lm-eval's own hub-backed tasks)."""
    return f"local_{task}"


def _write_jsonl(path: str, rows) -> int:
    n = 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
            n += 1
    os.replace(path + ".tmp", path)
    return n


def _read_jsonl(path: str):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _piqa(src):
    docs = list(_read_jsonl(os.path.join(src, "piqa/valid.jsonl")))
    labels = [int(x) for x in open(os.path.join(src, "piqa/valid-labels.lst")).read().split()]
    if len(docs) != len(labels):
        raise UserError(f"--eval-data-dir: piqa/valid.jsonl has {len(docs)} rows but valid-labels.lst {len(labels)}")
    for d, y in zip(docs, labels):
        yield {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": y}


def _boolq(src):
    for d in _read_jsonl(os.path.join(src, "boolq/val.jsonl")):
        label = d["label"]
        yes = label if isinstance(label, bool) else str(label).lower() == "true"
        yield {"passage": d["passage"], "question": d["question"], "label": int(yes)}


def _race(src):
    letter = {"A": 0, "B": 1, "C": 2, "D": 3}
    for path in sorted(glob.glob(os.path.join(src, "race/test/high/*.txt"))):
        d = json.load(open(path, encoding="utf-8"))
        problems = list(zip(d["questions"], d["options"], d["answers"]))
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
    for d in json.load(open(os.path.join(src, "webquestions/test.json"), encoding="utf-8")):
        answers = sorted(d["answers"])  # lm-eval webqs: drop aliases that have a strict prefix in the list
        kept = [answers[0]]
        for a in answers[1:]:
            if not a.startswith(kept[-1]):
                kept.append(a)
        yield {"question": d["qText"], "choices": kept, "gold": list(range(len(kept)))}


def _yaml(task: str, data_file: str, split: str, body: str) -> str:
    return (f"task: {task_name(task)}\ndataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {json.dumps(data_file)}\n"
            f"{split}_split: {split}\n" + body + "metadata:\n  version: 1.0\n")


_MC_ACC = "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
BODIES = {
    "lambada": ("test", "output_type: loglikelihood\n"
                "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
                "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
                "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
                "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"),
    "piqa": ("validation", "output_type: multiple_choice\n"
             "doc_to_text: \"Question: {{goal}}\\nAnswer:\"\ndoc_to_target: label\n"
             "doc_to_choice: \"{{[sol1, sol2]}}\"\n"
             "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
             "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"),
    "boolq": ("validation", "output_type: multiple_choice\n"
              "doc_to_text: \"{{passage}}\\nQuestion: {{question}}?\\nAnswer:\"\ndoc_to_target: label\n"
              "doc_to_choice: [\"no\", \"yes\"]\n" + _MC_ACC),
    "race": ("test", "output_type: multiple_choice\n"
             "doc_to_text: \"{{text}}\"\ndoc_to_target: label\ndoc_to_choice: \"{{choices}}\"\n" + _MC_ACC),
    "triviaqa": ("validation", "output_type: generate_until\n"
                 "doc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{aliases}}\"\n"
                 "generation_kwargs:\n  until:\n    - \"\\n\"\n    - \".\"\n    - \",\"\n  do_sample: false\n"
                 "  temperature: 0.0\n  max_gen_toks: 32\n"
                 "filter_list:\n  - name: remove_whitespace\n    filter:\n      - function: remove_whitespace\n"
                 "      - function: take_first\n"
                 "target_delimiter: \" \"\n"
                 "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
                 "    ignore_case: true\n    ignore_punctuation: true\n"),
    "webqs": ("test", "output_type: multiple_choice\n"
              "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_target: gold\n"
              "doc_to_choice: \"{{choices}}\"\n"
              "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"),
}
CONVERTERS = {"piqa": _piqa, "boolq": _boolq, "race": _race, "triviaqa": _triviaqa, "webqs": _webqs}


def write_tasks(eval_data_dir: str, out_dir: str, tasks=TASKS) -> dict:
    """Convert the local files of ``tasks`` and write their YAMLs into ``out_dir``; returns task -> doc count."""
    src = os.path.abspath(eval_data_dir)
    out = os.path.abspath(out_dir)
    os.makedirs(out, exist_ok=True)
    counts = {}
    for task in tasks:
        if task not in BODIES:
            raise UserError(f"--task-list: unknown task {task!r}; choose from {', '.join(TASKS)}")
        for rel in SOURCES[task]:
            if not os.path.exists(os.path.join(src, rel)):
                raise UserError(f"--eval-data-dir {eval_data_dir}: {rel} is missing (task {task}); "
                                f"point --eval-data-dir at the folder with the six task directories")
        split, body = BODIES[task]
        if task == "lambada":
            data_file = os.path.join(src, SOURCES[task][0])
            counts[task] = sum(1 for _ in _read_jsonl(data_file))
        else:
            data_file = os.path.join(out, f"{task}.jsonl")
            counts[task] = _write_jsonl(data_file, CONVERTERS[task](src))
        with open(os.path.join(out, f"{task_name(task)}.yaml"), "w") as f:
            f.write(_yaml(task, data_file, split, body))
    return counts
