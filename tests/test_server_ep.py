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
