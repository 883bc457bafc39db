"""Megatron-LM's examples/mixtral/train_mixtral_8x7b_distributed.sh with only the launcher line changed: its flag
set (reconstructed here from the script's MODEL / MOE / DATA / TRAINING / MODEL_PARALLEL / LOGGING arrays) plans
Mixtral-8x7B's published size with --dry-run, and the script's small variant (2 layers, hidden 256, EP 2, --mock-data,
a Llama2Tokenizer SentencePiece model) trains under torchrun on 2 CPU processes."""
import os
import re
import subprocess
import sys

import pytest

import pretrain_gpt_moe
from tests.conftest import ROOT
from tests.dist_utils import free_port

# Mixtral-8x7B-v0.1 as published: 46,702,792,704 parameters, 12,879,925,248 active per token (2 of 8 experts)
MIXTRAL_TOTAL, MIXTRAL_ACTIVE = 46_702_792_704, 12_879_925_248


def mixtral_argv(layers=32, hidden=4096, ffn=14336, heads=32, groups=8, experts=8, seq=4096, max_pos=32768,
                 tokenizer_model="/workspace/tokenizer.model", data=("--data-path", "/data/my_text_document"),
                 train=("--global-batch-size", "256", "--train-iters", "500000", "--lr-decay-iters", "320000",
                        "--lr-decay-style", "cosine", "--lr-warmup-iters", "500", "--bf16"),
                 parallel=("--pipeline-model-parallel-size", "4", "--expert-model-parallel-size", "8"),
                 logging=("--log-interval", "1", "--save-interval", "10000", "--eval-interval", "1000"),
                 ckpt=None):
    """The script's arrays in order (the published script, or its small variant with the arguments changed)."""
    model = ["--use-mcore-models", "--disable-bias-linear", "--seq-length", str(seq), "--max-position-embeddings",
             str(max_pos), "--num-layers", str(layers), "--hidden-size", str(hidden), "--ffn-hidden-size", str(ffn),
             "--num-attention-heads", str(heads), "--init-method-std", "0.01", "--attention-dropout", "0.0",
             "--hidden-dropout", "0.0", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--swiglu",
             "--untie-embeddings-and-output-weights", "--group-query-attention", "--num-query-groups", str(groups),
             "--no-masked-softmax-fusion", "--no-position-embedding", "--rotary-base", "1000000"]
    moe = ["--num-experts", str(experts), "--moe-router-topk", "2", "--moe-router-load-balancing-type", "aux_loss",
           "--moe-aux-loss-coeff", "1e-2", "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
           "--overlap-param-gather", "--overlap-grad-reduce"]
    data_args = ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", tokenizer_model, *data,
                 "--split", "99990,8,2"]
    training = ["--micro-batch-size", "1", *train[:2], "--lr", "1e-4", *train[2:4], "--min-lr", "1.0e-5",
                "--weight-decay", "0.1", "--clip-grad", "1.0", *train[4:]]
    par = ["--tensor-model-parallel-size", "1", *parallel[:2], *parallel[2:], "--use-distributed-optimizer",
           "--sequence-parallel"]
    log = [*logging, "--eval-iters", "10"]
    if ckpt is not None:
        log += ["--save", ckpt, "--load", ckpt, "--tensorboard-dir", os.path.join(ckpt, "tensorboard")]
    return model + moe + data_args + training + par + log + ["--no-load-optim", "--no-load-rng"]


def test_published_script_plans_mixtral_8x7b(tmp_path, capsys):
    """The launcher line becomes a dry run of 4 nodes x 8 GPUs (PP 4 x DP 8, EP 8 inside DP); without the
    tokenizer file the dry run is told Llama-2's vocabulary."""
    res = pretrain_gpt_moe.main(mixtral_argv(ckpt=str(tmp_path / "ck")) + ["--dry-run", "--dry-run-world-size", "32",
                                                                          "--vocab-size", "32000"])
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert (res["total"], res["active"]) == (MIXTRAL_TOTAL, MIXTRAL_ACTIVE)
    # Megatron-LM's MoE flags: every layer is an MoE layer (its --moe-layer-freq default), said once
    assert "experts per layer [" + ", ".join(["8"] * 32) + "]" in out
    assert "every layer is an MoE layer" in out
    assert "world 32 = TP 1 x PP 4 x DP 8 (EP 8, expert-DP 1)" in out


@pytest.fixture(scope="module")
def llama2_tokenizer(tmp_path_factory):
    """A small SentencePiece model with Llama-2's special pieces (unk 0, <s> 1, </s> 2)."""
    from megatron.tokenizer.sentencepiece_tokenizer import train_sentencepiece

    d = tmp_path_factory.mktemp("sp")
    text = d / "text.txt"
    words = ["the", "expert", "router", "token", "layer", "model", "mixture", "of", "gate", "capacity"]
    text.write_text("\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)))
    return train_sentencepiece([str(text)], str(d / "tokenizer"), vocab_size=300)


def test_small_script_variant_trains_under_torchrun(tmp_path, llama2_tokenizer):
    argv = mixtral_argv(layers=2, hidden=256, ffn=896, heads=2, groups=2, experts=2, seq=256, max_pos=2048,
                        tokenizer_model=llama2_tokenizer, data=("--mock-data",),
                        train=("--global-batch-size", "4", "--train-iters", "7"),
                        parallel=("--pipeline-model-parallel-size", "1", "--expert-model-parallel-size", "2"),
                        logging=("--eval-iters", "2", "--log-interval", "1"))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                "--node_rank", "0", "--master_addr", "localhost", "--master_port", str(free_port())]
    r = subprocess.run(launcher + [os.path.join(ROOT, "pretrain_gpt_moe.py")] + argv, cwd=tmp_path,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "(TP 1, DP 2, EP 2, ZeRO-1 optimizer)" in out and "vocab 300 padded to 384" in out
    losses = [float(x) for x in re.findall(r"lm loss: ([0-9.E+-]+)", out)]
    assert len(losses) == 7 and all(x == x for x in losses) and losses[-1] < losses[0]
    assert re.search(r"validation loss at iteration 7 \| lm loss value: [0-9.E+-]+", out)


def test_migrating_guide_names_the_script_flags_declared_for_megatron_lm_only():
    from megatron.config.compat.upstream_flags import UPSTREAM_FLAGS

    guide = open(os.path.join(ROOT, "docs", "MIGRATING.md")).read()
    upstream_only = {a for a in mixtral_argv() if a in UPSTREAM_FLAGS} | set(UPSTREAM_FLAGS)
    missing = sorted(f for f in upstream_only if f"`{f}" not in guide)
    assert not missing, missing
    assert "`--tokenizer-type Llama2Tokenizer`" in guide
