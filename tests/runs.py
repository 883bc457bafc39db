"""Tiny training runs through the real entry point (pretrain_gpt_moe.main)."""
import os

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "1",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1", "--seed", "7"]


def mock_args(extra=()):
    return TINY + ["--mock-data", "--vocab-size", "128"] + list(extra)


def train(rank, argv):
    """Entry used by tests (in this process or a spawned one): returns the per-iteration lm losses."""
    import pretrain_gpt_moe

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    result = pretrain_gpt_moe.main(argv)
    return {"losses": result["losses"], "valid": result.get("valid"), "rank": rank}
