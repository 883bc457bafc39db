"""Expert-parallel serving: torchrun with 2 gloo processes on 127.0.0.1, each holding half the experts,
answers exactly what one process answers (greedy tokens, seeded samples, prompt log-probs)."""
import pytest

from tests.test_server import PROMPTS, Server, checkpoints, send_together  # noqa: F401 (fixture)


@pytest.mark.slow
def test_expert_parallel_server_equals_one_process(checkpoints):  # noqa: F811
    one = Server(checkpoints["moe"])
    two = Server(checkpoints["moe"], "--moe-expert-parallel-size", "2", nproc=2)
    try:
        one.wait_ready(), two.wait_ready()
        bodies = [dict(prompt=" ".join(map(str, p)), max_tokens=6 + i, temperature=0 if i % 2 else 1.0, seed=i,
                       logprobs=0) for i, p in enumerate(PROMPTS)]
        bodies.append(dict(prompt=[[3, 9, 4, 4, 1, 8]], max_tokens=1, temperature=0, logprobs=1, echo=True))
        expected = [one.complete(**b)["choices"][0] for b in bodies]
        for e, g in zip(expected, send_together(two, bodies)):  # all at once: one batch on the EP server
            assert g["text"] == e["text"] and g["finish_reason"] == e["finish_reason"]
            assert g["logprobs"]["token_logprobs"][1:] == pytest.approx(e["logprobs"]["token_logprobs"][1:], abs=1e-4)
    finally:
        one.stop()
        code, out = two.stop()
    # torchrun forwards SIGTERM to both ranks: rank 0 drains and stops rank 1; torchrun itself then exits
    # with its own SignalException (its behaviour for any signalled job)
    assert code in (0, 1) and "Traceback" not in out.split("server stopped")[0], out
    assert "each rank holds 2 of 4 experts per MoE layer" in out and "server stopped" in out


def _ep_engine(rank, load, prompts):
    """Rank 0: an engine over 2 expert-parallel ranks that idles (pinging rank 1), then serves; rank 1 follows."""
    import time
    from types import SimpleNamespace

    from megatron.inference.load import load_model
    from megatron.inference.serving.distributed import BroadcastBatchState, follow
    from megatron.inference.serving.engine import Engine, Request, SamplingParams
    from megatron.parallel.state import initialize

    ps = initialize(SimpleNamespace(use_cpu=True, distributed_backend="gloo", tensor_model_parallel_size=1), 2)
    lm = load_model(load, "cpu", ps=ps)
    held = [m.experts.num_local for m in lm.model.moe_layers()]
    if rank == 1:
        follow(lm.model, ps.device)
        return {"held": held}
    engine = Engine(lm.model, lm.tokenizer.eod, 64, lm.tokenizer.detokenize, max_batch_size=4,
                    state=BroadcastBatchState(lm.model, ps.device))
    engine.IDLE_PING_S = 0.05
    engine.start()
    time.sleep(0.5)  # idle: rank 1 gets pings
    reqs = [engine.submit(Request(p, SamplingParams(max_new_tokens=6))) for p in prompts]
    for r in reqs:
        r.done.wait(120)
    engine.shutdown()
    return {"held": held, "tokens": [r.tokens for r in reqs]}


@pytest.mark.slow
def test_expert_parallel_engine_idles_and_equals_one_process(checkpoints, tmp_path):  # noqa: F811
    from megatron.inference.generate import generate
    from megatron.inference.load import load_model
    from tests.dist_utils import run_distributed

    out = run_distributed(_ep_engine, 2, str(tmp_path), checkpoints["moe"], PROMPTS[:4], timeout=240)
    assert out[0]["held"] == out[1]["held"] == [2, 2]  # 4 experts per MoE layer, half on each rank
    lm = load_model(checkpoints["moe"], "cpu")
    assert out[0]["tokens"] == [generate(lm.model, p, 6, eod=lm.tokenizer.eod) for p in PROMPTS[:4]]
