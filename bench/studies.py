"""One seeded study per method on the shared CIFAR-10 copy, each confirmed over seeds against a CE control.

For each method: `kdsearch optimize` (default 30 trials x 10 epochs, median pruning, sampler seed
42, 5,000 validation images, the teacher given, which must never have seen those 5,000 images;
methods that compare only logits, and ce, also search the `shift` views of
bench/spaces/augment-shift.yaml, so the studies measure whether they help), then
`kdsearch confirm --top 3 --seeds 5`: the study's 3 best configs re-trained with 5 seeds on the
search's own split, the winner chosen on mean validation accuracy and tested, seed for seed,
against the hand-set config and against the confirmed CE study (the control: does distillation
pay on top of a tuned recipe?). The `ce` study runs first so it can serve as the control. Every
number lands in bench/results/studies.json (resumable: a method already there is skipped unless
--redo names it, and `optimize`/`confirm` resume their studies anyway), and the table printed at the
end is the README's. The studies live in bench/studies/studies.db (committed as they progress, so a
later session on a fresh machine resumes them instead of starting over).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cli_runner
from cli_runner import kdsearch
from tutorial import RESULTS

CONTROL = "ce"
BENCH = Path(__file__).resolve().parent
SHIFT_SPACE = BENCH / "spaces" / "augment-shift.yaml"


def space_for(method: str, shift: bool) -> list[str]:
    """``--space`` adding the shift views, for methods whose teacher outputs fit a cache of 18 views."""
    from kdsearch.strategies import get_strategy

    return ["--space", str(SHIFT_SPACE)] if shift and not get_strategy(method).uses_features else []


def confirm_with_workers(workers: int, args: list[str]) -> dict[str, Any]:
    """`kdsearch confirm` run by ``workers`` processes sharing its companion study, the cores split between them.

    Each worker prints the whole summary (one that runs out of runs waits for the others'), so the
    first one's is the result.
    """
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // workers))}
    running = [cli_runner.start(cli_runner.kdsearch_command(args), env) for _ in range(workers)]
    finished = [worker.wait() for worker in running]  # all of them, before any failure is raised
    for done in finished:
        done.check()
    return finished[0].json()


def confirm_args(study: str, method: str, args: argparse.Namespace) -> list[str]:
    """The `kdsearch confirm` of one study, against the CE control unless it is the control."""
    against = [] if method == CONTROL else ["--against", f"{args.prefix}-{CONTROL}"]
    return ["confirm", "--study-name", study, "--top", str(args.top), "--seeds", str(args.seeds), *against]


def read_rows(out_path: Path) -> list[dict[str, Any]]:
    return json.loads(out_path.read_text()) if out_path.exists() else []


def confirmed_row(method: str, name: str, summary: dict[str, Any], search: dict[str, Any], wall: float) -> dict:
    """One table row: the chosen config's test runs and its paired differences to the baselines."""
    return {
        "method": method,
        "study": name,
        "trials": search["complete"] + search["pruned"] + search["failed"],
        "pruned": search["pruned"],
        "best_val_accuracy": search["best_value"],
        **from_summary(summary),
        "optimize_seconds": round(search["wall_seconds"], 1),
        "wall_seconds": round(wall, 1),
    }


def from_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The part of a row that `kdsearch confirm`'s summary decides."""
    chosen = next(r for r in summary["rows"] if r["chosen"])
    hand_set = next(r for r in summary["rows"] if r["arm"] == "hand-set")
    return {
        "seeds": summary["seeds"],
        "chosen": summary["chosen"],
        "chosen_params": chosen["params"],
        "chosen_val_mean": chosen["val_mean"],
        "chosen_test_runs": chosen["test_runs"],
        "chosen_test_median": statistics.median(chosen["test_runs"]),
        "hand_set_test_runs": hand_set["test_runs"],
        "hand_set_test_median": statistics.median(hand_set["test_runs"]),
        "chosen_minus": summary["chosen_minus"],
    }


def median_of(summary: dict[str, Any], arm_prefix: str) -> float | None:
    row = next((r for r in summary["rows"] if r["arm"].startswith(arm_prefix) and r["test_runs"]), None)
    return statistics.median(row["test_runs"]) if row else None


def trial_hours(storage: str, study_name: str) -> float:
    """Hours the study's runs took, summed over worker processes (runs cut short by a restart included)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return 0.0
    spans = [(t.datetime_complete - t.datetime_start).total_seconds() for t in trials if t.datetime_complete]
    return sum(spans) / 3600


def print_table(rows: list[dict[str, Any]], control: str, out_path: Path, storage: str) -> None:
    """The README's table: medians over the seeds, and the paired differences with their intervals."""
    print(
        "| method | augment | trials (pruned) | confirmed test %, median | hand-set | CE control | "
        "− hand-set | − CE control | worker-hours: search + confirm |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        summary = r.get("confirm", {"rows": []})
        control_median = median_of(summary, "control-")
        against = r["chosen_minus"].get(control, {}).get("interval", "—")
        print(
            f"| {r['method']} | {r['chosen_params'].get('augment', 'none')} | {r['trials']} ({r['pruned']}) | "
            f"**{r['chosen_test_median']:.2f}** | {r['hand_set_test_median']:.2f} | "
            f"{'—' if control_median is None else f'{control_median:.2f}'} | "
            f"{r['chosen_minus']['hand-set']['interval']} | {against} | "
            f"{trial_hours(storage, r['study']):.1f} + {trial_hours(storage, r['study'] + '-confirm'):.1f} |"
        )
    print(f"(medians over {len(rows[0]['seeds']) if rows else 0} seeds; differences paired by seed, mean ± 95 % CI,")
    print(f" in points; every run in {out_path}; hours of training summed over the worker processes)")


def parse_args() -> argparse.Namespace:
    """The command line: which studies, their size and seeds, where they and their rows live, and the modes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--methods", default="ce,kd,dkd,cosine,regressor,hybrid")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--teacher", default=None, help="Teacher checkpoint [default: the search's default teacher].")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prefix", default="bench")
    parser.add_argument("--n-jobs", type=int, default=1, help="Worker processes per study.")
    parser.add_argument("--redo", default="", help="Methods to run again although their row exists.")
    parser.add_argument("--results", default=str(RESULTS / "studies.json"))
    parser.add_argument("--storage", default=f"sqlite:///{BENCH / 'studies' / 'studies.db'}")
    parser.add_argument("--no-shift", action="store_true", help="Search the default augmentations only.")
    parser.add_argument("--table", action="store_true", help="Print the table of the results file and stop.")
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="Rebuild every row's summary from its finished confirmation in the storage (no training; "
        "search counts and timings kept), then print the table.",
    )
    return parser.parse_args()


def refresh(rows: list[dict[str, Any]], args: argparse.Namespace, out_path: Path) -> None:
    """Each row's summary rebuilt from its finished confirmation (which `confirm` resumes, so nothing trains)."""
    for row in rows:
        summary, _ = kdsearch(*confirm_args(row["study"], row["method"], args), "-q")
        row.update(from_summary(summary), confirm=summary)
    out_path.write_text(json.dumps(rows, indent=2))


def ordered_methods(methods: str) -> list[str]:
    """The methods asked for, the control first: the others are confirmed against it."""
    ordered = methods.split(",")
    if CONTROL in ordered:
        ordered = [CONTROL, *[m for m in ordered if m != CONTROL]]
    return ordered


def already_done(method: str, rows: list[dict[str, Any]], redo: str) -> bool:
    """Whether the method has its row already and --redo does not name it: an interrupted run resumes."""
    return any(r["method"] == method for r in rows) and method not in redo.split(",")


def study_row(method: str, args: argparse.Namespace, data: list[str]) -> dict[str, Any]:
    """One method's study then its confirmation, as the row the table prints."""
    name = f"{args.prefix}-{method}"
    start = time.perf_counter()
    search, _ = kdsearch(
        "optimize", "--method", method, *data, "--trials", str(args.trials), "--epochs", str(args.epochs),
        "--study-name", name, "--n-jobs", str(args.n_jobs), "--sampler-seed", "42", "--total", "-q",
        *space_for(method, not args.no_shift),
    )  # fmt: skip
    summary = confirm_with_workers(args.n_jobs, [*confirm_args(name, method, args), "-q"])
    row = confirmed_row(method, name, summary, search, time.perf_counter() - start)
    row["augment_choices"] = ["none", "flip", "shift"] if space_for(method, not args.no_shift) else ["none", "flip"]
    row["confirm"] = summary  # every arm's validation mean and test runs
    return row


def save_row(out_path: Path, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Replaces the method's row in the results file; returns every row now there."""
    # Read again before writing: a `--refresh` may have rewritten the other rows meanwhile.
    rows = [r for r in read_rows(out_path) if r["method"] != row["method"]] + [row]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(rows, indent=2))
    return rows


def main() -> int:
    """--table prints, --refresh rebuilds then prints; otherwise each missing study runs, then the table."""
    args = parse_args()
    os.environ["KDSEARCH_STORAGE"] = args.storage
    data = ["--dataset", "imagefolder", "--data-dir", args.data_dir, "--val-size", str(args.val_size)]
    data += ["--device", args.device] + (["--teacher", args.teacher] if args.teacher else [])
    out_path = Path(args.results)
    control = f"control-{args.prefix}-{CONTROL}"
    rows = read_rows(out_path)
    if args.table:
        print_table(rows, control, out_path, args.storage)
        return 0
    if args.refresh:
        refresh(rows, args, out_path)
        print_table(rows, control, out_path, args.storage)
        return 0
    for method in ordered_methods(args.methods):
        if already_done(method, rows, args.redo):
            continue
        row = study_row(method, args, data)
        rows = save_row(out_path, row)
        print(json.dumps(row), flush=True)
    print_table(rows, control, out_path, args.storage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
