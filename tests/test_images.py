"""Images of any size and mode: fitted at decode time with --image-size, colour unless all are gray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdsearch.decode import decode_dataset
from kdsearch.errors import ConfigError
from kdsearch.images import fit, parse_image_size
from tests.helpers import run_cli

# (suffix, PIL mode, size): the kinds of file a photo folder mixes.
KINDS = [
    (".jpg", "RGB", (40, 30)),
    (".png", "L", (32, 32)),
    (".png", "RGBA", (64, 48)),
    (".png", "P", (50, 50)),
    (".bmp", "RGB", (36, 44)),
    (".tif", "RGB", (32, 40)),
    (".ppm", "RGB", (30, 30)),
    (".gif", "P", (33, 35)),
]


def _image(mode: str, size: tuple[int, int], label: int, rng: np.random.Generator) -> Image.Image:
    pixels = rng.integers(0, 80, size=(size[1], size[0], 3)).astype(np.uint8)
    pixels[..., label % 3] += 150  # the class is the dominant colour, learnable after any resize
    return Image.fromarray(pixels).convert(mode)


def mixed_folder(root: Path, classes: int = 3, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for label in range(classes):
            folder = root / split / f"c{label}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                suffix, mode, size = KINDS[(i + label) % len(KINDS)]
                image = _image(mode, size, label, rng)
                if suffix == ".gif":
                    second = _image(mode, size, label, rng)
                    image.save(folder / f"{i}{suffix}", save_all=True, append_images=[second])
                else:
                    image.save(folder / f"{i}{suffix}")
    return root


@pytest.mark.parametrize(
    ("text", "size"), [("48", (48, 48)), ("64x48", (64, 48)), (" 32 X 16 ", (32, 16)), (7, (7, 7))]
)
def test_an_image_size_is_s_or_h_by_w(text: str | int, size: tuple[int, int]) -> None:
    assert parse_image_size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "0", "48x", "10000", "-3", "4x4x4"])
def test_a_bad_image_size_is_the_fields_error(text: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_image_size(text)
    assert raised.value.name == "image_size"


def test_fit_covers_then_centre_crops() -> None:
    wide = torch.zeros(3, 20, 40, dtype=torch.uint8)
    wide[:, :, 10:30] = 200  # a bright middle half
    fitted = fit(wide, (10, 10))  # scaled to 10x20, the middle 10 columns kept
    assert fitted.shape == (3, 10, 10) and fitted.dtype == torch.uint8
    assert int(fitted.min()) >= 150  # only the bright middle survives the crop
    assert fit(wide, (20, 40)) is wide


def test_a_folder_of_mixed_sizes_needs_an_image_size_and_mixed_modes_become_rgb(tmp_path: Path) -> None:
    folder = mixed_folder(tmp_path / "photos")
    with pytest.raises(ConfigError, match=r"must be given: images differ in size") as raised:
        decode_dataset("imagefolder", folder)
    assert raised.value.name == "image_size"
    decoded = decode_dataset("imagefolder", folder, cache_dir=tmp_path / "cache", image_size=(24, 24))
    assert decoded.train_images.shape == (24, 3, 24, 24) and decoded.test_images.shape == (24, 3, 24, 24)
    # Each class's dominant colour survives decoding every colour format, mode and resize (files are
    # listed per class in name order, so row 8·label + i is file i, of kind (i + label) % 8).
    means = decoded.train_images.float().mean(dim=(2, 3))
    for row, label in enumerate(decoded.train_labels.tolist()):
        if KINDS[(row % 8 + label) % len(KINDS)][1] != "L":
            assert int(means[row].argmax()) == label % 3, (row, KINDS[(row % 8 + label) % len(KINDS)])
    other = decode_dataset("imagefolder", folder, cache_dir=tmp_path / "cache", image_size=(16, 32))
    assert other.train_images.shape[2:] == (16, 32) and other.fingerprint != decoded.fingerprint
    assert len(list((tmp_path / "cache" / "data").glob("*.pt"))) == 2  # one cache per size


def test_a_folder_of_grayscale_images_stays_one_channel(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for label in range(2):
            (tmp_path / split / f"c{label}").mkdir(parents=True)
            for i in range(3):
                _image("L", (20, 20), label, rng).save(tmp_path / split / f"c{label}" / f"{i}.png")
    assert decode_dataset("imagefolder", tmp_path).train_images.shape == (6, 1, 20, 20)


@pytest.mark.slow
def test_a_mixed_folder_trains_with_an_image_size_on_the_command_line(
    tmp_path: Path, home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = mixed_folder(tmp_path / "photos")
    run = ["train", "--method", "ce", "--dataset", "imagefolder", "--data-dir", folder, "--val-size", "6"]
    run += ["--epochs", "1", "--batch-size", "8"]
    code, _, err = run_cli(run, capsys)
    assert code == 2 and err.count("\n") == 1 and "--image-size must be given: images differ in size" in err
    code, out, err = run_cli([*run, "--image-size", "48", "--json", "-q"], capsys)
    assert code == 0, err
    assert '"image_size": "48"' in out
    code, _, err = run_cli([*run, "--image-size", "48x"], capsys)
    assert code == 2 and "--image-size must be S or HxW" in err
