"""A client nobody here wrote: lm-eval's ``local-completions`` model pointed at the server gives the
same LAMBADA, PIQA and TriviaQA (generation) figures as tools/eval_harness.py on the same checkpoint.
The server's /tokenizer_info and /tokenize let lm-eval use the checkpoint's own tokenizer ("remote")."""
import pytest

import pretrain_gpt_moe
from tests.conftest import require_shared, shared_path
from tests.runs import mock_args
from tests.test_server import MOE, Server

TASKS = ["lambada", "piqa", "triviaqa"]
METRICS = {"lambada": ("acc,none", "perplexity,none"), "piqa": ("acc,none", "acc_norm,none"),
           "triviaqa": ("exact_match,remove_whitespace",)}


@pytest.mark.slow
def test_lm_eval_local_completions_matches_the_harness_adapter(tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    data = require_shared("eval")
    vocab, merges = require_shared("gpt2", "gpt2-vocab.json"), shared_path("gpt2", "gpt2-merges.txt")
    ck = str(tmp_path / "gpt2tok")
    pretrain_gpt_moe.main(mock_args(["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "2",
                                     "--num-layers", "2", "--seq-length", "256", "--tokenizer-type",
                                     "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges,
                                     "--save", ck] + MOE))
    server = Server(ck, "--max-batch-size", "8")
    try:
        import lm_eval.models  # noqa: F401 (registers local-completions)
        from lm_eval.tasks import TaskManager

        from megatron.evaluation.local_tasks import task_name, write_tasks
        from tools import eval_harness

        limit = 4
        direct = eval_harness.main(["--load", ck, "--eval-data-dir", data, "--task-list", ",".join(TASKS),
                                    "--limit", str(limit), "--micro-batch-size", "4", "--bootstrap-iters", "0",
                                    "--device", "cpu"])["results"][ck]
        task_dir = str(tmp_path / "tasks")
        write_tasks(data, task_dir, TASKS)
        server.wait_ready()
        args = (f"base_url={server.url}/v1/completions,model=gpt2tok,max_length=256,tokenizer_backend=remote,"
                f"tokenized_requests=True,num_concurrent=4,max_retries=1,timeout=120")
        remote = lm_eval.simple_evaluate(model="local-completions", model_args=args,
                                         tasks=[task_name(t) for t in TASKS],
                                         task_manager=TaskManager(include_path=task_dir, include_defaults=False),
                                         limit=limit, num_fewshot=0, random_seed=1234, numpy_random_seed=1234,
                                         torch_random_seed=1234,
                                         bootstrap_iters=0)["results"]
        for task in TASKS:
            for metric in METRICS[task]:
                a, b = direct[task_name(task)][metric], remote[task_name(task)][metric]
                assert a == pytest.approx(b, rel=1e-4), (task, metric, a, b)
    finally:
        code, out = server.stop()
    assert code == 0, out
