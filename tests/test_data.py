"""The data layer: decoding real image files, the decoded cache, splits, Fashion-MNIST, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kdsearch.data import TUTORIAL_MEAN, TUTORIAL_STD, load_splits
from kdsearch.decode import decode_dataset
from kdsearch.errors import ConfigError, UserError

FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_imagefolder_decodes_real_jpegs(cifar_slice: Path, tmp_path: Path) -> None:
    decoded = decode_dataset("imagefolder", cifar_slice, cache_dir=tmp_path)
    assert decoded.train_images.shape == (400, 3, 32, 32) and decoded.train_images.dtype == torch.uint8
    assert decoded.test_images.shape == (100, 3, 32, 32)
    assert decoded.classes[:3] == ["airplane", "automobile", "bird"]
    assert torch.equal(torch.bincount(decoded.train_labels), torch.full((10,), 40))
    # The second decode comes from the cache and is identical.
    assert list((tmp_path / "data").glob("imagefolder-*.pt"))
    again = decode_dataset("imagefolder", cifar_slice, cache_dir=tmp_path)
    assert torch.equal(again.train_images, decoded.train_images) and again.fingerprint == decoded.fingerprint


def test_a_changed_folder_is_decoded_again(pattern_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(pattern_folder, folder)
    first = decode_dataset("imagefolder", folder, cache_dir=tmp_path / "cache")
    (folder / "train" / "class0" / "000.png").unlink()
    second = decode_dataset("imagefolder", folder, cache_dir=tmp_path / "cache")
    assert second.fingerprint != first.fingerprint
    assert len(second.train_labels) == len(first.train_labels) - 1


def test_copies_of_a_folder_share_one_identity(pattern_folder: Path, tmp_path: Path) -> None:
    import os

    copy = tmp_path / "copy"
    shutil.copytree(pattern_folder, copy)
    for path in copy.rglob("*.png"):
        os.utime(path, (0, 0))  # another host's copy: other mtimes, same pixels
    original = decode_dataset("imagefolder", pattern_folder, cache_dir=tmp_path / "a")
    other = decode_dataset("imagefolder", copy, cache_dir=tmp_path / "b")
    assert other.fingerprint == original.fingerprint


def test_corrupt_decode_cache_is_rebuilt(pattern_folder: Path, tmp_path: Path) -> None:
    first = decode_dataset("imagefolder", pattern_folder, cache_dir=tmp_path)
    expected = first.train_images.clone()  # the decode is memory-mapped from the file damaged next
    del first
    (cache,) = (tmp_path / "data").glob("*.pt")
    cache.write_bytes(cache.read_bytes()[:100])
    again = decode_dataset("imagefolder", pattern_folder, cache_dir=tmp_path)
    assert torch.equal(again.train_images, expected)


def test_normalisation_is_the_tutorials(pattern_folder: Path) -> None:
    splits = load_splits("imagefolder", pattern_folder, val_size=0)
    decoded = decode_dataset("imagefolder", pattern_folder)
    mean = torch.tensor(TUTORIAL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(TUTORIAL_STD).view(1, 3, 1, 1)
    expected = (decoded.train_images.float() / 255 - mean) / std
    assert torch.allclose(splits.train.images, expected, atol=1e-5)


def test_validation_split_is_disjoint_and_stable(pattern_folder: Path) -> None:
    a = load_splits("imagefolder", pattern_folder, val_size=50)
    b = load_splits("imagefolder", pattern_folder, val_size=50)
    assert a.val is not None and b.val is not None
    assert len(a.train) == 250 and len(a.val) == 50
    train_rows, val_rows = set(a.train.source_index.tolist()), set(a.val.source_index.tolist())
    assert not train_rows & val_rows and len(train_rows | val_rows) == 300
    assert torch.equal(a.val.source_index, b.val.source_index)
    assert torch.equal(a.val.images, b.val.images)
    # Limiting the train set never moves images into or out of validation.
    c = load_splits("imagefolder", pattern_folder, val_size=50, limit_train=100)
    assert c.val is not None and torch.equal(c.val.source_index, a.val.source_index)
    assert len(c.train) == 100 and set(c.train.source_index.tolist()) <= train_rows
    assert load_splits("imagefolder", pattern_folder, val_size=0).val is None


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_from_the_idx_files() -> None:
    splits = load_splits("fashion-mnist", FASHION, val_size=5000, limit_train=1000)
    assert splits.train.images.shape == (1000, 1, 28, 28)
    assert len(splits.test) == 10_000 and splits.num_classes == 10
    assert splits.mean == (0.286,) and splits.std == (0.353,)


def _make_folder(root: Path, train_classes: list[str], test_classes: list[str]) -> Path:
    from PIL import Image

    for split, classes in (("train", train_classes), ("test", test_classes)):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "a.png")
    return root


def test_data_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="unknown dataset"):
        load_splits("mnist2", None)
    with pytest.raises(UserError, match="does not exist"):
        load_splits("imagefolder", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="missing"):
        load_splits("imagefolder", tmp_path / "empty")
    with pytest.raises(UserError, match="classes"):
        load_splits("imagefolder", _make_folder(tmp_path / "mismatch", ["a", "b"], ["a"]), val_size=0)
    broken = _make_folder(tmp_path / "broken", ["a"], ["a"])
    (broken / "train" / "a" / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="cannot decode image"):
        load_splits("imagefolder", broken, val_size=0)
    with pytest.raises(ConfigError, match="val_size must be below the 1 images of the train set"):
        load_splits("imagefolder", _make_folder(tmp_path / "one", ["a"], ["a"]), val_size=1)


def test_offline_download_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.error

    from torchvision import datasets

    def offline(self: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datasets.CIFAR10, "download", offline)
    with pytest.raises(ConfigError, match=r"could not be downloaded.*point data_dir at a local copy") as raised:
        load_splits("cifar10", tmp_path / "cifar")
    assert raised.value.name == "data_dir"


def test_sixteen_bit_pngs_are_read_as_eight_bit(tmp_path: Path) -> None:
    """A 16-bit PNG decodes to uint16; it is scaled to 8 bits like every other image, not a crash."""
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((8, 8), 257 * (100 + i), np.uint16)).save(folder / f"{i}.png")
    decoded = decode_dataset("imagefolder", tmp_path)
    assert decoded.train_images.dtype == torch.uint8 and decoded.train_images.shape == (4, 1, 8, 8)
    assert sorted(set(decoded.train_images.flatten().tolist())) == [100, 101]
