"""Atomic file writes, content hashes, output-path checks and config-file reading.

Every file kdsearch writes (checkpoints, caches, exports) goes through ``atomic_write`` so a crash
or a failed check never leaves a half-written file where a reader would find it.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsearch.errors import UserError, warn

if TYPE_CHECKING:
    from torch import Tensor


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    The rename is atomic on POSIX file systems, so readers see the old file or the whole new one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the user's group
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes: the identity of a checkpoint for cache keys and studies."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_sha256(*tensors: Tensor | None) -> str:
    """Hex SHA-256 of the tensors' bytes, in order (``None`` skipped): the content hash of every cache."""
    import torch

    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is not None:
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def save_verified(path: str | os.PathLike[str], header: dict[str, Any], tensors: dict[str, Tensor | None]) -> None:
    """Write a cache of ``tensors`` with ``header`` (what it is the cache of) and their SHA-256, atomically."""
    import torch

    blob = {**header, **tensors, "sha256": tensor_sha256(*tensors.values())}
    atomic_write(path, lambda tmp: torch.save(blob, tmp))


def load_verified(
    path: str | os.PathLike[str], header: dict[str, Any], names: tuple[str, ...], what: str, *, mmap: bool = False
) -> dict[str, Any] | None:
    """A cache ``save_verified`` wrote for this ``header``, its tensors hashed again; None to (re)build it.

    A missing cache, or one of something else (another header), is simply built; one whose bytes
    changed on disk (a bad sector, a stray write, a truncated copy) would silently change every
    result, so it is rebuilt too, with one warning line. ``mmap`` leaves the tensors in the page cache, where worker
    processes on one machine share them.
    """
    import torch

    if not Path(path).exists():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        if any(blob.get(key) != value for key, value in header.items()):
            return None
        intact = tensor_sha256(*(blob.get(name) for name in names)) == blob.get("sha256")
    except Exception:  # noqa: BLE001 - truncated or unreadable: rebuild rather than trust it
        intact = False
    if not intact:
        warn(f"{what} cache {path} is corrupt; building it again")
        return None
    return blob


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def refuse_overwriting_inputs(outputs: dict[str, str | os.PathLike[str] | None], inputs: Iterable[object]) -> None:
    """Fail, before anything runs, when an output path would replace an input or cannot be a file.

    ``outputs`` maps the user's option (``--out``) to its path; ``inputs`` are the command's files and
    folders (storage, teacher, config, caches). An output inside an input folder is allowed; an
    output that *is* an input, an existing folder, or a path below a regular file is not.
    """
    given = [Path(str(p)) for p in inputs if p is not None]
    for option, raw in outputs.items():
        if raw is None:
            continue
        path = Path(raw)
        if path.is_dir():
            raise UserError(f"{option} {path} is a folder; give a file path")
        for parent in path.absolute().parents:
            if parent.exists() and not parent.is_dir():
                raise UserError(f"{option} {path}: {parent} is a file, not a folder")
        for source in given:
            if path.absolute() == source.absolute() or _same_file(path, source):
                raise UserError(f"{option} {path} is one of this command's inputs; refusing to overwrite it")


def read_structured_file(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """Read a YAML or JSON mapping; anything unreadable is one user error naming the file."""
    import json

    import yaml

    target = Path(path)
    if not target.is_file():
        raise UserError(f"{what} {target} does not exist")
    try:
        text = target.read_text()
        data = json.loads(text) if target.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "JSON" if target.suffix == ".json" else "YAML"
        raise UserError(f"{what} {target} is not valid {kind}: {first}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {target} must hold a mapping at the top level")
    return data
