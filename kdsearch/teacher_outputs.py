"""The frozen teacher's outputs: computed once per view, cached on disk, gathered per batch.

Every trial of a study distils from the same frozen teacher on the same images, so its logits and
tapped features are computed once per (teacher checkpoint content, dataset, train rows, layer,
normalisation, view), written atomically under ``<home>/cache/teacher/`` behind a file lock, and
indexed by (view, row) in the loop: the teacher never runs per step. Each view (``kdsearch.views``)
has its own cache file, so every augmentation that contains a view shares it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from filelock import FileLock
from torch import Tensor, nn

from kdsearch.data import Split, inference_batch
from kdsearch.fsutil import load_verified, save_verified
from kdsearch.paths import cache_dir
from kdsearch.taps import FeatureTap
from kdsearch.views import FEATURE_VIEWS, IDENTITY, AnyView, gather_rows

if TYPE_CHECKING:
    from kdsearch.data import TensorSplits

CACHE_FORMAT = "kdsearch-teacher-outputs/3"  # /3: one file per view, hashed by kdsearch.fsutil


@dataclass
class TeacherOutputs:
    """The frozen teacher's logits (and tapped features) for every train row, per view, in row order.

    ``logits[v]`` (and ``features[v]``) hold view ``views[v]``'s outputs; a batch gathers each row
    from the view it was shown in, so a mirrored row is paired with the teacher's mirrored image.
    """

    views: tuple[AnyView, ...]
    logits: tuple[Tensor, ...]
    features: tuple[Tensor, ...] | None
    layer: str | None

    def __len__(self) -> int:
        return int(self.logits[0].shape[0])

    def select(self, views: tuple[AnyView, ...]) -> TeacherOutputs:
        """The outputs of ``views`` in that order (an augmentation's), without copying a tensor."""
        missing = [view.name for view in views if view not in self.views]
        if missing:
            raise ValueError(f"the teacher's outputs lack the views {', '.join(missing)}")
        positions = [self.views.index(view) for view in views]
        features = tuple(self.features[p] for p in positions) if self.features is not None else None
        return TeacherOutputs(views, tuple(self.logits[p] for p in positions), features, self.layer)

    def rows(self, index: Tensor, view: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Logits and features of rows ``index``, row ``i`` from view ``view[i]`` (the first view if None)."""
        logits = gather_rows(self.logits, index, view)
        features = gather_rows(self.features, index, view) if self.features is not None else None
        return logits, features

    def to(self, device: torch.device) -> TeacherOutputs:
        features = tuple(f.to(device) for f in self.features) if self.features is not None else None
        return replace(self, logits=tuple(t.to(device) for t in self.logits), features=features)

    def map_features(self, transform: Callable[[Tensor], Tensor]) -> TeacherOutputs:
        """The same outputs with ``transform`` applied to the features of every view."""
        return replace(self, features=tuple(map(transform, self.features)) if self.features is not None else None)

    def without_features(self) -> TeacherOutputs:
        """Logits only (so features are not indexed per step by a logit-only method)."""
        return replace(self, features=None, layer=None)


def as_input(images: Tensor, device: torch.device) -> Tensor:
    """A batch in the memory format the models run fastest in on ``device`` (channels_last on CPU)."""
    if device.type == "cpu" and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


@torch.inference_mode()
def compute_teacher_outputs(
    teacher: nn.Module,
    images: Tensor | Split,
    layer: str | None,
    device: torch.device,
    batch_size: int = 512,
    *,
    view: AnyView = IDENTITY,
    rows: Tensor | None = None,
) -> TeacherOutputs:
    """Run the frozen teacher once over ``images`` (normalised images, or a split) in ``view``.

    A per-image view (a crop) needs each image's row: a split gives them; a plain tensor of images
    takes ``rows``.
    """
    teacher.eval()
    batch_size = inference_batch(images, batch_size)
    logits: list[Tensor] = []
    features: list[Tensor] = []
    chunks: Iterable[tuple[Tensor, Tensor | None]]
    if isinstance(images, Split):
        chunks = images.chunks_with_rows(batch_size)
    elif rows is not None:
        chunks = zip(images.split(batch_size), rows.to(images.device).split(batch_size), strict=True)
    else:  # a per-image view then refuses, rather than using some other row's boxes
        chunks = ((chunk, None) for chunk in images.split(batch_size))
    with ExitStack() as stack:
        tap = stack.enter_context(FeatureTap(teacher, layer)) if layer else None
        for chunk, chunk_rows in chunks:
            logits.append(teacher(as_input(view.apply(chunk, chunk_rows), device)).float().cpu())
            if tap is not None:
                features.append(tap.take().float().contiguous().cpu())
    return TeacherOutputs((view,), (torch.cat(logits),), (torch.cat(features),) if features else None, layer)


def cache_key(teacher_checksum: str, teacher: nn.Module, splits: TensorSplits, layer: str | None, view: AnyView) -> str:
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
        "view": view.name,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


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
    views: tuple[AnyView, ...] = (IDENTITY,),
) -> CachedOutputs:
    """Teacher outputs of ``views`` for ``splits.train`` (on ``device``), from the cache or computed once.

    ``layer``'s features are cached for the views in ``FEATURE_VIEWS`` only, the rest hold logits
    (``features`` is then None). A file lock makes concurrent builders (worker processes) wait for
    the first one's cache rather than compute it again; the cache is written atomically, so a crash
    never leaves a partial file.
    """
    start = time.perf_counter()
    built = False
    per_view: list[TeacherOutputs] = []
    for view in views:
        outputs, made = _view_outputs(teacher, checksum, splits, layer if view in FEATURE_VIEWS else None, device, view)
        per_view.append(outputs)
        built = built or made
    with_features = all(outputs.features is not None for outputs in per_view)
    outputs = TeacherOutputs(
        views,
        tuple(outputs.logits[0] for outputs in per_view),
        tuple(outputs.features[0] for outputs in per_view) if with_features else None,  # type: ignore[index]
        layer if with_features else None,
    )
    return CachedOutputs(outputs.to(device), time.perf_counter() - start, built)


def _view_outputs(
    teacher: nn.Module, checksum: str, splits: TensorSplits, layer: str | None, device: torch.device, view: AnyView
) -> tuple[TeacherOutputs, bool]:
    key = cache_key(checksum, teacher, splits, layer, view)
    path = cache_dir() / "teacher" / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = len(splits.train)
    header = {"format": CACHE_FORMAT, "key": key}
    with FileLock(str(path) + ".lock"):
        blob = load_verified(path, header, ("logits", "features"), "teacher-output", mmap=True)
        features = blob.get("features") if blob is not None and layer is not None else None
        if blob is not None and blob["logits"].shape[0] == rows and (layer is None or features is not None):
            cached = TeacherOutputs((view,), (blob["logits"],), (features,) if features is not None else None, layer)
            return cached, False
        outputs = compute_teacher_outputs(teacher, splits.train, layer, device, view=view)
        tensors = {"logits": outputs.logits[0], "features": outputs.features[0] if layer else None}
        save_verified(path, header, tensors, "teacher-output")
        return outputs, True
