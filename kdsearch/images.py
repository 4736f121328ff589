"""Images of any size and mode, brought to one shape at decode time.

``image_size`` ("S" or "HxW") scales each image, keeping its aspect, until it covers S×S (H×W),
then centre-crops it there: torchvision's ``Resize`` then ``CenterCrop``, with antialiasing, on
the uint8 pixels, once per dataset (the result is what the decode cache holds). A folder's colour
mode is RGB unless every image is single-channel (grayscale, 1-bit, 16-bit): one grayscale photo
among colour ones no longer makes the whole folder gray, and RGBA and palette images become RGB.
The size rules are declarations (``kdsearch.config`` checks a size with them), so torch is
imported only where pixels are touched.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from kdsearch.errors import ConfigError, shown

if TYPE_CHECKING:
    from torch import Tensor

SIZE = re.compile(r"^\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*$")
MAX_SIDE = 4096
# PIL modes of single-channel images; every other mode (RGB, RGBA, P, CMYK, YCbCr…) decodes as RGB.
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"})


def parse_image_size(text: str | int) -> tuple[int, int]:
    """``"48"`` → (48, 48), ``"64x48"`` → (64, 48) as (height, width); anything else is the field's error."""
    match = SIZE.match(str(text))
    if match is None:
        raise ConfigError("image_size", f"must be S or HxW in pixels (48, 64x48), got {str(text)[:40]!r}")
    height = int(match.group(1))
    width = int(match.group(2)) if match.group(2) else height
    if not (1 <= height <= MAX_SIDE and 1 <= width <= MAX_SIDE):
        raise ConfigError("image_size", f"must be between 1 and {MAX_SIDE} pixels a side, got {shown(text)}")
    return height, width


def image_size_problem(text: str) -> str | None:
    """The knob's check: None when ``text`` is a size."""
    try:
        parse_image_size(text)
    except ConfigError as exc:
        return exc.problem
    return None


def fit(image: Tensor, size: tuple[int, int]) -> Tensor:
    """A uint8 (C, h, w) image (or a batch of one size) scaled to cover ``size``, aspect kept, and centre-cropped."""
    from torchvision.transforms.v2 import functional as tvf

    height, width = size
    if tuple(image.shape[-2:]) == (height, width):
        return image
    scale = max(height / image.shape[-2], width / image.shape[-1])
    covering = [max(height, round(image.shape[-2] * scale)), max(width, round(image.shape[-1] * scale))]
    return tvf.center_crop(tvf.resize(image, covering, antialias=True), [height, width])


def fit_all(images: list[Tensor], size: tuple[int, int]) -> Tensor:
    """Every image fitted to ``size``, stacked (N, C, H, W) uint8."""
    import torch

    return torch.stack([fit(image, size) for image in images])


def folder_is_gray(paths: list[str]) -> bool:
    """True when every image is single-channel, read from the file headers alone (no pixel is decoded)."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as image:
                if image.mode not in GRAY_MODES:
                    return False
        except (UnidentifiedImageError, OSError):
            return False  # the decode names the file; the mode question is moot
    return True
