"""GPU checks of issue #14 in one run of at most ``--budget`` seconds (`make bench-gpu`); writes bench/results/gpu.json.

On a CUDA machine, in this order:

(a) ``pytest -q tests -k "device or precision or cuda"`` with ``KDSEARCH_TEST_DEVICE=cuda``: pass/fail counts;
(b) kd trained on the same CIFAR-10 slice, same seed, on the CPU and on the GPU: both test accuracies
    (the last digits may differ, whole points should not);
(c) the steady (second) epoch of kd on 50,000 32x32 images (the slice, tiled) in fp32, bf16 and fp16;
(d) a 50-trial, 10-epoch kd study with ``--n-jobs 1`` and ``--n-jobs 4`` on the one GPU: both wall times;
(e) the checkpoint saved on the GPU in (b), evaluated on the CPU: the same test accuracy.

Each step is guarded and gets its share of the time left as its timeout (bench/budget.py): a failure is
recorded with the one line that says why and the run goes on; the exit code is 1 if any step failed.
Without a GPU the script says so in one line and exits 0.

The machine reaches no registry: `make bench-gpu-prepare` (bench/gpu_bundle.py) bundles the wheels it lacks
and the CIFAR-10 slice; the first step installs those into a folder put after the working tree on the steps'
PYTHONPATH, so ``python -m kdsearch`` is the working tree with the machine's torch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import budget
import gpu_bundle
from budget import Step
from cli_runner import CommandError, Finished, kdsearch_command, last_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "gpu.json"
SCHEMA = "kdsearch-bench-gpu/1"
TEST_FILTER = "device or precision or cuda"
STUDY_MARGIN_SECONDS = 30.0  # a study's start-up and its last running trial, after Optuna's --timeout
GROUPS = ("tests", "train", "precision", "study")
PRECISIONS = ("fp32", "bf16", "fp16")


def teacher_args(data_dir: Path, out: Path, epochs: int, val_size: int) -> list[str]:
    """A DeepNN teacher on the GPU; ``val_size`` as the studies', so it never saw the images they validate on."""
    return ["teacher", "--preset", "tutorial", "--dataset", "imagefolder", "--data-dir", str(data_dir),
            "--val-size", str(val_size), "--epochs", str(epochs), "--seed", "42", "--device", "cuda", "-q",
            "--out", str(out)]  # fmt: skip


def train_args(data_dir: Path, teacher: Path, device: str, epochs: int, precision: str = "fp32") -> list[str]:
    """(b) and (c): one kd run on the whole train split (``--val-size 0``), seed 42."""
    return ["train", "--method", "kd", "--dataset", "imagefolder", "--data-dir", str(data_dir), "--val-size", "0",
            "--epochs", str(epochs), "--seed", "42", "--device", device, "--teacher", str(teacher),
            "--precision", precision, "-q"]  # fmt: skip


def optimize_args(data_dir: Path, work: Path, n_jobs: int, args: argparse.Namespace, timeout: float) -> list[str]:
    """(d): a kd study on the GPU; Optuna's ``--timeout`` makes one that cannot finish stop in time."""
    return ["optimize", "--method", "kd", "--trials", str(args.study_trials), "--epochs", str(args.study_epochs),
            "--n-jobs", str(n_jobs), "--dataset", "imagefolder", "--data-dir", str(data_dir),
            "--val-size", str(args.study_val_size), "--device", "cuda", "--storage", f"sqlite:///{work / 'gpu.db'}",
            "--study-name", f"kd-gpu-{n_jobs}", "--teacher", str(work / "teacher-slice.pt"),
            "--timeout", f"{max(10.0, timeout - STUDY_MARGIN_SECONDS):.0f}", "-q"]  # fmt: skip


def plan_steps(args: argparse.Namespace, work: Path, results: dict[str, dict[str, Any]]) -> list[Step]:
    """The run's steps in order; ``results`` holds the earlier steps' results, for the comparisons."""
    data = Path(args.data_dir or Path(args.bundle) / "cifar-slice")
    teacher, tiled, tiled_teacher = work / "teacher-slice.pt", work / "tiled", work / "teacher-tiled.pt"

    def kdsearch(*kdsearch_args: str) -> Callable[[float], list[str]]:
        return lambda timeout: kdsearch_command(kdsearch_args, args.python)

    def compare(first: str, second: str, tolerance: float) -> Callable[[float], dict[str, Any]]:
        return lambda timeout: compare_accuracies(
            results[first]["test_accuracy"], results[second]["test_accuracy"], tolerance
        )

    def install(timeout: float) -> dict[str, Any]:
        return gpu_bundle.install(Path(args.bundle), Path(args.site), timeout, args.python)

    pytest = [args.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests"), "-k", TEST_FILTER]
    return [
        Step("install", 20, GROUPS, action=install),
        Step("tests", 60, ("tests",), command=lambda t: pytest, read=read_pytest, env={"KDSEARCH_TEST_DEVICE": "cuda"}),
        Step("teacher-slice", 20, ("train", "study"),
             command=kdsearch(*teacher_args(data, teacher, args.teacher_epochs, args.study_val_size))),
        Step("train-cpu", 40, ("train",), ("teacher-slice",),
             kdsearch(*train_args(data, teacher, "cpu", args.train_epochs), "--out", str(work / "ckpt-cpu.pt"))),
        Step("train-gpu", 20, ("train",), ("teacher-slice",),
             kdsearch(*train_args(data, teacher, "cuda", args.train_epochs), "--out", str(work / "ckpt-cuda.pt"))),
        Step("cpu-vs-gpu", 1, ("train",), ("train-cpu", "train-gpu"),
             action=compare("train-cpu", "train-gpu", args.accuracy_tolerance)),
        Step("evaluate-cpu", 15, ("train",), ("train-gpu",),
             kdsearch("evaluate", "--checkpoint", str(work / "ckpt-cuda.pt"), "--dataset", "imagefolder",
                      "--data-dir", str(data), "--val-size", "0", "--device", "cpu")),
        Step("gpu-ckpt-on-cpu", 1, ("train",), ("train-gpu", "evaluate-cpu"),
             action=compare("train-gpu", "evaluate-cpu", args.eval_tolerance)),
        Step("tiled-data", 10, ("precision",), action=lambda t: tile_slice(data, tiled, args.tiled_images)),
        Step("teacher-tiled", 45, ("precision",), ("tiled-data",), kdsearch(*teacher_args(tiled, tiled_teacher, 1, 0))),
        *(Step(f"kd-{p}", 25, ("precision",), ("teacher-tiled",),
               kdsearch(*train_args(tiled, tiled_teacher, "cuda", 2, precision=p))) for p in PRECISIONS),
        *(Step(f"study-{n}", 100, ("study",), ("teacher-slice",),
               lambda t, n=n: kdsearch_command(optimize_args(data, work, n, args, t), args.python), read=read_study)
          for n in (1, args.parallel_jobs)),
    ]  # fmt: skip


def read_study(finished: Finished) -> dict[str, Any]:
    """A study's JSON summary; one in which trials failed fails the step."""
    result = finished.check().json()
    if result.get("failed"):
        raise CommandError(f"{result['failed']} trials failed")
    return result


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|skipped|deselected|xfailed|xpassed|error|warning)s?\b")


def read_pytest(finished: Finished) -> dict[str, int]:
    """The counts of pytest -q's last line (``3 passed, 1 skipped, 140 deselected in 2.1s``); its exit 5 (no
    test selected) is 0 passed, not a failure of the run."""
    if finished.returncode not in (0, 5) and not finished.timed_out:
        raise CommandError(last_line(finished.stdout) or last_line(finished.stderr))
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for number, word in PYTEST_COUNT.findall(last_line(finished.check((0, 5)).stdout)):
        counts[word + "s" if word in ("error", "warning") else word] = int(number)
    return counts


def compare_accuracies(first: float, second: float, tolerance: float) -> dict[str, Any]:
    """Two test accuracies (percent) that should agree within ``tolerance`` points; raise if they do not."""
    difference = round(abs(float(first) - float(second)), 4)
    if difference > tolerance:
        raise RuntimeError(f"{first:.2f}% vs {second:.2f}%: {difference:.2f} points apart (tolerance {tolerance})")
    return {"first": first, "second": second, "difference": difference, "tolerance": tolerance}


def tile_slice(slice_dir: Path, root: Path, n_train: int) -> dict[str, int]:
    """(c)'s data: the slice's train images linked over and over, ``n_train`` in all, and its test split. An
    epoch's seconds are measured, not what is learnt, so repeats do; 50,000 files would not fit in the tree."""
    classes = sorted(p for p in (slice_dir / "train").iterdir() if p.is_dir())
    for label, class_dir in enumerate(classes):
        images = sorted(p.resolve() for p in class_dir.iterdir() if p.is_file())
        target = root / "train" / class_dir.name
        target.mkdir(parents=True)
        for i in range(n_train // len(classes) + (label < n_train % len(classes))):
            image = images[i % len(images)]
            os.symlink(image, target / f"{i:05d}{image.suffix}")
    (root / "test").symlink_to((slice_dir / "test").resolve())
    return {"train": n_train, "classes": len(classes)}


def steady_epoch(result: Mapping[str, Any]) -> float | None:
    """The steady epoch's seconds: the last one, after the first has paid the warm-up."""
    seconds = result.get("epoch_seconds") or []
    return float(seconds[-1]) if seconds else None


def study_seconds_per_trial(result: Mapping[str, Any]) -> float | None:
    """Wall seconds per finished (complete or pruned) trial: comparable when Optuna's --timeout cut a study short."""
    finished = (result.get("complete") or 0) + (result.get("pruned") or 0)
    return round(float(result["wall_seconds"]) / finished, 3) if finished and "wall_seconds" in result else None


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The headline numbers of the issue, from the steps that ran (None where a step did not)."""
    ok = {r["name"]: r.get("result") or {} for r in records if r["status"] == "ok"}
    studies = {
        name.removeprefix("study-"): {k: ok[name].get(k) for k in ("wall_seconds", "complete", "pruned", "failed")}
        | {"seconds_per_trial": study_seconds_per_trial(ok[name])}
        for name in ok
        if name.startswith("study-")
    }
    return {
        "tests": ok.get("tests"),
        "test_accuracy": {"cpu": ok.get("train-cpu", {}).get("test_accuracy"),
                          "cuda": ok.get("train-gpu", {}).get("test_accuracy")},
        "gpu_checkpoint_on_cpu": ok.get("evaluate-cpu", {}).get("test_accuracy"),
        "steady_epoch_seconds": {p: steady_epoch(ok[f"kd-{p}"]) if f"kd-{p}" in ok else None for p in PRECISIONS},
        "studies": studies,
    }  # fmt: skip


def results_document(records: Sequence[Mapping[str, Any]], args: argparse.Namespace, host: Mapping[str, Any],
                     wall: float) -> dict[str, Any]:  # fmt: skip
    """What goes to bench/results/gpu.json: options, host, every step's raw record, the summary."""
    return {
        "schema": SCHEMA,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_seconds": args.budget,
        "wall_seconds": round(wall, 1),
        "host": dict(host),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in sorted(vars(args).items())},
        "steps": list(records),
        "summary": summarize(records),
        "failed": [r["name"] for r in records if r["status"] == "failed"],
    }


def host_info() -> dict[str, Any]:
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0), "cpus": os.cpu_count()}  # fmt: skip


def gpu_absent_reason() -> str | None:
    """Why there is nothing to run here, or None on a CUDA machine."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable here ({exc})"
    return None if torch.cuda.is_available() else "torch.cuda.is_available() is false"


def subprocess_env(base: Mapping[str, str], site: Path | None, home: Path) -> dict[str, str]:
    """Every step's environment: the working tree first on PYTHONPATH, then the bundle's packages, and a
    studies home of the run's own (teachers, caches and artifacts stay out of the tree)."""
    parts = [str(ROOT)] + ([str(site)] if site else []) + ([base["PYTHONPATH"]] if base.get("PYTHONPATH") else [])
    env = {k: v for k, v in base.items() if k != "KDSEARCH_STORAGE"}
    return env | {"PYTHONPATH": os.pathsep.join(parts), "KDSEARCH_HOME": str(home), "PYTHONUNBUFFERED": "1"}


def run(args: argparse.Namespace) -> int:
    """Every step in order inside the budget, then the table and the JSON (or, dry, each step's plan)."""
    reason = None if args.dry_run else gpu_absent_reason()
    if reason is not None:
        print(f"bench/gpu.py: no CUDA GPU here ({reason}); nothing to run")
        return 0
    dry_work = Path(tempfile.gettempdir()) / "kdsearch-gpu-XXXXXXXX"  # a dry run makes no folder
    work = Path(args.work_dir or (dry_work if args.dry_run else tempfile.mkdtemp(prefix="kdsearch-gpu-")))
    results: dict[str, dict[str, Any]] = {}
    steps = plan_steps(args, work, results)
    wanted = [s.name for s in steps if not set(s.groups) <= set(args.skip)]
    wanted = [name for name in wanted if not (args.no_install and name == "install")]
    if args.dry_run:
        print("\n".join(budget.plan_lines([s for s in steps if s.name in wanted], args.budget)))
        return 0
    started = time.perf_counter()
    (work / "home").mkdir(parents=True, exist_ok=True)
    host = host_info()
    print(f"bench/gpu.py: {host['gpu']}, torch {host['torch']}, Python {host['python']}; budget {args.budget:.0f} s")
    print(f"work folder {work}", flush=True)
    env = subprocess_env(os.environ, None if args.no_install else Path(args.site), work / "home")
    records = budget.run_steps(steps, wanted, args.budget - (time.perf_counter() - started), env, results)
    wall = time.perf_counter() - started
    document = results_document(records, args, host, wall)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(budget.format_table(records))
    print(json.dumps(document["summary"], indent=2))
    print(f"{wall:.0f} s in all; results in {args.results}")
    return 1 if document["failed"] else 0


def positive(convert: Callable[[str], float]) -> Callable[[str], Any]:
    """An argparse type: a finite number above zero (anything else exits 2 with the reason)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench/gpu.py", description="The GPU checks of issue #14, on a GPU machine.")
    add = parser.add_argument
    add("--budget", type=positive(float), default=480.0, help="seconds for the whole run (default 480)")
    add("--bundle", default=str(gpu_bundle.BUNDLE), help="made by `make bench-gpu-prepare` (default bench/gpu-bundle)")
    add("--data-dir", default=None, help="CIFAR-10 slice, ImageFolder layout (default BUNDLE/cifar-slice)")
    add("--work-dir", default=None, help="teachers, checkpoints, (c)'s images, the study database")
    add("--site", default=str(Path(tempfile.gettempdir()) / "kdsearch-gpu-site"), help="where the wheels go")
    add("--results", default=str(RESULTS), help="the JSON written (default bench/results/gpu.json)")
    add("--no-install", action="store_true", help="the packages are there already: install nothing")
    add("--skip", action="append", choices=GROUPS, default=[], help="leave out a group (repeatable)")
    add("--train-epochs", type=positive(int), default=3, help="(b) epochs on CPU and GPU (default 3)")
    add("--teacher-epochs", type=positive(int), default=5, help="the slice teacher's epochs (default 5)")
    add("--accuracy-tolerance", type=float, default=1.0, help="(b) CPU vs GPU, points (default 1)")
    add("--eval-tolerance", type=float, default=0.1,
        help="(e) points: CPU and cuDNN kernels may flip a near-tie, one image of 1,000 (default 0.1)")  # fmt: skip
    add("--tiled-images", type=positive(int), default=50_000, help="(c) train images (default 50000)")
    add("--study-trials", type=positive(int), default=50, help="(d) trials per study (default 50)")
    add("--study-epochs", type=positive(int), default=10, help="(d) epochs per trial (default 10)")
    add("--study-val-size", type=positive(int), default=1000, help="(d) validation images (default 1000)")
    add("--parallel-jobs", type=positive(int), default=4, help="(d) the second study's --n-jobs (default 4)")
    add("--python", default=sys.executable, help=argparse.SUPPRESS)
    add("--dry-run", action="store_true", help="print each step's timeout share and command; run nothing")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
