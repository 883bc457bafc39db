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


def run_cli(main) -> None:
    """Run an entry point: a UserError becomes ``error: <message>`` on stderr and exit status 2."""
    import os
    import sys

    try:
        code = main()
    except UserError as e:
        rank = os.environ.get("RANK")
        prefix = f"[rank {rank}] " if rank not in (None, "0") else ""
        print(f"{prefix}error: {e}", file=sys.stderr, flush=True)
        _exit_now_if_distributed(e.exit_code)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)



def _exit_now_if_distributed(code: int) -> None:
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
    if initialized:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
