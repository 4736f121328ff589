"""The tutorial's models: parameter counts, state_dict keys, sizing, user models and hooks."""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from kdsearch.data import load_splits
from kdsearch.errors import UserError
from kdsearch.loop import prepare_module
from kdsearch.models import DeepNN, LightNN, build_model, count_parameters
from kdsearch.taps import FeatureTap

CPU = torch.device("cpu")

# The keys `torch.save(model.state_dict())` writes in the tutorial's own code.
TUTORIAL_DEEP_KEYS = [
    "features.0.weight",
    "features.0.bias",
    "features.2.weight",
    "features.2.bias",
    "features.5.weight",
    "features.5.bias",
    "features.7.weight",
    "features.7.bias",
    "classifier.0.weight",
    "classifier.0.bias",
    "classifier.3.weight",
    "classifier.3.bias",
]
TUTORIAL_LIGHT_KEYS = [
    "features.0.weight",
    "features.0.bias",
    "features.3.weight",
    "features.3.bias",
    "classifier.0.weight",
    "classifier.0.bias",
    "classifier.3.weight",
    "classifier.3.bias",
]


def test_parameter_counts_match_the_tutorial() -> None:
    assert count_parameters(DeepNN(num_classes=10)) == 1_186_986
    assert count_parameters(LightNN(num_classes=10)) == 267_738


def test_state_dict_keys_match_the_tutorial() -> None:
    assert list(DeepNN().state_dict()) == TUTORIAL_DEEP_KEYS
    assert list(LightNN().state_dict()) == TUTORIAL_LIGHT_KEYS


def test_models_are_sized_from_the_dataset() -> None:
    model = build_model("deepnn", num_classes=7, in_channels=1, image_size=(28, 28))
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    assert model.classifier[0].in_features == 32 * 7 * 7


def test_width_multiplier_scales_the_student() -> None:
    half = build_model("lightnn", num_classes=10, in_channels=3, image_size=(32, 32), width=0.5)
    assert half.features[0].out_channels == 8 and half.classifier[0].out_features == 128
    assert count_parameters(half) < count_parameters(LightNN()) / 3


def test_user_model_by_import_path_with_hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mynets.py").write_text(
        textwrap.dedent("""
        from torch import nn

        class Tiny(nn.Module):
            def __init__(self, num_classes):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
                self.head = nn.Linear(16, num_classes)

            def forward(self, x):
                return self.head(self.body(x).flatten(1))
    """)
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    model = build_model("mynets:Tiny", num_classes=5, in_channels=3, image_size=(32, 32))
    with FeatureTap(model, "body.1") as tap:
        logits = model(torch.randn(3, 3, 32, 32))
        features = tap.take()
    assert logits.shape == (3, 5)
    assert features.shape == (3, 4, 32, 32)
    assert (features >= 0).all()  # it is the ReLU's output
    assert not model.body[1]._forward_hooks  # the hook is removed with the context
    with pytest.raises(UserError, match=r"no layer 'nope'.*body, head"):
        FeatureTap(model, "nope")
    with pytest.raises(UserError, match="takes no width"):
        build_model("mynets:Tiny", num_classes=5, in_channels=3, image_size=(32, 32), width=0.5)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("resnet", "unknown model 'resnet'"),
        ("nosuchmodule:Net", "cannot import model module 'nosuchmodule'"),
        ("torch.nn:NoSuchClass", "has no class 'NoSuchClass'"),
    ],
)
def test_unknown_models_are_user_errors(name: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        build_model(name, num_classes=10, in_channels=3, image_size=(32, 32))


def _tutorial_order(model: nn.Module) -> nn.Module:
    """The same weights in the tutorial's written order: every MaxPool2d→ReLU pair as ReLU→MaxPool2d."""
    layers = list(model.features)
    for i in range(len(layers) - 1):
        if isinstance(layers[i], nn.MaxPool2d) and isinstance(layers[i + 1], nn.ReLU):
            layers[i], layers[i + 1] = layers[i + 1], layers[i]
    twin = copy.deepcopy(model)
    twin.features = nn.Sequential(*copy.deepcopy(layers))
    return twin


@pytest.mark.slow
def test_pooling_before_relu_trains_bit_for_bit_like_the_tutorials_order(cifar_slice: Path) -> None:
    """Same state_dict keys, logits, gradients and weights after Adam steps on real CIFAR-10 images."""
    train = load_splits("imagefolder", cifar_slice, val_size=0).train.to(CPU)
    for build in (LightNN, DeepNN):
        torch.manual_seed(0)
        ours = prepare_module(build(), CPU)
        tutorial = _tutorial_order(ours)
        assert [type(m) for m in tutorial.features] != [type(m) for m in ours.features]
        assert list(tutorial.state_dict()) == list(ours.state_dict())
        optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (tutorial, ours)]
        for begin in range(0, 400, 100):
            images, labels = train.images[begin : begin + 100], train.labels[begin : begin + 100]
            torch.manual_seed(begin)  # the same dropout masks in both models
            tutorial_logits = tutorial(images)
            torch.manual_seed(begin)
            our_logits = ours(images)
            assert torch.equal(tutorial_logits, our_logits)
            for logits, optimizer in zip((tutorial_logits, our_logits), optimizers, strict=True):
                optimizer.zero_grad()
                nn.functional.cross_entropy(logits, labels).backward()
            for (name, p), q in zip(tutorial.named_parameters(), ours.parameters(), strict=True):
                assert torch.equal(p.grad, q.grad), name
            for optimizer in optimizers:
                optimizer.step()
        for p, q in zip(tutorial.parameters(), ours.parameters(), strict=True):
            assert torch.equal(p, q)


def test_user_models_run_as_written() -> None:
    """Nothing rewrites a user's module: its Sequential keeps its own forward, in its order."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2))
    prepared = prepare_module(model, CPU)
    assert "forward" not in vars(prepared) and [type(m) for m in prepared] == [nn.Conv2d, nn.ReLU, nn.MaxPool2d]


def test_feature_tap_sees_the_tutorial_feature_maps() -> None:
    teacher, student = DeepNN(), LightNN()
    x = torch.randn(2, 3, 32, 32)
    with FeatureTap(teacher, "features") as t_tap, FeatureTap(student, "features") as s_tap:
        teacher(x), student(x)
        assert t_tap.take().shape == (2, 32, 8, 8)
        assert s_tap.take().shape == (2, 16, 8, 8)
    assert isinstance(teacher.features, nn.Sequential)
