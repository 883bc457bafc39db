"""Sequence-length curriculum: DeepSpeed's schedules, batch truncation, token counts, state."""
import pytest
import torch

from megatron.config.curriculum import CurriculumConfig
from megatron.errors import UserError
from megatron.training.curriculum import SeqLenCurriculum, tokens_trained, truncate_batch, truncate_block


def linear(total=100, lo=8, hi=64, step=8):
    return SeqLenCurriculum(CurriculumConfig(lo, hi, "fixed_linear", total_curriculum_step=total, difficulty_step=step))


def test_fixed_linear_values():
    c = linear()
    # floor(8 + 56 * s / 100) rounded down to a multiple of 8
    assert [c.difficulty(s) for s in (1, 14, 15, 50, 99, 100, 500)] == [8, 8, 16, 32, 56, 64, 64]
    assert [linear(hi=2048, lo=72, total=20728).difficulty(s) for s in (1, 10364, 20728)] == [72, 1056, 2048]


def test_fixed_root_and_discrete():
    root = SeqLenCurriculum(CurriculumConfig(8, 64, "fixed_root", total_curriculum_step=100, difficulty_step=8,
                                             root_degree=2))
    # sqrt(s / 100): s = 25 -> 8 + 56 * 0.5 = 36 -> 32
    assert [root.difficulty(s) for s in (1, 25, 64, 100)] == [8, 32, 48, 64]
    disc = SeqLenCurriculum(CurriculumConfig(8, 64, "fixed_discrete", difficulty=[8, 32, 64], max_step=[5, 10]))
    assert [disc.difficulty(s) for s in (1, 5, 6, 10, 11, 1000)] == [8, 8, 32, 32, 64, 64]
    with pytest.raises(UserError, match="one more 'difficulty' entry than 'max_step'"):
        CurriculumConfig(8, 64, "fixed_discrete", difficulty=[8, 64], max_step=[5, 10]).validate()
    with pytest.raises(UserError, match="root_degree must be > 0"):
        CurriculumConfig(8, 64, "fixed_root", total_curriculum_step=10).validate()


def test_update_state_and_exact_resume():
    full = linear(total=10)
    lengths = [full.update(s) for s in range(1, 13)]
    assert lengths == [8, 16, 24, 24, 32, 40, 40, 48, 56, 64, 64, 64]
    first = linear(total=10)
    for s in range(1, 5):
        first.update(s)
    resumed = linear(total=10)
    resumed.load_state_dict(first.state_dict())
    assert resumed.state_dict() == {"current": 24, "last_step": 4}
    assert [resumed.update(s) for s in range(5, 13)] == lengths[4:]


def test_truncation_keeps_labels_and_positions_aligned():
    block = torch.arange(2 * 9).view(2, 9)  # [mbs, seq + 1]
    cut = truncate_block(block, 4)
    tokens, labels = cut[:, :-1], cut[:, 1:]
    assert tokens.tolist() == [[0, 1, 2, 3], [9, 10, 11, 12]]
    assert labels.tolist() == [[1, 2, 3, 4], [10, 11, 12, 13]]
    full_tokens, full_labels = block[:, :-1], block[:, 1:]
    mask = torch.ones(2, 8)
    mask[0, 2] = 0
    pos = torch.arange(8).expand(2, 8)
    t, l, m, p = truncate_batch(4, full_tokens, full_labels, mask, pos)
    assert torch.equal(t, tokens) and torch.equal(l, labels)
    assert m.tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]] and p.tolist() == [[0, 1, 2, 3]] * 2
    assert tokens_trained(256, 72) == 18432


def test_built_from_the_deepspeed_config_of_the_command_line(tmp_path):
    import json

    from megatron.training.arguments import parse_args
    from megatron.training.curriculum import build_curriculum
    from tests.runs import mock_args

    cl = {"enabled": True, "curriculum_type": "seqlen", "min_difficulty": 8, "max_difficulty": 16,
          "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 4, "difficulty_step": 8}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"curriculum_learning": cl}))
    cfg = parse_args(mock_args(["--train-iters", "1", "--deepspeed", "--deepspeed_config", str(path)]))
    cur = build_curriculum(cfg)
    assert [cur.update(s) for s in (1, 2, 3, 4)] == [8, 8, 8, 16]
    assert build_curriculum(parse_args(mock_args(["--train-iters", "1"]))) is None
    cl["max_difficulty"] = 32  # above --seq-length 16
    path.write_text(json.dumps({"curriculum_learning": cl}))
    with pytest.raises(UserError, match="max_difficulty 32 exceeds --seq-length 16"):
        parse_args(mock_args(["--train-iters", "1", "--deepspeed_config", str(path)]))
