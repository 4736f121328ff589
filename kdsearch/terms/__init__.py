"""What each loss term is, without torch: its name, the hyperparameters it reads, the inputs it needs.

A term's computation lives in ``kdsearch.losses.<name>`` (torch); its declaration lives here, in
``kdsearch.terms.<name>``, so a strategy (``kdsearch.strategies``) can list its terms, validate
their values and offer their search spaces while ``RunConfig()`` and ``kdsearch --help`` stay
free of torch. Terms are found by file name, as strategies are: adding a term adds its two modules.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

from kdsearch.errors import UserError, shown
from kdsearch.knobs import Knob

# What a term may read besides the student's logits and the labels.
TEACHER_LOGITS = "teacher_logits"
FEATURES = "features"  # the student's and the teacher's tapped layers


@dataclass(frozen=True)
class Hyper:
    """A hyperparameter: its tutorial value and its rule (range, choices, default search space)."""

    default: Any
    rule: Knob


def hyper(default: Any, help: str, **rules: Any) -> Hyper:
    if "kind" not in rules:
        rules["kind"] = type(default)
    return Hyper(default, Knob(help, **rules))


@dataclass(frozen=True)
class TermSpec:
    """A term as the declarations see it; ``kdsearch.losses.<name>.build(shapes, **params)`` makes it."""

    name: str
    summary: str
    params: dict[str, Hyper] = field(default_factory=dict)
    reads: tuple[str, ...] = ()

    @property
    def reads_teacher_logits(self) -> bool:
        return TEACHER_LOGITS in self.reads

    @property
    def reads_features(self) -> bool:
        return FEATURES in self.reads


TERMS: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def get_term(name: str) -> TermSpec:
    if name not in TERMS:
        raise UserError(f"unknown loss term {shown(name)}; choose one of {', '.join(TERMS)}")
    return importlib.import_module(f"{__name__}.{name}").SPEC
