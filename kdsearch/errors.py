"""The exceptions a user can cause.

Everything a user can get wrong (a flag, a file, a dataset) raises ``UserError``; the CLI turns it
into one line on stderr and exit code 2. Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2."""


class ConfigError(UserError):
    """A config field holds a value it may not: ``name`` is the field, ``problem`` what is wrong.

    The field's name is the code's; whoever built the config says it in the user's words (the
    command-line flag, or the key in a config file), through ``kdsearch.config.flag``.
    """

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


class RunFailedError(Exception):
    """A run that could not finish although its input was valid (a diverged loss): one line, exit 1.

    Not a ``UserError``: nothing the user typed was wrong, so it must not exit 2 as if it were.
    """


class DivergedError(RunFailedError):
    """The loss became NaN or infinite: the hyperparameters (usually lr) are unusable."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"training diverged at epoch {epoch}, step {step} (loss {value}); try a lower learning rate")
        self.epoch = epoch
        self.step = step
        self.value = value


def warn(message: str) -> None:
    """One line on stderr for something the user should know that does not stop the run."""
    import sys

    print(f"kdsearch: warning: {message}", file=sys.stderr, flush=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so Optuna closes the running trial (as failed) before we exit."""


def raise_terminated(signum: int, _frame: object) -> None:
    """A SIGTERM handler: unwind like Ctrl-C, so every ``finally`` and Optuna's trial bookkeeping run."""
    raise Terminated(signum)
