"""The study's progress bar: trials finished, best value so far, pruned count.

It reads the counts from the storage, so it shows the same thing whether this process runs the
trials (an Optuna callback) or worker processes do (polled): Optuna's own bar counts only the
calling process's trials and has no pruned count.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from kdsearch.storage import counts


class TrialProgress:
    def __init__(self, total: int | None, enabled: bool, study: optuna.Study, finished_before: int) -> None:
        self.study = study
        self.seen = finished_before
        self.bar: Any = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="trial", dynamic_ncols=True)

    def callback(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna's callback signature, for trials run in this process."""
        self.poll()

    def poll(self) -> None:
        """Advance by the trials finished since the last look (complete or pruned, any worker)."""
        if self.bar is None:
            return
        c = counts(self.study)
        finished = c["complete"] + c["pruned"]
        if finished <= self.seen:
            return
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = "-"
        if complete and len(self.study.directions) == 1:
            best = f"{self.study.best_value:.2f}%"
        self.bar.set_postfix(best=best, pruned=c["pruned"])
        self.bar.update(finished - self.seen)
        self.seen = finished

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
