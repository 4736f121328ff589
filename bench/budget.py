"""Guarded steps inside one time budget, for bench/gpu.py: a run on a borrowed GPU must end in time and
report every step, whatever fails.

Each step's timeout is its share, by expected seconds, of the time left among the steps still to run
(those whose inputs have not failed), so time a step leaves unused flows to the later ones. No step
outlasts its timeout by more than cli_runner's SIGTERM grace, which RESERVE_SECONDS keeps back: the run
ends inside the budget. A step that fails is recorded with the one line that says why, and a step that
needs its result is marked failed without running.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cli_runner
from cli_runner import Finished

RESERVE_SECONDS = 15.0  # a timed-out step's SIGTERM grace, then the report
MIN_STEP_SECONDS = 3.0  # less than this left for a step: it is not started


def read_json(finished: Finished) -> dict[str, Any]:
    return finished.check().json()


@dataclass(frozen=True)
class Step:
    """One guarded check: a ``command`` (given its timeout, so a study can stop starting trials in time)
    whose output ``read`` turns into the step's result, or an in-process ``action``. ``seconds``: what it
    is expected to take, its weight in the share of the time left; ``groups``: what ``--skip`` names."""

    name: str
    seconds: float
    groups: tuple[str, ...]
    needs: tuple[str, ...] = ()
    command: Callable[[float], list[str]] | None = None
    action: Callable[[float], dict[str, Any]] | None = None
    read: Callable[[Finished], dict[str, Any]] = read_json
    env: Mapping[str, str] = field(default_factory=dict)


def time_share(left: float, seconds: float, later: Iterable[float]) -> float:
    """A step's timeout: its share, by expected seconds, of the time left among the steps still to run."""
    return max(0.0, left) * seconds / (seconds + sum(later))


def plan_lines(steps: Sequence[Step], budget: float) -> list[str]:
    """The dry run: each step's timeout if every earlier one took all of its own, and its command."""
    left, lines = budget - RESERVE_SECONDS, []
    for i, step in enumerate(steps):
        share = time_share(left, step.seconds, [s.seconds for s in steps[i + 1 :]])
        left -= share
        shown = cli_runner.shown(step.command(share)) if step.command else "(in-process)"
        lines.append(f"{step.name:<18} {share:5.0f} s  {shown}")
    return lines


def execute(step: Step, timeout: float, env: Mapping[str, str]) -> dict[str, Any]:
    """Run one step under its timeout; never raise: a failure is recorded with the one line that says why."""
    record: dict[str, Any] = {"name": step.name, "status": "ok", "timeout": round(timeout, 1), "error": None}
    start = time.perf_counter()
    try:
        if step.action is not None:
            record["result"] = step.action(timeout)
        else:
            assert step.command is not None
            finished = cli_runner.run(step.command(timeout), {**env, **step.env}, timeout)
            record.update(command=finished.command, returncode=finished.returncode)
            if finished.timed_out or finished.returncode != 0:
                record["stderr_tail"] = finished.stderr[-3000:]  # the whole story, for a run that is hard to repeat
            record["result"] = step.read(finished)
    except Exception as exc:  # noqa: BLE001 - one step's failure, whatever it is, must not stop the others
        record["status"] = "failed"
        record["error"] = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def run_steps(
    steps: Sequence[Step], wanted: Collection[str], budget: float, env: Mapping[str, str], results: dict[str, Any]
) -> list[dict[str, Any]]:
    """Every step in order inside ``budget`` seconds from now, one record each; the results of those that
    succeed go into ``results``."""
    started = time.perf_counter()
    deadline = started + budget - RESERVE_SECONDS
    to_run = [s for s in steps if s.name in wanted]
    names = [s.name for s in to_run]
    records: list[dict[str, Any]] = []
    for step in steps:
        unrun = {"name": step.name, "status": "failed", "seconds": 0.0, "timeout": 0.0}
        if step.name not in wanted:
            records.append(unrun | {"status": "skipped", "error": "not asked for (--skip/--no-install)"})
            continue
        if missing := [n for n in step.needs if n not in results]:
            records.append(unrun | {"error": f"not run: needs {', '.join(missing)}"})
            continue
        failed = {r["name"] for r in records if r["status"] == "failed"}
        later = [s.seconds for s in to_run[names.index(step.name) + 1 :] if not failed & set(s.needs)]
        timeout = time_share(deadline - time.perf_counter(), step.seconds, later)
        if timeout < MIN_STEP_SECONDS:
            records.append(unrun | {"error": "not run: budget spent"})
            continue
        print(f"[{time.perf_counter() - started:4.0f} s] {step.name} (timeout {timeout:.0f} s)", flush=True)
        records.append(execute(step, timeout, env))
        if records[-1]["status"] == "ok":
            results[step.name] = records[-1]["result"]
    return records


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
    """One row per step: status, seconds, and for a step that did not run well, why."""
    width = max(len(r["name"]) for r in records)
    rows = [f"{r['name']:<{width}}  {r['status']:<7}  {r['seconds']:7.1f}  {r.get('error') or ''}" for r in records]
    return "\n".join(row.rstrip() for row in rows)
