"""One study across every method, and its racing confirm, beside the six per-method ones (`make bench-auto`).

`kdsearch optimize --method auto` on the shared CIFAR-10 copy with the committed strong teacher
(10 epochs, 5,000 validation images, the default sampler and pruner, sampler seed 42, `--total`
so an interrupted run resumes the study; ASHA's first rung pinned at epoch 2, the default when the
committed study ran, so that resuming it keeps its rungs), then `kdsearch confirm --top 3 --seeds 5` (racing, the
default): the best config of each of the 3 best methods raced over seeds against the study's own
best ce trial. Set beside the per-method studies and confirmations in the same storage
(bench/studies/studies.db: `bench-<method>` and `bench-<method>-confirm`): epochs trained,
worker-hours (the runs' own seconds, summed over worker processes), the confirmed pick's median
test accuracy and its paired interval against the CE arm. Rows land in bench/results/auto.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import cli_runner

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "auto.json"
STORAGE = f"sqlite:///{BENCH / 'studies' / 'studies.db'}"
TEACHER = BENCH / "teachers" / "deepnn-cifar10-jpeg-strong-val5000.pt"
PER_METHOD = ("ce", "kd", "dkd", "cosine", "regressor", "hybrid")


def optimize_command(args: argparse.Namespace, workers: int = 1) -> list[str]:
    return cli_runner.kdsearch_command([
        "optimize", "--method", "auto", "--dataset", "imagefolder", "--data-dir", args.data_dir,
        "--val-size", "5000", "--epochs", str(args.epochs), "--teacher", str(TEACHER), "--trials", str(args.trials),
        "--total", "--sampler-seed", "42", "--study-name", args.study, "--storage", args.storage,
        "--n-jobs", str(workers), "--pruner-warmup", "2", "-q",
    ])  # fmt: skip


def cost(storage: str, study_name: str, epochs_per_run: int = 10) -> dict[str, Any]:
    """Epochs a study trained (pruned and failed trials' epochs counted; a confirmation run, which
    reports no epochs, counts ``epochs_per_run``) and its runs' worker-hours."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        trials = optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False)
    except KeyError:
        return {"trials": 0, "epochs": 0, "worker_hours": 0.0}
    epochs = 0
    for t in trials:
        if t.user_attrs.get("reused_trial") is not None:
            continue  # a confirmation run recorded from a search trial: trained once, counted there
        recorded = t.user_attrs.get("epoch_val_accuracy")
        epochs += (
            len(recorded) if recorded else len(t.intermediate_values) or (epochs_per_run if t.value is not None else 0)
        )
    seconds = sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.datetime_complete and t.datetime_start and t.user_attrs.get("reused_trial") is None
    )
    return {"trials": len(trials), "epochs": epochs, "worker_hours": round(seconds / 3600, 2)}


def confirmed(summary: dict[str, Any], control: str) -> dict[str, Any]:
    chosen = next(r for r in summary["rows"] if r["chosen"])
    control_row = next((r for r in summary["rows"] if r["arm"] == control), None)
    return {
        "chosen": summary["chosen"],
        "chosen_method": chosen["params"].get("method"),
        "chosen_params": chosen["params"],
        "chosen_test_runs": chosen["test_runs"],
        "chosen_test_median": statistics.median(chosen["test_runs"]),
        "control_test_median": statistics.median(control_row["test_runs"]) if control_row else None,
        "chosen_minus_control": summary["chosen_minus"].get(control),
        "race": summary.get("race"),
    }


def per_method_rows(storage: str) -> list[dict[str, Any]]:
    rows = []
    studies = json.loads((BENCH / "results" / "studies.json").read_text())
    for method in PER_METHOD:
        search, check = cost(storage, f"bench-{method}"), cost(storage, f"bench-{method}-confirm")
        row = next((r for r in studies if r["method"] == method), {})
        control = row.get("chosen_minus", {}).get("control-bench-ce", {}).get("interval") if method != "ce" else None
        rows.append({"study": f"bench-{method}", "search": search, "confirm": check,
                     "chosen_test_median": row.get("chosen_test_median"), "minus_ce_control": control})  # fmt: skip
    return rows


def table(result: dict[str, Any]) -> None:
    print("| study | search epochs | confirm epochs | worker-hours | confirmed test %, median | − CE |")
    print("|---|---|---|---|---|---|")
    for row in result["per_method"]:
        hours = row["search"]["worker_hours"] + row["confirm"]["worker_hours"]
        print(f"| {row['study']} | {row['search']['epochs']} | {row['confirm']['epochs']} | {hours:.1f} | "
              f"{row['chosen_test_median']} | {row['minus_ce_control'] or '—'} |")  # fmt: skip
    totals = result["per_method_total"]
    print(f"| six per-method, together | {totals['search_epochs']} | {totals['confirm_epochs']} | "
          f"{totals['worker_hours']:.1f} | | |")  # fmt: skip
    auto = result["auto"]
    pick = auto.get("confirmed") or {}
    minus = (pick.get("chosen_minus_control") or {}).get("interval", "—")
    print(f"| {result['study']} ({pick.get('chosen_method')}) | {auto['search']['epochs']} | "
          f"{auto['confirm']['epochs']} | {auto['search']['worker_hours'] + auto['confirm']['worker_hours']:.1f} | "
          f"{pick.get('chosen_test_median')} | {minus} |")  # fmt: skip
    print(f"auto / per-method epochs: {result['epoch_ratio']:.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="../shared/datasets/cifar10-jpeg")
    parser.add_argument("--trials", type=int, default=80, help="the study's total of finished trials")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--study", default="bench-auto")
    parser.add_argument("--storage", default=STORAGE)
    parser.add_argument("--table", action="store_true", help="print the table of the results file and stop")
    args = parser.parse_args()
    if args.table:
        table(json.loads(RESULTS.read_text()))
        return 0
    search = cli_runner.run(optimize_command(args, args.n_jobs)).check().json()
    env = os.environ | {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.n_jobs))}
    confirm_args = ["confirm", "--study-name", args.study, "--storage", args.storage, "--top", str(args.top),
                    "--seeds", str(args.seeds), "-q"]  # fmt: skip
    workers = [cli_runner.start(cli_runner.kdsearch_command(confirm_args), env) for _ in range(args.n_jobs)]
    finished = [w.wait() for w in workers]
    for done in finished:
        done.check()
    summary = finished[0].json()
    per_method = per_method_rows(args.storage)
    totals = {
        "search_epochs": sum(r["search"]["epochs"] for r in per_method),
        "confirm_epochs": sum(r["confirm"]["epochs"] for r in per_method),
        "worker_hours": round(sum(r["search"]["worker_hours"] + r["confirm"]["worker_hours"] for r in per_method), 2),
    }
    auto = {"search": cost(args.storage, args.study), "confirm": cost(args.storage, f"{args.study}-confirm"),
            "best_val_accuracy": search["best_value"], "confirmed": confirmed(summary, "control-ce"),
            "summary": summary}  # fmt: skip
    auto_epochs = auto["search"]["epochs"] + auto["confirm"]["epochs"]
    result = {"study": args.study, "command": cli_runner.shown(optimize_command(args, args.n_jobs)),
              "per_method": per_method, "per_method_total": totals, "auto": auto,
              "epoch_ratio": auto_epochs / (totals["search_epochs"] + totals["confirm_epochs"])}  # fmt: skip
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    table(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
