"""Exact speed-ups: pooling before ReLU must leave every number where it was."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import torch
from torch import nn

from kdsearch.data import load_splits
from kdsearch.fastpath import pool_before_relu
from kdsearch.loop import prepare_module
from kdsearch.models import DeepNN, LightNN
from kdsearch.taps import FeatureTap

CPU = torch.device("cpu")


def _written_order(model: nn.Module) -> nn.Module:
    """The same model on the CPU in channels_last, its sequences left to run as written."""
    return model.to(memory_format=torch.channels_last)


def test_pooling_first_trains_bit_for_bit_like_the_written_order(cifar_slice: Path) -> None:
    """Same logits, same gradients, same weights after Adam steps on real CIFAR-10 images."""
    train = load_splits("imagefolder", cifar_slice, val_size=0).train.to(CPU)
    for build in (LightNN, DeepNN):
        torch.manual_seed(0)
        plain = _written_order(build())
        fast = prepare_module(copy.deepcopy(plain), CPU)
        assert list(fast.state_dict()) == list(plain.state_dict())
        assert "forward" in vars(fast.features)  # pooled first
        assert "forward" not in vars(plain.features)
        optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (plain, fast)]
        for begin in range(0, 400, 100):
            images, labels = train.images[begin : begin + 100], train.labels[begin : begin + 100]
            torch.manual_seed(begin)  # the same dropout masks in both models
            plain_logits = plain(images)
            torch.manual_seed(begin)
            fast_logits = fast(images)
            assert torch.equal(plain_logits, fast_logits)
            for logits, optimizer in zip((plain_logits, fast_logits), optimizers, strict=True):
                optimizer.zero_grad()
                nn.functional.cross_entropy(logits, labels).backward()
            for (name, p), q in zip(plain.named_parameters(), fast.parameters(), strict=True):
                assert torch.equal(p.grad, q.grad), name
            for optimizer in optimizers:
                optimizer.step()
        for p, q in zip(plain.parameters(), fast.parameters(), strict=True):
            assert torch.equal(p, q)


def test_a_hooked_relu_or_pool_runs_in_the_written_order() -> None:
    """A tap on the ReLU sees the full-size map the model as written gives it, not a pooled one."""
    torch.manual_seed(0)
    model = prepare_module(LightNN(), CPU)
    images = torch.randn(4, 3, 32, 32)
    with FeatureTap(model, "features.1") as relu_tap, FeatureTap(model, "features.2") as pool_tap:
        model(images)
        relu_out, pool_out = relu_tap.take(), pool_tap.take()
    expected_relu = torch.relu(model.features[0](images))
    assert relu_out.shape == (4, 16, 32, 32)
    assert torch.equal(relu_out, expected_relu)
    assert torch.equal(pool_out, nn.functional.max_pool2d(expected_relu, 2, 2))
    # With the taps gone, the sequence is back on the fast path and gives the same logits.
    model.eval()
    with torch.no_grad(), FeatureTap(model, "features") as tap:
        fast = model(images)
        fast_features = tap.take()
    plain = _written_order(copy.deepcopy(model))
    plain.features.forward = nn.Sequential.forward.__get__(plain.features)
    pickled = pickle.loads(pickle.dumps(model))  # a whole-model save still round-trips
    assert pickled.features.forward.args[0] is pickled.features  # bound to its own copy
    with torch.no_grad():
        assert torch.equal(plain(images), fast)
        assert torch.equal(plain.features(images), fast_features)
        assert torch.equal(pickled(images), fast)


def test_only_plain_sequences_with_a_relu_pool_pair_are_touched() -> None:
    class OwnForward(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1

    inplace = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2))
    model = nn.Sequential(
        OwnForward(nn.ReLU(), nn.MaxPool2d(2)),
        inplace,
        nn.Sequential(nn.ReLU(), nn.AvgPool2d(2)),
    )
    assert pool_before_relu(model) == 1  # only ``inplace``: it has a ReLU→MaxPool2d pair
    assert "forward" not in vars(model[0]) and "forward" not in vars(model[2])
    x = torch.randn(2, 3, 10, 10)
    # An in-place ReLU is left in its place: the fast path would not modify the conv's output.
    expected = nn.functional.max_pool2d(torch.relu(inplace[0](x)), 2)
    assert torch.equal(inplace(x), expected)
