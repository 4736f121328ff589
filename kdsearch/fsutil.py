"""Atomic file writes, content hashes, output-path checks and config-file reading.

Every file kdsearch writes (checkpoints, caches, exports) goes through ``atomic_write`` so a crash
or a failed check never leaves a half-written file where a reader would find it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import reprlib
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


# --- config and space files -----------------------------------------------------------------------

# What one config or space file may hold. Aliases may add this many values to those written out
# (a YAML "billion laughs" adds billions from a few hundred bytes); no string is longer than a path
# may be (PATH_MAX); a message quotes at most QUOTE_LIMIT characters of a value.
MAX_ALIAS_EXPANSION = 100_000
MAX_STRING = 4096
QUOTE_LIMIT = 80
# A number YAML 1.2 (and JSON, and Python) reads but YAML 1.1, which PyYAML follows, reads as a
# string: an exponent without a dot in the mantissa or without a sign (1e-5, 1.0e5).
_YAML11_STRING_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def shown(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to about ``limit`` characters, whatever its size: what a message may quote.

    A value read from a file or a flag can be megabytes long (or, through YAML aliases, billions of
    items); quoted whole it would make a one-line error gigabytes long.
    """
    shortened = reprlib.Repr()
    shortened.maxstring = shortened.maxother = limit
    shortened.maxlist = shortened.maxtuple = shortened.maxdict = shortened.maxset = 6
    shortened.maxlevel = 3
    text = shortened.repr(value)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    if isinstance(value, str) and len(value) > limit:
        text += f" ({len(value):,} characters)"
    return text


class FileContentError(Exception):
    """Something a config or space file may not hold; ``read_structured_file`` names the file."""


def _yaml_number_hint(value: str) -> str:
    """``value`` (``1e-5``) as YAML 1.1 reads a number: a dot in the mantissa, a signed exponent."""
    mantissa, exponent = re.split("[eE]", value)
    if "." not in mantissa:
        mantissa += ".0"
    elif mantissa.endswith("."):
        mantissa += "0"
    if exponent[0] not in "+-":
        exponent = "+" + exponent
    return f"{mantissa}e{exponent}"


def _line(node: Any) -> str:
    return f"line {node.start_mark.line + 1}"


def _check_expansion(root: Any) -> None:
    """Refuse, before anything is built, a node graph whose aliases expand past ``MAX_ALIAS_EXPANSION``.

    PyYAML shares an aliased node rather than copying it, so the graph is small; but whatever walks
    the loaded data (a check, a message quoting it) walks the expansion. Sizes are counted once per
    node (memoised), so this is linear in the file, and an alias to a node that contains it is refused.
    """
    import yaml

    size: dict[int, int] = {}
    visiting: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            if len(node.value) > MAX_STRING:
                raise FileContentError(
                    f"{_line(node)}: value {shown(node.value)} is too long; "
                    f"no key or value of this file may be longer than {MAX_STRING:,} characters"
                )
            size[key] = 1
            continue
        if done:
            visiting.discard(key)
            size[key] = 1 + sum(size[id(child)] for child in children)
            continue
        if key in size:
            continue
        if key in visiting:
            raise FileContentError(f"{_line(node)}: an alias refers to a value that contains it")
        visiting.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in visiting:
                raise FileContentError(f"{_line(child)}: an alias refers to a value that contains it")
            if id(child) not in size:
                stack.append((child, False))
    expanded = size[id(root)]
    if expanded - len(size) > MAX_ALIAS_EXPANSION:
        raise FileContentError(
            f"its aliases expand {len(size):,} values into {expanded:,}; at most {MAX_ALIAS_EXPANSION:,} "
            "values may come from aliases"
        )


@functools.cache
def _yaml_loader() -> type:
    """A safe YAML loader (libyaml's when installed) that refuses what a config or space file may not hold.

    Aliases that expand past a small size, strings longer than a path, a key given twice in one
    mapping (the last would win silently), and a plain ``1e-5`` (a string in YAML 1.1) are each a
    ``FileContentError`` naming the line.
    """
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class BoundedLoader(base):  # type: ignore[misc, valid-type]
        def get_single_node(self) -> Any:
            node = super().get_single_node()
            if node is not None:
                _check_expansion(node)
            return node

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: set[Any] = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *base` then a key overrides the merged one: YAML's own rule
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        repeated = key in seen
                    except TypeError:
                        continue  # unhashable: the constructor says so
                    if repeated:
                        raise FileContentError(f"{_line(key_node)}: key {shown(key)} is given twice in one mapping")
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    def construct_str(loader: Any, node: Any) -> str:
        value = loader.construct_scalar(node)
        # A plain scalar: libyaml marks it with style '', PyYAML's own parser with None.
        if not node.style and _YAML11_STRING_NUMBER.fullmatch(value):
            raise FileContentError(
                f"{_line(node)}: {value} is read as a string (YAML 1.1); write {_yaml_number_hint(value)} "
                "for the number, or quote it for a string"
            )
        return value

    BoundedLoader.add_constructor("tag:yaml.org,2002:str", construct_str)
    return BoundedLoader


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (json keeps the last silently)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise FileContentError(f"key {shown(key)} is given twice in one object")
        seen[key] = value
    return seen


def _check_strings(data: Any) -> None:
    """Refuse a JSON key or value longer than ``MAX_STRING`` (walked without recursion)."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
        elif isinstance(item, str) and len(item) > MAX_STRING:
            raise FileContentError(
                f"value {shown(item)} is too long; no key or value of this file may be longer than "
                f"{MAX_STRING:,} characters"
            )


@functools.cache
def _yaml_dumper() -> type:
    """PyYAML's safe dumper, quoting the strings ``read_structured_file`` would take for a misread number.

    PyYAML writes the string ``1e5`` plain (YAML 1.1 reads it back as a string); quoted, a file
    kdsearch writes (a study named ``2e3`` in an export) reads back as what it wrote.
    """
    import yaml

    class QuotingDumper(yaml.SafeDumper):
        pass

    def represent_str(dumper: Any, value: str) -> Any:
        style = "'" if _YAML11_STRING_NUMBER.fullmatch(value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    QuotingDumper.add_representer(str, represent_str)
    return QuotingDumper


def dump_yaml(data: Any) -> str:
    """``yaml.safe_dump`` in the order given, every string written so ``read_structured_file`` reads it back."""
    import yaml

    return yaml.dump(data, Dumper=_yaml_dumper(), sort_keys=False, allow_unicode=False)


def read_structured_file(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """Read a YAML or JSON mapping; anything unreadable, or more than a config holds, is one user error.

    Bounded before anything is built from it: aliases may not expand it past a small size, no string
    is longer than a path, no key is given twice, and a message quotes at most a few dozen characters.
    """
    import json

    import yaml

    target = Path(path)
    if not target.is_file():
        raise UserError(f"{what} {target} does not exist")
    kind = "JSON" if target.suffix == ".json" else "YAML"
    try:
        text = target.read_text()
        if kind == "JSON":
            data = json.loads(text, object_pairs_hook=_json_pairs)
            _check_strings(data)
        else:
            data = yaml.load(text, Loader=_yaml_loader())
    except FileContentError as exc:
        raise UserError(f"{what} {target}: {exc}") from None
    except RecursionError:
        raise UserError(f"{what} {target} is nested too deeply to be a {what}") from None
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{what} {target} is not valid {kind}: {first[:200]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {target} must hold a mapping at the top level")
    return data
