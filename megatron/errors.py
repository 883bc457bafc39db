"""User-facing errors: one line that names the flag or file and says what to do."""


class UserError(Exception):
    """A mistake in the user's flags, files or data.

    Entry points catch it, print ``error: <message>`` on one line and exit with status 2.
    """

    exit_code = 2


class TrainingFault(UserError):
    """Training itself went wrong (a non-finite loss, too many skipped steps, diverged replicas).

    Reported like a UserError (one line) but with exit status 3, so a job scheduler can tell a
    diverged run from a bad command line; the last good checkpoint is kept.
    """

    exit_code = 3


def check(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)


def check_writable_dir(flag: str, path: str, todo: str) -> None:
    """``flag path`` names a directory that exists or can be created and that accepts a file (a test write,
    removed); otherwise one line naming the flag, the path and why, then ``todo``. A file there is kept."""
    import os

    if os.path.lexists(path) and not os.path.isdir(path):
        what = "a file, not a directory" if os.path.isfile(path) else "not a directory"
        raise UserError(f"{flag} {path}: this is {what}; {todo}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create the directory ({e.strerror or e}); {todo}") from None
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
    except OSError as e:
        raise UserError(f"{flag} {path}: a test write failed ({e.strerror or e}); {todo}") from None
    finally:
        try:
            os.remove(probe)
        except OSError:
            pass


def run_cli(main) -> None:
    """Run an entry point: a UserError becomes ``error: <message>`` on stderr and exit status 2 (3 for a
    TrainingFault); a distributed run that lost one of its ranks (killed, crashed, or gone after its own
    error) becomes one line naming this rank and what it was doing, exit status 1, on every surviving rank."""
    import os
    import sys

    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
    try:
        code = main()
    except UserError as e:
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        _exit_now_if_distributed(e.exit_code)
        sys.exit(e.exit_code)
    except Exception as e:
        cause = lost_peer(e)
        if cause is None:
            raise
        print(f"{prefix}error: {lost_peer_message(rank or '0', e.__traceback__, cause)}", file=sys.stderr, flush=True)
        _exit_now_if_distributed(LOST_PEER_EXIT, always=True)
        sys.exit(LOST_PEER_EXIT)
    sys.exit(code if isinstance(code, int) else 0)


LOST_PEER_EXIT = 1  # what torch's launcher reports for a failed worker; not a bad input (2) nor a fault of training (3)

# What gloo, NCCL and the TCP store say when the process at the other end of a connection is gone.
_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe", "connection refused",
              "socket timeout", "timed out", "timeout", "read error", "write error", "end of file",
              "nccl communicator was aborted", "remote process exited", "connection was likely closed")


_TIMEOUTS = ("socket timeout", "timed out", "timeout")


def lost_peer(exc: BaseException) -> str | None:
    """The short cause when ``exc`` says a collective or the rendezvous store lost another rank (else None):
    a network or store error of torch.distributed, or a backend error (gloo, NCCL, c10d) whose text says the
    other end of a connection is gone or did not answer. Other errors keep their traceback."""
    try:
        import torch.distributed as dist
    except Exception:  # torch not importable: no collective can have failed
        return None
    network = tuple(getattr(dist, n) for n in ("DistNetworkError", "DistStoreError") if hasattr(dist, n))
    backend = getattr(dist, "DistError", RuntimeError)
    chain, e = [], exc
    while e is not None and len(chain) < 8:
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in chain:
        low = str(e).lower()
        hit = next((k for k in _PEER_GONE if k in low), None)
        from_backend = isinstance(e, backend) or (isinstance(e, RuntimeError)
                                                  and any(w in low for w in ("gloo", "nccl", "c10d")))
        if isinstance(e, network) or (hit and from_backend):
            if hit is None:
                return type(e).__name__
            return "Timed out" if hit in _TIMEOUTS else hit.capitalize()
    return None


# The trainer's methods (innermost first wins) and what a user calls that phase.
_PHASES = {"save": "a checkpoint save", "save_checkpoint": "a checkpoint save", "finish_pending_save": "a checkpoint save",
           "poll_pending_save": "a checkpoint save", "evaluate": "evaluation", "load": "the checkpoint load",
           "load_checkpoint": "the checkpoint load", "step": "a training step", "optimizer_step": "a training step",
           "forward_backward": "a training step", "train_step": "a training step", "should_exit": "a training step",
           "setup": "start-up", "initialize": "start-up", "train": "training"}


def lost_peer_message(rank, tb, cause: str) -> str:
    """``rank R: lost contact with another rank during <phase> (a rank died or was killed: <cause>); ...``."""
    phase, iteration = "the run", None
    frames = []
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):  # innermost first
        name, path = frame.f_code.co_name, frame.f_code.co_filename.replace("\\", "/")
        if "/megatron/" not in path or name not in _PHASES:
            continue
        if phase == "the run":
            phase = _PHASES[name]
        owner = frame.f_locals.get("self")
        if type(owner).__name__ == "Trainer" and isinstance(getattr(owner, "iteration", None), int):
            if phase in ("a training step", "training"):
                iteration = owner.iteration + 1  # the step in progress
            elif phase in ("a checkpoint save", "evaluation"):
                iteration = owner.iteration
            break
    where = f"{phase} at iteration {iteration}" if iteration is not None else phase
    why = "another rank did not answer in time: it died, hangs or was killed" if cause == "Timed out" else \
        "a rank died or was killed"
    return f"rank {rank}: lost contact with another rank during {where} ({why}: {cause}); see the other ranks' logs " \
           f"for the cause"


def _exit_now_if_distributed(code: int, always: bool = False) -> None:
    """Leave at once from a failed distributed run: the interpreter's normal shutdown would tear down a
    process group whose peer may be gone or mid-collective, which aborts the process (SIGABRT,
    "terminate called ...") instead of exiting with ``code``."""
    import os
    import sys

    try:
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
    except Exception:  # torch not importable: nothing to tear down
        initialized = False
    if initialized or always:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
