"""Shared fixtures: small real image folders, an isolated studies home, teachers (trained or not), the stub trainer."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from filelock import FileLock
from PIL import Image

from tests.helpers import CLASSES, POSTGRES_URL, StubTrainer, optimize_args, postgres_available, run_cli

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg"
# A memory file system for the tests' files where the machine has one: a SQLite commit there costs
# microseconds, not the ~17 ms of an fsync to disk, and a study's set-up commits dozens of times.
MEMORY_TEMP = Path("/dev/shm")


# One thread per test process, and per child process a test starts: the tests' tensors are tiny, and on
# a busy two-core machine a second thread mostly waits for a core (a LightNN forward pass on one image
# took 50 ms with two threads there, 0.4 ms with one). OMP_NUM_THREADS set by the caller is kept.
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    """Put pytest's temporary folders (every ``tmp_path``, so every studies home) on ``MEMORY_TEMP``,
    unless a temporary folder was chosen (``--basetemp``, ``TMPDIR``) or the machine has no such folder."""
    chosen = config.option.basetemp or os.environ.get("TMPDIR") or os.environ.get("PYTEST_DEBUG_TEMPROOT")
    if not chosen and MEMORY_TEMP.is_dir() and os.access(MEMORY_TEMP, os.W_OK):
        tempfile.tempdir = str(MEMORY_TEMP)


def _pattern(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 32x32 RGB image whose colour and stripe direction depend on the class, plus noise."""
    image = rng.integers(0, 60, size=(32, 32, 3)).astype(np.int32)
    channel = label % 3
    image[:, :, channel] += 120
    if label >= 3:
        stripes = (np.arange(32) // (2 + label % 4)) % 2 == 0
        if label >= 6:
            image[stripes, :, (channel + 1) % 3] += 100
        else:
            image[:, stripes, (channel + 1) % 3] += 100
    if label == 9:
        image[8:24, 8:24, :] = 250
    return np.clip(image, 0, 255).astype(np.uint8)


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]) -> Path:
    """``name`` in the run's temporary root, built by the first pytest-xdist worker that asks for it and
    read by the others (pytest-xdist's recipe for session fixtures): a teacher trains once per run, not
    once per worker. ``build`` writes a new path it is given; it is renamed into place when complete."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # shared by every worker of this run
    target = root / name
    with FileLock(f"{target}.lock"):
        if not target.exists():
            partial = root / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            build(partial)
            partial.rename(target)
    return target


def _write_patterns(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 30), ("test", 10)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_pattern(label, rng)).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="session")
def pattern_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated ImageFolder of real PNG files: 30 train / 10 test images per class, learnable."""
    return built_once(tmp_path_factory, "patterns", _write_patterns)


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slice of the shared CIFAR-10 JPEG copy: 40 train / 10 test JPEGs per class."""
    if not SHARED_CIFAR.is_dir():
        pytest.skip(f"shared CIFAR-10 copy not found at {SHARED_CIFAR}")
    root = tmp_path_factory.mktemp("cifar-slice")
    for split, per_class in (("train", 40), ("test", 10)):
        for class_dir in sorted((SHARED_CIFAR / split).iterdir()):
            target = root / split / class_dir.name
            target.mkdir(parents=True)
            for path in sorted(class_dir.iterdir())[:per_class]:
                shutil.copy(path, target / path.name)
    return root


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty studies home (storage, artifacts, teachers, caches) for one test."""
    path = tmp_path / "studies"
    monkeypatch.setenv("KDSEARCH_HOME", str(path))
    monkeypatch.delenv("KDSEARCH_STORAGE", raising=False)
    return path


@pytest.fixture(scope="session")
def pattern_teacher(pattern_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeepNN teacher trained for 3 epochs on the pattern folder, saved as a kdsearch checkpoint."""
    from kdsearch.config import RecipeConfig
    from kdsearch.data import load_splits
    from kdsearch.teacher import train_teacher

    def train(folder: Path) -> None:
        folder.mkdir()
        splits = load_splits("imagefolder", pattern_folder, val_size=0)
        train_teacher(splits, "deepnn", RecipeConfig(epochs=3), torch.device("cpu"), folder / "teacher.pt")

    return built_once(tmp_path_factory, "pattern-teacher", train) / "teacher.pt"


@pytest.fixture(scope="session")
def untrained_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DeepNN teacher checkpoint, seeded and untrained: for tests where the teacher's skill is not the point."""
    from kdsearch.checkpoints import save_checkpoint
    from kdsearch.models import DeepNN

    out = tmp_path_factory.mktemp("untrained-teacher") / "teacher.pt"
    torch.manual_seed(0)
    save_checkpoint(out, DeepNN(), {"kind": "teacher", "model": "deepnn", "num_classes": 10, "data": {"val_size": 0}})
    return out


@pytest.fixture()
def stub(monkeypatch: pytest.MonkeyPatch) -> StubTrainer:
    """The stub trainer in place of data, teacher and training for searches and confirmations (tests.helpers)."""
    return StubTrainer().install(monkeypatch)


@pytest.fixture()
def search(
    pattern_folder: Path, untrained_teacher: Path, home: Path, stub: StubTrainer, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, str]]:
    """``search(*args, method="kd", epochs=1)``: `kdsearch optimize` on the pattern folder and the stub trainer,
    in-process (``optimize_args``); returns (exit code, stdout, stderr)."""

    def run(*extra: object, method: str = "kd", epochs: int = 1) -> tuple[int, str, str]:
        return run_cli(optimize_args(pattern_folder, untrained_teacher, *extra, method=method, epochs=epochs), capsys)

    return run


@pytest.fixture()
def postgres() -> str:
    if not postgres_available():
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}")
    return POSTGRES_URL
