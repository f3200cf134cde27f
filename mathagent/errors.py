"""The one exception type for the user's mistakes.

Bad input, a missing file, an impossible option: the CLI turns a `UserError` into a one-line message on
stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user gave us (input records, paths, options).

    `options`: the options the message is about, named in it as the code names them (a config's field names,
    "learning_rate"); only the CLI knows their flags ("--lr"), and writes each flag in its option's place."""

    def __init__(self, message: str, *, options: tuple[str, ...] = ()):
        super().__init__(message)
        self.options = options
