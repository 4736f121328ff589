"""Atomic file writes, content hashes, verified caches and output-path checks.

Every file kdsearch writes (checkpoints, caches, exports) goes through ``atomic_write`` so a crash
or a failed check never leaves a half-written file where a reader would find it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdsearch.errors import ConfigError, UserError, warn

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


# A cache this large is announced (one line) before it is written.
LARGE_CACHE_BYTES = 1 << 30
# Room left beside a cache for the rest of the run's files (the database, checkpoints).
DISK_MARGIN_BYTES = 64 << 20


def save_verified(
    path: str | os.PathLike[str], header: dict[str, Any], tensors: dict[str, Tensor | None], what: str = "cache"
) -> None:
    """Write a cache of ``tensors`` with ``header`` (what it is the cache of) and their SHA-256, atomically.

    Its size is checked against the disk's free space first (a cache the disk cannot hold is one user
    error, nothing written), said in one line when it is over a gigabyte, and a disk that fills up
    while writing is the same user error, the partial file removed.
    """
    import torch

    target = Path(path)
    size = sum(t.numel() * t.element_size() for t in tensors.values() if t is not None)
    target.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target.parent).free
    if size + DISK_MARGIN_BYTES > free:
        raise UserError(
            f"the {what} cache needs {_gigabytes(size)} and {target.parent} has {_gigabytes(free)} free; free some "
            "space or point KDSEARCH_HOME at a larger disk"
        )
    if size > LARGE_CACHE_BYTES:
        warn(f"writing the {what} cache: {_gigabytes(size)} in {target.parent} ({_gigabytes(free)} free)")
    blob = {**header, **tensors, "sha256": tensor_sha256(*tensors.values())}
    full = UserError(f"the disk filled up writing the {what} cache in {target.parent}; nothing was kept")
    try:
        atomic_write(target, lambda tmp: torch.save(blob, tmp))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise full from None
        raise
    except RuntimeError as exc:  # torch.save reports a full disk as a RuntimeError from its writer
        if "No space left" in str(exc) or "unexpected pos" in str(exc):
            raise full from None
        raise


def _gigabytes(size: int) -> str:
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


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


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies below ``folder``, symbolic links followed as far as they exist."""
    try:
        return folder.resolve() in path.resolve().parents
    except (OSError, RuntimeError):  # a symlink loop: said by whoever reads the path
        return False


def refuse_overwriting_inputs(
    outputs: dict[str, str | os.PathLike[str] | None],
    inputs: Iterable[object],
    *,
    others: Iterable[object] = (),
) -> None:
    """Fail, before anything runs, when an output path would replace an input or cannot be a file.

    ``outputs`` maps the output's field (``out``) to its path; ``inputs`` are the command's files and
    folders (storage, teacher, config, the data folder). An output may not be an input, nor lie
    inside an input folder: every file there is an input too (a checkpoint written as
    ``data/train/cat/0000.jpg`` replaces a training image, and one written anywhere in an image
    folder's class folders becomes one). ``others`` are the command's other output *files*
    (export's checkpoint beside its config): an output may not be one, nor lie below one, nor
    hold one below it. Nor may an output be an existing folder or lie below a regular file.
    """
    given = [Path(str(p)) for p in inputs if p is not None]
    siblings = [Path(str(p)) for p in others if p is not None]
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
        for other in siblings:
            if path.absolute() == other.absolute() or _same_file(path, other):
                raise UserError(f"{option} {path} is also another output of this command; give each its own path")
            if _inside(path, other) or _inside(other, path):
                raise UserError(
                    f"{option} {path} and {other}, another output of this command, would be file and folder"
                )
        for source in given:
            if source.is_dir() and _inside(path, source):
                raise UserError(
                    f"{option} {path} is inside {source}, a folder this command reads; "
                    "every file there is an input: write it elsewhere"
                )
        check_writable(path.absolute().parent, f"{option} {path}")


def nearest_existing(path: Path) -> Path:
    """``path`` itself, or the nearest folder above it that exists: where a missing folder would be made."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(folder: Path, what: str) -> None:
    """``folder`` (made later if missing) can take new files: checked before the work that would write there.

    The nearest folder that exists must be writable — ``os.access`` also says no on a read-only
    file system, whoever runs.
    """
    existing = nearest_existing(folder)
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "a read-only file system" if _read_only_mount(existing) else "not writable"
        raise UserError(f"{what}: cannot write in {existing}: it is {reason}")


def _read_only_mount(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _created_parents(target: Path) -> list[Path]:
    """Create ``target``'s missing parent folders; returns the ones created, outermost first."""
    missing = [parent for parent in target.absolute().parents if not parent.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    return list(reversed(missing))


# A file to write with others: (the field it is the value of, its path, ``write(tmp)``).
PlannedFile = tuple[str, str | os.PathLike[str], Callable[[Path], None]]


def write_together(files: Sequence[PlannedFile]) -> list[Path]:
    """Write every file or none, each atomically, and leave the old files as they were unless all succeed.

    ``files`` are (field, target, ``write(tmp)``). Each is written to a temporary file beside its
    target first; only when every one is written and synced are they renamed into place. On any
    failure (a read-only or full disk, a missing artifact, Ctrl-C) only the temporaries, and the
    folders made for them, are removed: an existing target is never written over, so never lost.
    An ``OSError`` is one user error naming the field and the file.
    """
    temporaries: list[tuple[Path, Path]] = []
    made: list[Path] = []
    umask = os.umask(0)
    os.umask(umask)
    try:
        for field, raw, write in files:
            target = Path(raw)
            try:
                made += _created_parents(target)
                fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
                os.close(fd)
                tmp = Path(name)
                temporaries.append((tmp, target))
                os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the user's group
                write(tmp)
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
            except OSError as exc:
                raise ConfigError(field, f"{target}: cannot write it: {exc.strerror or exc}") from None
        for tmp, target in temporaries:
            os.replace(tmp, target)
    except BaseException:
        for tmp, _ in temporaries:
            tmp.unlink(missing_ok=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return [target for _, target in temporaries]
