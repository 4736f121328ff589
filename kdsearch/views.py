"""Augmentation as a tuple of fixed views, so the frozen teacher's outputs can be cached per view.

A view is a deterministic transform of every image: the image itself, its mirror, or a shift.
An augmentation is a tuple of views (``none``: the identity; ``flip``: identity and mirror;
``shift``: 18 views, each image translated by (dx, dy) ∈ {−4, 0, 4}² — pad-and-crop, the padding
at 0, the dataset's mean after normalisation — plain or mirrored). Each training row is shown in
one view drawn per row, and the teacher's outputs are held by (view, row): a student always sees
the view the teacher scored, as "patient and consistent" distillation asks (Beyer et al., 2022),
without running the teacher per step. A view's outputs are cached under the view's name, so every
augmentation that contains a view (identity is in all three) shares its cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

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

    def apply(self, images: Tensor) -> Tensor:
        """``images`` (N, C, H, W) in this view."""
        if self.dx or self.dy:
            height, width = images.shape[-2:]
            padded = F.pad(images, (SHIFT, SHIFT, SHIFT, SHIFT))
            images = padded[..., SHIFT - self.dy : SHIFT - self.dy + height, SHIFT - self.dx : SHIFT - self.dx + width]
        return images.flip(-1) if self.mirrored else images


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


def views_of(augmentations: tuple[str, ...] | str) -> tuple[View, ...]:
    """The views of one augmentation, or the union of several's in a stable order (first seen first)."""
    names = (augmentations,) if isinstance(augmentations, str) else augmentations
    return tuple(dict.fromkeys(view for name in names for view in AUGMENTATION_VIEWS[name]))


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


def apply_views(images: Tensor, views: tuple[View, ...], index: Tensor | None) -> Tensor:
    """Row ``i`` of ``images`` in view ``views[index[i]]`` (all in ``views[0]`` when ``index`` is None)."""
    if index is None:
        return images if views[0] == IDENTITY else views[0].apply(images)
    out = torch.empty_like(images)
    for position in torch.unique(index).tolist():
        rows = index == position
        out[rows] = views[position].apply(images[rows])
    return out


def gather_rows(per_view: tuple[Tensor, ...], rows: Tensor, index: Tensor | None) -> Tensor:
    """Row ``rows[i]`` of ``per_view[index[i]]``: a batch's cached outputs, each from its row's view."""
    if index is None:
        return per_view[0][rows]
    stacked = torch.stack([outputs[rows] for outputs in per_view])
    return stacked[index, torch.arange(len(rows), device=stacked.device)]
