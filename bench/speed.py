"""Speed, side by side in one run on the shared CIFAR-10 copy; prints a table, writes JSON.

(a) a tutorial-style KD epoch (torchvision ImageFolder + PIL transforms in a DataLoader, the teacher
    run live on every batch, NCHW) against a kdsearch KD epoch in steady state, and the one-off cost
    of building the teacher-output cache. The tutorial epoch is timed on --tutorial-batches batches
    and scaled to a whole epoch (it is ~20x slower, and the rate is steady after the first batches).
(b) kdsearch epochs of ce against kd, cosine and regressor: the distillation overhead. The regressor
    strategy also trains its own conv (the tutorial's 16->32 3x3): a second regressor row takes that
    conv's forward and backward time (timed alone on the same shapes, an epoch's worth of steps)
    out, leaving the cost of distilling through it (feature tap, cached teacher maps, the MSE).
(c) a --study-trials-trial, 3-epoch study with 1 and with 2 worker processes.
(d) time spent in the storage per trial, as a share of trial time (from the 1-worker study).
(e) --precision bf16 against fp32 on the running device: a kd epoch's time, and the test accuracy of
    the tutorial's kd recipe trained --precision-epochs epochs each way.
(f) the issue's whole-study target: `kdsearch optimize` as a user runs it, --full-study-trials trials
    of --full-study-method, 10 epochs, median pruning, 5,000 validation images, --n-jobs 2, timed
    from the command line (data and teacher-cache loading included) to its exit.
Needs a teacher: the dataset's default one (`make bench-tutorial` trains it once), or --teacher PATH
(any DeepNN checkpoint for this dataset: speed does not depend on what the teacher learnt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from cli_runner import kdsearch

RESULTS = Path(__file__).resolve().parent / "results"
Row = tuple[str, float, str]  # a table row: the measure, its value, the target the issue set for it
Measured = tuple[dict[str, Any], list[Row]]  # a phase's part of speed.json, and its table rows


def tutorial_epoch_seconds(data_dir: str, teacher_path: Path, batches: int, n_train: int) -> float:
    """The tutorial's loop: DataLoader + PIL transforms, live teacher per batch, NCHW student."""
    from torch import nn
    from torchvision import datasets, transforms

    from kdsearch.checkpoints import load_checkpoint
    from kdsearch.models import DeepNN, LightNN

    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])]
    )
    train = datasets.ImageFolder(str(Path(data_dir) / "train"), transform=transform)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, num_workers=2)
    teacher = DeepNN()
    teacher.load_state_dict(load_checkpoint(teacher_path).state_dict)
    teacher.eval()
    torch.manual_seed(42)
    student = LightNN()
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    ce = nn.CrossEntropyLoss()
    times = []
    start = time.perf_counter()
    for i, (inputs, labels) in enumerate(loader):
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        student_logits = student(inputs)
        soft_targets = nn.functional.softmax(teacher_logits / 2, dim=-1)
        soft_prob = nn.functional.log_softmax(student_logits / 2, dim=-1)
        soft_loss = torch.sum(soft_targets * (soft_targets.log() - soft_prob)) / soft_prob.size()[0] * 4
        loss = 0.25 * soft_loss + 0.75 * ce(student_logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        now = time.perf_counter()
        times.append(now - start)
        start = now
        if i + 1 >= batches:
            break
    steady = statistics.median(times[2:]) if len(times) > 4 else statistics.median(times)
    return steady * ((n_train + 127) // 128)


def kdsearch_epochs(
    data_dir: str, teacher: Path, methods: list[str], epochs: int, precision: str = "fp32"
) -> dict[str, Any]:
    from kdsearch.config import RunConfig
    from kdsearch.distill import prepare, train_student
    from kdsearch.loop import evaluate

    out: dict[str, Any] = {}
    for method in methods:
        values = {"method": method, "dataset": "imagefolder", "data_dir": data_dir, "val_size": 0, "epochs": epochs}
        config = RunConfig.from_flat(values | {"precision": precision, "teacher": str(teacher)}, origin="of bench")
        prepared = prepare(config)
        result = train_student(prepared)
        out[method] = {
            "epoch_seconds": [r.seconds for r in result.epochs],
            "steady_seconds": statistics.median([r.seconds for r in result.epochs[1:]]),
            "teacher_outputs_seconds": prepared.teacher_outputs_seconds,
            "test_accuracy": evaluate(result.model, prepared.splits.test, prepared.device),
        }
    return out


def regressor_conv_seconds(steps: int, batch_size: int = 128) -> float:
    """Forward and backward of the tutorial's regressor conv alone for ``steps`` batches.

    The same shapes as in a regressor epoch: the student's 16x8x8 map in, the teacher's 32x8x8 out,
    channels_last on the CPU; the input needs its gradient, as the student's features do.
    """
    from kdsearch.loop import prepare_module, resolve_device
    from kdsearch.losses.regressor import build_regressor

    device = resolve_device("auto")
    torch.manual_seed(0)
    conv = prepare_module(build_regressor(16, 32, 3, 1, 32), device)
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    features = torch.randn(batch_size, 16, 8, 8, device=device).contiguous(memory_format=memory_format)
    features.requires_grad_()
    grad = torch.randn(batch_size, 32, 8, 8, device=device).contiguous(memory_format=memory_format)
    for _ in range(10):
        conv(features).backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        conv(features).backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def full_study_seconds(data_dir: str, teacher: Path, method: str, trials: int) -> dict[str, Any]:
    """`kdsearch optimize` in a subprocess, timed from start to exit, with its JSON summary."""
    folder = Path(tempfile.mkdtemp(prefix="kdsearch-bench-full-"))
    start = time.perf_counter()
    summary, _ = kdsearch(
        "optimize", "--method", method, "--dataset", "imagefolder", "--data-dir", data_dir,
        "--teacher", str(teacher), "--trials", str(trials), "--epochs", "10", "--val-size", "5000",
        "--pruner", "median", "--n-jobs", "2", "--seed", "42",
        "--storage", f"sqlite:///{folder / 'full.db'}", "--study-name", f"bench-full-{method}", "--quiet",
    )  # fmt: skip
    wall = time.perf_counter() - start
    return {"wall_seconds": wall, "method": method, "trials": trials, "summary": summary}


def interleaved_epochs(data_dir: str, teacher: Path, methods: list[str], epochs: int) -> dict[str, Any]:
    """``kdsearch_epochs`` in two rounds, the second in reverse order, medians over both.

    Whichever method runs first in a process can be a few per cent slower or faster (one run had ce
    at 3.07 s after the cache build, then kd at 2.83 s), so no ratio rests on one position.
    """
    rounds = [kdsearch_epochs(data_dir, teacher, order, epochs) for order in (methods, methods[::-1])]
    out: dict[str, Any] = {}
    for method in methods:
        runs = [r[method] for r in rounds]
        steady = [s for r in runs for s in r["epoch_seconds"][1:]]
        out[method] = {
            "epoch_seconds": [r["epoch_seconds"] for r in runs],
            "steady_seconds": statistics.median(steady),
            "test_accuracy": [r["test_accuracy"] for r in runs],
        }
    return out


def cache_build_seconds(data_dir: str, teacher_path: Path) -> float:
    from kdsearch.data import load_splits
    from kdsearch.loop import resolve_device
    from kdsearch.paths import cache_dir
    from kdsearch.teacher import load_teacher
    from kdsearch.teacher_outputs import compute_teacher_outputs

    device = resolve_device("auto")
    splits = load_splits("imagefolder", data_dir, val_size=0, cache_dir=cache_dir()).to(device)
    teacher = load_teacher(teacher_path, None, splits, device)
    start = time.perf_counter()
    compute_teacher_outputs(teacher.model, splits.train.images, "features", device)
    return time.perf_counter() - start


class TimedStorage:
    """Wraps an Optuna storage and adds up the seconds spent in its methods."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed


def study_seconds(data_dir: str, teacher: Path, trials: int, n_jobs: int, timed: bool) -> dict[str, Any]:
    from kdsearch import study as search
    from kdsearch.config import RunConfig
    from kdsearch.distill import prepare
    from kdsearch.search_config import SearchConfig

    folder = Path(tempfile.mkdtemp(prefix="kdsearch-bench-"))
    url = f"sqlite:///{folder / 'bench.db'}"
    timer: TimedStorage | None = None
    if timed:
        real_open = search.open_storage

        def open_timed(*args: Any, **kwargs: Any) -> Any:
            nonlocal timer
            timer = TimedStorage(real_open(*args, **kwargs))
            return timer

        search.open_storage = open_timed  # type: ignore[assignment]
    values = {"method": "kd", "dataset": "imagefolder", "data_dir": data_dir, "val_size": 5000, "epochs": 3}
    config = RunConfig.from_flat(values | {"teacher": str(teacher)}, origin="of bench")
    # The teacher-output caches (both views: the default space may draw flip) are built outside the
    # timing, so the 1-worker study does not pay a one-off cost the 2-worker one then skips.
    prepare(config, augmentations=("none", "flip"))
    start = time.perf_counter()
    try:
        plan = SearchConfig(
            trials=trials, study_name="bench", storage=url, pruner="none", n_jobs=n_jobs, sampler_seed=42
        )
        summary = search.run_search(config, plan, progress=False)
    finally:
        if timed:
            search.open_storage = real_open  # type: ignore[assignment]
    wall = time.perf_counter() - start
    out = {"wall_seconds": wall, "complete": summary["complete"]}
    if timer is not None:
        out["storage_seconds"] = timer.seconds
    return out


def parse_args() -> argparse.Namespace:
    """The command line: how long each measurement runs, and which of the slow ones to skip."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--tutorial-batches", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--study-trials", type=int, default=20)
    parser.add_argument("--skip-study", action="store_true")
    parser.add_argument("--precision-epochs", type=int, default=10, help="0 skips the bf16 accuracy runs.")
    parser.add_argument("--full-study-trials", type=int, default=50, help="0 skips (f).")
    parser.add_argument("--full-study-method", default="cosine")
    parser.add_argument("--teacher", default=None, help="Teacher checkpoint [default: the dataset's tutorial teacher].")
    return parser.parse_args()


def find_teacher(data_dir: str, teacher: str | None) -> tuple[Path, int]:
    """The teacher checkpoint (--teacher, or the dataset's tutorial one) and the number of training images.

    Loading the splits names the default teacher, and their size is an epoch's length in batches.
    """
    from kdsearch.config import RecipeConfig
    from kdsearch.data import load_splits
    from kdsearch.paths import cache_dir
    from kdsearch.teacher import TUTORIAL_TEACHER, default_teacher_path

    splits = load_splits("imagefolder", data_dir, val_size=0, cache_dir=cache_dir())
    path = Path(teacher) if teacher else default_teacher_path(splits, TUTORIAL_TEACHER, RecipeConfig())
    return path, len(splits.train)


def epoch_measures(args: argparse.Namespace, teacher: Path, n_train: int) -> Measured:
    """(a) and (b): the tutorial's epoch, the cache build and kdsearch's epochs, each method against ce."""
    measured: dict[str, Any] = {}
    measured["tutorial_epoch_seconds"] = tutorial_epoch_seconds(args.data_dir, teacher, args.tutorial_batches, n_train)
    measured["cache_build_seconds"] = cache_build_seconds(args.data_dir, teacher)
    epochs = interleaved_epochs(args.data_dir, teacher, ["ce", "kd", "cosine", "regressor"], args.epochs)
    measured["epochs"] = epochs
    kd, ce = epochs["kd"]["steady_seconds"], epochs["ce"]["steady_seconds"]
    rows = [
        ("(a) tutorial KD epoch / kdsearch KD epoch", measured["tutorial_epoch_seconds"] / kd, ">= 20"),
        (
            "(a) cache build / tutorial KD epoch",
            measured["cache_build_seconds"] / measured["tutorial_epoch_seconds"],
            "<= 1",
        ),
    ]
    for method in ("kd", "cosine", "regressor"):
        rows.append((f"(b) {method} epoch / ce epoch", epochs[method]["steady_seconds"] / ce, "<= 1.10"))
    measured["regressor_conv_seconds"] = regressor_conv_seconds((n_train + 127) // 128)
    less_conv = epochs["regressor"]["steady_seconds"] - measured["regressor_conv_seconds"]
    rows.append(("(b) regressor epoch less its conv / ce epoch", less_conv / ce, "<= 1.10"))
    return measured, rows


def precision_measures(args: argparse.Namespace, teacher: Path, kd_fp32_seconds: float) -> Measured:
    """(e): a bf16 kd epoch against fp32's, and (unless --precision-epochs 0) what bf16 costs in accuracy."""
    bf16 = kdsearch_epochs(args.data_dir, teacher, ["kd"], args.epochs, precision="bf16")["kd"]
    measured: dict[str, Any] = {"epochs_bf16": {"kd": bf16}}
    rows = [("(e) kd bf16 epoch / kd fp32 epoch", bf16["steady_seconds"] / kd_fp32_seconds, "< 1 to be worth it")]
    if args.precision_epochs:
        full = {
            p: kdsearch_epochs(args.data_dir, teacher, ["kd"], args.precision_epochs, p)["kd"] for p in ("fp32", "bf16")
        }
        measured["precision_accuracy"] = {p: r["test_accuracy"] for p, r in full.items()}
        rows.append(
            (
                f"(e) kd test accuracy, bf16 - fp32 ({args.precision_epochs} ep.)",
                full["bf16"]["test_accuracy"] - full["fp32"]["test_accuracy"],
                "within noise (~0.5)",
            )
        )
    return measured, rows


def study_measures(args: argparse.Namespace, teacher: Path) -> Measured:
    """(c) and (d): the same study with 1 and 2 workers, the storage timed in the 1-worker one only."""
    one = study_seconds(args.data_dir, teacher, args.study_trials, 1, timed=True)
    two = study_seconds(args.data_dir, teacher, args.study_trials, 2, timed=False)
    rows = [
        ("(c) study wall, 1 worker / 2 workers", one["wall_seconds"] / two["wall_seconds"], ">= 1.3"),
        ("(d) storage seconds / trial seconds", one["storage_seconds"] / one["wall_seconds"], "< 0.01"),
    ]
    return {"study_1_worker": one, "study_2_workers": two}, rows


def full_study_measures(args: argparse.Namespace, teacher: Path) -> Measured:
    """(f): the whole study a user runs, in minutes against the issue's 30."""
    full = full_study_seconds(args.data_dir, teacher, args.full_study_method, args.full_study_trials)
    measure = f"(f) {args.full_study_trials}-trial 10-epoch {args.full_study_method} study, minutes"
    return {"full_study": full}, [(measure, full["wall_seconds"] / 60, "<= 30")]


def measurements(args: argparse.Namespace, teacher: Path, n_train: int) -> Iterator[Measured]:
    """The phases in the order they run, the skipped ones left out."""
    epochs, rows = epoch_measures(args, teacher, n_train)
    yield epochs, rows
    yield precision_measures(args, teacher, epochs["epochs"]["kd"]["steady_seconds"])
    if not args.skip_study:
        yield study_measures(args, teacher)
    if args.full_study_trials:
        yield full_study_measures(args, teacher)


def print_table(rows: list[Row]) -> None:
    """Each measure beside its target."""
    print(f"{'measure':<45} {'value':>8}  target")
    for measure, value, target in rows:
        print(f"{measure:<45} {value:>8.3f}  {target}")


def main() -> int:
    """Every measurement, then the table and bench/results/speed.json; exit status 2 without a teacher."""
    args = parse_args()
    teacher, n_train = find_teacher(args.data_dir, args.teacher)
    if not teacher.exists():
        print(f"no teacher at {teacher}: run `make bench-tutorial` first", file=sys.stderr)
        return 2
    result: dict[str, Any] = {}
    rows: list[Row] = []
    for measured, more in measurements(args, teacher, n_train):
        result.update(measured)
        rows += more
    result["rows"] = [{"measure": m, "value": v, "target": t} for m, v, t in rows]
    print_table(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
