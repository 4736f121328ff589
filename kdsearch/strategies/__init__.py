"""The distillation methods, one module each, found by file name.

A method is a module ``kdsearch/strategies/<name>.py`` holding ``STRATEGY`` (a
``kdsearch.losses.Strategy``): adding a method is adding its module, nothing else here. The names
are read from the package folder without importing the modules, so ``--help`` never loads torch.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING

from kdsearch.errors import UserError

if TYPE_CHECKING:
    from kdsearch.losses import Strategy

METHODS: tuple[str, ...] = tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")))


def get_strategy(method: str) -> Strategy:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return importlib.import_module(f"{__name__}.{method}").STRATEGY
