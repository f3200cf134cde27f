"""The one exception type for the user's mistakes, and the one way a command reports them.

Bad input, a missing file, an impossible option: a command (`mathagent ...`, `python -m mathagent.loop ...`)
runs its work inside `user_errors()`, which turns a `UserError` into a one-line message on stderr and exit code
2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator


class UserError(Exception):
    """A mistake in what the user gave us (input records, paths, options).

    `options`: the options the message is about, named in it as the code names them (a config's field names,
    "learning_rate"); only the command knows their flags ("--lr"), and writes each flag in its option's place
    (`with_flags`)."""

    def __init__(self, message: str, *, options: tuple[str, ...] = ()):
        super().__init__(message)
        self.options = options


def fail(message: str) -> None:
    """`error: MESSAGE` on stderr and exit code 2 (typer's Exit, so a command's cleanup still runs)."""
    import typer

    # Plain text, never wrapped: scripts grep for "FILE:LINE: ...".
    sys.stderr.write(f"error: {message}\n")
    raise typer.Exit(2)


def with_flags(error: UserError, flags: dict[str, str]) -> str:
    """The message of a `UserError`, each option it is about written as its flag: `flags[option]`, or "--" and
    the option's name with dashes."""
    message = str(error)
    for option in error.options:
        flag = flags.get(option, "--" + option.replace("_", "-"))
        message = re.sub(rf"(?<![\w/.~-]){re.escape(option)}(?![\w/.-])", flag, message, count=1)
    return message


@contextlib.contextmanager
def user_errors(flags: dict[str, str] | None = None) -> Iterator[None]:
    """User mistakes become one line on stderr and exit code 2, their options written as the command's flags
    (`flags`: those that are not "--" and the option's name); anything else keeps its traceback."""
    try:
        yield
    except UserError as e:
        fail(with_flags(e, flags or {}))
