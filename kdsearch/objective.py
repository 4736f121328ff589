"""The objective: one trial is one student, trained from the study's config with the trial's values.

A trial suggests values from the space, runs the shared training loop with ``trial.report`` /
``should_prune`` after every epoch, and, when it beats every finished trial so far (or, with
several objectives, no finished trial dominates it), uploads the student's weights and config as
an Optuna artifact. In a study across methods each method keeps its own best student, so the best
of every method can be exported and confirmed.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from kdsearch.artifacts import ArtifactDirectory, keep_artifact
from kdsearch.checkpoints import save_checkpoint
from kdsearch.distill import Prepared, StudentResult, student_metadata, train_student
from kdsearch.errors import DivergedError
from kdsearch.loop import EpochReport, predict
from kdsearch.search_config import OBJECTIVES
from kdsearch.spaces import METHOD, Space, is_conditional, suggest

LATENCY_WARMUP = 10
LATENCY_REPEATS = 50


@dataclass
class Objective:
    """Train one student per trial; report every epoch; keep the best students as artifacts.

    Single-objective: validation accuracy after the last epoch, reported every epoch for pruning.
    Multi-objective: (accuracy, parameters, latency…) with no pruning (Optuna cannot prune
    multi-objective trials on intermediate values), and every trial on the Pareto front so far keeps
    its student.
    """

    prepared: Prepared
    space: Space
    artifacts: ArtifactDirectory
    objectives: tuple[str, ...] = ("accuracy",)

    @property
    def multi(self) -> bool:
        return len(self.objectives) > 1

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, ...]:
        values = suggest(trial, self.space)
        config = self.prepared.config.with_values(values)
        trial.set_user_attr("seed", config.recipe.seed)
        # Pinned values are not trial params; recorded here so export rebuilds this trial exactly even
        # when another run of the same study pinned something else (and, across methods, only this
        # trial's method's). Not "fixed_params": Optuna keeps an enqueued trial's values under that name.
        trial.set_user_attr("pinned", {name: value for name, value in values.items() if name not in trial.params})
        accuracies: list[float] = []
        seconds: list[float] = []

        def on_epoch(report: EpochReport) -> None:
            assert report.val_accuracy is not None
            accuracies.append(report.val_accuracy)
            seconds.append(round(report.seconds, 3))
            trial.set_user_attr("epoch_val_accuracy", accuracies)
            trial.set_user_attr("epoch_seconds", seconds)
            if self.multi:
                return
            trial.report(report.val_accuracy, report.epoch)
            # After the last epoch there is nothing left to save: the trial completes with its value.
            if report.epoch < config.recipe.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {report.epoch} with {report.val_accuracy:.2f}%")

        try:
            result = train_student(self.prepared, config, on_epoch=on_epoch)
        except DivergedError as exc:
            trial.set_user_attr("failure", str(exc))
            if self.multi:
                raise  # Optuna cannot prune multi-objective trials: it ends failed, with the reason
            raise optuna.TrialPruned(str(exc)) from None
        trial.set_user_attr("params", result.params)
        assert result.val_accuracy is not None
        values = {"accuracy": result.val_accuracy, "params": float(result.params)}
        if "latency" in self.objectives:
            values["latency"] = latency_ms(result.model, self.prepared)
            trial.set_user_attr("latency_ms", values["latency"])
        chosen = tuple(values[name] for name in self.objectives)
        if self._is_best_so_far(trial, chosen):
            self._keep_student(trial, result)
        return chosen if self.multi else chosen[0]

    def _is_best_so_far(self, trial: optuna.Trial, values: tuple[float, ...]) -> bool:
        """Better than every finished trial (single objective), or dominated by none (several).

        Across methods, "every finished trial" is every finished trial of the same method.
        """
        signs = [1.0 if OBJECTIVES[name] == "maximize" else -1.0 for name in self.objectives]
        mine = [s * v for s, v in zip(signs, values, strict=True)]
        others = trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if is_conditional(self.space):
            others = [t for t in others if t.params.get(METHOD) == trial.params.get(METHOD)]
        for other in others:
            theirs = [s * v for s, v in zip(signs, other.values, strict=True)]
            if all(t >= m for t, m in zip(theirs, mine, strict=True)) and (
                not self.multi or any(t > m for t, m in zip(theirs, mine, strict=True))
            ):
                return False
        return True

    def _keep_student(self, trial: optuna.Trial, result: StudentResult) -> None:
        metadata = student_metadata(self.prepared, result) | {"study": trial.study.study_name, "trial": trial.number}
        tmp_dir = Path(tempfile.mkdtemp(prefix="kdsearch-"))
        try:
            path = tmp_dir / f"student-trial-{trial.number}.pt"
            save_checkpoint(path, result.model, metadata)
            keep_artifact(trial, self.artifacts, path)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def latency_ms(model: nn.Module, prepared: Prepared) -> float:
    """Median milliseconds for one image (batch of 1) on the running device, after a warm-up."""
    split = prepared.splits.val if prepared.splits.val is not None else prepared.splits.train
    sample = split.head()
    cuda = prepared.device.type == "cuda"
    times = []
    for i in range(LATENCY_WARMUP + LATENCY_REPEATS):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        predict(model, sample, prepared.device)
        if cuda:
            torch.cuda.synchronize()
        if i >= LATENCY_WARMUP:
            times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
