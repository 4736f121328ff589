"""Search spaces: Optuna distributions, the YAML/JSON file format, pins (``fix``), grids and baselines.

A space maps a name (a recipe knob, one of the method's hyperparameters, or ``width`` in a size
search) to an Optuna distribution to sample, or to a constant to pin. The default space is the
recipe's (``kdsearch.config.RECIPE_SPACE``) plus the method's own; a user's space file may narrow,
widen or pin parameters, and is validated before any trial runs, so a typo never costs a study.
The file format is::

    method: kd
    parameters:
      lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
      temperature: {type: float, low: 1, high: 8}
      soft_target_weight: 0.25          # a constant: pinned, not searched
      optimizer: {type: categorical, choices: [adam, adamw]}
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from kdsearch.config import KNOBS, RECIPE_SPACE, RecipeConfig
from kdsearch.errors import ConfigError, UserError, shown
from kdsearch.structured import read_structured_file

if TYPE_CHECKING:
    from kdsearch.strategies import Strategy

Space = dict[str, Any]  # name → a distribution, a constant, or (``method``) the MethodSpaces of a study across methods
# The student's width multiplier, searched when the student's size is an objective.
WIDTH_SPACE = FloatDistribution(0.25, 2.0, log=True)
# Points per float parameter when --sampler grid must discretise a continuous range.
GRID_POINTS = 4
# A grid is enumerated up front; past this many points it would exhaust memory long before it ran.
MAX_GRID_POINTS = 100_000
MAX_CHOICES = 1000
# The key of a study's space under which a study across methods keeps its MethodSpaces.
METHOD = "method"


@dataclass(frozen=True)
class MethodSpaces:
    """The method as a categorical and each method's own parameters conditional on it (define-by-run).

    A study across methods has ``space["method"] = MethodSpaces(...)`` beside the shared recipe knobs: a
    trial draws the method first, then the recipe, then only its method's parameters, so a trial's
    parameters never hold another method's.
    """

    spaces: dict[str, Space]  # method → its own parameters (distributions or pins)

    @property
    def methods(self) -> tuple[str, ...]:
        return tuple(self.spaces)


def is_conditional(space: Space) -> bool:
    return isinstance(space.get(METHOD), MethodSpaces)


def space_to_dict(space: Space) -> dict[str, Any]:
    """The file form of a space (inverse of ``parse_parameters``); a study across methods nests each
    method's under ``method: {type: conditional, arms: {kd: {...}, ...}}``."""
    out: dict[str, Any] = {}
    for name, param in space.items():
        if isinstance(param, MethodSpaces):
            out[name] = {"type": "conditional", "arms": {m: space_to_dict(sub) for m, sub in param.spaces.items()}}
        elif isinstance(param, FloatDistribution):
            out[name] = {"type": "float", "low": param.low, "high": param.high, "log": param.log}
        elif isinstance(param, IntDistribution):
            out[name] = {"type": "int", "low": param.low, "high": param.high, "step": param.step, "log": param.log}
        elif isinstance(param, CategoricalDistribution):
            out[name] = {"type": "categorical", "choices": list(param.choices)}
        else:
            out[name] = param
    return out


def _number(name: str, key: str, value: object, kind: type) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"search space: {name}.{key} must be a finite number, got {shown(value)}")
    if kind is int and not float(value).is_integer():
        raise UserError(f"search space: {name}.{key} must be an integer, got {shown(value)}")
    return int(value) if kind is int else float(value)


KEYS = {
    "float": {"type", "low", "high", "log"},
    "int": {"type", "low", "high", "step", "log"},
    "categorical": {"type", "choices"},
}


def parse_param(name: str, spec: object) -> Any:
    """One entry of the file format → a distribution or a constant; malformed entries are user errors."""
    if not isinstance(spec, dict):
        if isinstance(spec, (int, float, str, bool)):
            return spec
        raise UserError(f"search space: {name} must be a mapping or a constant, got {shown(spec)}")
    kind = spec.get("type")
    if kind not in KEYS:
        raise UserError(f"search space: {name}.type must be float, int or categorical, got {shown(kind)}")
    extra = set(spec) - KEYS[kind]
    if extra:
        raise UserError(f"search space: {name} has unknown keys {sorted(extra)} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices or len(choices) > MAX_CHOICES:
            raise UserError(f"search space: {name}.choices must be a list of 1 to {MAX_CHOICES} values")
        if not all(c is None or isinstance(c, (int, float, str, bool)) for c in choices):
            raise UserError(f"search space: {name}.choices must hold numbers, strings or booleans")
        return CategoricalDistribution(tuple(choices))
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
        return FloatDistribution(float(low), float(high), log=log)
    step = _number(name, "step", spec.get("step", 1), int)
    if step < 1 or (log and step != 1):
        raise UserError(f"search space: {name}.step must be a positive integer (and 1 when log-scaled)")
    if (high - low) % step:
        raise UserError(f"search space: {name}: high - low ({high - low}) must be a multiple of step {step}")
    return IntDistribution(int(low), int(high), log=log, step=int(step))


def parse_parameters(data: object) -> Space:
    if not isinstance(data, dict) or not data:
        raise UserError("search space: 'parameters' must be a non-empty mapping")
    return {str(name): parse_param(str(name), spec) for name, spec in data.items()}


def load_space_file(path: str | os.PathLike[str], method: str) -> Space:
    """Read a space file; a ``method`` key, if present, must name the method (or ``auto``, the list) searched."""
    data = read_structured_file(path, "search-space file")
    unknown = set(data) - {"method", "parameters"}
    if unknown:
        raise UserError(f"search-space file {path} has unknown keys {sorted(unknown)}; expected method, parameters")
    if "method" in data and str(data["method"]).replace(" ", "") != method:
        raise UserError(f"search-space file {path} is for method {shown(data['method'])}, not {shown(method)}")
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


def parse_assignments(items: tuple[str, ...] | list[str], field: str) -> dict[str, Any]:
    """``NAME=VALUE`` pairs of ``field`` (``fix``, ``hp``) → values (so 3, 0.5, 1e-7, true and mse all work)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip() or not raw.strip():
            raise ConfigError(field, f"expects NAME=VALUE, got {shown(item)}")
        out[name.strip()] = parse_value(raw)
    return out


def default_space(strategy: Strategy) -> Space:
    """What every study of ``strategy`` searches unless told otherwise: the recipe's knobs and the method's own."""
    return {**RECIPE_SPACE, **strategy.space}


def _corners(param: Any) -> list[Any]:
    if isinstance(param, (FloatDistribution, IntDistribution)):
        return [param.low, param.high]
    if isinstance(param, CategoricalDistribution):
        return list(param.choices)
    return [param]


def check_value(strategy: Strategy, name: str, value: Any) -> None:
    """A value ``name`` could take in a run of ``strategy``; a user error (naming it) otherwise."""
    try:
        if name in KNOBS:
            KNOBS[name].validate(name, value)
        else:
            strategy.hyperparameters({name: value})
    except ConfigError as exc:
        raise UserError(f"search space: {exc.name} {exc.problem}") from None
    except UserError as exc:
        raise UserError(f"search space: {exc}") from None


def check_layer(strategy: Strategy, layer: Space, searchable: Space) -> None:
    """Validate a user's space layer: known names, matching types, every corner value usable."""
    for name, param in layer.items():
        if name not in searchable and name not in strategy.params:
            known = ", ".join(sorted(set(searchable) | set(strategy.params)))
            raise UserError(f"search space: method {strategy.name} has no parameter {shown(name)}; known: {known}")
        default = searchable.get(name)
        if isinstance(param, BaseDistribution) and isinstance(default, BaseDistribution):
            if type(param) is not type(default):
                kind = type(default).__name__.removesuffix("Distribution").lower()
                raise UserError(f"search space: {name} must be of type {kind} for method {strategy.name}")
        for value in _corners(param):
            check_value(strategy, name, value)


def build_space(
    strategy: Strategy, space_file: str | None, fixes: dict[str, Any], *, search_width: bool = False
) -> Space:
    """The default space, overlaid by the user's file (``space``), then the pins (``fix``); all validated.

    With ``search_width`` (a size objective) the student's width multiplier joins the space.
    """
    space = default_space(strategy) | ({"width": WIDTH_SPACE} if search_width else {})
    searchable = dict(space)
    layers = {"space": load_space_file(space_file, strategy.name)} if space_file is not None else {}
    layers["fix"] = dict(fixes)
    for field, layer in layers.items():
        if "width" in layer and not search_width:
            raise ConfigError(
                field, "sets width, which is searched only with a size objective ({objectives} accuracy,params)"
            )
        check_layer(strategy, layer, searchable)
        space.update(layer)
    return space


def build_methods_space(
    strategies: list[Strategy], label: str, space_file: str | None, fixes: dict[str, Any], *, search_width: bool = False
) -> Space:
    """The space of a study across methods: the recipe's knobs shared, each method's own under ``MethodSpaces``.

    A name in the user's file or pins applies to the recipe when it is a recipe knob, else to every
    method that has it; a name no method has is an error, as in a one-method study. A parameter that
    several methods share (``temperature``) must have the same kind and choices in each: Optuna keeps
    one distribution per name in a study.
    """
    shared: Space = dict(RECIPE_SPACE) | ({"width": WIDTH_SPACE} if search_width else {})
    own = {s.name: dict(s.space) for s in strategies}
    layers = {"space": load_space_file(space_file, label)} if space_file is not None else {}
    layers["fix"] = dict(fixes)
    for field, layer in layers.items():
        if "width" in layer and not search_width:
            raise ConfigError(
                field, "sets width, which is searched only with a size objective ({objectives} accuracy,params)"
            )
        for name, param in layer.items():
            if name in shared:
                check_layer(strategies[0], {name: param}, shared)
                shared[name] = param
                continue
            having = [s for s in strategies if name in s.params]
            if not having:
                known = ", ".join(sorted(set(shared).union(*(s.params for s in strategies)) - {"ce_weight"}))
                raise UserError(f"search space: no method of {label} has a parameter {shown(name)}; known: {known}")
            for strategy in having:
                check_layer(strategy, {name: param}, own[strategy.name])
                own[strategy.name][name] = param
    _check_shared_names(own)
    return {METHOD: MethodSpaces(own), **shared}


def _check_shared_names(own: dict[str, Space]) -> None:
    seen: dict[str, tuple[str, BaseDistribution]] = {}
    for method, space in own.items():
        for name, param in space.items():
            if not isinstance(param, BaseDistribution):
                continue
            if name in seen:
                first, other = seen[name]
                if type(other) is not type(param) or (isinstance(param, CategoricalDistribution) and param != other):
                    raise UserError(
                        f"search space: {name} is searched differently by {first} and {method}; give both one space"
                    )
            else:
                seen[name] = (method, param)


def holds(param: Any, value: Any) -> bool:
    """Whether a distribution can produce ``value``."""
    if isinstance(param, (FloatDistribution, IntDistribution)):
        return not isinstance(value, bool) and isinstance(value, (int, float)) and param.low <= value <= param.high
    if isinstance(param, CategoricalDistribution):
        return value in param.choices
    return False


def baseline_params(strategy: Strategy, space: Space) -> dict[str, Any]:
    """The tutorial's hand-set values of the searched parameters, where the space can hold them.

    Enqueued as a new study's first trial, they make the hand-set config one of the candidates, so
    the best trial is never worse on validation than the tutorial, and a size search (width 1 is the
    tutorial's LightNN) shows the tutorial's student on its front. Parameters whose value the
    user's space excludes are left to the sampler.
    """
    recipe = RecipeConfig()
    values = {name: getattr(recipe, name) for name in RECIPE_SPACE} | strategy.tutorial() | {"width": 1.0}
    return {name: values[name] for name, param in space.items() if name in values and holds(param, values[name])}


def methods_baselines(space: Space) -> list[dict[str, Any]]:
    """A study across methods starts with every method's hand-set config: ``ce`` is the study's control."""
    arms = space[METHOD]
    assert isinstance(arms, MethodSpaces)
    from kdsearch.strategies import get_strategy

    shared = {name: param for name, param in space.items() if name != METHOD}
    return [
        {METHOD: method, **baseline_params(get_strategy(method), shared | arms.spaces[method])}
        for method in arms.methods
    ]


def grid_of(space: Space) -> dict[str, list[Any]]:
    """Every searched parameter's grid points; a grid too large to enumerate is a user error."""
    if is_conditional(space):
        raise ConfigError("sampler", "grid enumerates one fixed space; a study across methods needs tpe or random")
    grid: dict[str, list[Any]] = {}
    for name, param in space.items():
        if isinstance(param, FloatDistribution):
            lo, hi = (math.log(param.low), math.log(param.high)) if param.log else (param.low, param.high)
            inner = [lo + (hi - lo) * i / (GRID_POINTS - 1) for i in range(1, GRID_POINTS - 1)]
            # The ends exactly: exp(log(x)) may land a rounding step outside the range.
            grid[name] = sorted({param.low, param.high, *(math.exp(p) if param.log else p for p in inner)})
        elif isinstance(param, IntDistribution):
            if (param.high - param.low) // param.step + 1 > MAX_GRID_POINTS:
                raise ConfigError("sampler", f"grid: {name} has more than {MAX_GRID_POINTS:,} values; narrow it")
            grid[name] = list(range(param.low, param.high + 1, param.step))
        elif isinstance(param, CategoricalDistribution):
            grid[name] = list(param.choices)
    size = math.prod(len(points) for points in grid.values())
    if size > MAX_GRID_POINTS:
        raise ConfigError(
            "sampler", f"grid: the grid has {size:,} points, more than {MAX_GRID_POINTS:,}; narrow the space"
        )
    return grid


def suggest(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """Sample every distribution of ``space``; constants pass through (recorded as trial attributes).

    In a study across methods the method is drawn first and then only that method's parameters.
    """
    values: dict[str, Any] = {}
    for name, param in space.items():
        if isinstance(param, MethodSpaces):
            method = str(trial.suggest_categorical(name, list(param.methods)))
            values[name] = method
            values |= suggest(trial, param.spaces[method])
        elif isinstance(param, FloatDistribution):
            values[name] = trial.suggest_float(name, param.low, param.high, log=param.log, step=param.step)
        elif isinstance(param, IntDistribution):
            values[name] = trial.suggest_int(name, param.low, param.high, step=param.step, log=param.log)
        elif isinstance(param, CategoricalDistribution):
            values[name] = trial.suggest_categorical(name, list(param.choices))
        else:
            values[name] = param
    return values
