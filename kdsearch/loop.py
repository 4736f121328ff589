"""The one training loop every method (and the teacher) goes through, and evaluation.

Batches are rows of in-memory tensors picked by a seeded permutation; the frozen teacher's
outputs arrive precomputed and are gathered for the same rows, so the teacher never runs here.
The loop knows nothing of Optuna: it calls ``on_epoch`` after every epoch, and a search prunes by
raising from there. Its parts: ``batches`` (order and views), ``TeacherOutputs.rows`` (the
teacher's side of a batch), ``learning_rate_at`` (the schedule), ``make_optimizer`` and
``Training.step`` (one update).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdsearch.config import RecipeConfig
from kdsearch.data import Split, inference_batch
from kdsearch.errors import ConfigError, DivergedError, UserError, shown
from kdsearch.losses import LossInputs
from kdsearch.taps import FeatureTap
from kdsearch.teacher_outputs import TeacherOutputs, as_input
from kdsearch.views import AnyView, apply_views, draw_views, views_of
from kdsearch.weighted_sum import WeightedSum

EVAL_BATCH_SIZE = 1024
# How often (in steps) the running loss is checked for NaN/inf: each check syncs a GPU, and a
# diverged run is caught within this many steps (and always at the end of an epoch).
FINITE_CHECK_EVERY = 50
SGD_MOMENTUM = 0.9


def check_precision(precision: str, device: torch.device) -> None:
    """Reject a precision the device cannot train in, before any data is loaded."""
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision", "fp16 needs a CUDA device; use bf16 or fp32 on the CPU")


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The forward-pass context for ``precision``: autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass
class EpochReport:
    epoch: int  # 1-based
    train_loss: float
    val_accuracy: float | None  # percent; None without a validation split
    seconds: float  # training time of the epoch, validation included


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error, not a crash."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {shown(name)}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", f"{name} was asked for, but no CUDA device is available; use cpu")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {shown(name)}; use auto, cpu, cuda or cuda:N")
    return device


def prepare_module(module: nn.Module, device: torch.device) -> nn.Module:
    """Move to ``device``; channels_last on the CPU, where these convolutions run much faster in it."""
    module = module.to(device)
    if device.type == "cpu":
        module = module.to(memory_format=torch.channels_last)
    return module


def learning_rate_at(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """The rate for 0-based ``step`` of ``total_steps``: constant, or half a cosine from base to 0.

    It depends only on the step count of the whole run, never on the pruner or on the epochs seen
    so far, so a search trial and the re-train of its exported config follow the same curve.
    """
    if schedule == "constant":
        return base_lr
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * step / max(total_steps, 1)))


def make_optimizer(recipe: RecipeConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam (the tutorial's), AdamW (decoupled decay) or SGD with Nesterov momentum 0.9."""
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=SGD_MOMENTUM, nesterov=True, weight_decay=recipe.weight_decay
        )
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


@dataclass
class Batch:
    index: Tensor  # train rows
    view: Tensor | None  # each row's view (an index into the augmentation's views); None: one view only


def batches(
    n: int, batch_size: int, views: int, order: torch.Generator, draws: torch.Generator, device: torch.device
) -> Iterator[Batch]:
    """One epoch: a seeded permutation cut into batches, each row in one of ``views`` views.

    The views come from their own generator, so the batch order is the same as without augmentation.
    """
    permutation = torch.randperm(n, generator=order).to(device)
    for begin in range(0, n, batch_size):
        index = permutation[begin : begin + batch_size]
        view = draw_views(len(index), views, draws)
        yield Batch(index, view.to(device) if view is not None else None)


@dataclass
class Training:
    """The state of one run of ``fit``: what each step needs, built once."""

    model: nn.Module
    loss_fn: nn.Module
    train: Split
    recipe: RecipeConfig
    device: torch.device
    teacher: TeacherOutputs | None
    tap: FeatureTap | None
    views: tuple[AnyView, ...]
    optimizer: torch.optim.Optimizer = field(init=False)
    scaler: torch.amp.GradScaler = field(init=False)
    steps_per_epoch: int = field(init=False)
    sources: Tensor = field(init=False)  # each train row's position in the dataset, for per-image views

    def __post_init__(self) -> None:
        self.sources = self.train.source_index.to(self.device)
        params = [p for p in [*self.model.parameters(), *self.loss_fn.parameters()] if p.requires_grad]
        self.optimizer = make_optimizer(self.recipe, params)
        # fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.recipe.precision == "fp16")
        self.steps_per_epoch = (len(self.train) + self.recipe.batch_size - 1) // self.recipe.batch_size

    def inputs(self, batch: Batch) -> LossInputs:
        """The student's forward pass on the batch's views, and what the loss compares it with."""
        images = apply_views(self.train.batch(batch.index), self.views, batch.view, self.sources[batch.index])
        with autocast(self.recipe.precision, self.device):
            logits = self.model(as_input(images, self.device))
            features = self.tap.take() if self.tap is not None else None
        inputs = LossInputs(logits.float(), self.train.labels[batch.index])
        if features is not None:
            inputs.student_features = features.float()
        if self.teacher is not None:
            inputs.teacher_logits, inputs.teacher_features = self.teacher.rows(batch.index, batch.view)
        return inputs

    def step(self, batch: Batch, step: int) -> Tensor:
        """One update at 0-based run step ``step``; returns the batch's loss (detached)."""
        loss = self.loss_fn(self.inputs(batch))
        if self.recipe.lr_schedule != "constant":
            total = self.recipe.epochs * self.steps_per_epoch
            rate = learning_rate_at(self.recipe.lr_schedule, self.recipe.lr, step, total)
            for group in self.optimizer.param_groups:
                group["lr"] = rate
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss.detach()


def fit(
    model: nn.Module,
    loss_fn: nn.Module,
    train: Split,
    recipe: RecipeConfig,
    *,
    device: torch.device,
    teacher: TeacherOutputs | None = None,
    student_layer: str | None = None,
    val: Split | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    progress: bool = False,
) -> list[EpochReport]:
    """Train ``model`` (and ``loss_fn``'s own parameters) as ``recipe`` says.

    ``train``/``val``/``teacher`` must already be on ``device``. ``student_layer`` taps the
    student's features for losses that need them. Raises ``DivergedError`` on a non-finite loss.
    With a reduced precision only the student's forward pass runs under autocast: its outputs are
    cast back to float32 before the loss, so softmax, temperature scaling and feature distances
    (and the cached float32 teacher outputs they meet) keep full precision.
    """
    if teacher is not None and len(teacher) != len(train):
        raise ValueError(f"teacher outputs have {len(teacher)} rows for {len(train)} train rows")
    check_precision(recipe.precision, device)
    views = views_of(recipe.augment, train.population)
    if teacher is not None:
        teacher = teacher.select(views)
        if teacher.features is not None and isinstance(loss_fn, WeightedSum):
            teacher = teacher.map_features(loss_fn.teacher_features_once)
    order = torch.Generator().manual_seed(recipe.seed)
    draws = torch.Generator().manual_seed(recipe.seed + 1)
    reports: list[EpochReport] = []
    with ExitStack() as stack:
        tap = stack.enter_context(FeatureTap(model, student_layer)) if student_layer else None
        run = Training(model, loss_fn, train, recipe, device, teacher, tap, views)
        bar = stack.enter_context(_progress(progress, recipe.epochs * run.steps_per_epoch))
        for epoch in range(1, recipe.epochs + 1):
            start = time.perf_counter()
            mean_loss = train_epoch(
                run, epoch, batches(len(train), recipe.batch_size, len(views), order, draws, device), bar
            )
            val_accuracy = evaluate(model, val, device) if val is not None else None
            report = EpochReport(epoch, mean_loss, val_accuracy, time.perf_counter() - start)
            reports.append(report)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{mean_loss:.3f}", val=f"{val_accuracy:.2f}%" if val_accuracy is not None else "-"
                )
            if on_epoch is not None:
                on_epoch(report)
    return reports


def train_epoch(run: Training, epoch: int, epoch_batches: Iterator[Batch], bar: Any) -> float:
    """One pass over the batches; the mean loss. A non-finite loss stops the run (``DivergedError``)."""
    run.model.train()
    run.loss_fn.train()
    running = torch.zeros((), device=run.device)
    steps = 0
    for steps, batch in enumerate(epoch_batches, 1):
        loss = run.step(batch, (epoch - 1) * run.steps_per_epoch + steps - 1)
        running += loss
        if steps % FINITE_CHECK_EVERY == 0 and not torch.isfinite(running):
            raise DivergedError(epoch, steps, float(loss))
        if bar is not None:
            bar.update(1)
            bar.set_description(f"epoch {epoch}/{run.recipe.epochs}")
    mean_loss = float(running) / max(steps, 1)
    if not torch.isfinite(running):
        raise DivergedError(epoch, steps, mean_loss)
    return mean_loss


def _progress(enabled: bool, total: int) -> AbstractContextManager[Any]:
    if not enabled:
        return nullcontext()
    from tqdm import tqdm

    return tqdm(total=total, unit="batch", leave=False, dynamic_ncols=True)


@torch.inference_mode()
def predict(
    model: nn.Module, images: Tensor | Split, device: torch.device, batch_size: int = EVAL_BATCH_SIZE
) -> Tensor:
    """Logits for ``images`` (a tensor of normalised images, or a split) in large inference batches, model in eval."""
    model.eval()
    batch_size = inference_batch(images, batch_size)
    chunks = images.chunks(batch_size) if isinstance(images, Split) else images.split(batch_size)
    return torch.cat([model(as_input(chunk, device)) for chunk in chunks])


def evaluate(model: nn.Module, split: Split, device: torch.device) -> float:
    """Top-1 accuracy in percent."""
    predictions = predict(model, split, device).argmax(dim=1)
    return 100.0 * int((predictions == split.labels).sum()) / len(split)


@torch.inference_mode()
def feature_shape(model: nn.Module, layer: str, sample: Tensor, device: torch.device) -> tuple[int, ...]:
    """Per-sample shape of ``layer``'s output, found by one forward pass on one sample."""
    model.eval()
    with FeatureTap(model, layer) as tap:
        model(as_input(sample[:1], device))
        return tuple(tap.take().shape[1:])
