"""Models from the zoos users have: torchvision's classification builders and timm's, by name.

``torchvision.models:NAME`` builds ``torchvision.models.get_model(NAME, weights=None,
num_classes=…)``; a channel count other than 3 gets a first convolution of that many input
channels (the one torchvision builds for RGB, re-made with the same shape otherwise).
``timm:NAME`` builds ``timm.create_model(NAME, pretrained=False, num_classes=…, in_chans=…)``,
timm's own way to take both counts. Neither ever downloads weights: pretrained or fine-tuned
weights come from a file the user names (``--teacher``, ``--student-init``), loaded without code.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from kdsearch.errors import UserError, shown

TORCHVISION = "torchvision.models:"
TIMM = "timm:"
ZOOS = (TORCHVISION, TIMM)


def is_zoo_model(name: str) -> bool:
    return name.startswith(ZOOS)


def check_zoo_name(name: str) -> None:
    """Refuse an unknown zoo name (or a zoo that is not installed) in one line, before anything is built."""
    if name.startswith(TIMM):
        timm = _timm()
        if not timm.is_model(name.removeprefix(TIMM)):
            stem = name.removeprefix(TIMM)[:4]
            raise UserError(f"timm has no model {name.removeprefix(TIMM)!r}; timm.list_models('{stem}*') lists names")
    elif name.startswith(TORCHVISION):
        from torchvision import models

        builder = name.removeprefix(TORCHVISION)
        if builder not in models.list_models(module=models):
            raise UserError(
                f"torchvision has no classification model {shown(builder)}; e.g. resnet18, mobilenet_v3_small, "
                "efficientnet_b0 (torchvision.models.list_models() lists them)"
            )


def build_zoo_model(name: str, *, num_classes: int, in_channels: int) -> nn.Module:
    """The zoo model ``name`` with a head of ``num_classes`` and ``in_channels`` input channels."""
    check_zoo_name(name)
    if name.startswith(TIMM):
        return _timm().create_model(
            name.removeprefix(TIMM), pretrained=False, num_classes=num_classes, in_chans=in_channels
        )
    from torchvision import models

    model = models.get_model(name.removeprefix(TORCHVISION), weights=None, num_classes=num_classes)
    if in_channels != 3:
        _adapt_first_conv(model, in_channels, name)
    return model


def _timm() -> ModuleType:
    try:
        import timm
    except ImportError:
        raise UserError("timm models need timm: pip install 'kdsearch[timm]' (or pip install timm)") from None
    return timm


def _adapt_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    """Replace the first ``Conv2d`` (torchvision's RGB stem) by one taking ``in_channels`` channels."""
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                break
            stem = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            model.set_submodule(path, stem)
            return
    raise UserError(f"{name} has no plain first convolution to adapt to {in_channels}-channel images")
