"""The one way the bench scripts run a command line: ``python -m kdsearch ARGS --json`` (or pytest, or pip).

Each script measures kdsearch as a user runs it, so each needs the same few things: the command shown as
the user would type it (on stderr, and in the results), its JSON read back, a failure that says why in
one line, and, on the GPU machine, a timeout that also stops the command's worker processes.

Output goes to temporary files rather than pipes: several workers can run at once (a study confirmed by
two processes, the soak's four) and a pipe that nobody reads while another worker is waited for would
block its writer.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

TERM_GRACE_SECONDS = 10.0  # after SIGTERM, kdsearch closes its running trials as failed, then exits


def kdsearch_command(args: Sequence[str], python: str = sys.executable, as_json: bool = True) -> list[str]:
    """``python -m kdsearch ARGS --json``: the working tree's kdsearch, no console script needed."""
    return [python, "-m", "kdsearch", *args, *(["--json"] if as_json else [])]


def shown(command: Sequence[str]) -> str:
    """The command as a user types it: ``kdsearch ...`` for ``python -m kdsearch ...``."""
    words = list(command)
    if words[1:3] == ["-m", "kdsearch"]:
        words = ["kdsearch", *words[3:]]
    return shlex.join(words)


def last_line(text: str | None) -> str:
    """The last non-empty line of a stream: where a failing command says why."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


class CommandError(RuntimeError):
    """A command that exited non-zero or ran out of time; the message is the reason, in one line."""


@dataclass
class Finished:
    """A command that has exited (or was stopped at its timeout), with everything it printed."""

    command: list[str]
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timeout: float | None
    timed_out: bool

    def check(self, ok_returncodes: Sequence[int] = (0,)) -> Finished:
        """Itself, or CommandError with the last line of stderr (a traceback's last line names the error)."""
        if self.timed_out:
            raise CommandError(f"timed out after {self.timeout:.0f} s; stderr: {last_line(self.stderr)}")
        if self.returncode not in ok_returncodes:
            raise CommandError(last_line(self.stderr) or f"exit code {self.returncode}")
        return self

    def json(self) -> dict[str, Any]:
        """The object that ``--json`` prints: the last line of stdout that parses as one."""
        for line in reversed(self.stdout.splitlines()):
            if line.strip().startswith("{"):
                try:
                    value = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict):
                    return value
        raise ValueError(f"no JSON object on the stdout of {shown(self.command)}")


def _read_and_close(stream: IO[str]) -> str:
    stream.seek(0)
    text = stream.read()
    stream.close()
    return text


class Running:
    """A started command. ``own_group``: it leads a process group of its own, so a timeout can stop the
    workers it started too (kdsearch's ``--n-jobs`` processes); otherwise Ctrl-C reaches it as usual."""

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None, own_group: bool = False) -> None:
        self.command = list(command)
        self.own_group = own_group
        self._out: IO[str] = tempfile.TemporaryFile("w+")
        self._err: IO[str] = tempfile.TemporaryFile("w+")
        self._start = time.perf_counter()
        self.process = subprocess.Popen(
            self.command, env=None if env is None else dict(env), stdout=self._out, stderr=self._err, text=True,
            start_new_session=own_group,
        )  # fmt: skip

    def kill(self) -> None:
        """SIGKILL the command itself, as a crash would (the soak's fault)."""
        self.process.kill()

    def _signal(self, sig: int) -> None:
        """Signal the command, and its whole group if it leads one."""
        try:
            if self.own_group:
                os.killpg(self.process.pid, sig)
            else:
                self.process.send_signal(sig)
        except (ProcessLookupError, PermissionError):
            pass

    def wait(self, timeout: float | None = None) -> Finished:
        """Wait for the exit; past ``timeout`` seconds SIGTERM it (and its group), SIGKILL after a grace period."""
        timed_out = False
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            self._signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=TERM_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.process.wait()
        stdout, stderr = (_read_and_close(stream) for stream in (self._out, self._err))
        seconds = time.perf_counter() - self._start
        return Finished(self.command, self.process.returncode, stdout, stderr, seconds, timeout, timed_out)


def start(command: Sequence[str], env: Mapping[str, str] | None = None, own_group: bool = False) -> Running:
    """Start ``command`` after showing it on stderr (``$ kdsearch ...``)."""
    print(f"$ {shown(command)}", file=sys.stderr, flush=True)
    return Running(command, env, own_group)


def run(command: Sequence[str], env: Mapping[str, str] | None = None, timeout: float | None = None) -> Finished:
    """Run ``command`` to its end, or to ``timeout`` seconds, with its workers stopped then too."""
    return start(command, env, own_group=timeout is not None).wait(timeout)


def kdsearch(
    *args: str, env: Mapping[str, str] | None = None, timeout: float | None = None, python: str = sys.executable
) -> tuple[dict[str, Any], str]:
    """``kdsearch ARGS --json``: its JSON object and the command as shown; CommandError if it fails."""
    finished = run(kdsearch_command(args, python), env, timeout).check()
    return finished.json(), shown(finished.command)
