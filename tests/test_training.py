"""End-to-end on real data: WikiText-2 -> SentencePiece -> indexed dataset -> training lowers the loss."""
import glob
import os
import subprocess
import sys

import numpy as np
import pytest

import pretrain_gpt_moe
from megatron.data.indexed_dataset import IndexedDataset
from tests.conftest import ROOT, require_shared


@pytest.fixture(scope="module")
def wikitext(tmp_path_factory):
    train = require_shared("corpus", "wikitext-2-raw", "train.txt")
    valid = require_shared("corpus", "wikitext-2-raw", "valid.txt")
    d = tmp_path_factory.mktemp("wt2")
    py = sys.executable
    subprocess.run([py, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", valid, "--model-prefix",
                    str(d / "sp"), "--vocab-size", "2000"], check=True, capture_output=True)
    for name, src in (("train", train), ("valid", valid)):
        subprocess.run([py, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", src, "--output-prefix",
                        str(d / name), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(d / "sp.model"),
                        "--append-eod", "--workers", "2", "--quiet"], check=True, capture_output=True)
    return d


def unigram_entropy(prefix) -> float:
    ds = IndexedDataset(prefix)
    counts = np.bincount(np.asarray(ds.bin), minlength=2000).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


COMMON = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
          "--micro-batch-size", "16", "--global-batch-size", "16", "--train-iters", "300", "--lr", "3e-3",
          "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "10", "--hidden-dropout", "0",
          "--attention-dropout", "0", "--tokenizer-type", "SentencePieceTokenizer", "--eval-iters", "4",
          "--eval-interval", "100", "--log-interval", "50", "--num-experts", "4", "--seed", "3"]


@pytest.fixture(scope="module")
def trained(wikitext, tmp_path_factory):
    d = wikitext
    out_dir = tmp_path_factory.mktemp("run")
    argv = COMMON + ["--data-path", str(d / "train_text_document"), "--split", "100,0,0",
                     "--tokenizer-model", str(d / "sp.model"), "--tensorboard-dir", str(out_dir / "tb"),
                     "--save", str(out_dir / "ck")]
    return pretrain_gpt_moe.main(argv), out_dir


def test_training_on_wikitext_beats_unigram_entropy(wikitext, trained):
    out, run_dir = trained
    h = unigram_entropy(str(wikitext / "train_text_document"))
    losses = out["losses"]
    assert losses[0] > h  # starts above the unigram entropy (~ln 2000 = 7.6)
    assert np.mean(losses[-20:]) < h - 0.6, (np.mean(losses[-20:]), h)
    tb = str(run_dir / "tb")
    assert glob.glob(os.path.join(tb, "events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(tb)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("lm loss", "moe loss", "learning-rate", "grad-norm", "moe/layer1/drop-fraction", "moe/layer1/load-cv"):
        assert tag in tags, tags
    assert acc.Scalars("lm loss")[-1].value == pytest.approx(np.mean(losses[-50:]), rel=1e-4)


def test_held_out_validation_loss(wikitext, trained):
    """The trained checkpoint scored on WikiText-2 valid (a file it never saw) in eval mode."""
    _, run_dir = trained
    d = wikitext
    out = pretrain_gpt_moe.main(COMMON + ["--data-path", str(d / "valid_text_document"), "--split", "0,100,0",
                                          "--tokenizer-model", str(d / "sp.model"), "--load", str(run_dir / "ck"),
                                          "--skip-train"])
    assert out["valid"]["lm loss"] < unigram_entropy(str(d / "valid_text_document")) - 0.5
