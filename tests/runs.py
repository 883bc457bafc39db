"""Tiny training runs through the real entry point (pretrain_gpt_moe.main)."""
import os

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1", "--seed", "7"]


def mock_args(extra=()):
    return TINY + ["--mock-data", "--vocab-size", "128"] + list(extra)


def train(rank, argv):
    """Entry used by tests (in this process or a spawned one): per-iteration lm losses, grad norms,
    KD losses, and the final validation figures."""
    import pretrain_gpt_moe

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = pretrain_gpt_moe.main(argv)
    return {"losses": result["losses"], "grad_norms": result.get("grad_norms"), "kd_losses": result.get("kd_losses"),
            "valid": result.get("valid"), "rank": rank, "teacher_held": result.get("teacher_held"),
            "local_parameters": result.get("local_parameters")}


def close(a, b, rtol=1e-5):
    """Two loss (or norm) histories agree to ``rtol`` element by element."""
    assert len(a) == len(b) and len(a) > 0
    for x, y in zip(a, b):
        assert abs(x - y) <= rtol * abs(y), (a, b)
