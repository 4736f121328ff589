"""Peak memory of a `kdsearch train` run, anonymous and file-backed apart, read from /proc while it runs.

The decoded images and the teacher's outputs are memory-mapped from their caches, so their pages are
file-backed (RssFile: the page cache, shared by workers, dropped under pressure); what grows with a
run's own allocations is anonymous memory (RssAnon). This polls /proc/PID/status of the command and
its children every 0.1 s and reports each one's peak, so a change of data path can be measured:

    python bench/memory.py --label after -- kdsearch train --method kd --epochs 1 ...

Memory is not timing: another job on the machine does not change these numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
FIELDS = ("RssAnon", "RssFile", "VmRSS")


def status_kib(pid: int) -> dict[str, int]:
    """RssAnon, RssFile and VmRSS of one process in KiB (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in FIELDS:
            values[key] = int(rest.split()[0])
    return values


def descendants(pid: int) -> list[int]:
    """The process and every child it started (kdsearch may spawn workers)."""
    found, frontier = [pid], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            continue
        found += [int(c) for c in children]
        frontier += [int(c) for c in children]
    return found


def measure(command: list[str], interval: float = 0.1, stdout: IO[str] | None = None) -> dict[str, float]:
    """Run ``command``; the peak of each field summed over its processes, in MiB, and the wall time.

    Its standard output goes to ``stdout`` (a file the caller reads back), or nowhere."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=stdout if stdout is not None else subprocess.DEVNULL)
    peaks = dict.fromkeys(FIELDS, 0)
    while process.poll() is None:
        total = dict.fromkeys(FIELDS, 0)
        for pid in descendants(process.pid):
            for key, value in status_kib(pid).items():
                total[key] += value
        peaks = {key: max(peaks[key], total[key]) for key in FIELDS}
        time.sleep(interval)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}")
    return {f"peak_{key}_mib": round(value / 1024, 1) for key, value in peaks.items()} | {
        "wall_seconds": round(time.perf_counter() - start, 1)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="The row's name in bench/results/memory.json.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- kdsearch ARGS (run as python -m kdsearch)")
    args = parser.parse_args()
    words = args.command[1:] if args.command[:1] == ["--"] else args.command
    if words[:1] == ["kdsearch"]:
        words = [sys.executable, "-m", "kdsearch", *words[1:]]
    row = {"label": args.label, "command": " ".join(args.command).removeprefix("-- ")} | measure(words)
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    rows = [r for r in rows if r["label"] != args.label] + [row]
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
