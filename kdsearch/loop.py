"""The one training loop every strategy (and the teacher) goes through, and evaluation.

Batches are rows of in-memory tensors picked by a seeded permutation; the frozen teacher's
outputs arrive precomputed and are indexed the same way, so the teacher never runs here. The loop
knows nothing of Optuna: it calls ``on_epoch`` after every epoch, and a search prunes by raising
from there.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kdsearch.data import Split
from kdsearch.errors import UserError
from kdsearch.fastpath import pool_before_relu
from kdsearch.recipe import AUGMENTATIONS, LR_SCHEDULES, learning_rate_at
from kdsearch.strategies.base import DistillationLoss, LossInputs
from kdsearch.taps import FeatureTap

EVAL_BATCH_SIZE = 1024
# How often (in steps) the running loss is checked for NaN/inf: each check syncs a GPU, and a
# diverged run is caught within this many steps (and always at the end of an epoch).
FINITE_CHECK_EVERY = 50
# Training precisions: fp32, or autocast with bf16 (CPU and CUDA) or fp16 (CUDA, with a gradient
# scaler). Weights, optimizer state, losses and evaluation stay float32 in every case.
PRECISIONS = ("fp32", "bf16", "fp16")


def check_precision(precision: str, device: torch.device) -> None:
    """Reject a precision the device cannot train in, before any data is loaded."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The forward-pass context for ``precision``: autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass
class TeacherOutputs:
    """The frozen teacher's logits (and tapped features) for every train row, in row order.

    ``mirrored`` holds the same for the horizontally flipped images, when ``flip`` augmentation
    may be used: a flipped row is paired with the teacher's view of that flipped image.
    """

    logits: Tensor
    features: Tensor | None
    layer: str | None
    mirrored: TeacherOutputs | None = None

    def __len__(self) -> int:
        return int(self.logits.shape[0])

    def to(self, device: torch.device) -> TeacherOutputs:
        features = self.features.to(device) if self.features is not None else None
        mirrored = self.mirrored.to(device) if self.mirrored is not None else None
        return TeacherOutputs(self.logits.to(device), features, self.layer, mirrored)

    def map_features(self, transform: Callable[[Tensor], Tensor]) -> TeacherOutputs:
        """The same outputs with ``transform`` applied to the features of every view."""
        features = transform(self.features) if self.features is not None else None
        mirrored = self.mirrored.map_features(transform) if self.mirrored is not None else None
        return TeacherOutputs(self.logits, features, self.layer, mirrored)

    def without_features(self) -> TeacherOutputs:
        """Logits only (so features are not indexed per step by a logit-only strategy)."""
        mirrored = self.mirrored.without_features() if self.mirrored is not None else None
        return TeacherOutputs(self.logits, None, None, mirrored)


def _pick(flip: Tensor | None, plain: Tensor, flipped: Tensor) -> Tensor:
    """Row-wise ``flipped`` where ``flip`` is set, else ``plain``."""
    if flip is None:
        return plain
    return torch.where(flip.view(-1, *[1] * (plain.dim() - 1)), flipped, plain)


@dataclass
class EpochReport:
    epoch: int  # 1-based
    train_loss: float
    val_accuracy: float | None  # percent; None without a validation split
    seconds: float  # training time of the epoch, validation included


class DivergedError(UserError):
    """The loss became NaN or infinite: the hyperparameters (usually lr) are unusable."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(f"training diverged at epoch {epoch}, step {step} (loss {value}); try a lower learning rate")
        self.epoch = epoch
        self.step = step
        self.value = value


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def prepare_module(module: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; channels_last on CPU, where it is ~2.5x faster for these convs.

    ReLU→max-pool pairs run pooled first (``kdsearch.fastpath``): the same numbers, less work.
    """
    module = module.to(device)
    if device.type == "cpu":
        module = module.to(memory_format=torch.channels_last)
    pool_before_relu(module)
    return module


def _as_input(images: Tensor, device: torch.device) -> Tensor:
    if device.type == "cpu" and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    train: Split,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    teacher: TeacherOutputs | None = None,
    student_layer: str | None = None,
    val: Split | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    progress: bool = False,
    precision: str = "fp32",
    lr_schedule: str = "constant",
    augment: str = "none",
) -> list[EpochReport]:
    """Train ``model`` (and ``loss_fn``'s own parameters) with Adam for ``epochs`` epochs.

    ``lr_schedule`` (see ``kdsearch.recipe``) sets the rate before every step, over all the
    run's steps, so it depends only on the step count and never on the pruner or the epoch count
    seen so far. ``augment="flip"`` mirrors a random half of every batch (from its own seeded
    generator, so the batch order is the same as without it) and pairs each mirrored row with the
    teacher's cached outputs for the mirrored image.

    ``train``/``val``/``teacher`` must already be on ``device``. ``student_layer`` taps the student's
    features for losses that need them. Raises ``DivergedError`` on a non-finite loss. With a
    reduced ``precision`` only the student's forward pass runs under autocast: its outputs are cast
    back to float32 before the loss, so softmax, temperature scaling and feature distances (and the
    cached float32 teacher outputs they meet) keep full precision.
    """
    if epochs <= 0:
        raise UserError(f"epochs must be positive, got {epochs}")
    if batch_size <= 0:
        raise UserError(f"batch size must be positive, got {batch_size}")
    if teacher is not None and len(teacher) != len(train):
        raise ValueError(f"teacher outputs have {len(teacher)} rows for {len(train)} train rows")
    check_precision(precision, device)
    if lr_schedule not in LR_SCHEDULES:
        raise UserError(f"unknown learning-rate schedule {lr_schedule!r}; use {', '.join(LR_SCHEDULES)}")
    if augment not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation {augment!r}; use {', '.join(AUGMENTATIONS)}")
    if augment == "flip" and teacher is not None and teacher.mirrored is None:
        raise ValueError("flip augmentation needs the teacher's outputs for the mirrored images")
    if teacher is not None and teacher.features is not None and isinstance(loss_fn, DistillationLoss):
        teacher = teacher.map_features(loss_fn.teacher_features_once)
    params = [p for p in list(model.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator().manual_seed(seed)
    flip_generator = torch.Generator().manual_seed(seed + 1)
    n = len(train)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    reports: list[EpochReport] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=epochs * steps_per_epoch, unit="batch", leave=False, dynamic_ncols=True)
    try:
        with ExitStack() as stack:
            tap = stack.enter_context(FeatureTap(model, student_layer)) if student_layer else None
            for epoch in range(1, epochs + 1):
                start = time.perf_counter()
                model.train()
                loss_fn.train()
                order = torch.randperm(n, generator=generator).to(device)
                running = torch.zeros((), device=device)
                steps = 0
                for steps, begin in enumerate(range(0, n, batch_size), start=1):
                    index = order[begin : begin + batch_size]
                    images = train.images[index]
                    flip = None
                    if augment == "flip":
                        flip = (torch.rand(len(index), generator=flip_generator) < 0.5).to(device)
                        images = _pick(flip, images, images.flip(-1))
                    images = _as_input(images, device)
                    with autocast(precision, device):
                        logits = model(images)
                        features = tap.take() if tap is not None else None
                    inputs = LossInputs(logits.float(), train.labels[index])
                    if features is not None:
                        inputs.student_features = features.float()
                    if teacher is not None:
                        mirrored = teacher.mirrored if flip is not None else None
                        inputs.teacher_logits = teacher.logits[index]
                        if mirrored is not None:
                            inputs.teacher_logits = _pick(flip, inputs.teacher_logits, mirrored.logits[index])
                        if teacher.features is not None:
                            inputs.teacher_features = teacher.features[index]
                            if mirrored is not None and mirrored.features is not None:
                                inputs.teacher_features = _pick(flip, inputs.teacher_features, mirrored.features[index])
                    loss = loss_fn(inputs)
                    if lr_schedule != "constant":
                        step_lr = learning_rate_at(
                            lr_schedule, lr, (epoch - 1) * steps_per_epoch + steps - 1, epochs * steps_per_epoch
                        )
                        for group in optimizer.param_groups:
                            group["lr"] = step_lr
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    running += loss.detach()
                    if steps % FINITE_CHECK_EVERY == 0 and not torch.isfinite(running):
                        raise DivergedError(epoch, steps, float(loss.detach()))
                    if bar is not None:
                        bar.update(1)
                        bar.set_description(f"epoch {epoch}/{epochs}")
                mean_loss = float(running) / max(steps, 1)
                if not torch.isfinite(running):
                    raise DivergedError(epoch, steps, mean_loss)
                val_accuracy = evaluate(model, val, device) if val is not None else None
                report = EpochReport(epoch, mean_loss, val_accuracy, time.perf_counter() - start)
                reports.append(report)
                if bar is not None:
                    shown = f"{val_accuracy:.2f}%" if val_accuracy is not None else "-"
                    bar.set_postfix(loss=f"{mean_loss:.3f}", val=shown)
                if on_epoch is not None:
                    on_epoch(report)
    finally:
        if bar is not None:
            bar.close()
    return reports


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor, device: torch.device, batch_size: int = EVAL_BATCH_SIZE) -> Tensor:
    """Logits for ``images`` in large inference batches, the model left in eval mode."""
    model.eval()
    outputs = [model(_as_input(images[i : i + batch_size], device)) for i in range(0, len(images), batch_size)]
    return torch.cat(outputs)


def evaluate(model: nn.Module, split: Split, device: torch.device) -> float:
    """Top-1 accuracy in percent."""
    predictions = predict(model, split.images, device).argmax(dim=1)
    return 100.0 * int((predictions == split.labels).sum()) / len(split)


@torch.inference_mode()
def compute_teacher_outputs(
    teacher: nn.Module,
    images: Tensor,
    layer: str | None,
    device: torch.device,
    batch_size: int = 512,
    *,
    mirrored: bool = False,
) -> TeacherOutputs:
    """Run the frozen teacher once over ``images`` (flipped left-right when ``mirrored``).

    Keeps the logits and the tapped layer's output, row by row as ``images``.
    """
    teacher.eval()
    logits: list[Tensor] = []
    features: list[Tensor] = []
    with ExitStack() as stack:
        tap = stack.enter_context(FeatureTap(teacher, layer)) if layer else None
        for i in range(0, len(images), batch_size):
            batch = images[i : i + batch_size]
            if mirrored:
                batch = batch.flip(-1)
            logits.append(teacher(_as_input(batch, device)).float().cpu())
            if tap is not None:
                features.append(tap.take().float().contiguous().cpu())
    return TeacherOutputs(torch.cat(logits), torch.cat(features) if features else None, layer)


@torch.inference_mode()
def feature_shape(model: nn.Module, layer: str, sample: Tensor, device: torch.device) -> tuple[int, ...]:
    """Per-sample shape of ``layer``'s output, found by one forward pass on one sample."""
    model.eval()
    with FeatureTap(model, layer) as tap:
        model(_as_input(sample[:1], device))
        return tuple(tap.take().shape[1:])
