"""Config and space files: read bounded and strict, written so they read back as written.

A config or space file comes from a user and may come from anyone: before anything is built from
it, YAML aliases are bounded (a "billion laughs" expands to gigabytes from a few hundred bytes),
strings may be no longer than a path, a key given twice is an error naming it, and a number YAML
1.1 reads as a string (``1e-5``) is an error saying how to write it. Messages quote at most a few
dozen characters of any value (``shown``).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

from kdsearch.errors import UserError, shown

# What one config or space file may hold. Aliases may add this many values to those written out
# (a YAML "billion laughs" adds billions from a few hundred bytes); no string is longer than a path
# may be (PATH_MAX); a message quotes at most errors.QUOTE_LIMIT characters of a value.
MAX_ALIAS_EXPANSION = 100_000
MAX_STRING = 4096
# A number YAML 1.2 (and JSON, and Python) reads but YAML 1.1, which PyYAML follows, reads as a
# string: an exponent without a dot in the mantissa or without a sign (1e-5, 1.0e5).
_YAML11_STRING_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
