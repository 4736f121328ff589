"""Augmentation as a tuple of fixed views, so the frozen teacher's outputs can be cached per view.

A view is a deterministic transform of every image: the image itself, its mirror, a shift, or
the k-th of K seeded random-resized crops of that image. An augmentation is a tuple of views
(``none``: the identity; ``flip``: identity and mirror; ``shift``: 18 views, each image translated
by (dx, dy) ∈ {−4, 0, 4}² — pad-and-crop, the padding at 0, the dataset's mean after
normalisation — plain or mirrored; ``crops:K``: K crops per image, the FKD way (Shen & Xing, ECCV
2022: the teacher's soft labels stored per crop with the crop's coordinates). Each training row is shown in
one view drawn per row, and the teacher's outputs are held by (view, row): a student always sees
the view the teacher scored, as "patient and consistent" distillation asks (Beyer et al., 2022),
without running the teacher per step. A view's outputs are cached under the view's name, so every
augmentation that contains a view (identity is in all three) shares its cache.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

from kdsearch.config import CROPS

SHIFT = 4


@dataclass(frozen=True)
class View:
    """Move right by ``dx`` and down by ``dy`` pixels (zeros come in), then mirror if asked."""

    dx: int = 0
    dy: int = 0
    mirrored: bool = False

    @property
    def name(self) -> str:
        """The view's cache name: ``identity``, ``mirrored`` or ``shift(dx,dy)[+mirrored]``."""
        if not (self.dx or self.dy):
            return "mirrored" if self.mirrored else "identity"
        return f"shift({self.dx},{self.dy}){'+mirrored' if self.mirrored else ''}"

    def apply(self, images: Tensor, rows: Tensor | None = None) -> Tensor:
        """``images`` (N, C, H, W) in this view (the same for every image: ``rows`` is not needed)."""
        if self.dx or self.dy:
            height, width = images.shape[-2:]
            padded = F.pad(images, (SHIFT, SHIFT, SHIFT, SHIFT))
            images = padded[..., SHIFT - self.dy : SHIFT - self.dy + height, SHIFT - self.dx : SHIFT - self.dx + width]
        return images.flip(-1) if self.mirrored else images


# Crops: a box per (image, crop) covering 25-100 % of the image at an aspect ratio within [3/4, 4/3]
# (torchvision's RandomResizedCrop for small images; a box that would not fit is clamped to it,
# where torchvision retries), half of them mirrored, resampled back to the image's size.
CROP_SCALE = (0.25, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_SEED = 0  # one set of crops per dataset, so every trial and worker shares one cache


@dataclass(frozen=True)
class CropView:
    """The ``index``-th of ``count`` random-resized crops of every image, its box fixed by (seed, row).

    The boxes of all ``rows`` rows (the train set's size) are drawn at once from one generator, so
    row r's k-th crop is the same in every process, whatever split or batch the row is in.
    """

    index: int
    count: int
    rows: int
    seed: int = CROP_SEED

    @property
    def name(self) -> str:
        return f"crop{self.index}of{self.count}-rows{self.rows}-seed{self.seed}"

    @cached_property
    def boxes(self) -> Tensor:
        """(rows, 5): x1, y1, x2, y2 as fractions of the image, and 1.0 where the crop is mirrored."""
        return crop_boxes(self.rows, self.count, self.seed)[:, self.index]

    def apply(self, images: Tensor, rows: Tensor | None = None) -> Tensor:
        from torchvision.ops import roi_align

        assert rows is not None, "a crop view needs each image's row"
        height, width = images.shape[-2:]
        box = self.boxes.to(images.device)[rows]
        scale = torch.tensor([width, height, width, height], dtype=images.dtype, device=images.device)
        corners = box[:, :4].to(images.dtype) * scale
        positions = torch.arange(len(images), device=images.device, dtype=images.dtype).unsqueeze(1)
        crops = roi_align(images, torch.cat([positions, corners], dim=1), (height, width), 1.0, 2, aligned=True)
        mirrored = box[:, 4].bool()
        return torch.where(mirrored.view(-1, 1, 1, 1), crops.flip(-1), crops)


@functools.lru_cache(maxsize=4)
def crop_boxes(rows: int, count: int, seed: int) -> Tensor:
    """(rows, count, 5) crop boxes as fractions of the image, drawn from one seeded generator.

    Cached: the K views of one augmentation each take their column of the same table (never written).
    """
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(rows, count, 5, generator=generator, dtype=torch.float64)
    area = CROP_SCALE[0] + draws[..., 0] * (CROP_SCALE[1] - CROP_SCALE[0])
    log_ratio = math.log(CROP_RATIO[0]) + draws[..., 1] * (math.log(CROP_RATIO[1]) - math.log(CROP_RATIO[0]))
    width = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    height = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    left = draws[..., 2] * (1.0 - width)
    top = draws[..., 3] * (1.0 - height)
    mirrored = (draws[..., 4] < 0.5).to(torch.float64)
    return torch.stack([left, top, left + width, top + height, mirrored], dim=-1).to(torch.float32)


AnyView = View | CropView
IDENTITY = View()
MIRRORED = View(mirrored=True)
# The order fixes which view a drawn index means, so it is part of every result: view 4 is the image.
SHIFT_VIEWS: tuple[View, ...] = tuple(
    View(dx, dy, mirrored) for mirrored in (False, True) for dy in (-SHIFT, 0, SHIFT) for dx in (-SHIFT, 0, SHIFT)
)
AUGMENTATION_VIEWS: dict[str, tuple[View, ...]] = {
    "none": (IDENTITY,),
    "flip": (IDENTITY, MIRRORED),
    "shift": SHIFT_VIEWS,
}
# The views whose tapped features are cached: a feature map of one view of CIFAR-10 fills hundreds
# of MB, so feature methods are offered these and the other views cache logits only.
FEATURE_VIEWS: tuple[View, ...] = AUGMENTATION_VIEWS["flip"]


def views_of(augmentations: tuple[str, ...] | str, rows: int = 0) -> tuple[AnyView, ...]:
    """The views of one augmentation, or the union of several's in a stable order (first seen first).

    ``rows`` is the train set's size, which crop views draw their boxes for.
    """
    names = (augmentations,) if isinstance(augmentations, str) else augmentations
    views: list[AnyView] = []
    for name in names:
        match = CROPS.match(name)
        if match:
            count = int(match.group(1))
            views += [CropView(k, count, rows) for k in range(count)]
        else:
            views += AUGMENTATION_VIEWS[name]
    return tuple(dict.fromkeys(views))


def draw_views(rows: int, views: int, generator: torch.Generator) -> Tensor | None:
    """Each row's view: an index into an augmentation's views, or None when there is only one.

    Two views are picked by a fair coin (the second when ``rand < 0.5``) and more uniformly, the
    draws ``flip`` and ``shift`` have always made, so seeded runs keep their numbers.
    """
    if views == 1:
        return None
    if views == 2:
        return (torch.rand(rows, generator=generator) < 0.5).long()
    return torch.randint(views, (rows,), generator=generator)


def apply_views(images: Tensor, views: tuple[AnyView, ...], index: Tensor | None, rows: Tensor | None = None) -> Tensor:
    """Row ``i`` of ``images`` in view ``views[index[i]]`` (all in ``views[0]`` when ``index`` is None).

    ``rows`` are the images' rows in the train set, which crop views need (each image has its own boxes).
    """
    if index is None:
        return images if views[0] == IDENTITY else views[0].apply(images, rows)
    out = torch.empty_like(images)
    for position in torch.unique(index).tolist():
        chosen = index == position
        out[chosen] = views[position].apply(images[chosen], rows[chosen] if rows is not None else None)
    return out


def gather_rows(per_view: tuple[Tensor, ...], rows: Tensor, index: Tensor | None) -> Tensor:
    """Row ``rows[i]`` of ``per_view[index[i]]``: a batch's cached outputs, each from its row's view."""
    if index is None:
        return per_view[0][rows]
    stacked = torch.stack([outputs[rows] for outputs in per_view])
    return stacked[index, torch.arange(len(rows), device=stacked.device)]
