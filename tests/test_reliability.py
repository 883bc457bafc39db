"""Never lose a run: the NaN guard, preflight, safe re-save, SIGTERM saves, kill -9 at random moments, ranks
that disagree. Real processes, real checkpoints on disk, real gloo."""
import os
import random
import re
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

import pretrain_gpt_moe
from megatron.checkpoint.layout import TRACKER, locate_checkpoint
from megatron.config.schema import ModelConfig
from megatron.errors import TrainingFault, UserError
from megatron.inference.load import load_model
from megatron.training.preflight import check_save_dir
from tests.conftest import ROOT
from tests.dist_utils import free_port, run_distributed
from tests.runs import mock_args

BASE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--num-experts", "4"]
SCRIPT = os.path.join(ROOT, "pretrain_gpt_moe.py")


def env(**extra):
    # the same thread count as this process: the in-process reference runs must reduce in the same order
    e = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=ROOT)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update({k: str(v) for k, v in extra.items()})
    return e


def tracker(ck):
    return int(open(os.path.join(ck, TRACKER)).read())


def assert_loadable(ck):
    """The tracker names a complete checkpoint: its model loads (every shard it needs read through the index)
    and holds finite weights."""
    path, common = locate_checkpoint(ck)
    assert common["iteration"] == tracker(ck)
    lm = load_model(ck, "cpu")
    n = 0
    for name, p in lm.model.named_parameters():
        assert torch.isfinite(p).all(), name
        n += 1
    assert n >= 4
    return common["iteration"]


def leftovers(ck):
    return sorted(f for f in os.listdir(ck) if f.startswith(".") or ".tmp" in f or ".old" in f)


# ---------------------------------------------------------------------------------------------- NaN guard


def test_diverged_run_stops_with_exit_3_and_keeps_the_last_finite_checkpoint(tmp_path):
    ck = str(tmp_path / "ck")
    r = subprocess.run([sys.executable, SCRIPT] + mock_args(BASE + ["--train-iters", "8", "--lr", "1e10", "--save", ck,
                                                                     "--save-interval", "1"]),
                       capture_output=True, text=True, env=env(), timeout=300)
    assert r.returncode == 3, r.stderr
    assert re.fullmatch(r"error: iteration (\d+): lm loss is nan .*last finite checkpoint is kept.*\n", r.stderr), r.stderr
    stopped = int(re.match(r"error: iteration (\d+)", r.stderr).group(1))
    assert tracker(ck) == stopped - 1 and assert_loadable(ck) == stopped - 1
    assert not os.path.exists(os.path.join(ck, f"iter_{stopped:07d}"))


def test_nonfinite_loss_at_the_first_step_saves_nothing(tmp_path):
    ck = str(tmp_path / "ck")
    with pytest.raises(TrainingFault, match="iteration 1: lm loss is nan"):
        pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "3", "--init-method-std", "1e30", "--save", ck,
                                                "--save-interval", "1"]))
    assert os.listdir(ck) == []


def test_skipped_steps_stop_after_max_skipped_iterations():
    # a constant fp16 loss scale of 1e30 overflows every backward: every step is skipped and counts
    with pytest.raises(TrainingFault, match="iteration 3: 3 steps in a row were skipped .* --max-skipped-iterations 2"):
        pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "8", "--fp16", "--loss-scale", "1e30",
                                                "--max-skipped-iterations", "2", "--peak-tflops", "1"]))


# ---------------------------------------------------------------------------------------------- preflight


def test_save_dir_without_space_or_under_a_file_size_limit(tmp_path):
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=128)
    check_save_dir(str(tmp_path / "ok"), cfg, True)  # room and no limit: passes, and leaves no probe file
    assert os.listdir(tmp_path / "ok") == []
    with pytest.raises(UserError, match=r"--save .*: 0.00 GiB free but one checkpoint needs about"):
        check_save_dir(str(tmp_path / "ok"), cfg, True, free_bytes=1000)
    ck = str(tmp_path / "ck")

    def limit():  # ulimit -f 64 KiB; without SIGXFSZ a larger write fails with EFBIG instead of killing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    r = subprocess.run([sys.executable, SCRIPT] + mock_args(BASE + ["--train-iters", "2", "--save", ck]),
                       capture_output=True, text=True, env=env(), timeout=300, preexec_fn=limit)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "the file-size limit (ulimit -f) is 65536 bytes" in r.stderr and os.listdir(ck) == []


def test_load_equal_to_save_with_no_checkpoint_yet_starts_from_scratch(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + ["--train-iters", "2", "--load", ck, "--save", ck])
    out = pretrain_gpt_moe.main(argv)
    assert len(out["losses"]) == 2 and tracker(ck) == 2
    assert f"no checkpoint in {ck}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- safe re-save


def test_resave_of_an_existing_iteration_swaps_in_a_complete_copy(tmp_path):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + ["--train-iters", "3", "--save-interval", "2", "--save", ck])
    pretrain_gpt_moe.main(argv)
    it3 = os.path.join(ck, "iter_0000003")
    inode = os.stat(it3).st_ino
    out = pretrain_gpt_moe.main(argv + ["--load", ck])  # finished job restarted: re-saves iteration 3
    assert out["losses"] == [] and tracker(ck) == 3
    assert os.stat(it3).st_ino != inode  # a new copy took the name
    assert assert_loadable(ck) == 3 and leftovers(ck) == []


def test_crash_between_the_renames_and_orphans_are_repaired_at_start(tmp_path, capsys):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + ["--train-iters", "4"])
    full = pretrain_gpt_moe.main(argv)["losses"]
    pretrain_gpt_moe.main(argv + ["--save", ck, "--exit-interval", "2"])
    # what a kill leaves: the live copy at its backup name (no atomic exchange), a half-written save, a tracker temp
    os.replace(os.path.join(ck, "iter_0000002"), os.path.join(ck, ".iter_0000002.old"))
    os.makedirs(os.path.join(ck, ".iter_0000003.tmp", "experts"))
    open(os.path.join(ck, TRACKER + ".tmp999"), "w").write("3")
    with pytest.raises(UserError, match="iter_0000002 is missing; its previous copy is at .*old: rename it back"):
        pretrain_gpt_moe.main(argv + ["--load", ck])  # a plain load names the repair
    capsys.readouterr()
    out = pretrain_gpt_moe.main(argv + ["--load", ck, "--save", ck])
    log = capsys.readouterr().out
    assert "restored" in log and log.count("left by an interrupted save") == 2
    assert out["losses"] == full[2:] and tracker(ck) == 4 and leftovers(ck) == []


# ---------------------------------------------------------------------------------------------- SIGTERM and kill -9


def wait_for(path, pattern, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if re.search(pattern, open(path).read()):
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended before {pattern!r}:\n{open(path).read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"no {pattern!r} within {timeout} s")


def test_sigterm_saves_at_the_end_of_the_step_and_resumes_exactly(tmp_path):
    ck, log = str(tmp_path / "ck"), str(tmp_path / "log")
    argv = mock_args(BASE + ["--train-iters", "30"])
    full = pretrain_gpt_moe.main(argv)["losses"]
    with open(log, "w") as f:
        p = subprocess.Popen([sys.executable, SCRIPT] + argv + ["--save", ck, "--exit-signal-handler"], stdout=f,
                             stderr=subprocess.STDOUT, env=env())
    wait_for(log, r" iteration +2/", p)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=120) == 0
    k = int(re.search(r"> exiting at iteration (\d+): SIGTERM", open(log).read()).group(1))
    assert 2 <= k < 30 and tracker(ck) == k and assert_loadable(ck) == k
    assert pretrain_gpt_moe.main(argv + ["--load", ck])["losses"] == full[k:]


def kill_loop(tmp_path, kills, iters, seed, extra=()):
    """Start, kill -9 at a random moment (1-3 steps on, then 0-150 ms into the step's save or the next step; a
    save every step), check, repeat; then resume to the end: the tracker always names a loadable checkpoint
    and the losses equal the uninterrupted run's."""
    ck, log = str(tmp_path / "ck"), str(tmp_path / "log")
    argv = mock_args(BASE + ["--train-iters", str(iters), "--save-interval", "1"] + list(extra))
    full = pretrain_gpt_moe.main(argv)["losses"]
    rng = random.Random(seed)
    seen = []
    for _ in range(kills):
        start = tracker(ck) if os.path.exists(os.path.join(ck, TRACKER)) else 0
        if start > iters - 20:  # a fast machine runs several steps in the 150 ms: keep the end out of reach
            break
        with open(log, "w") as f:
            p = subprocess.Popen([sys.executable, SCRIPT] + argv + ["--load", ck, "--save", ck], stdout=f,
                                 stderr=subprocess.STDOUT, env=env())
        wait_for(log, rf" iteration +{start + rng.randint(1, 3)}/", p)
        time.sleep(rng.uniform(0.0, 0.15))
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        if os.path.exists(os.path.join(ck, TRACKER)):
            seen.append(assert_loadable(ck))
    assert len(seen) >= max(1, kills // 2) and seen == sorted(seen), seen
    k = tracker(ck)
    assert k < iters
    assert pretrain_gpt_moe.main(argv + ["--load", ck, "--save", ck])["losses"] == full[k:]
    assert leftovers(ck) == []


@pytest.mark.parametrize("save", [[], ["--async-save"]], ids=["sync", "async"])
def test_kill_9_at_random_moments(tmp_path, save):
    kill_loop(tmp_path, kills=3, iters=30, seed=1, extra=save)


@pytest.mark.slow
def test_kill_9_soak(tmp_path):
    kill_loop(tmp_path, kills=10, iters=80, seed=2)


# ---------------------------------------------------------------------------------------------- ranks that disagree


def launch_two(argvs, timeout=60):
    """Two real ranks (as torchrun starts them) with their own flags; (exit status, stderr) per rank."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, SCRIPT] + a, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=env(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=r, LOCAL_RANK=r, WORLD_SIZE=2))
             for r, a in enumerate(argvs)]
    t0 = time.time()
    try:
        out = [p.communicate(timeout=max(timeout - (time.time() - t0), 1)) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, err) for p, (_, err) in zip(procs, out)]


@pytest.mark.parametrize("flag,a,b", [("--global-batch-size", "4", "8"), ("--seed", "1", "2"),
                                      ("--moe-expert-parallel-size", "1", "2")])
def test_ranks_with_different_settings_fail_on_every_rank_within_60_s(tmp_path, flag, a, b):
    argv = mock_args(["--micro-batch-size", "2", "--num-experts", "4", "--train-iters", "50",
                      "--save", str(tmp_path / "ck")])
    results = launch_two([argv + [flag, a], argv + [flag, b]])
    for rank, (code, err) in enumerate(results):
        assert code == 2 and err.count("\n") == 1, (rank, code, err)
        prefix = "[rank 1] " if rank else ""
        assert err.startswith(f"{prefix}error: the ranks were launched with different settings: {flag} "), err
        assert f"rank 0: {a}; rank 1: {b}" in err
    assert not os.path.exists(tmp_path / "ck" / TRACKER)


def _replica_worker(rank):
    """check_replicas on identical replicas, then on replicas whose weights differ: one verdict per case."""
    import torch.distributed as dist

    from megatron.parallel.state import build_groups
    from megatron.training.agreement import check_replicas

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ps = build_groups(rank, 2, 1, torch.device("cpu"))
    verdicts = []
    for seed in (0, rank):
        torch.manual_seed(seed)
        try:
            check_replicas(torch.nn.Linear(8, 8), ps, 5)
            verdicts.append("ok")
        except TrainingFault as e:
            verdicts.append(str(e))
    dist.destroy_process_group()
    return verdicts


def test_diverged_replicas_are_an_error_on_every_rank_at_save(tmp_path):
    (same0, diff0), (same1, diff1) = run_distributed(_replica_worker, 2, str(tmp_path))
    assert same0 == same1 == "ok"
    assert diff0 == diff1 and diff0.startswith("iteration 5: the dense weights of data-parallel replicas differ")


def _tp_replica_worker(rank, which):
    """TP = 2: a TP shard may differ between the ranks; a TP-replicated weight or an expert (replicated over
    TP under the MoE token split) may not."""
    import torch.distributed as dist

    from megatron.model.param_tags import mark_expert, mark_tp_shard
    from megatron.parallel.state import build_groups
    from megatron.training.agreement import check_replicas

    dist.init_process_group("gloo", rank=rank, world_size=2)
    ps = build_groups(rank, 2, 1, torch.device("cpu"), tp_size=2)
    model = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(4), "shard": torch.nn.Linear(4, 4),
                                 "experts": torch.nn.Linear(4, 4)})
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    mark_tp_shard(model["shard"].weight, 0, [torch.arange(0, 4), torch.arange(4, 8)])
    for p in model["experts"].parameters():
        mark_expert(p)
    with torch.no_grad():
        model["shard"].weight.add_(rank)  # shards differ by design
        if which:
            getattr(model[which], "weight").add_(1e-6 * rank)
    try:
        check_replicas(model, ps, 7)
        verdict = "ok"
    except TrainingFault as e:
        verdict = str(e)
    dist.destroy_process_group()
    return verdict


@pytest.mark.parametrize("which,what", [(None, None), ("norm", "TP-replicated weights of tensor-parallel ranks"),
                                        ("experts", "expert weights of their replicas")])
def test_diverged_tp_and_expert_replicas_are_an_error_at_save(tmp_path, which, what):
    v0, v1 = run_distributed(_tp_replica_worker, 2, str(tmp_path), which)
    assert v0 == v1
    assert v0 == "ok" if what is None else v0.startswith(f"iteration 7: the {what} differ")
