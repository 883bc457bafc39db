"""Issue 28, round 3: output directories that cannot be written (``--tensorboard-dir``, ``--data-cache-path``) are
one line before the first step, and a distributed run that loses a rank ends with one line on every surviving rank
(real processes on gloo, launched as torchrun does; a rank killed by SIGKILL, or by the kernel's SIGXFSZ while
writing its part of a checkpoint)."""
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from megatron.checkpoint.layout import TRACKER
from tests.conftest import ROOT
from tests.dist_utils import free_port
from tests.runs import mock_args
from tests.test_faults import data_args, make_data, run_main

SCRIPT = os.path.join(ROOT, "pretrain_gpt_moe.py")
BASE = ["--micro-batch-size", "2", "--global-batch-size", "4", "--num-experts", "4"]


# ---------------------------------------------------------------------------------------------- output directories


def test_tensorboard_dir_that_is_a_file_is_one_line_before_training(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    ck = tmp_path / "ck"
    for where, needle in ((notes, f"--tensorboard-dir {notes}: this is a file, not a directory"),
                          (notes / "tb", f"--tensorboard-dir {notes / 'tb'}: cannot create the directory")):
        code, message = run_main(mock_args(BASE + ["--train-iters", "2", "--save", str(ck), "--tensorboard-dir",
                                                   str(where)]))
        assert code == 2 and message.startswith(needle) and "\n" not in message, message
        assert "give a directory for the event files" in message
    assert notes.read_text() == "mine"
    assert not os.path.exists(ck / TRACKER)  # refused before the first step: nothing trained, nothing saved


def test_data_cache_path_that_is_a_file_is_one_line(tmp_path):
    """Was silently ignored: the indices went beside the data and the run exited 0."""
    prefix = make_data(tmp_path)
    notes = tmp_path / "cache.txt"
    notes.write_text("mine")
    for where, needle in ((notes, "this is a file, not a directory"), (notes / "sub", "cannot create the directory")):
        code, message = run_main(data_args(tmp_path, None, prefix) + ["--data-cache-path", str(where)])
        assert code == 2 and message.startswith(f"--data-cache-path {where}: {needle}") and "\n" not in message, message
        assert "leave the flag out to cache beside the data" in message
    assert notes.read_text() == "mine"
    assert not os.path.exists(tmp_path / "data_ck" / TRACKER)


READ_ONLY_CASES = r"""
import json, os, sys
sys.path.insert(0, ROOT)
from tests.test_faults import data_args, run_main
from tests.runs import mock_args
ro, rw = sys.argv[1], sys.argv[2]
prefix = os.path.join(ro, "d_text_document")
out = {}
out["cache"] = run_main(data_args(__import__("pathlib").Path(rw), None, prefix) + ["--data-cache-path", ro])
out["tensorboard"] = run_main(mock_args(["--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "1",
                                         "--tensorboard-dir", os.path.join(ro, "tb")]))
out["beside"] = run_main(data_args(__import__("pathlib").Path(rw), None, prefix)[:-2])  # no --data-cache-path
print("RESULT " + json.dumps(out))
"""


def test_read_only_cache_and_tensorboard_dirs_are_one_line_and_the_default_cache_warns(tmp_path):
    """A read-only tmpfs in a private mount namespace (the tests run as root, which ignores permissions): an explicit
    ``--data-cache-path`` or ``--tensorboard-dir`` there is one line; the default cache beside read-only data is the
    documented fallback, indices in memory, with one warning (was silent)."""
    ro, rw = tmp_path / "ro", tmp_path / "rw"
    ro.mkdir()
    rw.mkdir()
    src = make_data(tmp_path)
    script = tmp_path / "cases.py"
    script.write_text(f"ROOT = {ROOT!r}\n" + READ_ONLY_CASES)
    shell = (f"mount -t tmpfs tmpfs {ro} && cp {src}.bin {src}.idx {ro}/ && mount -o remount,ro {ro} && "
             f"{sys.executable} {script} {ro} {rw}")
    try:
        r = subprocess.run(["unshare", "-m", "sh", "-c", shell], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"))
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if "RESULT " not in r.stdout and ("unshare" in r.stderr or "mount" in r.stderr):
        pytest.skip(f"cannot mount a read-only tmpfs here: {r.stderr.strip()[-300:]}")
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    code, message = out["cache"]
    assert code == 2 and message.startswith(f"--data-cache-path {ro}: a test write failed (Read-only file system)"), \
        message
    code, message = out["tensorboard"]
    assert code == 2 and message.startswith(f"--tensorboard-dir {ro}/tb: cannot create the directory (Read-only file "
                                            f"system)"), message
    assert out["beside"] == [0, ""], out["beside"]
    warnings = [ln for ln in r.stderr.splitlines() if "dataset index cache" in ln]
    assert warnings == [f"WARNING: cannot write the dataset index cache in {ro}; the indices are kept in memory and "
                        f"rebuilt at every start (pass --data-cache-path DIR, a writable directory, to cache them)"], \
        r.stderr[-3000:]


# ---------------------------------------------------------------------------------------------- a rank that dies

# The rank runs the entry point unchanged, except that SIGXFSZ has its default action (Python ignores it at start):
# a write past `ulimit -f` kills the process, as it would any program that does not ignore the signal.
KILLABLE = ("import runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_DFL); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
LOST = re.compile(r"^(\[rank (?P<p>\d)\] )?error: rank (?P<r>\d): lost contact with another rank during (?P<phase>.+) "
                  r"at iteration (?P<it>\d+) \(a rank died or was killed: (?P<cause>[^)]+)\); see the other ranks' "
                  r"logs for the cause\n$")


def launch(argv, tmp_path, limit_rank=None, killable=True):
    port = free_port()

    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))

    procs, logs = [], []
    for r in range(2):
        logs.append(open(tmp_path / f"rank{r}.out", "w"))
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2")
        procs.append(subprocess.Popen([sys.executable] + (["-c", KILLABLE] if killable else []) + [SCRIPT] + argv,
                                      stdout=logs[-1],
                                      stderr=subprocess.PIPE, text=True, env=env,
                                      preexec_fn=limited if r == limit_rank else None))
    return procs, logs


def finish(procs, logs, timeout=90):
    t0 = time.time()
    try:
        errs = [p.communicate(timeout=max(timeout - (time.time() - t0), 1))[1] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    return [(p.returncode, e) for p, e in zip(procs, errs)], time.time() - t0


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_training_ends_the_other_with_one_line(tmp_path, victim):
    """Was a 40-line gloo traceback (``RuntimeError: ... Connection reset by peer``) on the surviving rank."""
    procs, logs = launch(mock_args(BASE + ["--train-iters", "100000"]), tmp_path)
    t0 = time.time()
    while not re.search(r"iteration +3/", open(tmp_path / "rank0.out").read()):
        assert time.time() - t0 < 120 and all(p.poll() is None for p in procs), open(tmp_path / "rank0.out").read()
        time.sleep(0.2)
    procs[victim].send_signal(signal.SIGKILL)
    results, seconds = finish(procs, logs)
    assert results[victim][0] == -signal.SIGKILL
    survivor = 1 - victim
    code, err = results[survivor]
    m = LOST.match(err)
    assert code == 1 and m, (code, err[-3000:])
    # the collective that failed: in the step, or between steps (the log line's reductions, the exit check)
    assert m["r"] == str(survivor) and (m["p"] or "0") == str(survivor) and m["phase"] in ("a training step",
                                                                                          "training"), err
    assert int(m["it"]) >= 3 and seconds < 60


def test_a_rank_killed_while_saving_ends_the_other_with_one_line(tmp_path):
    """Rank 1 is killed by SIGXFSZ writing its shard (its ``ulimit -f`` is below the file; rank 0 checked only its
    own at start): rank 0 says it lost contact during the save; the tracker names no checkpoint."""
    ck = tmp_path / "ck"
    procs, logs = launch(mock_args(BASE + ["--train-iters", "4", "--save-interval", "2", "--save", str(ck)]), tmp_path,
                         limit_rank=1)
    results, _ = finish(procs, logs)
    assert results[1][0] == -signal.SIGXFSZ, results[1]
    code, err = results[0]
    m = LOST.match(err)
    assert code == 1 and m and m["p"] is None and m["r"] == "0", (code, err[-3000:])
    assert m["phase"] == "a checkpoint save" and m["it"] == "2", err
    assert not os.path.exists(ck / TRACKER)
    shutil.rmtree(ck, ignore_errors=True)


@pytest.mark.parametrize("fmt", ["torch_dist", "torch"])
def test_a_save_that_fails_on_one_rank_is_one_line_on_both(tmp_path, fmt):
    """Rank 1 alone under a small ``ulimit -f`` (Python ignores SIGXFSZ, so its write fails with EFBIG): every rank
    prints the same one line naming the file and the rank, exit 2; no tracker. With the full-tensor format rank 1
    writes its own experts (``--moe-expert-parallel-size 2``)."""
    ck = tmp_path / "ck"
    extra = ["--ckpt-format", fmt] + (["--moe-expert-parallel-size", "2"] if fmt == "torch" else [])
    procs, logs = launch(mock_args(BASE + ["--train-iters", "4", "--save-interval", "2", "--save", str(ck)] + extra),
                         tmp_path, limit_rank=1, killable=False)
    results, _ = finish(procs, logs)
    for rank, (code, err) in enumerate(results):
        assert code == 2 and err.count("\n") == 1, (rank, code, err[-3000:])
        assert err.startswith(("[rank 1] " if rank else "") + "error: --save: writing "), err
        assert "File too large" in err or "unexpected pos" in err, err
        assert "the previous checkpoint is intact" in err
    assert not os.path.exists(ck / TRACKER)


def test_only_errors_of_a_lost_peer_are_turned_into_the_line():
    """Other errors keep their traceback: a lost peer is a network / store error of torch.distributed, or a
    backend error whose text says the other end is gone."""
    import torch.distributed as dist

    from megatron.errors import lost_peer

    assert lost_peer(RuntimeError("CUDA out of memory")) is None
    assert lost_peer(ValueError("Connection reset by peer")) is None
    assert lost_peer(RuntimeError("gloo: invalid tensor size")) is None
    assert lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: Connection reset by "
                                  "peer")) == "Connection reset by peer"
    assert lost_peer(dist.DistBackendError("NCCL communicator was aborted on rank 1")) == \
        "Nccl communicator was aborted"
    assert lost_peer(dist.DistNetworkError("Socket Timeout")) == "Timed out"
    try:
        try:
            raise dist.DistStoreError("wait timeout after 300000ms")
        except Exception as e:
            raise KeyError("x") from e
    except KeyError as e:
        assert lost_peer(e) == "Timed out"
