"""A student that stalls inside its first training step when asked to, for the fault tests.

Killing or signalling a worker "while a trial runs" is a race on a fast machine: the tiny test
trials can finish between the moment a RUNNING trial shows up in the storage and the signal. This
model removes the race: with ``KDSEARCH_TEST_STALL=<path>`` in the worker's environment, the first
training-mode forward pass creates ``<path>`` and then sleeps, so the test knows the trial is inside
the training loop and stays there until it is signalled. Without the variable it is LightNN.

A fixture module, not a test module: the command line imports it by its path (``MODEL``) in a child
process, as it imports a user's model, so it stays this small and imports nothing of the tests. Tests
reach it through ``tests.helpers`` (``STALLING_MODEL``, ``STALL_VARIABLE``, ``spawn``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from kdsearch.models import LightNN

STALL_VARIABLE = "KDSEARCH_TEST_STALL"
MODEL = "tests.stalling_model:StallingLightNN"


class StallingLightNN(LightNN):
    """LightNN whose training forward blocks once ``KDSEARCH_TEST_STALL`` names a marker file."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        marker = os.environ.get(STALL_VARIABLE)
        if marker and self.training:
            Path(marker).touch()
            while True:  # interrupted only by a signal: the test's kill, SIGINT or SIGTERM
                time.sleep(0.1)
        return super().forward(x)
