"""Search spaces: parameter types, the YAML/JSON file format, and ``--fix`` overrides.

A space is a mapping from hyperparameter name to a ``FloatParam``, ``IntParam``, ``CategoricalParam``
or a constant. Each strategy owns its default space (see ``kdsearch.strategies``); a user's space
file may narrow, widen or pin parameters, and is validated against the strategy before any trial
runs, so a typo never costs a study. The file format is::

    method: kd
    parameters:
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      temperature: {type: float, low: 1, high: 8}
      soft_target_weight: 0.25          # a constant: pinned, not searched
      distance: {type: categorical, choices: [mse, smooth_l1]}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdsearch.errors import UserError


@dataclass(frozen=True)
class FloatParam:
    low: float
    high: float
    log: bool = False


@dataclass(frozen=True)
class IntParam:
    low: int
    high: int
    step: int = 1
    log: bool = False


@dataclass(frozen=True)
class CategoricalParam:
    choices: tuple[Any, ...]


Param = FloatParam | IntParam | CategoricalParam
# A space entry is a distribution to sample or a constant to pin.
Space = dict[str, Param | float | int | str | bool]


def is_distribution(value: object) -> bool:
    return isinstance(value, (FloatParam, IntParam, CategoricalParam))


def space_to_dict(space: Space) -> dict[str, Any]:
    """The YAML/JSON form of a space (inverse of ``parse_parameters``)."""
    out: dict[str, Any] = {}
    for name, param in space.items():
        if isinstance(param, FloatParam):
            out[name] = {"type": "float", "low": param.low, "high": param.high, "log": param.log}
        elif isinstance(param, IntParam):
            out[name] = {"type": "int", "low": param.low, "high": param.high, "step": param.step, "log": param.log}
        elif isinstance(param, CategoricalParam):
            out[name] = {"type": "categorical", "choices": list(param.choices)}
        else:
            out[name] = param
    return out


def _number(name: str, key: str, value: object, kind: type) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"search space: {name}.{key} must be a number, got {value!r}")
    if kind is int and not float(value).is_integer():
        raise UserError(f"search space: {name}.{key} must be an integer, got {value!r}")
    return int(value) if kind is int else float(value)


def parse_param(name: str, spec: object) -> Param | float | int | str | bool:
    """One entry of the file format → a parameter or a constant; malformed entries are user errors."""
    if not isinstance(spec, dict):
        if isinstance(spec, (int, float, str, bool)):
            return spec
        raise UserError(f"search space: {name} must be a mapping or a constant, got {spec!r}")
    kind = spec.get("type")
    known = {
        "float": {"type", "low", "high", "log"},
        "int": {"type", "low", "high", "step", "log"},
        "categorical": {"type", "choices"},
    }
    if kind not in known:
        raise UserError(f"search space: {name}.type must be float, int or categorical, got {kind!r}")
    extra = set(spec) - known[kind]
    if extra:
        raise UserError(f"search space: {name} has unknown keys {sorted(extra)} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise UserError(f"search space: {name}.choices must be a non-empty list")
        return CategoricalParam(tuple(choices))
    number_type = float if kind == "float" else int
    if "low" not in spec or "high" not in spec:
        raise UserError(f"search space: {name} needs low and high")
    low = _number(name, "low", spec["low"], number_type)
    high = _number(name, "high", spec["high"], number_type)
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"search space: {name}.log must be true or false")
    if low > high:
        raise UserError(f"search space: {name} has low {low} > high {high}")
    if log and low <= 0:
        raise UserError(f"search space: {name} is log-scaled, so low must be positive, got {low}")
    if kind == "float":
        return FloatParam(float(low), float(high), log)
    step = _number(name, "step", spec.get("step", 1), int)
    if step < 1 or (log and step != 1):
        raise UserError(f"search space: {name}.step must be a positive integer (and 1 when log-scaled)")
    return IntParam(int(low), int(high), int(step), log)


def parse_parameters(data: object) -> Space:
    if not isinstance(data, dict) or not data:
        raise UserError("search space: 'parameters' must be a non-empty mapping")
    return {str(name): parse_param(str(name), spec) for name, spec in data.items()}


def read_structured_file(path: str | os.PathLike[str], what: str) -> dict[str, Any]:
    """Read a YAML or JSON mapping; anything unreadable is one user error naming the file."""
    target = Path(path)
    if not target.is_file():
        raise UserError(f"{what} {target} does not exist")
    try:
        text = target.read_text()
        data = json.loads(text) if target.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{what} {target} is not valid {'JSON' if target.suffix == '.json' else 'YAML'}: {first}"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{what} {target} must hold a mapping at the top level")
    return data


def load_space_file(path: str | os.PathLike[str], method: str) -> Space:
    """Read a space file; a ``method`` key, if present, must name the strategy being searched."""
    data = read_structured_file(path, "search-space file")
    unknown = set(data) - {"method", "parameters"}
    if unknown:
        raise UserError(f"search-space file {path} has unknown keys {sorted(unknown)}; expected method, parameters")
    if "method" in data and data["method"] != method:
        raise UserError(f"search-space file {path} is for method {data['method']!r}, not {method!r}")
    return parse_parameters(data.get("parameters"))


def parse_value(raw: str) -> float | int | str | bool:
    """A command-line value: integer, float (``1e-7`` included, which YAML 1.1 reads as a string), boolean or word."""
    text = raw.strip()
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_fixes(fixes: tuple[str, ...] | list[str]) -> dict[str, float | int | str | bool]:
    """``NAME=VALUE`` pairs → constants (so 3, 0.5, 1e-7, true and mse all work)."""
    out: dict[str, float | int | str | bool] = {}
    for item in fixes:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip() or not raw.strip():
            raise UserError(f"--fix expects NAME=VALUE, got {item!r}")
        out[name.strip()] = parse_value(raw)
    return out
