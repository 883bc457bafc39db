"""User-facing errors: one line that names the flag or file and says what to do."""


class UserError(Exception):
    """A mistake in the user's flags, files or data.

    Entry points catch it, print ``error: <message>`` on one line and exit with status 2.
    """

    exit_code = 2


def check(condition: bool, message: str) -> None:
    """Raise :class:`UserError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise UserError(message)
