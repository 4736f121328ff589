"""The frozen teacher's outputs: computed once per view, cached on disk, gathered per batch.

Every trial of a study distils from the same frozen teacher on the same images, so its logits and
tapped features are computed once per (teacher checkpoint content, dataset, train rows, layer,
normalisation, view), written atomically under ``<home>/cache/teacher/`` behind a file lock, and
indexed by row in the loop: the teacher never runs per step. Augmentation is a fixed set of views
(``flip``: the image and its mirror), so the outputs are cached once per view too, and a batch's
rows are gathered from the view each row was shown in.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from torch import Tensor, nn

from kdsearch.errors import warn
from kdsearch.fsutil import atomic_write
from kdsearch.paths import cache_dir
from kdsearch.taps import FeatureTap
from kdsearch.views import SHIFT_VIEWS, apply_view, view_name

if TYPE_CHECKING:
    from kdsearch.data import TensorSplits

CACHE_FORMAT = "kdsearch-teacher-outputs/2"  # /2: with a SHA-256 of the tensors


def pick_rows(flip: Tensor | None, plain: Tensor, flipped: Tensor) -> Tensor:
    """Row-wise ``flipped`` where ``flip`` is set, else ``plain``."""
    if flip is None:
        return plain
    return torch.where(flip.view(-1, *[1] * (plain.dim() - 1)), flipped, plain)


@dataclass
class TeacherOutputs:
    """The frozen teacher's logits (and tapped features) for every train row, in row order.

    ``mirrored`` holds the same for the horizontally flipped images, when ``flip`` augmentation
    may be used: a flipped row is paired with the teacher's view of that flipped image.
    """

    logits: Tensor
    features: Tensor | None
    layer: str | None
    mirrored: TeacherOutputs | None = None
    shifted: Tensor | None = None  # (views, rows, classes): logits of every shift view

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def rows(
        self, index: Tensor, flip: Tensor | None = None, view: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Logits and features of rows ``index``, each from the view it was shown in (``flip``, ``view``)."""
        if view is not None:
            assert self.shifted is not None, "shift augmentation needs the teacher's outputs per shift view"
            return self.shifted[view, index], None
        logits = self.logits[index]
        features = self.features[index] if self.features is not None else None
        mirrored = self.mirrored if flip is not None else None
        if mirrored is not None:
            logits = pick_rows(flip, logits, mirrored.logits[index])
            if features is not None and mirrored.features is not None:
                features = pick_rows(flip, features, mirrored.features[index])
        return logits, features

    def to(self, device: torch.device) -> TeacherOutputs:
        features = self.features.to(device) if self.features is not None else None
        mirrored = self.mirrored.to(device) if self.mirrored is not None else None
        shifted = self.shifted.to(device) if self.shifted is not None else None
        return TeacherOutputs(self.logits.to(device), features, self.layer, mirrored, shifted)

    def map_features(self, transform: Callable[[Tensor], Tensor]) -> TeacherOutputs:
        """The same outputs with ``transform`` applied to the features of every view."""
        features = transform(self.features) if self.features is not None else None
        mirrored = self.mirrored.map_features(transform) if self.mirrored is not None else None
        return TeacherOutputs(self.logits, features, self.layer, mirrored, self.shifted)

    def without_features(self) -> TeacherOutputs:
        """Logits only (so features are not indexed per step by a logit-only method)."""
        mirrored = self.mirrored.without_features() if self.mirrored is not None else None
        return TeacherOutputs(self.logits, None, None, mirrored, self.shifted)


def as_input(images: Tensor, device: torch.device) -> Tensor:
    """A batch in the memory format the models run fastest in on ``device`` (channels_last on CPU)."""
    if device.type == "cpu" and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


@torch.inference_mode()
def compute_teacher_outputs(
    teacher: nn.Module,
    images: Tensor,
    layer: str | None,
    device: torch.device,
    batch_size: int = 512,
    *,
    mirrored: bool = False,
    view: tuple[int, int, bool] | None = None,
) -> TeacherOutputs:
    """Run the frozen teacher once over ``images`` (flipped left-right when ``mirrored``, or in a shift ``view``)."""
    teacher.eval()
    logits: list[Tensor] = []
    features: list[Tensor] = []
    with ExitStack() as stack:
        tap = stack.enter_context(FeatureTap(teacher, layer)) if layer else None
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            if mirrored:
                batch = batch.flip(-1)
            if view is not None:
                batch = apply_view(batch, view)
            logits.append(teacher(as_input(batch, device)).float().cpu())
            if tap is not None:
                features.append(tap.take().float().contiguous().cpu())
    return TeacherOutputs(torch.cat(logits), torch.cat(features) if features else None, layer)


def cache_key(teacher_checksum: str, teacher: nn.Module, splits: TensorSplits, layer: str | None, view: str) -> str:
    """Everything the cached outputs depend on; any change gives a new key and a fresh cache."""
    parts = {
        "format": CACHE_FORMAT,
        "teacher_sha256": teacher_checksum,
        "teacher_model": type(teacher).__module__ + "." + type(teacher).__qualname__,
        "dataset": splits.dataset,
        "data_fingerprint": splits.fingerprint,
        "train_rows": splits.train_index_digest(),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "layer": layer,
        "view": view,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def content_digest(*tensors: Tensor | None) -> str:
    """SHA-256 of the tensors' bytes: stored with a cache and checked when it is read."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is not None:
            digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _read_cache(path: str, key: str, rows: int, layer: str | None) -> TeacherOutputs | None:
    """The cached outputs if they are this key's and intact; a corrupt file is rebuilt with one warning."""
    try:
        # Memory-mapped: worker processes on one machine share the pages instead of each holding a copy.
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if blob.get("format") != CACHE_FORMAT or blob.get("key") != key:
            return None
        logits, features = blob["logits"], blob.get("features")
        if logits.shape[0] != rows or (layer is not None and (features is None or features.shape[0] != rows)):
            return None
        intact = content_digest(logits, features) == blob.get("sha256")
    except Exception:  # noqa: BLE001 - truncated or unreadable: rebuild rather than trust it
        intact = False
    if not intact:
        warn(f"teacher-output cache {path} is corrupt; computing the teacher's outputs again")
        return None
    return TeacherOutputs(logits, features, layer)


@dataclass
class CachedOutputs:
    outputs: TeacherOutputs
    seconds: float  # spent computing or loading
    built: bool  # True when this call ran the teacher (no usable cache existed)


def cached_teacher_outputs(
    teacher: nn.Module,
    checksum: str,
    splits: TensorSplits,
    layer: str | None,
    device: torch.device,
    *,
    mirrored: bool = False,
    shifted: bool = False,
) -> CachedOutputs:
    """Teacher outputs for ``splits.train`` (on ``device``), from the cache or computed once and cached.

    With ``mirrored`` the outputs for the flipped images come along (``.mirrored``). A file lock
    makes concurrent builders (worker processes) wait for the first one's cache rather than compute
    it again; the cache is written atomically, so a crash never leaves a partial file.
    """
    start = time.perf_counter()
    outputs, built = _view_outputs(teacher, checksum, splits, layer, device, "identity")
    if mirrored:
        outputs.mirrored, built_mirror = _view_outputs(teacher, checksum, splits, layer, device, "mirrored")
        built = built or built_mirror
    if shifted:
        # Logits only: one view's tapped features of CIFAR-10 fill hundreds of MB, 18 views gigabytes.
        views = [_view_outputs(teacher, checksum, splits, None, device, view_name(v)) for v in SHIFT_VIEWS]
        outputs.shifted = torch.stack([view.logits for view, _ in views])
        built = built or any(made for _, made in views)
    return CachedOutputs(outputs.to(device), time.perf_counter() - start, built)


def _view_outputs(
    teacher: nn.Module, checksum: str, splits: TensorSplits, layer: str | None, device: torch.device, view: str
) -> tuple[TeacherOutputs, bool]:
    key = cache_key(checksum, teacher, splits, layer, view)
    path = cache_dir() / "teacher" / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = len(splits.train)
    with FileLock(str(path) + ".lock"):
        outputs = _read_cache(str(path), key, rows, layer) if path.exists() else None
        if outputs is not None:
            return outputs, False
        shift = next((v for v in SHIFT_VIEWS if view_name(v) == view), None)
        outputs = compute_teacher_outputs(
            teacher, splits.train.images, layer, device, mirrored=view == "mirrored", view=shift
        )
        blob = {
            "format": CACHE_FORMAT,
            "key": key,
            "logits": outputs.logits,
            "features": outputs.features,
            "sha256": content_digest(outputs.logits, outputs.features),
        }
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
        return outputs, True
