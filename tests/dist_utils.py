"""Run a function in N real processes with torch.distributed (gloo), as torchrun would."""
import multiprocessing as mp
import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, out_dir, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    result = fn(rank, *args)
    torch.save(result, os.path.join(out_dir, f"rank_{rank}.pt"))


def run_distributed(fn, world_size: int, out_dir: str, *args, timeout: float = 300):
    """fn(rank, *args) in ``world_size`` processes; returns the list of their return values."""
    os.makedirs(out_dir, exist_ok=True)
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, out_dir, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert all(c == 0 for c in codes), f"distributed run failed: exit codes {codes}"
    return [torch.load(os.path.join(out_dir, f"rank_{r}.pt"), weights_only=False) for r in range(world_size)]
