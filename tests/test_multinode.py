"""Multi-node launch: two torchrun "nodes" on 127.0.0.1 meeting through c10d rendezvous, and the
launch line examples_moe/common.sh builds (node count, node rank, hostfile)."""
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.dist_utils import free_port
from tests.runs import mock_args, train

EXACT = ["--hidden-dropout", "0", "--attention-dropout", "0", "--moe-train-capacity-factor", "8",
         "--moe-eval-capacity-factor", "8", "--use-cpu"]
LOSS = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: ([0-9.E+-]+)")


@pytest.mark.slow
def test_two_nodes_with_expert_parallelism_spanning_them(tmp_path):
    base = EXACT + ["--num-experts", "4", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3"]
    single = train(0, mock_args(base))["losses"]
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs, logs = [], []
    for node in (0, 1):  # one process per "node"; EP 2 puts half the experts on each
        log = open(tmp_path / f"node{node}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
             "--rdzv-id", "two-nodes", os.path.join(ROOT, "pretrain_gpt_moe.py"),
             *mock_args(base + ["--moe-expert-parallel-size", "2"])],
            cwd=str(tmp_path), env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=300) for p in procs]
    for log in logs:
        log.close()
    text = "".join((tmp_path / f"node{n}.log").read_text() for n in (0, 1))
    assert codes == [0, 0], text[-2000:]
    losses = [float(v) for _, v in LOSS.findall(text)]
    assert len(losses) == 3
    for got, want in zip(losses, single):  # the log prints 7 significant digits
        assert abs(got - want) <= 1e-5 * abs(want), (losses, single)


def _launch_line(tmp_path, env):
    out = subprocess.run(["bash", os.path.join(ROOT, "examples_moe", "gpt_350M_moe128.sh")], cwd=str(tmp_path),
                         env=dict(os.environ, TORCHRUN="echo torchrun", **env), capture_output=True, text=True)
    return out.returncode, out.stdout.split(), out.stderr


def test_common_sh_launches_across_nodes_with_c10d(tmp_path):
    code, argv, _ = _launch_line(tmp_path, {"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "head", "MASTER_PORT": "7000"})
    assert code == 0
    line = " ".join(argv[: argv.index(os.path.join(ROOT, "pretrain_gpt_moe.py"))])
    assert line == ("torchrun --nnodes 4 --nproc-per-node 8 --node-rank 3 --rdzv-backend c10d "
                    "--rdzv-endpoint head:7000 --rdzv-id megatron-moe-gpt_350M_moe128")


def test_deepspeed_style_hostfile(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# our cluster\nworker-0 slots=4\nworker-1 slots=4  # second node\n\nworker-2 slots=4\n")
    code, argv, _ = _launch_line(tmp_path, {"HOSTFILE": str(hostfile), "HOSTFILE_SELF": "worker-2"})
    assert code == 0
    assert argv[1:11] == ["--nnodes", "3", "--nproc-per-node", "4", "--node-rank", "2", "--rdzv-backend", "c10d",
                          "--rdzv-endpoint", "worker-0:6000"]
    hostfile.write_text("worker-0 slots=4\nworker-1 slots=2\n")
    code, _, err = _launch_line(tmp_path, {"HOSTFILE": str(hostfile), "HOSTFILE_SELF": "worker-0"})
    assert code == 2 and err.strip().splitlines() == [
        f"error: HOSTFILE {hostfile}: every host needs the same slots (torchrun starts the same number of processes per node)"]
    hostfile.write_text("worker-0 slots=4\n")
    code, _, err = _launch_line(tmp_path, {"HOSTFILE": str(hostfile), "HOSTFILE_SELF": "elsewhere"})
    assert code == 2 and "is not listed; set NODE_RANK" in err
