"""Zero-shot evaluation, generation and checkpoint conversion on tiny checkpoints trained here."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

import pretrain_gpt_moe
from megatron.errors import UserError
from megatron.inference.generate import generate
from megatron.inference.load import load_model
from tests.conftest import require_shared, shared_path
from tests.runs import mock_args

RUN = ["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "3", "--seq-length", "32"]
MOE = ["--num-experts", "4", "--mlp-type", "residual", "--topk", "2"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    out = {}
    for name, extra in (("dense", []), ("moe", MOE)):
        out[name] = str(d / name)
        pretrain_gpt_moe.main(mock_args(RUN + extra + ["--save", out[name]]))
    return out


def harness_lm(path, mbs=3):
    pytest.importorskip("lm_eval")
    from megatron.evaluation.harness_model import MegatronMoELM

    return MegatronMoELM(load=path, micro_batch_size=mbs, device="cpu")


def direct_loglikelihood(model, ctx, cont):
    tokens = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits, _ = model.logits(tokens[:, :-1])
    logp = F.log_softmax(logits.float(), -1)[0, len(ctx) - 1:]
    return float(logp.gather(1, torch.tensor(cont)[:, None]).sum())


REQUESTS = [(("", ""), [5, 6, 7, 8, 9, 10, 11], [12, 13]), (("", ""), [3], [4]), (("", ""), [1, 2, 3, 4], [5, 6, 7]),
            (("", ""), [20] * 15, [21, 22, 23, 24]), (("", ""), [9, 8], [7])]


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_loglikelihood_equals_direct_forward(checkpoints, kind):
    lm = harness_lm(checkpoints[kind])
    got = lm._loglikelihood_tokens(REQUESTS, disable_tqdm=True)  # batches of 3, padded to each batch's longest
    for (_, ctx, cont), (ll, greedy) in zip(REQUESTS, got):
        assert abs(ll - direct_loglikelihood(lm.model, ctx, cont)) < 1e-4
        assert isinstance(greedy, bool)
    # longer than the 32-token window: its last 32 tokens are scored, each given what precedes it in the window
    long_cont = list(range(3, 43))
    (ll, _), = lm._loglikelihood_tokens([(("", ""), [1], long_cont)], disable_tqdm=True)
    assert abs(ll - direct_loglikelihood(lm.model, long_cont[7:8], long_cont[8:])) < 1e-4


def test_loglikelihood_rolling_is_the_sum_over_every_token(checkpoints):
    lm = harness_lm(checkpoints["moe"])
    text = "4 9 2 7 7 1 30 31 5 6 8"  # NullTokenizer: ids are the numbers
    ids = lm.tok_encode(text)
    direct = direct_loglikelihood(lm.model, [lm.eot_token_id], ids)
    req = type("Req", (), {"args": (text,)})()
    assert abs(lm.loglikelihood_rolling([req], disable_tqdm=True)[0] - direct) < 1e-4


def test_padding_changes_neither_routing_nor_loglikelihood(checkpoints):
    lm = harness_lm(checkpoints["moe"])
    short, long = [3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    model = lm.model

    def counts(seqs):
        T = max(map(len, seqs))
        tokens = torch.zeros(len(seqs), T, dtype=torch.long)
        mask = torch.zeros(len(seqs), T, dtype=torch.bool)
        for i, s in enumerate(seqs):
            tokens[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), True
        with torch.no_grad():
            logits, stats = model.logits(tokens, token_mask=mask)
        return logits, [s.counts for s in stats]

    logits_pair, c_pair = counts([short, long])
    logits_short, c_short = counts([short])
    _, c_long = counts([long])
    torch.testing.assert_close(logits_pair[0, :len(short)], logits_short[0], rtol=1e-5, atol=1e-5)
    for a, b, c in zip(c_pair, c_short, c_long):  # the padded slots were routed nowhere
        assert torch.equal(a, b + c) and a.sum() == 2 * (len(short) + len(long))  # top-2


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_generation_with_kv_cache_equals_without(checkpoints, kind):
    lm = load_model(checkpoints[kind], "cpu")
    prompt = [5, 17, 9, 33, 2]
    with_cache = generate(lm.model, prompt, 20, use_cache=True)
    without = generate(lm.model, prompt, 20, use_cache=False)
    assert len(with_cache) == 20 and with_cache == without
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = generate(lm.model, prompt, 10, temperature=1.0, top_k=20, top_p=0.9, generator=g1)
    s2 = generate(lm.model, prompt, 10, temperature=1.0, top_k=20, top_p=0.9, use_cache=False, generator=g2)
    assert s1 == s2


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_batched_greedy_generation_equals_one_prompt_at_a_time(checkpoints, kind):
    from megatron.inference.generate import generate_greedy_batch

    lm = load_model(checkpoints[kind], "cpu")
    prompts = [[5, 17, 9, 33, 2], [40], list(range(3, 20)), [7, 7, 7]]  # left-padded to 17 in the batch
    one_by_one = [generate(lm.model, p, 10) for p in prompts]
    assert generate_greedy_batch(lm.model, prompts, 10) == one_by_one
    stop_at_3 = generate_greedy_batch(lm.model, prompts, 10, stop=lambda ids: len(ids) >= 3)
    assert [len(r) for r in stop_at_3] == [3, 3, 3, 3]


def test_harness_generate_until_batches_like_single_requests(checkpoints):
    lm1, lm4 = harness_lm(checkpoints["moe"], mbs=1), harness_lm(checkpoints["moe"], mbs=4)
    Req = type("Req", (), {})
    reqs = []
    for ctx in ("5 17 9", "40", "3 4 5 6 7 8 9 10 11", "7 7 7 7 7"):
        r = Req()
        r.args = (ctx, {"until": ["99"], "max_gen_toks": 6})
        reqs.append(r)
    assert lm4.generate_until(reqs, disable_tqdm=True) == lm1.generate_until(reqs, disable_tqdm=True)


def test_generation_stops_at_the_context_limit(checkpoints):
    lm = load_model(checkpoints["dense"], "cpu")
    out = generate(lm.model, list(range(1, 30)), 100)
    assert len(out) == 32 - 29  # --seq-length 32 = max positions


def test_six_tasks_end_to_end_through_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    data = require_shared("eval")
    vocab, merges = require_shared("gpt2", "gpt2-vocab.json"), shared_path("gpt2", "gpt2-merges.txt")
    ck = str(tmp_path / "gpt2tok")
    pretrain_gpt_moe.main(mock_args(RUN + MOE + ["--num-layers", "2", "--seq-length", "256", "--tokenizer-type",
                                                 "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
                                                 "--save", ck]))
    from tools import eval_harness

    res_path = str(tmp_path / "results.json")
    # Megatron-DeepSpeed's evaluation flags (ds_evalharness.sh) as they are spelled there
    out = eval_harness.main(["--load", ck, "--eval-data-dir", data, "--limit", "2", "--micro-batch-size", "4",
                             "--results_path", res_path, "--bootstrap-iters", "0", "--adaptive_seq_len", "--eval_fp32",
                             "--task_list", "lambada,piqa,boolq,race,triviaqa,webqs", "--deepspeed", "--no-pipeline-parallel",
                             "--pipeline-model-parallel-size", "1", "--num-layers", "-1", "--hidden-size", "-1",
                             "--inference", "--no-load-optim", "--tokenizer-type", "GPT2BPETokenizer"])
    res = out["results"][ck]
    for task, metric in (("lambada", "acc,none"), ("piqa", "acc,none"), ("boolq", "acc,none"), ("race", "acc,none"),
                         ("triviaqa", "exact_match,remove_whitespace"), ("webqs", "exact_match,none")):
        v = res[f"local_{task}"][metric]
        assert 0.0 <= v <= 1.0, (task, v)
    assert out["table"].splitlines()[0] == "| checkpoint | LAMBADA | PIQA | BoolQ | RACE-h | TriviaQA | WebQs |"
    assert json.load(open(res_path))[ck]["results"]["local_piqa"]["alias"] == "local_piqa"


def test_eval_harness_user_errors(tmp_path, checkpoints):
    pytest.importorskip("lm_eval")
    from tools import eval_harness

    with pytest.raises(UserError, match="--task-list is empty"):
        eval_harness.main(["--load", checkpoints["dense"], "--task-list", ",", "--eval-data-dir", str(tmp_path)])
    with pytest.raises(UserError, match="--tensor-model-parallel-size 2: evaluation runs in one process"):
        eval_harness.main(["--load", checkpoints["dense"], "--tensor-model-parallel-size", "2"])
    with pytest.raises(UserError, match="--eval-data-dir .*no such directory"):
        eval_harness.main(["--load", checkpoints["dense"], "--eval-data-dir", str(tmp_path / "nope")])
    with pytest.raises(UserError, match="no text tokenizer"):
        eval_harness.main(["--load", checkpoints["dense"], "--eval-data-dir", str(tmp_path)])
    with pytest.raises(UserError, match="--load .*no checkpoint there"):
        eval_harness.main(["--load", str(tmp_path), "--eval-data-dir", str(tmp_path)])


def test_export_hf_gives_the_same_logits(checkpoints, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tools import checkpoint_util

    out = str(tmp_path / "hf")
    checkpoint_util.main(["export-hf", "--load", checkpoints["dense"], "--save", out])
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ours = load_model(checkpoints["dense"], "cpu").model
    tokens = torch.randint(0, 127, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours.logits(tokens)[0], rtol=1e-4, atol=1e-4)
    moe_out = str(tmp_path / "moe")
    checkpoint_util.main(["export-hf", "--load", checkpoints["moe"], "--save", moe_out])
    cfg = json.load(open(os.path.join(moe_out, "config.json")))
    assert cfg["format"] == "megatron-moe" and cfg["experts_per_layer"] == [1, 4, 1, 4]
    from safetensors.torch import load_file

    state = load_file(os.path.join(moe_out, "model.safetensors"))
    moe_model = load_model(checkpoints["moe"], "cpu").model
    for n, p in moe_model.named_parameters():
        assert torch.equal(state[n], p.detach())


def test_reshard_round_trip_and_inspect(checkpoints, tmp_path, capsys):
    from tools import checkpoint_util

    a, b = str(tmp_path / "ep2"), str(tmp_path / "ep1")
    checkpoint_util.main(["reshard", "--load", checkpoints["moe"], "--save", a, "--target-expert-parallel-size", "2"])
    checkpoint_util.main(["reshard", "--load", a, "--save", b, "--target-expert-parallel-size", "1"])
    src, back = load_model(checkpoints["moe"], "cpu"), load_model(b, "cpu")
    assert load_model(a, "cpu").config["model"]["moe"]["expert_parallel_size"] == 2
    for (n, p), (_, q) in zip(src.model.named_parameters(), back.model.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(UserError, match="--target-expert-parallel-size 3 does not divide"):
        checkpoint_util.main(["reshard", "--load", a, "--save", str(tmp_path / "x"), "--target-expert-parallel-size", "3"])
    info = checkpoint_util.main(["inspect", "--load", a])
    assert info["iteration"] == 3 and "total parameters:" in capsys.readouterr().out
    # training resumes from the resharded checkpoint
    out = pretrain_gpt_moe.main(mock_args(RUN + MOE + ["--train-iters", "4", "--load", a]))
    assert out["iteration"] == 4


def test_generate_text_tool_batches_greedy_prompts_like_single_ones(checkpoints, tmp_path):
    from tools import generate_text

    prompts = tmp_path / "p.txt"
    prompts.write_text("5 17 9\n40\n3 4 5 6 7 8 9 10\n")
    argv = ["--load", checkpoints["moe"], "--prompt-file", str(prompts), "--max-new-tokens", "6"]
    batched = generate_text.main(argv)["outputs"]
    assert batched == generate_text.main(argv + ["--batch-size", "1"])["outputs"]
    assert len(batched) == 3 and all(len(t.split()) == 6 for t in batched)
    with pytest.raises(UserError, match="--batch-size"):
        generate_text.main(argv + ["--batch-size", "0"])


def test_upstream_eval_flags_parse():
    from tools import eval_harness

    a = eval_harness.parse(["--load", "ck", "--task_list", "piqa,hellaswag", "--results_path", "r.json",
                            "--num_fewshot", "5", "--eval_fp32", "--adaptive_seq_len", "--deepspeed",
                            "--deepspeed_config", "ds.json", "--moe-expert-parallel-size", "1",
                            "--disable-moe-token-dropping", "--no-load-rng", "--seq-length", "-1",
                            "--max-position-embeddings", "-1", "--num-attention-heads", "-1"])
    assert (a.tasks, a.results_path, a.num_fewshot, a.eval_fp32) == (["piqa", "hellaswag"], "r.json", 5, True)


def _piqa_dir(tmp_path, second_line):
    d = tmp_path / "eval" / "piqa"
    d.mkdir(parents=True)
    good = json.dumps({"goal": "g", "sol1": "a", "sol2": "b"})
    (d / "valid.jsonl").write_text(good + "\n" + second_line + "\n" + good + "\n")
    (d / "valid-labels.lst").write_text("0\n1\n0\n")
    return str(tmp_path / "eval")


@pytest.mark.parametrize("line, message", [
    ('{"goal": "g", "sol1": "a", "sol2": ', r"valid.jsonl line 2: not valid JSON \(Expecting value at column 36\)"),
    ('{"goal": "g", "sol1": "a"}', r"valid.jsonl line 2: field 'sol2' is missing"),
    ('["g", "a", "b"]', r"valid.jsonl line 2: expected a JSON object, got list"),
])
def test_a_broken_line_in_an_eval_file_names_file_and_line(tmp_path, line, message):
    from megatron.evaluation.local_tasks import write_tasks

    src = _piqa_dir(tmp_path, line)
    with pytest.raises(UserError, match=message) as e:
        write_tasks(src, str(tmp_path / "out"), ["piqa"])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / "piqa.jsonl").exists()


def test_eval_task_registry_is_one_record_per_task(tmp_path):
    from megatron.evaluation.local_tasks import REGISTRY, EvalTask, register, write_tasks

    assert list(REGISTRY) == ["lambada", "piqa", "boolq", "race", "triviaqa", "webqs"]
    src = tmp_path / "src" / "tiny"
    src.mkdir(parents=True)
    (src / "docs.jsonl").write_text('{"q": "1 + 1", "a": "2"}\n{"q": "2 + 2", "a": "4"}\n')
    task = EvalTask("tiny_qa", "TinyQA", ("tiny/docs.jsonl",), "test",
                    "output_type: loglikelihood\ndoc_to_text: \"{{q}} =\"\ndoc_to_target: \" {{a}}\"\n"
                    "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
                    metric="acc,none")
    register(task)
    try:
        counts = write_tasks(str(tmp_path / "src"), str(tmp_path / "out"), ["tiny_qa"])
        assert counts == {"tiny_qa": 2}
        assert "task: local_tiny_qa" in (tmp_path / "out" / "local_tiny_qa.yaml").read_text()
    finally:
        del REGISTRY["tiny_qa"]


def test_a_task_whose_dataset_is_absent_fails_naming_it(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from tools import eval_harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "absent.yaml").write_text(
        "task: absent_task\ndataset_path: nobody/no_such_dataset_here\ndataset_name: main\noutput_type: loglikelihood\n"
        "test_split: test\ndoc_to_text: q\ndoc_to_target: a\nmetric_list:\n  - metric: acc\n")
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with pytest.raises(UserError, match=r"--task-list absent_task: its dataset nobody/no_such_dataset_here \(main\) "
                                        r"is not available") as e:
        eval_harness.check_task_data(tm, ["absent_task"])
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"--task-list: unknown task\(s\) nope_task"):
        eval_harness.check_task_names(tm, ["nope_task"])


@pytest.mark.slow
def test_any_lm_eval_task_name_reaches_lm_evals_registry(tmp_path, monkeypatch):
    """hellaswag is no local task: it is found in lm-eval's registry, and offline its absent data is named."""
    pytest.importorskip("lm_eval")
    from tools import eval_harness

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"--task-list hellaswag: its dataset Rowan/hellaswag is not available"):
        eval_harness.task_manager(str(tmp_path), ["hellaswag"])
