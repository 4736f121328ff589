"""Datasets as uint8 tensors: decode once, keep the decode, split deterministically, normalise per batch.

A search trains hundreds of small students on the same images, so the images are decoded once
into uint8 tensors, cached on disk and memory-mapped from there (worker processes share the
pages, and resident memory does not grow with the dataset), and batched by index, as airbench
does: a batch's rows are gathered as uint8 and normalised to float32 on the device. No
DataLoader, no per-sample PIL. Normalising is elementwise, so a batch normalised alone holds the
same floats as the whole split normalised at once: results do not depend on when it happens.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kdsearch.decode import DecodedDataset, decode_dataset
from kdsearch.errors import ConfigError
from kdsearch.images import parse_image_size
from kdsearch.paths import cache_dir

if TYPE_CHECKING:
    from kdsearch.config import DataConfig

# The tutorial normalises every 3-channel image with ImageNet's statistics; we keep that so a
# tutorial checkpoint sees the inputs it was trained on.
TUTORIAL_MEAN = (0.485, 0.456, 0.406)
TUTORIAL_STD = (0.229, 0.224, 0.225)

# The validation split never depends on the training seed: every trial of a study, whatever its
# seed, must be judged on the same images.
SPLIT_SEED = 0


@dataclass
class Split:
    """One split: rows ``rows`` of the decoded uint8 ``pixels`` (N, C, H, W), their labels, the normalisation.

    ``pixels`` is the whole decoded set, shared by the splits cut from it (memory-mapped from the
    decode cache on the CPU), so a split costs its index, not a copy of its images. ``source_index``
    holds each row's position in the dataset's original train (or test) set, so teacher outputs
    and validation membership can be traced back to real files; on the CPU it is ``rows`` itself.
    """

    pixels: Tensor
    labels: Tensor
    source_index: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rows: Tensor | None = None  # positions in ``pixels``, on its device [default: ``source_index``]
    population: int = 0  # rows of the original set ``source_index`` points into [default: len(pixels)]

    def __post_init__(self) -> None:
        if self.rows is None:
            self.rows = self.source_index
        if not self.population:
            self.population = int(self.pixels.shape[0])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        channels, height, width = self.pixels.shape[1:]
        return int(channels), int(height), int(width)

    def batch(self, index: Tensor) -> Tensor:
        """Rows ``index`` (positions in this split) as normalised float32 (B, C, H, W), on the split's device."""
        assert self.rows is not None
        return normalise(self.pixels[self.rows[index]], self.mean, self.std)

    def chunks(self, size: int) -> Iterator[Tensor]:
        """Every row in order, normalised, ``size`` rows at a time (evaluation)."""
        for images, _ in self.chunks_with_rows(size):
            yield images

    def chunks_with_rows(self, size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Every row in order, normalised, with its ``source_index`` (on the device): the teacher's one pass."""
        sources = self.source_index.to(self.labels.device)
        for begin in range(0, len(self), size):
            index = torch.arange(begin, min(begin + size, len(self)), device=self.labels.device)
            yield self.batch(index), sources[index]

    def head(self, count: int = 1) -> Tensor:
        """The first ``count`` rows, normalised: a sample for shape probes."""
        return self.batch(torch.arange(min(count, len(self)), device=self.labels.device))

    @property
    def images(self) -> Tensor:
        """Every row normalised at once: float32, 4x the uint8 pixels; for small splits and tests."""
        return self.batch(torch.arange(len(self), device=self.labels.device))

    def to(self, device: torch.device) -> Split:
        """The split on ``device``: on a GPU its rows' pixels are copied there once (as uint8), so batches
        never cross the bus again; on the CPU it stays where it is (memory-mapped)."""
        if device == self.pixels.device:
            return self
        assert self.rows is not None
        pixels = self.pixels[self.rows.to(self.pixels.device)].to(device)
        rows = torch.arange(len(self), device=device)
        return replace(self, pixels=pixels, labels=self.labels.to(device), rows=rows)


@dataclass
class TensorSplits:
    """Train / validation / test splits of one dataset, normalised and ready to index."""

    dataset: str
    train: Split
    val: Split | None
    test: Split
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train.shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.train.shape[1], self.train.shape[2]

    def train_index_digest(self) -> str:
        """Hash of the train rows' source indices: part of the teacher-output cache key."""
        data = self.train.source_index.to(torch.int64).numpy().tobytes()
        return hashlib.sha256(data).hexdigest()[:16]

    def to(self, device: torch.device) -> TensorSplits:
        return TensorSplits(
            self.dataset,
            self.train.to(device),
            self.val.to(device) if self.val is not None else None,
            self.test.to(device),
            self.classes,
            self.mean,
            self.std,
            self.fingerprint,
        )


def load_splits(
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    *,
    val_size: int = 5000,
    limit_train: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: tuple[int, int] | None = None,
) -> TensorSplits:
    """Load ``dataset`` and return normalised train / validation / test splits.

    ``val_size`` images are held out of the train set by a fixed permutation (stable across runs
    and seeds; 0 disables validation). ``limit_train`` keeps the first N of the remaining train
    images, for quick runs. The test split is untouched and never used to choose anything.
    """
    decoded = decode_dataset(dataset, data_dir, cache_dir=cache_dir, image_size=image_size)
    n_train = int(decoded.train_labels.shape[0])
    if val_size >= n_train:
        raise ConfigError("val_size", f"must be below the {n_train} images of the train set, got {val_size}")

    order = torch.randperm(n_train, generator=torch.Generator().manual_seed(SPLIT_SEED))
    val_index = torch.sort(order[:val_size]).values
    train_index = torch.sort(order[val_size:]).values
    if limit_train is not None:
        train_index = torch.sort(order[val_size:][:limit_train]).values

    mean, std = _normalisation(decoded)
    train = _make_split(decoded.train_images, decoded.train_labels, train_index, mean, std)
    val = _make_split(decoded.train_images, decoded.train_labels, val_index, mean, std) if val_size else None
    test_index = torch.arange(int(decoded.test_labels.shape[0]))
    test = _make_split(decoded.test_images, decoded.test_labels, test_index, mean, std)
    return TensorSplits(dataset, train, val, test, decoded.classes, mean, std, decoded.fingerprint)


# CIFAR-10's 32x32 images are inferred this many at a time; larger ones fewer (a 224-pixel batch of 1,024
# held ~7 GB of activations), so an inference batch holds about the same number of pixels at any size.
CIFAR_PIXELS = 32 * 32


def inference_batch(images: Tensor | Split, batch_size: int) -> int:
    """Rows per inference batch: ``batch_size`` 32x32 images' worth of pixels, at least one image."""
    height, width = images.shape[-2:]
    return max(1, min(batch_size, batch_size * CIFAR_PIXELS // (int(height) * int(width))))


def normalise(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """uint8 (N, C, H, W) → float32 ``(x/255 - mean)/std``, elementwise (the same floats for any batch).

    Written as a plain cast then an in-place multiply-add: mixed uint8*float kernels are ~4x slower.
    """
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    out = images.to(torch.float32)
    return out.mul_((1.0 / (255.0 * s)).to(torch.float32)).add_((-m / s).to(torch.float32))


def _make_split(
    pixels: Tensor, labels: Tensor, index: Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> Split:
    return Split(pixels, labels[index].clone(), index, mean, std)


def _normalisation(decoded: DecodedDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The tutorial's values for 3-channel data; the train set's own statistics otherwise."""
    channels = int(decoded.train_images.shape[1])
    if channels == 3:
        return TUTORIAL_MEAN, TUTORIAL_STD
    pixels = decoded.train_images.to(torch.float64).div(255.0).transpose(0, 1).reshape(channels, -1)
    mean = tuple(round(float(v), 4) for v in pixels.mean(dim=1))
    std = tuple(round(float(v), 4) for v in pixels.std(dim=1))
    return mean, std


def splits_for(data: DataConfig, *, limit_train: bool = True) -> TensorSplits:
    """The splits a run's data section names, decoded through the home's cache.

    ``limit_train=False`` keeps every training image (a teacher that must not depend on a quick
    run's limit).
    """
    return load_splits(
        data.dataset,
        data.data_dir,
        val_size=data.val_size,
        limit_train=data.limit_train if limit_train else None,
        cache_dir=cache_dir(),
        image_size=parse_image_size(data.image_size) if data.image_size is not None else None,
    )
