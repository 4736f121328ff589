"""Shared fixtures: small real image folders, an isolated studies home, a tiny trained teacher."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED_CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10-jpeg"
CLASSES = [f"class{i}" for i in range(10)]


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


@pytest.fixture(scope="session")
def pattern_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated ImageFolder of real PNG files: 30 train / 10 test images per class, learnable."""
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 30), ("test", 10)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(_pattern(label, rng)).save(folder / f"{i:03d}.png")
    return root


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

    out = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    splits = load_splits("imagefolder", pattern_folder, val_size=0)
    train_teacher(splits, "deepnn", RecipeConfig(epochs=3), torch.device("cpu"), out)
    return out
