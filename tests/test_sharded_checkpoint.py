"""The sharded checkpoint format (format 2, torch.distributed.checkpoint): boxes that tile, every rank
writing its own shard, and resharding on load across TP / EP / DP / ZeRO layouts, checked against the
gathered full-tensor format 1 and against uninterrupted runs. Real gloo processes, real files."""
import os
import pickle

import pytest
import torch

from megatron.checkpoint.boxes import Box, Placement, flat_boxes, flat_range_boxes, runs
from megatron.checkpoint.formats import FORMATS
from megatron.checkpoint.layout import COMMON_FILE, TRACKER
from megatron.checkpoint.load import load_checkpoint
from megatron.config.schema import ModelConfig  # noqa: F401  (the config types the loader checks)
from megatron.errors import UserError
from megatron.optim.build import build_optimizer
from megatron.parallel.apply import build_model
from megatron.parallel.state import ParallelState
from megatron.training.arguments import parse_args
from tests.dist_utils import run_distributed
from tests.runs import close, mock_args, train

EXACT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--moe-train-capacity-factor", "8",
         "--moe-eval-capacity-factor", "8", "--disable-moe-top2-2nd-expert-sampling", "--use-cpu", "--clip-grad", "0"]
MOE = ["--micro-batch-size", "1", "--global-batch-size", "4", "--num-experts", "4", "--topk", "2",
       "--weight-decay", "0.1"]


PWNED = "/tmp/megatron_moe_test_pwned_index"


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4), (2, 1, 3, 2)])
def test_flat_range_boxes_tile_every_range_with_contiguous_boxes(shape):
    n = 1
    for s in shape:
        n *= s
    full = torch.arange(float(n)).view(shape)
    for a in range(n + 1):
        for b in range(a, n + 1):
            boxes = flat_boxes(full.reshape(-1)[a:b], shape, a)
            assert len(boxes) <= max(1, 2 * len(shape) - 1)
            seen = torch.zeros(shape)
            for box in boxes:
                region = tuple(slice(o, o + z) for o, z in zip(box.offsets, box.data.shape))
                assert torch.equal(full[region], box.data)  # the box's data is that region of the tensor
                seen[region] += 1
            expect = torch.zeros(n)
            expect[a:b] = 1
            assert torch.equal(seen.view(-1), expect), (a, b)
    assert flat_range_boxes(shape, 3, 3) == []


def test_tp_index_runs_map_a_shard_to_its_rows_of_the_full_tensor():
    # a qkv-like shard: rows 0-1, 4-5 and 8-9 of a 12-row tensor
    idx = [0, 1, 4, 5, 8, 9]
    assert runs(idx) == [(0, 0, 2), (2, 4, 2), (4, 8, 2)]
    local = torch.arange(12.0).view(6, 2)
    boxes = Placement((12, 2), 0, tuple(runs(idx))).to_full(Box((1, 0), local[1:5]))
    assert [b.offsets for b in boxes] == [(1, 0), (4, 0), (8, 0)]
    assert [b.data.shape[0] for b in boxes] == [1, 2, 1]
    assert torch.equal(torch.cat([b.data for b in boxes]), local[1:5])


def _load_single(ck: str, argv: list[str]):
    """Model and torch AdamW of ``argv`` in this process (TP 1, EP 1, no ZeRO) filled from checkpoint ``ck``."""
    cfg = parse_args(argv)
    ps = ParallelState()
    model = build_model(cfg.model, ps, seed=cfg.train.seed)
    opt = build_optimizer(model, cfg.optimizer, ps.device, ps)
    load_checkpoint(ck, model, opt, None, None, cfg, ps, load_rng=False)
    state = {n: opt.state[p] for n, p in model.named_parameters()}
    return dict(model.named_parameters()), state


def test_each_rank_writes_its_shard_and_the_sharded_checkpoint_equals_the_gathered_one(tmp_path):
    """ZeRO-1 with EP=2 at DP=2: both ranks write (bytes within 1.5x); loaded at TP 1 / EP 1 into torch AdamW,
    weights and Adam state equal the full-tensor format's (gathered to one writer) exactly."""
    ck2, ck1 = str(tmp_path / "dcp"), str(tmp_path / "full")
    argv = mock_args(EXACT + MOE + ["--train-iters", "2"])
    layout = ["--moe-expert-parallel-size", "2", "--use-distributed-optimizer"]
    run_distributed(train, 2, str(tmp_path / "a"), argv + layout + ["--save", ck2])
    run_distributed(train, 2, str(tmp_path / "b"), argv + layout + ["--save", ck1, "--ckpt-format", "torch"])
    common = torch.load(os.path.join(ck2, "iter_0000002", COMMON_FILE), weights_only=True)
    assert common["format"] == 2 and FORMATS[2].__name__.endswith("sharded_format")
    shards = os.path.join(ck2, "iter_0000002", "shards")
    sizes = [os.path.getsize(os.path.join(shards, f"__{r}_0.distcp")) for r in range(2)]
    assert max(sizes) <= 1.5 * min(sizes), sizes
    assert not os.path.exists(os.path.join(ck2, "iter_0000002", "model_dense.pt"))
    w2, s2 = _load_single(ck2, argv)
    w1, s1 = _load_single(ck1, argv)
    for n in w1:
        assert torch.equal(w1[n], w2[n]), n
        for key in ("exp_avg", "exp_avg_sq"):
            assert s1[n][key].abs().sum() > 0 or n.endswith("bias"), (n, key)  # real state, not zeros
            assert torch.equal(s1[n][key], s2[n][key]), (n, key)
        assert float(s1[n]["step"]) == float(s2[n]["step"]) == 2.0


def test_resume_moves_across_layouts_within_rounding_and_is_exact_at_the_same_layout(tmp_path):
    """ZeRO-1 x EP=2 (DP=2) -> one process, plain Adam -> TP=2 with ZeRO-2; and DP=2 ZeRO-1 -> the same layout
    bit for bit."""
    ck, ck2 = str(tmp_path / "ck"), str(tmp_path / "ck2")
    argv = mock_args(EXACT + MOE + ["--train-iters", "6"])
    full = train(0, argv)["losses"]
    first = run_distributed(train, 2, str(tmp_path / "a"), argv + ["--moe-expert-parallel-size", "2",
                                                                   "--use-distributed-optimizer", "--save", ck,
                                                                   "--exit-interval", "2"])
    close(first[0]["losses"], full[:2])
    middle = train(0, argv + ["--load", ck, "--save", ck2, "--exit-interval", "4"])
    close(middle["losses"], full[2:4])
    last = run_distributed(train, 2, str(tmp_path / "b"), argv + ["--tensor-model-parallel-size", "2",
                                                                  "--zero-stage", "2", "--load", ck2])
    close(last[0]["losses"], full[4:])
    # the same layout: bit-exact
    zero = ["--use-distributed-optimizer"]
    whole = run_distributed(train, 2, str(tmp_path / "c"), argv + zero)[0]["losses"]
    ck3 = str(tmp_path / "ck3")
    run_distributed(train, 2, str(tmp_path / "d"), argv + zero + ["--save", ck3, "--exit-interval", "3"])
    resumed = run_distributed(train, 2, str(tmp_path / "e"), argv + zero + ["--load", ck3])
    assert resumed[0]["losses"] == whole[3:]


def test_a_damaged_or_mismatched_sharded_checkpoint_is_one_line(tmp_path):
    ck = str(tmp_path / "ck")
    argv = mock_args(MOE + ["--train-iters", "2"])
    train(0, argv + ["--save", ck])
    assert open(os.path.join(ck, TRACKER)).read() == "2"
    with pytest.raises(UserError) as e:  # another architecture (8 experts): refused before any read
        _load_single(ck, mock_args(MOE[:-4] + ["--num-experts", "8", "--train-iters", "2"]))
    assert "\n" not in str(e.value)
    shard = os.path.join(ck, "iter_0000002", "shards", "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) // 2)
    with pytest.raises(UserError, match="the checkpoint is damaged") as e:
        _load_single(ck, argv)
    assert "\n" not in str(e.value)
    index = os.path.join(ck, "iter_0000002", "shards", ".metadata")
    with open(index, "wb") as f:  # an index that would run code when unpickled is refused
        pickle.dump(Exploit(), f)
    with pytest.raises(UserError, match="refused as unsafe") as e:
        _load_single(ck, argv)
    assert "\n" not in str(e.value) and not os.path.exists(PWNED)
    os.remove(index)
    with pytest.raises(UserError, match=r"the shard index .*\.metadata is missing") as e:
        _load_single(ck, argv)
    assert "\n" not in str(e.value)


def test_checkpoints_move_between_fsdp2_zero1_and_plain(tmp_path):
    """FSDP2 (DP 2) -> ZeRO-1 (DP 2) -> FSDP2 x EP 2: each resume continues the uninterrupted one-process run
    within fp32 rounding; under FSDP2 each rank writes its own half."""
    ck, ck2 = str(tmp_path / "ck"), str(tmp_path / "ck2")
    argv = mock_args(EXACT + MOE + ["--train-iters", "6"])
    full = train(0, argv)["losses"]
    first = run_distributed(train, 2, str(tmp_path / "a"), argv + ["--use-torch-fsdp2", "--save", ck,
                                                                   "--exit-interval", "2"])
    close(first[0]["losses"], full[:2])
    shards = os.path.join(ck, "iter_0000002", "shards")
    sizes = [os.path.getsize(os.path.join(shards, f"__{r}_0.distcp")) for r in range(2)]
    assert max(sizes) <= 1.5 * min(sizes), sizes
    middle = run_distributed(train, 2, str(tmp_path / "b"), argv + ["--use-distributed-optimizer", "--load", ck,
                                                                    "--save", ck2, "--exit-interval", "4"])
    close(middle[0]["losses"], full[2:4])
    last = run_distributed(train, 2, str(tmp_path / "c"), argv + ["--use-torch-fsdp2", "--moe-expert-parallel-size",
                                                                  "2", "--load", ck2])
    close(last[0]["losses"], full[4:])
