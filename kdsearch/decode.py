"""Decoding datasets into uint8 tensors once, and caching the decode.

CIFAR and Fashion-MNIST come in torchvision's formats (downloaded when missing), an image folder as
files; each is decoded once into (N, C, H, W) uint8 tensors whose content fingerprint names the
dataset everywhere else (teacher caches, study identity), whatever folder it was read from.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdsearch.config import DATASETS
from kdsearch.errors import ConfigError, UserError, shown
from kdsearch.fsutil import load_verified, save_verified, tensor_sha256
from kdsearch.images import fit, fit_all, folder_is_gray
from kdsearch.paths import default_data_dir

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class DecodedDataset:
    """A whole dataset as uint8 tensors (N, C, H, W) plus int64 labels, before any split."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: list[str]
    fingerprint: str


def decode_dataset(
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    image_size: tuple[int, int] | None = None,
) -> DecodedDataset:
    """Decode ``dataset`` into uint8 tensors, each fitted to ``image_size`` if given; from the cache when current."""
    if dataset not in DATASETS:
        raise UserError(f"unknown dataset {shown(dataset)}; choose one of {', '.join(DATASETS)}")
    if dataset == "imagefolder":
        if data_dir is None:
            raise ConfigError(
                "data_dir", "must be given for dataset imagefolder (a folder with train/<class>/, test/<class>/)"
            )
        return _decode_imagefolder(Path(data_dir), cache_dir, image_size)
    root = Path(data_dir) if data_dir is not None else default_data_dir(dataset)
    decoded = _decode_fashion_mnist(root) if dataset == "fashion-mnist" else _decode_cifar(dataset, root)
    return _fitted(decoded, image_size) if image_size is not None else decoded


def _fitted(decoded: DecodedDataset, size: tuple[int, int]) -> DecodedDataset:
    """A torchvision-format dataset (one size throughout) fitted to ``size``, its fingerprint that of the result."""
    train, test = fit(decoded.train_images, size), fit(decoded.test_images, size)
    fingerprint = _content_fingerprint(train, decoded.train_labels, test, decoded.test_labels)
    return DecodedDataset(train, decoded.train_labels, test, decoded.test_labels, decoded.classes, fingerprint)


def _content_fingerprint(*tensors: Tensor) -> str:
    """The dataset's identity: the hash of its decoded pixels and labels, equal on every host."""
    return tensor_sha256(*tensors)[:16]


def _download_error(name: str, root: Path, exc: Exception) -> ConfigError:
    return ConfigError(
        "data_dir",
        f"{root} holds no {name} and it could not be downloaded ({type(exc).__name__}): point data_dir at a "
        "local copy, or use dataset imagefolder",
    )


def _decode_cifar(dataset: str, root: Path) -> DecodedDataset:
    from torchvision import datasets

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    name = "CIFAR-10" if dataset == "cifar10" else "CIFAR-100"
    try:
        train = cls(str(root), train=True, download=False)
        test = cls(str(root), train=False, download=False)
    except RuntimeError:
        try:
            train = cls(str(root), train=True, download=True)
            test = cls(str(root), train=False, download=True)
        except (OSError, RuntimeError) as exc:  # URLError is an OSError
            raise _download_error(name, root, exc) from None
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise UserError(f"{name} files in {root} are corrupt ({exc}); delete them and retry") from None
    train_images = torch.from_numpy(np.ascontiguousarray(train.data.transpose(0, 3, 1, 2)))
    test_images = torch.from_numpy(np.ascontiguousarray(test.data.transpose(0, 3, 1, 2)))
    train_labels = torch.tensor(train.targets, dtype=torch.int64)
    test_labels = torch.tensor(test.targets, dtype=torch.int64)
    fingerprint = _content_fingerprint(train_images, train_labels, test_images, test_labels)
    return DecodedDataset(train_images, train_labels, test_images, test_labels, list(train.classes), fingerprint)


FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _find_idx_folder(root: Path) -> Path | None:
    """A folder holding the four idx files, gzipped or not: ``root`` itself or torchvision's layout."""
    for folder in (root, root / "FashionMNIST" / "raw"):
        if all((folder / f).exists() or (folder / f"{f}.gz").exists() for f in FASHION_FILES.values()):
            return folder
    return None


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if len(raw) < 8 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims))
    if len(raw) - offset != expected:
        raise UserError(f"{path} is truncated: expected {expected} bytes of data, found {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims)


def _decode_fashion_mnist(root: Path) -> DecodedDataset:
    folder = _find_idx_folder(root)
    if folder is None:
        from torchvision import datasets

        try:
            datasets.FashionMNIST(str(root), train=True, download=True)
            datasets.FashionMNIST(str(root), train=False, download=True)
        except (OSError, RuntimeError) as exc:
            raise _download_error("Fashion-MNIST", root, exc) from None
        folder = _find_idx_folder(root)
        assert folder is not None
    arrays = {}
    for key, stem in FASHION_FILES.items():
        path = folder / stem if (folder / stem).exists() else folder / f"{stem}.gz"
        arrays[key] = _read_idx(path)
    train_images = torch.from_numpy(arrays["train_images"].copy()).unsqueeze(1)
    test_images = torch.from_numpy(arrays["test_images"].copy()).unsqueeze(1)
    train_labels = torch.from_numpy(arrays["train_labels"].astype(np.int64))
    test_labels = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    if len(train_images) != len(train_labels) or len(test_images) != len(test_labels):
        raise UserError(f"Fashion-MNIST files in {folder} disagree on the number of images and labels")
    fingerprint = _content_fingerprint(train_images, train_labels, test_images, test_labels)
    return DecodedDataset(train_images, train_labels, test_images, test_labels, list(FASHION_CLASSES), fingerprint)


def _list_imagefolder(split_dir: Path) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    """Classes and ``(path, label, size, mtime_ns)`` per image file, by one scandir per folder.

    A folder or file that cannot be read (a symlink loop, no permission) is one user error naming it.
    """
    try:
        return _scan_imagefolder(split_dir)
    except OSError as exc:
        raise UserError(f"{exc.filename or split_dir} cannot be read: {exc.strerror or exc}") from None


def _scan_imagefolder(split_dir: Path) -> tuple[list[str], list[tuple[str, int, int, int]]]:
    if not split_dir.is_dir():
        raise UserError(f"{split_dir} is missing: an image folder needs train/<class>/ and test/<class>/")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} holds no class folders")
    files: list[tuple[str, int, int, int]] = []
    for label, name in enumerate(classes):
        entries = sorted(os.scandir(split_dir / name), key=lambda e: e.name)
        for entry in entries:
            if os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES and entry.is_file():
                stat = entry.stat()
                files.append((entry.path, label, stat.st_size, stat.st_mtime_ns))
    if not files:
        raise UserError(f"{split_dir} holds no image files")
    return classes, files


def _imagefolder_fingerprint(files: list[tuple[str, int, int, int]], root: Path) -> str:
    """Cheap stamp of one copy of an image folder: every file's relative path, label, size and mtime."""
    digest = hashlib.sha256()
    prefix = len(str(root)) + 1
    for path, label, size, mtime in files:
        digest.update(f"{path[prefix:]}\0{size}\0{mtime}\0{label}\n".encode())
    return digest.hexdigest()[:16]


# Files decoded per batch: JPEGs decode in one batched call per chunk, and no more than a chunk of
# compressed files and decoded images is held in memory at once.
DECODE_CHUNK = 1024


def _decode_files(
    files: list[tuple[str, int, int, int]],
    gray: bool,
    image_size: tuple[int, int] | None,
    spill_dir: Path | None = None,
) -> tuple[Tensor, Tensor]:
    """Decode with torchvision's native decoders (JPEGs batched: ~4x PIL's speed), PIL for the rest.

    Every image is decoded as grayscale when ``gray`` (the whole folder is single-channel), else as
    RGB; then fitted to ``image_size``, or, without one, required to share one size. Images are
    decoded a chunk at a time into one uint8 tensor; with ``spill_dir`` that tensor is a shared
    mapping of an (unlinked) file there, so a split larger than memory is decoded in page cache,
    not in the process's anonymous memory.
    """
    labels = torch.tensor([label for _, label, *_ in files], dtype=torch.int64)
    out: Tensor | None = None
    size: tuple[int, ...] | None = None
    for start in range(0, len(files), DECODE_CHUNK):
        chunk = files[start : start + DECODE_CHUNK]
        with warnings.catch_warnings():
            # torchvision 0.29 deprecates torchvision.io in favour of torchcodec; it is still the fastest
            # JPEG path for torch<=2.14 here, and the decoded cache means it runs once per dataset.
            warnings.simplefilter("ignore", DeprecationWarning)
            decoded = _decode_files_quietly(chunk, gray)
        if image_size is not None:
            batch = fit_all(decoded, image_size)
        else:
            size = size or tuple(decoded[0].shape[1:])
            for (path, *_), image in zip(chunk, decoded, strict=True):
                if tuple(image.shape[1:]) != size:
                    raise ConfigError(
                        "image_size",
                        f"must be given: images differ in size ({path} is {image.shape[2]}x{image.shape[1]}, earlier "
                        f"ones {size[1]}x{size[0]}); with it each image is resized and centre-cropped to it",
                    )
            batch = torch.stack(decoded)
        if out is None:
            out = _uint8_buffer((len(files), *batch.shape[1:]), spill_dir)
        out[start : start + len(chunk)] = batch
    assert out is not None
    return out, labels


def _uint8_buffer(shape: tuple[int, ...], spill_dir: Path | None) -> Tensor:
    """An uninitialised uint8 tensor: in memory, or mapped from a file in ``spill_dir`` (unlinked at once:
    the mapping keeps it until the tensor is freed, and a crash leaves nothing behind)."""
    if spill_dir is None:
        return torch.empty(shape, dtype=torch.uint8)
    spill_dir.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".decode-", suffix=".raw", dir=spill_dir)
    os.close(fd)
    try:
        flat = torch.from_file(name, shared=True, size=math.prod(shape), dtype=torch.uint8)
    finally:
        os.unlink(name)
    return flat.view(shape)


def _read(path: str) -> Tensor:
    from torchvision.io import read_file

    if os.path.getsize(path) == 0:
        raise UserError(f"cannot decode image {path}: the file is empty")
    try:
        return read_file(path)
    except (RuntimeError, OSError) as exc:
        raise UserError(f"cannot read image {path}: {str(exc).strip().splitlines()[-1]}") from None


def _eight_bit(image: Tensor | None) -> Tensor:
    """16-bit PNGs decode to uint16: scaled to 8 bits like every other image (0..65535 → 0..255)."""
    assert image is not None
    if image.dtype == torch.uint8:
        return image
    top = float(torch.iinfo(image.dtype).max)
    return (image.to(torch.float64) * (255.0 / top)).round().to(torch.uint8)


# What torchvision decodes natively; everything else (BMP, TIFF, PPM/PGM, GIF's first frame) goes through PIL.
NATIVE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def _decode_files_quietly(files: list[tuple[str, int, int, int]], gray: bool) -> list[Tensor]:
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    def fail(path: str, exc: Exception) -> UserError:
        return UserError(f"cannot decode image {path}: {str(exc).strip().splitlines()[0] if str(exc).strip() else exc}")

    mode = ImageReadMode.GRAY if gray else ImageReadMode.RGB
    suffixes = [os.path.splitext(path)[1].lower() for path, *_ in files]
    raw = {i: _read(path) for i, (path, *_) in enumerate(files) if suffixes[i] in NATIVE_SUFFIXES}
    decoded: list[Tensor | None] = [None] * len(files)
    jpeg_positions = [i for i, suffix in enumerate(suffixes) if suffix in (".jpg", ".jpeg")]
    if jpeg_positions:
        try:
            for i, image in zip(jpeg_positions, decode_jpeg([raw[i] for i in jpeg_positions], mode=mode), strict=True):
                decoded[i] = image
        except RuntimeError:
            pass  # one bad file fails the batch; the per-file pass below names it
    for i, image in enumerate(decoded):
        if image is not None:
            continue
        path = files[i][0]
        try:
            decoded[i] = decode_image(raw[i], mode=mode) if i in raw else _decode_with_pil(path, gray)
        except (RuntimeError, OSError, ValueError) as exc:
            raise fail(path, exc) from None
    return [_eight_bit(image) for image in decoded]


def _decode_with_pil(path: str, gray: bool) -> Tensor:
    """A format torchvision does not decode, through PIL: the first frame, converted to L or RGB."""
    from PIL import Image, UnidentifiedImageError

    if os.path.getsize(path) == 0:
        raise UserError(f"cannot decode image {path}: the file is empty")
    try:
        with Image.open(path) as image:
            image.seek(0)
            array = np.asarray(image.convert("L" if gray else "RGB"))
    except UnidentifiedImageError as exc:
        raise OSError(str(exc)) from None
    pixels = torch.from_numpy(array.copy())
    return pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1).contiguous()


CACHE_FORMAT = "kdsearch-decoded/2"  # /2: hashed by kdsearch.fsutil
CACHED_TENSORS = ("train_images", "train_labels", "test_images", "test_labels")


def _read_decode_cache(path: Path, listing: str) -> DecodedDataset | None:
    """The cached decode of this listing, memory-mapped and verified against its stored hash (None: decode again)."""
    blob = load_verified(path, {"format": CACHE_FORMAT, "listing": listing}, CACHED_TENSORS, "decoded-image", mmap=True)
    if blob is None:
        return None
    tensors = [blob[name] for name in CACHED_TENSORS]
    return DecodedDataset(*tensors, list(blob["classes"]), _content_fingerprint(*tensors))


def _decode_imagefolder(
    root: Path, cache_dir: str | os.PathLike[str] | None, image_size: tuple[int, int] | None
) -> DecodedDataset:
    if not root.is_dir():
        raise UserError(f"data dir {root} does not exist")
    classes, train_files = _list_imagefolder(root / "train")
    test_classes, test_files = _list_imagefolder(root / "test")
    if test_classes != classes:
        raise UserError(f"{root}/test has classes {test_classes}, but {root}/train has {classes}")
    trained = {label for _, label, _, _ in train_files}
    untrained = [name for label, name in enumerate(classes) if label not in trained]
    if untrained:
        raise UserError(f"{root}/train/{untrained[0]} holds no image files: every class needs training images")
    # The cache is found by a cheap stat fingerprint (paths, sizes, mtimes) of this copy and the size
    # asked for; the dataset's identity is the hash of the decoded pixels, equal for every copy on
    # every host, so workers on several machines agree on the study and the teacher.
    listing = _imagefolder_fingerprint(train_files + test_files, root)
    if image_size is not None:
        listing += f"-{image_size[0]}x{image_size[1]}"
    cache_path = Path(cache_dir) / "data" / f"imagefolder-{listing}.pt" if cache_dir is not None else None
    if cache_path is not None:
        cached = _read_decode_cache(cache_path, listing)
        if cached is not None:
            return cached
    gray = folder_is_gray([path for path, *_ in train_files + test_files])
    spill = cache_path.parent if cache_path is not None else None
    train_images, train_labels = _decode_files(train_files, gray, image_size, spill)
    test_images, test_labels = _decode_files(test_files, gray, image_size, spill)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ConfigError(
            "image_size",
            f"must be given: train images are {tuple(train_images.shape[2:])} but test images "
            f"{tuple(test_images.shape[2:])}",
        )
    fingerprint = _content_fingerprint(train_images, train_labels, test_images, test_labels)
    decoded = DecodedDataset(train_images, train_labels, test_images, test_labels, classes, fingerprint)
    if cache_path is not None:
        tensors = dict(zip(CACHED_TENSORS, (train_images, train_labels, test_images, test_labels), strict=True))
        save_verified(
            cache_path, {"format": CACHE_FORMAT, "listing": listing, "classes": classes}, tensors, "decoded-image"
        )
        # Read back memory-mapped: the pixels then live in the page cache, not in this process's memory.
        return _read_decode_cache(cache_path, listing) or decoded
    return decoded
