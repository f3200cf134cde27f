"""The one exception type for the user's mistakes.

Bad input, a missing file, an impossible option: the CLI turns a `UserError` into a one-line message on
stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user gave us (input records, paths, options)."""
