"""Intermediate features through forward hooks on named layers, as torchdistill does.

A hidden-state loss needs a layer's output, not only the logits. Editing model classes to return
it (as the tutorial does) would make every user model a special case; a forward hook on a module
path works for any ``nn.Module`` and leaves the state_dict keys alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from kdsearch.errors import UserError, shown


def find_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name``; unknown names are a user error listing the choices."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        choices = [n for n, _ in model.named_modules() if n and "." not in n]
        raise UserError(
            f"{type(model).__name__} has no layer {shown(name)}; top-level layers are: {', '.join(choices) or 'none'}"
        ) from None


class FeatureTap:
    """Keeps the most recent output of one layer while registered.

    Use as a context manager so the hook never outlives the run that needed it::

        with FeatureTap(model, "features") as tap:
            logits = model(x)
            feats = tap.output
    """

    def __init__(self, model: nn.Module, layer: str) -> None:
        self.layer = layer
        self.module = find_layer(model, layer)
        self.output: Tensor | None = None
        self._handle: RemovableHandle | None = None

    def _hook(self, _module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        if not isinstance(output, Tensor):
            raise UserError(f"layer {shown(self.layer)} returns {type(output).__name__}, not a tensor")
        self.output = output

    def __enter__(self) -> FeatureTap:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.output = None

    def take(self) -> Tensor:
        """The captured output; an error if the layer did not run in the last forward pass."""
        if self.output is None:
            raise UserError(f"layer {shown(self.layer)} did not run during the forward pass")
        out, self.output = self.output, None
        return out


@dataclass(frozen=True)
class LayerShape:
    """One tappable layer: its dotted name (what ``teacher_layer``/``student_layer`` take), type, output shape."""

    name: str
    kind: str
    shape: tuple[int, ...] | None  # per sample; None when the layer's output is not one tensor or it did not run


@torch.inference_mode()
def layer_shapes(model: nn.Module, sample: Tensor) -> list[LayerShape]:
    """Every named layer of ``model`` with its per-sample output shape for ``sample`` (one batch row)."""
    model.eval()
    outputs: dict[str, tuple[int, ...] | None] = {}

    def record(name: str) -> Callable[[nn.Module, tuple, object], None]:
        def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
            outputs.setdefault(name, tuple(output.shape[1:]) if isinstance(output, Tensor) else None)

        return hook

    named = [(name, module) for name, module in model.named_modules() if name]
    handles = [module.register_forward_hook(record(name)) for name, module in named]
    try:
        model(sample[:1])
    finally:
        for handle in handles:
            handle.remove()
    return [LayerShape(name, type(module).__name__, outputs.get(name)) for name, module in named]
