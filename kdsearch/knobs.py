"""How a config field declares its rules: type, range, choices, help, search space.

A ``Knob`` rides in a dataclass field's metadata; ``Section`` checks every knob of a dataclass
when it is built, so each value has one validator and one wording, whether it came from a flag, a
file or a study. The fields themselves are declared in ``kdsearch.config`` and
``kdsearch.settings``; the command line derives its options from them (``kdsearch.cli_options``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution

from kdsearch.errors import ConfigError, shown


@dataclass(frozen=True)
class Knob:
    """What a field may hold and how the command line shows it.

    ``low``/``high`` are inclusive bounds (``low_open``: exclusive); ``space`` is the default search
    space of a recipe knob every method searches; ``identity`` marks fields a study cannot mix.
    ``help`` may mention other fields as ``{field}``: the command line says them as its flags.
    """

    help: str
    kind: type = str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    optional: bool = False
    identity: bool = False
    space: BaseDistribution | None = None
    path: str | None = None  # "file" or "dir" for click.Path
    envvar: str | None = None
    short: str | None = None  # a one-letter option beside the long one (-o, -q)
    check: Callable[[Any], str | None] | None = None  # extra rule: a problem, or None

    def validate(self, name: str, value: Any) -> Any:
        """``value`` converted to ``kind`` (an int where a float is wanted), or ``ConfigError``."""
        if value is None:
            if self.optional:
                return None
            raise ConfigError(name, "must be given")
        value = self._typed(name, value)
        if self.choices is not None and value not in self.choices:
            raise ConfigError(name, f"must be one of {', '.join(map(str, self.choices))}, got {shown(value)}")
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            relation = "above" if self.low_open else "at least"
            raise ConfigError(name, f"must be {relation} {_show(self.low)}, got {shown(value)}")
        if self.high is not None and value > self.high:
            raise ConfigError(name, f"must be at most {_show(self.high)}, got {shown(value)}")
        problem = self.check(value) if self.check is not None else None
        if problem:
            raise ConfigError(name, problem)
        return value

    def _typed(self, name: str, value: Any) -> Any:
        if self.kind is str:
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(name, f"must be a non-empty string, got {shown(value)}")
            return value
        if self.kind is tuple:
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                raise ConfigError(name, f"must be a list of strings, got {shown(value)}")
            return tuple(value)
        if self.kind is bool:
            if not isinstance(value, bool):
                raise ConfigError(name, f"must be true or false, got {shown(value)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(name, f"must be a number, got {shown(value)}")
        if not math.isfinite(value):
            raise ConfigError(name, f"must be finite, got {shown(value)}")
        if self.kind is int:
            if not float(value).is_integer():
                raise ConfigError(name, f"must be an integer, got {shown(value)}")
            return int(value)
        return float(value)


def _show(bound: float) -> str:
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def knob(default: Any, help: str, **rules: Any) -> Any:
    """A dataclass field with its ``Knob``; ``kind`` defaults to the default's type.

    A field whose default is None may stay None (``optional``) unless its rules say otherwise.
    """
    if "kind" not in rules and default is not None:
        rules["kind"] = type(default)
    rules.setdefault("optional", default is None)
    return field(default=default, metadata={"knob": Knob(help, **rules)})


def same(section: type, name: str, **changes: Any) -> Any:
    """A field declared like ``section``'s ``name`` (its rules, its default), with ``changes``.

    ``default`` in ``changes`` replaces the default; anything else replaces a rule (``help``,
    ``optional``). One declaration then serves two commands: evaluate's width has the run's range.
    """
    default = changes.pop("default", default_of(section, name))
    rule = dataclasses.replace(dict(knobs_of(section))[name], **changes)
    return field(default=default, metadata={"knob": rule})


def default_of(section: type, name: str) -> Any:
    """The declared default of a section's field: read from the declaration, never written again."""
    return next(f.default for f in dataclasses.fields(section) if f.name == name)


def knobs_of(section: Any) -> Iterator[tuple[str, Knob]]:
    """(name, knob) of every declared field of a section (class or instance), in order."""
    for f in dataclasses.fields(section):
        if "knob" in f.metadata:
            yield f.name, f.metadata["knob"]


class Section:
    """Base of the config sections: validates and normalises every knob when built."""

    def __post_init__(self) -> None:
        for name, rule in knobs_of(self):
            object.__setattr__(self, name, rule.validate(name, getattr(self, name)))
