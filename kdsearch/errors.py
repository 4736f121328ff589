"""The one exception type a user can cause.

Everything a user can get wrong (a flag, a file, a dataset) raises ``UserError``; the CLI turns it
into one line on stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2."""
