"""The tools and the evaluation data: each user mistake is one line (UserError, exit status 2), never a traceback
or a wrong success, and nothing already written is overwritten. Real files through the real entry points."""
import json
import os
import subprocess
import sys

import pytest
import torch

import pretrain_gpt_moe
from megatron.errors import UserError
from tests.conftest import ROOT
from tests.runs import mock_args
from tools import checkpoint_util, eval_harness, generate_text, merge_datasets, preprocess_data, train_tokenizer

NULL = ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10", "--quiet"]


def one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    return msg


# ---------------------------------------------------------------- evaluation data (megatron/evaluation/local_tasks.py)

def _eval_dir(tmp_path, rel, content):
    path = tmp_path / "eval" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return str(tmp_path / "eval"), str(path)


RACE_OK = {"article": "a b", "questions": ["q1?", "q2?"], "options": [["a", "b", "c", "d"]] * 2, "answers": ["A", "B"]}

EVAL_DATA = [
    ("boolq label maybe", "boolq", "boolq/val.jsonl",
     json.dumps({"passage": "p", "question": "q", "label": "true"}) + "\n"
     + json.dumps({"passage": "p", "question": "q", "label": "maybe"}) + "\n",
     ["val.jsonl line 2", 'label "maybe" is not true or false']),
    ("boolq label number", "boolq", "boolq/val.jsonl", json.dumps({"passage": "p", "question": "q", "label": 2}) + "\n",
     ["val.jsonl line 1", "label 2 is not true or false"]),
    ("race answer Z", "race", "race/test/high/1.txt", json.dumps(dict(RACE_OK, answers=["A", "Z"])),
     ["1.txt: question 1", 'answer "Z" is not A, B, C or D']),
    ("race two options", "race", "race/test/high/1.txt", json.dumps(dict(RACE_OK, options=[["a", "b"]] * 2)),
     ["1.txt: question 0", "4 option strings"]),
    ("race lists differ", "race", "race/test/high/1.txt", json.dumps(dict(RACE_OK, answers=["A"])),
     ["1.txt", "lists of the same, non-zero length (got 2, 2, 1)"]),
    ("lambada empty", "lambada", "lambada/lambada_test.jsonl", "",
     ["lambada/lambada_test.jsonl holds no records (task lambada)"]),
    ("lambada blank lines", "lambada", "lambada/lambada_test.jsonl", "\n\n",
     ["lambada/lambada_test.jsonl holds no records"]),
    ("lambada no text", "lambada", "lambada/lambada_test.jsonl", json.dumps({"txt": "a b c"}) + "\n",
     ["lambada_test.jsonl line 1", "field 'text' is missing"]),
    ("lambada text a number", "lambada", "lambada/lambada_test.jsonl", json.dumps({"text": 5}) + "\n",
     ["lambada_test.jsonl line 1", "field 'text' is 5, not a string of at least 2 words"]),
    ("lambada one word", "lambada", "lambada/lambada_test.jsonl",
     json.dumps({"text": "the end"}) + "\n" + json.dumps({"text": "word"}) + "\n",
     ["lambada_test.jsonl line 2", "not a string of at least 2 words"]),
    ("race no passage", "race", "race/test/high/.keep", "", ["race/test/high holds no records (task race)"]),
    ("webqs no answers", "webqs", "webquestions/test.json", json.dumps([{"qText": "q", "answers": []}]),
     ["test.json question 0", "'answers' is [], not a non-empty list of strings"]),
]


@pytest.mark.parametrize("name,task,rel,content,needles", EVAL_DATA, ids=[c[0] for c in EVAL_DATA])
def test_bad_eval_data_is_one_line_naming_file_and_record(tmp_path, name, task, rel, content, needles):
    from megatron.evaluation.local_tasks import write_tasks

    src, _ = _eval_dir(tmp_path, rel, content)
    with pytest.raises(UserError) as e:
        write_tasks(src, str(tmp_path / "out"), [task])
    one_line(e, *needles)


def test_good_eval_records_still_convert(tmp_path):
    from megatron.evaluation.local_tasks import write_tasks

    src, _ = _eval_dir(tmp_path, "boolq/val.jsonl", json.dumps({"passage": "p", "question": "q", "label": "False"})
                       + "\n" + json.dumps({"passage": "p", "question": "q", "label": True}) + "\n")
    _eval_dir(tmp_path, "race/test/high/1.txt", json.dumps(RACE_OK))
    _eval_dir(tmp_path, "lambada/lambada_test.jsonl", json.dumps({"text": "a b c"}) + "\n")
    out = tmp_path / "out"
    assert write_tasks(src, str(out), ["boolq", "race", "lambada"]) == {"boolq": 2, "race": 1, "lambada": 1}
    assert [json.loads(x)["label"] for x in (out / "boolq.jsonl").read_text().splitlines()] == [0, 1]
    assert json.loads((out / "race.jsonl").read_text())["label"] == 1


@pytest.mark.slow
def test_an_lm_eval_task_without_network_is_one_line_on_stderr(tmp_path, checkpoint):
    """hellaswag with no network and no cache: the download retries are not logged (were 11 more lines)."""
    pytest.importorskip("lm_eval")
    if "gpt2" not in checkpoint:
        pytest.skip("the shared GPT-2 tokenizer files are absent")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "eval_harness.py"), "--load", checkpoint["gpt2"],
                        "--task-list", "hellaswag", "--limit", "1"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.startswith("error: --task-list hellaswag: its dataset") and r.stderr.count("\n") == 1, r.stderr


# ---------------------------------------------------------------- preprocess_data / merge_datasets

def _existing(tmp_path, prefix="out"):
    good = tmp_path / "good.txt"
    good.write_text("1 2 3\n")
    preprocess_data.main(["--input", str(good), "--output-prefix", str(tmp_path / prefix)] + NULL)
    return {p: (tmp_path / p).read_bytes() for p in os.listdir(tmp_path) if p.startswith(prefix + "_")}


PREPROCESS = [
    ("id >= vocab", "ids.txt", b"1 2 3\n\n4 5\n6 10 7\n", [],
     ["--input", "ids.txt:3", "token id 10 is outside the vocabulary [0, 10)"]),
    ("negative id", "ids.jsonl", b'{"text": "1"}\n{"text": "2 -1"}\n', [], ["ids.jsonl:2", "token id -1 is outside"]),
    ("words", "words.txt", b"1 2\nhello world\n", ["--text-document", "line"],
     ["words.txt:2", "'hello' is not a token id", "--tokenizer-type"]),
    ("words with workers", "words.txt", b"1 2\n" * 600 + b"1 two\n", ["--text-document", "line", "--workers", "2"],
     ["words.txt:601", "'two' is not a token id"]),
    ("lone surrogate", "s.jsonl", b'{"text": "1 2"}\n{"text": "\\ud800 1"}\n', [],
     ["s.jsonl:2", "key 'text' holds a lone surrogate '\\ud800' at character 0"]),
]


@pytest.mark.parametrize("name,fname,content,extra,needles", PREPROCESS, ids=[c[0] for c in PREPROCESS])
def test_preprocess_refuses_text_its_tokenizer_cannot_hold(tmp_path, name, fname, content, extra, needles):
    before = _existing(tmp_path)
    (tmp_path / fname).write_bytes(content)
    with pytest.raises(UserError) as e:
        preprocess_data.main(["--input", str(tmp_path / fname), "--output-prefix", str(tmp_path / "out")]
                             + NULL + extra)
    one_line(e, *needles)
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == sorted(["good.txt", fname] + list(before))  # no temp file left


def test_preprocess_output_prefix_must_name_a_file_stem_and_input_must_be_files(tmp_path):
    (tmp_path / "in.txt").write_text("1 2 3\n")
    (tmp_path / "od").mkdir()
    for prefix in (str(tmp_path / "od") + "/", str(tmp_path / "od") + "/."):
        with pytest.raises(UserError) as e:
            preprocess_data.main(["--input", str(tmp_path / "in.txt"), "--output-prefix", prefix] + NULL)
        one_line(e, "--output-prefix", "names a directory, not a file stem: give DIR/NAME")
    assert os.listdir(tmp_path / "od") == []  # was: od/_text_document.bin/.idx
    with pytest.raises(UserError) as e:
        preprocess_data.main(["--input", str(tmp_path / "od"), "--output-prefix", str(tmp_path / "x")] + NULL)
    one_line(e, "--input", "is a directory; give its files")
    preprocess_data.main(["--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "d")] + NULL)
    with pytest.raises(UserError) as e:
        merge_datasets.main(["--input-prefixes", str(tmp_path / "d_text_document"), "--output-prefix",
                             str(tmp_path / "od") + "/"])
    one_line(e, "names a directory, not a file stem")
    assert os.listdir(tmp_path / "od") == []


def _limited(cmd, limit):
    """Run ``cmd`` (argv of a tool's main) in a child whose files may not grow past ``limit`` bytes (a full disk)."""
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            f"sys.argv = {cmd!r}; from megatron.errors import run_cli; from tools import {cmd[0]} as t; "
            f"run_cli(t.main)")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def test_a_full_destination_is_one_line_and_the_existing_dataset_stays(tmp_path):
    before = _existing(tmp_path)
    big = tmp_path / "big.txt"
    big.write_text(" ".join(["5"] * 20000) + "\n")  # 40 KB of uint16 tokens, past the 16 KiB the child may write
    r = _limited(["preprocess_data", "--input", str(big), "--output-prefix", str(tmp_path / "out")] + NULL, 16384)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith(f"error: --output-prefix {tmp_path / 'out'}: writing") and "File too large" in r.stderr
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert sorted(os.listdir(tmp_path)) == sorted(["good.txt", "big.txt"] + list(before))
    # merge_datasets: the same, its existing output kept
    preprocess_data.main(["--input", str(big), "--output-prefix", str(tmp_path / "big")] + NULL)
    (tmp_path / "merged.bin").write_bytes(b"old")
    (tmp_path / "merged.idx").write_bytes(b"old")
    r = _limited(["merge_datasets", "--input-prefixes", str(tmp_path / "out_text_document"),
                  str(tmp_path / "big_text_document"), "--output-prefix", str(tmp_path / "merged")], 16384)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "File too large" in r.stderr, r.stderr[-2000:]
    assert (tmp_path / "merged.bin").read_bytes() == b"old" and (tmp_path / "merged.idx").read_bytes() == b"old"
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


# ---------------------------------------------------------------- train_tokenizer

def test_train_tokenizer_mistakes_are_one_line(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("hello world this is text\n")
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "k.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    cases = [
        ([str(text)], "m", ["--vocab-size", "0"], ["--vocab-size must be >= 1 (got 0)"]),
        ([str(text)], "m", ["--vocab-size", "100000"], ["--vocab-size 100000 does not fit this text",
                                                        "Please set it to a value <="]),
        ([str(tmp_path / "empty.txt")], "m", ["--vocab-size", "100"], ["no text found"]),
        ([str(text)], "nodir/m", ["--vocab-size", "300"], ["--model-prefix", "does not exist; create it first"]),
        ([str(tmp_path / "k.jsonl")], "m", ["--vocab-size", "300"], ["k.jsonl:1: no key 'text'", "--json-key"]),
    ]
    for inputs, prefix, extra, needles in cases:
        with pytest.raises(UserError) as e:
            train_tokenizer.main(["--input"] + inputs + ["--model-prefix", str(tmp_path / prefix)] + extra)
        one_line(e, *needles)
    assert not [p for p in os.listdir(tmp_path) if p.startswith("m.")]


# ---------------------------------------------------------------- generate_text, eval_harness, checkpoint_util

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ck")
    out = {"null": str(d / "null")}
    pretrain_gpt_moe.main(mock_args(["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
                                     "--num-layers", "1", "--save", out["null"]]))
    gpt2 = os.path.join(ROOT, "..", "shared", "data", "gpt2")
    if os.path.isdir(gpt2):
        out["gpt2"] = str(d / "gpt2")
        pretrain_gpt_moe.main(mock_args(["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
                                         "--num-layers", "1", "--tokenizer-type", "GPT2BPETokenizer",
                                         "--vocab-file", os.path.join(gpt2, "gpt2-vocab.json"),
                                         "--merge-file", os.path.join(gpt2, "gpt2-merges.txt"), "--save", out["gpt2"]]))
    return out


def _generate_cases(tmp_path):
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"1 2\n\xbd\xff\x00\x01\n")
    return [
        (["--vocab-file", str(binary), "--merge-file", str(binary)],
         ["--vocab-file", "the checkpoint's tokenizer is NullTokenizer", "drop --vocab-file"]),
        (["--tokenizer-model", str(binary)], ["--tokenizer-model", "drop --tokenizer-model"]),
        (["--moe-eval-capacity-factor", "-1"], ["--moe-eval-capacity-factor must be > 0 (got -1.0)"]),
        (["--moe-eval-capacity-factor", "nan"], ["--moe-eval-capacity-factor must be > 0 (got nan)"]),
        (["--prompt-file", str(binary)], ["--prompt-file", "line 2: not UTF-8 text (byte 0xbd)"]),
        (["--seed", str(2 ** 70)], [f"--seed must be in [0, 2^63) (got {2 ** 70})"]),
        (["--seed", "-1"], ["--seed must be in [0, 2^63)"]),
        (["--temperature", "nan"], ["--temperature nan: use 0 for greedy decoding"]),
        (["--temperature", "1e-300"], ["--temperature 1e-300: use 0 for greedy decoding or a finite value >= 1e-05"]),
        (["--temperature", "inf"], ["--temperature inf"]),
        (["--device", "gpu0"], ["--device 'gpu0' is not a device name"]),
        (["--prompt", "1 2 128"], ["--prompt 1 cannot be tokenized",
                                   "token id 128 is outside the vocabulary [0, 128)"]),
        (["--prompt", "hello"], ["--prompt 1 cannot be tokenized", "'hello' is not a token id"]),
    ]


def test_generate_text_flags_are_checked(tmp_path, checkpoint):
    for extra, needles in _generate_cases(tmp_path):
        with pytest.raises(UserError) as e:
            generate_text.main(["--load", checkpoint["null"], "--prompt", "1 2", "--max-new-tokens", "2"] + extra)
        one_line(e, *needles)
    out = generate_text.main(["--load", checkpoint["null"], "--prompt", "1 2", "--max-new-tokens", "2",
                              "--temperature", "1e-05", "--seed", str(2 ** 63 - 1), "--moe-eval-capacity-factor", "1"])
    assert len(out["outputs"]) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_generate_text_on_cuda_without_a_gpu_is_one_line(checkpoint):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate_text.py"), "--load", checkpoint["null"],
                        "--prompt", "1 2", "--device", "cuda"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and r.stderr == ("error: --device cuda: no CUDA GPU is available here; use --device cpu "
                                              "(or leave it out)\n"), r.stderr[-2000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
@pytest.mark.parametrize("tool", ["eval_harness.py", "run_text_generation_server.py"])
def test_eval_and_server_on_cuda_without_a_gpu_are_one_line(checkpoint, tool):
    """Was ``AssertionError: Torch not compiled with CUDA enabled`` once the model was loaded (a checkpoint with a
    text tokenizer and real task data, so that nothing else stops the run first)."""
    eval_data = os.path.join(ROOT, "..", "shared", "data", "eval")
    if tool == "eval_harness.py":
        if "gpt2" not in checkpoint or not os.path.isdir(eval_data):
            pytest.skip("needs ../shared/data (GPT-2 files and the eval tasks)")
        extra = ["--load", checkpoint["gpt2"], "--task-list", "lambada", "--limit", "1", "--eval-data-dir", eval_data]
    else:
        extra = ["--load", checkpoint["null"], "--port", "0"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool)] + extra + ["--device", "cuda"],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and r.stderr == ("error: --device cuda: no CUDA GPU is available here; use --device cpu "
                                              "(or leave it out)\n"), r.stderr[-2000:]


def test_eval_harness_flags_are_checked(tmp_path, checkpoint):
    with pytest.raises(UserError) as e:
        eval_harness.main(["--load", checkpoint["null"], "--moe-eval-capacity-factor", "-2"])
    one_line(e, "--moe-eval-capacity-factor must be > 0 (got -2.0)")
    with pytest.raises(UserError) as e:
        eval_harness.main(["--load", checkpoint["null"], "--eval-data-dir", str(tmp_path), "--vocab-file",
                           str(tmp_path)])
    one_line(e, "--vocab-file", "the checkpoint's tokenizer is NullTokenizer")


def test_eval_harness_results_path_that_is_a_directory_is_one_line_before_evaluating(tmp_path, checkpoint):
    """Was ``IsADirectoryError`` from the final ``os.replace``, after every task had been evaluated."""
    with pytest.raises(UserError) as e:
        eval_harness.main(["--load", checkpoint["null"], "--eval-data-dir", str(tmp_path), "--results-path",
                           str(tmp_path)])
    one_line(e, f"--results-path {tmp_path}: this is a directory; give a file name")
    assert os.listdir(tmp_path) == []


def test_export_hf_save_pointing_at_a_file_is_one_line_and_keeps_it(tmp_path, checkpoint):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(UserError) as e:
        checkpoint_util.main(["export-hf", "--load", checkpoint["null"], "--save", str(f)])
    one_line(e, f"--save {f} is a file, not a directory")
    with pytest.raises(UserError) as e:
        checkpoint_util.main(["export-hf", "--load", checkpoint["null"], "--save", str(f / "sub")])
    one_line(e, f"--save {f / 'sub'}: cannot create the directory")
    assert f.read_text() == "mine"


TOOLS_IN_A_CHILD = [
    ("preprocess words", ["preprocess_data.py", "--input", "{d}/w.txt", "--output-prefix", "{d}/o"] + NULL,
     "error: --input {d}/w.txt:1 (key 'text'): 'hello' is not a token id"),
    ("train_tokenizer vocab too large", ["train_tokenizer.py", "--input", "{d}/w.txt", "--model-prefix", "{d}/m",
                                         "--vocab-size", "100000"], "error: --vocab-size 100000 does not fit"),
]


@pytest.mark.parametrize("name,argv,start", TOOLS_IN_A_CHILD, ids=[c[0] for c in TOOLS_IN_A_CHILD])
def test_tool_exit_status_and_one_line(tmp_path, name, argv, start):
    (tmp_path / "w.txt").write_text("hello world\n")
    argv = [a.format(d=tmp_path) for a in argv]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", argv[0])] + argv[1:], capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith(start.format(d=tmp_path)), r.stderr

