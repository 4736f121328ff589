"""Augmentation as a fixed set of views, so the frozen teacher's outputs can be cached per view.

``flip`` shows each row as it is or mirrored (two views). ``shift`` shows each row in one of 18
views: translated by (dx, dy) ∈ {−4, 0, 4}² — pad-and-crop, the padding at 0, the dataset's mean
after normalisation — each plain or mirrored. A student always sees the view the teacher scored,
as "patient and consistent" distillation asks (Beyer et al., 2022), without running the teacher
per step: every view's logits are computed once, cached, and gathered by (view, row).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F  # noqa: N812

SHIFT = 4
# (dx, dy, mirrored) of every shift view; view 4 is the image itself.
SHIFT_VIEWS: tuple[tuple[int, int, bool], ...] = tuple(
    (dx, dy, mirrored) for mirrored in (False, True) for dy in (-SHIFT, 0, SHIFT) for dx in (-SHIFT, 0, SHIFT)
)


def view_name(view: tuple[int, int, bool]) -> str:
    dx, dy, mirrored = view
    return f"shift({dx},{dy}){'+mirrored' if mirrored else ''}"


def apply_view(images: Tensor, view: tuple[int, int, bool]) -> Tensor:
    """``images`` (N, C, H, W) moved right by dx and down by dy (zeros come in), then mirrored if asked."""
    dx, dy, mirrored = view
    if dx or dy:
        height, width = images.shape[-2:]
        padded = F.pad(images, (SHIFT, SHIFT, SHIFT, SHIFT))
        images = padded[..., SHIFT - dy : SHIFT - dy + height, SHIFT - dx : SHIFT - dx + width]
    return images.flip(-1) if mirrored else images


def apply_views(images: Tensor, views: Tensor) -> Tensor:
    """Each row in its own view: ``views`` holds an index into ``SHIFT_VIEWS`` per row."""
    out = torch.empty_like(images)
    for view in torch.unique(views).tolist():
        rows = views == view
        out[rows] = apply_view(images[rows], SHIFT_VIEWS[view])
    return out
