"""The exceptions a user can cause.

Everything a user can get wrong (a flag, a file, a dataset) raises ``UserError``; the CLI turns it
into one line on stderr and exit code 2. Anything else is a bug and keeps its traceback.

A wrong value raises ``ConfigError``, which names the *field* (``val_size``), never the way the
user wrote it: the layers below the command line do not know whether a value came from a flag or
a file. Whoever read the value says it the user's way: the command line as ``--val-size``, the
config-file reader as ``data.val_size`` (``ConfigError.say``).
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# A field mentioned inside a message, written ``{name}``: said the user's way with the field itself.
MENTION = re.compile(r"\{([a-z][a-z0-9_]*)\}")

# A message quotes at most about this many characters of a value the user gave.
QUOTE_LIMIT = 80


def shown(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to about ``limit`` characters, whatever its size: what a message may quote.

    A value read from a file or a flag can be megabytes long (or, through YAML aliases, billions of
    items); quoted whole it would make a one-line error gigabytes long.
    """
    shortened = reprlib.Repr()
    shortened.maxstring = shortened.maxother = limit
    shortened.maxlist = shortened.maxtuple = shortened.maxdict = shortened.maxset = 6
    shortened.maxlevel = 3
    text = shortened.repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if isinstance(value, str) and len(value) > limit:
        text += f" ({len(value):,} characters)"
    return text


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2."""


def plain(name: str) -> str:
    """A field said as its name: how messages read where no command line or file is involved."""
    return name


def speak(text: str, words: Callable[[str], str]) -> str:
    """``text`` with every ``{field}`` it mentions said through ``words`` (a flag, a file key)."""
    return MENTION.sub(lambda match: words(match.group(1)), text)


class ConfigError(UserError):
    """A config field holds a value it may not: ``name`` is the field, ``problem`` what is wrong.

    ``problem`` may mention other fields as ``{field}`` ("or {timeout} must be given"); ``say``
    names them all in the user's words. ``str()`` gives the plain field names.
    """

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        self.problem = problem
        super().__init__(self.say(plain))

    def say(self, words: Callable[[str], str]) -> str:
        """The message with each field said by ``words``: ``--val-size …`` or ``data.val_size …``."""
        return f"{words(self.name)} {speak(self.problem, words)}"

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str]]:
        # Worker processes send their errors to the parent, which says them as flags.
        return (type(self), (self.name, self.problem))


@contextmanager
def about(name: str) -> Iterator[None]:
    """Make a ``UserError`` a check raised about ``name`` (naming it first) a ``ConfigError`` of that field.

    For checks that name what they are given (``fsutil.refuse_overwriting_inputs`` names an output by
    its key): given the field, their error is the field's, and the command line says it as a flag.
    """
    try:
        yield
    except ConfigError:
        raise
    except UserError as exc:
        message = str(exc)
        if not message.startswith(f"{name} "):
            raise
        raise ConfigError(name, message.removeprefix(f"{name} ")) from None


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


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
    """``warn``, once per process: for what every trial of a search would otherwise repeat."""
    if message not in _WARNED:
        _WARNED.add(message)
        warn(message)


def warn(message: str) -> None:
    """One line on stderr for something the user should know that does not stop the run."""
    import sys

    print(f"kdsearch: warning: {message}", file=sys.stderr, flush=True)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so Optuna closes the running trial (as failed) before we exit."""


class Interrupted(Exception):  # noqa: N818 - what the user did, not an error of the program
    """Ctrl-C or SIGTERM inside a command, carried past click (whose own handler prints an empty line)."""

    def __init__(self, terminated: bool) -> None:
        super().__init__("terminated" if terminated else "interrupted")
        self.terminated = terminated


def raise_terminated(signum: int, _frame: object) -> None:
    """A SIGTERM handler: unwind like Ctrl-C, so every ``finally`` and Optuna's trial bookkeeping run."""
    raise Terminated(signum)
