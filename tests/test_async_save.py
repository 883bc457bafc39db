"""--async-save: shards written by a background thread while training goes on. The run's numbers do not
change, the checkpoint resumes exactly, and a failed write (the file-size limit, as a full disk would)
stops the run at the next step with one line, leaving the previous checkpoint named. Real gloo ranks,
real files; kill -9 during async saves is in test_reliability's kill loop."""
import os
import re
import resource
import signal
import subprocess
import sys
import time

import pytest

import pretrain_gpt_moe
from megatron.checkpoint.layout import TRACKER
from tests.conftest import ROOT
from tests.dist_utils import run_distributed
from tests.runs import mock_args, train

BASE = ["--micro-batch-size", "1", "--global-batch-size", "4", "--num-experts", "4", "--hidden-dropout", "0",
        "--attention-dropout", "0", "--use-cpu"]


def test_async_save_changes_nothing_and_resumes_exactly_at_dp2_with_zero(tmp_path):
    ck = str(tmp_path / "ck")
    argv = mock_args(BASE + ["--train-iters", "6", "--use-distributed-optimizer", "--moe-expert-parallel-size", "2"])
    whole = run_distributed(train, 2, str(tmp_path / "a"), argv)[0]["losses"]
    first = run_distributed(train, 2, str(tmp_path / "b"), argv + ["--save", ck, "--save-interval", "1",
                                                                    "--async-save", "--exit-interval", "4"])
    assert first[0]["losses"] == whole[:4]  # saving in the background does not touch the step
    assert open(os.path.join(ck, TRACKER)).read() == "4"  # the exit waited for the last save
    assert sorted(f for f in os.listdir(ck) if f.startswith(".")) == []  # every save was published
    resumed = run_distributed(train, 2, str(tmp_path / "c"), argv + ["--load", ck])
    assert resumed[0]["losses"] == whole[4:]


@pytest.mark.parametrize("save", [["--async-save"], [], ["--ckpt-format", "torch"]], ids=["async", "sync", "full-tensor"])
def test_a_save_that_fails_stops_the_run_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, save):
    """The file-size limit of the running process is cut (prlimit) after two steps, as a disk filling up would:
    the save in flight fails (a background one is reported at the next step), the run stops with one line,
    and the tracker keeps naming a complete checkpoint."""
    ck, log = str(tmp_path / "ck"), str(tmp_path / "log")
    argv = mock_args(BASE + ["--train-iters", "200", "--save", ck, "--save-interval", "1"] + save)

    def ignore_sigxfsz():  # a write past the limit then fails with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    with open(log, "w") as out, open(str(tmp_path / "err"), "w") as err:
        p = subprocess.Popen([sys.executable, os.path.join(ROOT, "pretrain_gpt_moe.py")] + argv, stdout=out,
                             stderr=err, env=env, preexec_fn=ignore_sigxfsz)
        t0 = time.time()
        while " iteration        2/" not in open(log).read() or not os.path.exists(os.path.join(ck, TRACKER)):
            assert p.poll() is None and time.time() - t0 < 240, open(log).read()[-2000:]
            time.sleep(0.05)
        limit = 256 * 1024  # above common.pt and the RNG files, below a shard (about 1.6 MB)
        resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (limit, limit))
        assert p.wait(timeout=240) == 2
    stderr = open(str(tmp_path / "err")).read()
    assert stderr.count("\n") == 1, stderr
    last = int(re.findall(r" iteration +(\d+)/", open(log).read())[-1])
    m = re.search(r"(--async-save: the checkpoint of iteration (\d+) was not saved: )?--save: writing "
                  r"(the shards into )?\S+ failed "
                  r"\(.*\); the previous checkpoint is intact", stderr)
    assert m and bool(m.group(1)) == ("--async-save" in save), stderr
    failed = int(m.group(2)) if m.group(2) else last
    assert last <= failed + 1  # reported at the next step (or at the next save, which waits for it)
    kept = int(open(os.path.join(ck, TRACKER)).read())
    assert 1 <= kept < failed  # the tracker names a complete, earlier checkpoint, which loads
    resumed = pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", str(kept + 1), "--load", ck]))
    assert resumed["iteration"] == kept + 1


def test_async_save_flag_needs_the_sharded_format():
    status = None
    try:
        pretrain_gpt_moe.main(mock_args(BASE + ["--train-iters", "1", "--async-save", "--ckpt-format", "torch"]))
    except Exception as e:  # noqa: BLE001
        status = str(e)
    assert status and "--async-save needs --ckpt-format torch_dist" in status and "\n" not in status
