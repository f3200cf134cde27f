"""The one exception type for the user's mistakes, and the one way a command reports them.

Bad input, a missing file, an impossible option: a command (`mathagent ...`, `python -m mathagent.loop ...`)
runs its work inside `user_errors()`, which turns a `UserError` into a one-line message on stderr and exit code
2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class UserError(Exception):
    """A mistake in what the user gave us (input records, paths, options)."""


def fail(message: str) -> None:
    """`error: MESSAGE` on stderr and exit code 2 (typer's Exit, so a command's cleanup still runs)."""
    import typer

    # Plain text, never wrapped: scripts grep for "FILE:LINE: ...".
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(2)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """User mistakes become one line on stderr and exit code 2; anything else keeps its traceback."""
    try:
        yield
    except UserError as e:
        fail(str(e))
