"""One run's settings, declared once: typed sections whose fields carry their own rules.

A run is data + models + recipe + loss (+ the device it runs on). Every field is declared here,
once, with its default, its help text, the values it may take and, for recipe knobs every method
searches, its default search space. Everything else is derived from these declarations: the
command-line options (``kdsearch.cli``), a study's identity and user attributes, exported configs
and checkpoint metadata. Values are checked when a section is built (``__post_init__``), so a
config that exists is a valid one; a wrong value raises ``ConfigError`` naming the field, and the
caller says it in the user's terms (``--val-size`` on the command line, ``data.val_size`` in a file).

This module imports neither torch nor the training code, so ``kdsearch --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution

from kdsearch.errors import ConfigError, UserError, plain, shown
from kdsearch.images import image_size_problem
from kdsearch.knobs import Knob, Section, knob, knobs_of
from kdsearch.strategies import METHODS

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "imagefolder")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
# Train-time augmentations. Each is a fixed set of views of every image, so the frozen teacher's
# outputs are cached once per view and never computed live (see kdsearch.teacher_outputs).
AUGMENTATIONS = ("none", "flip", "shift")
# crops:K — K seeded random-resized crops per image (kdsearch.views.CropView), the FKD way.
CROPS = re.compile(r"^crops:(\d+)$")
MAX_CROPS = 64
# The default search space leaves `shift` out: offered it, the ce and kd benchmark studies chose flip or
# nothing (README "Does distillation pay?"). Opt in with --augment, --fix or a space file.
SEARCHED_AUGMENTATIONS = ("none", "flip")
# fp32, or autocast with bf16 (CPU and CUDA) or fp16 (CUDA, with a gradient scaler).
PRECISIONS = ("fp32", "bf16", "fp16")
# Seeds feed numpy and joblib as well as torch, which take 0 <= seed < 2**32 - 1.
MAX_SEED = 2**32 - 2
# Weight decay values a search draws from: off (the tutorial), or log-spaced strengths.
WEIGHT_DECAYS = (0.0, 1e-5, 1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2)


# Teacher recipes by name, as recipe knob values over the defaults. `tutorial` is the tutorial's own
# (the teacher its five runs distil from); `strong` is the best recipe measured for DeepNN on the
# shared CIFAR-10 copy (README "A stronger teacher", bench/results/teacher-strong.json).
TEACHER_PRESETS: dict[str, dict[str, Any]] = {
    "tutorial": {},
    "strong": {
        "epochs": 15,
        "optimizer": "adamw",
        "lr": 2e-3,
        "lr_schedule": "cosine",
        "weight_decay": 0.05,
        "label_smoothing": 0.1,
        "augment": "flip",
    },
}
# A search's default teacher must be one distillation can gain from: the tutorial's teacher is
# weaker than a tuned student (README "Does distillation pay?").
DEFAULT_TEACHER_PRESET = "strong"
# The tutorial's teacher architecture: every teacher kdsearch trains or loads unless told otherwise.
DEFAULT_TEACHER_MODEL = "deepnn"


def _augment_problem(name: str) -> str | None:
    """One of the fixed augmentations, or crops:K."""
    match = CROPS.match(name)
    if name in AUGMENTATIONS or (match and 1 <= int(match.group(1)) <= MAX_CROPS):
        return None
    return f"must be one of {', '.join(AUGMENTATIONS)} or crops:K (K from 1 to {MAX_CROPS}), got {shown(name[:40])}"


@dataclass(frozen=True)
class DataConfig(Section):
    """Which images, and how the train split is cut."""

    dataset: str = knob(
        "cifar10",
        "cifar10/cifar100/fashion-mnist (torchvision format, downloaded if missing) or imagefolder.",
        choices=DATASETS,
        identity=True,
    )
    data_dir: str | None = knob(
        None, "Dataset folder (imagefolder: train/<class>/ and test/<class>/).", kind=str, path="dir"
    )
    val_size: int = knob(5000, "Train images held out for validation (fixed split; 0 = none).", low=0, identity=True)
    limit_train: int | None = knob(None, "Keep only N training images (quick runs).", kind=int, low=1, identity=True)
    image_size: str | None = knob(
        None,
        "S or HxW: scale each image to cover it, aspect kept, and centre-crop it there (once, at decode; a folder "
        "of mixed sizes needs it) [default: the images' own size].",
        kind=str,
        check=image_size_problem,
        identity=True,
    )

    def __post_init__(self) -> None:
        if isinstance(self.image_size, int) and not isinstance(self.image_size, bool):
            object.__setattr__(self, "image_size", str(self.image_size))  # a file may say image_size: 48
        super().__post_init__()


@dataclass(frozen=True)
class ModelsConfig(Section):
    """The frozen teacher, the student, and the layers hidden-state losses tap."""

    teacher: str | None = knob(
        None,
        "Teacher checkpoint [default: the dataset's teacher, trained once if missing].",
        kind=str,
        path="file",
    )
    teacher_model: str | None = knob(
        None,
        f"Teacher architecture: deepnn, torchvision.models:NAME, timm:NAME or package.module:Class [default: "
        f"{DEFAULT_TEACHER_MODEL}, or a built-in or zoo name the checkpoint records].",
        kind=str,
    )
    teacher_preset: str = knob(
        DEFAULT_TEACHER_PRESET,
        "Recipe of the dataset's default teacher, trained once when {teacher} is not given: strong (the best "
        "measured, for searches) or tutorial (the tutorial's, to reproduce its numbers).",
        choices=tuple(TEACHER_PRESETS),
    )
    student_model: str = knob(
        "lightnn", "lightnn, deepnn, torchvision.models:NAME, timm:NAME or package.module:Class.", identity=True
    )
    teacher_layer: str = knob("features", "Teacher layer tapped for features.", identity=True)
    student_layer: str = knob("features", "Student layer tapped for features.", identity=True)
    width: float = knob(1.0, "Student width multiplier.", low=0.0, low_open=True, high=16.0, identity=True)
    student_init: str | None = knob(
        None,
        "Start the student from these weights (a checkpoint or state_dict: .pt, .pth, .safetensors) instead of "
        "a random initialisation.",
        kind=str,
        path="file",
        identity=True,
    )


@dataclass(frozen=True)
class RecipeConfig(Section):
    """How a network is trained. The defaults are the tutorial's: Adam 1e-3, batch 128, 10 epochs."""

    epochs: int = knob(10, "Training epochs.", low=1, high=100_000, identity=True)
    batch_size: int = knob(128, "Batch size.", low=1, high=1_000_000, identity=True)
    optimizer: str = knob(
        "adam",
        "adam, adamw (decoupled weight decay) or sgd (Nesterov, momentum 0.9).",
        choices=OPTIMIZERS,
        space=CategoricalDistribution(OPTIMIZERS),
    )
    lr: float = knob(
        1e-3, "Peak learning rate.", low=0.0, low_open=True, high=10.0, space=FloatDistribution(1e-4, 1e-2, log=True)
    )
    lr_schedule: str = knob(
        "constant",
        "constant, or cosine decay to 0 over the run's steps.",
        choices=LR_SCHEDULES,
        space=CategoricalDistribution(LR_SCHEDULES),
    )
    weight_decay: float = knob(
        0.0,
        "Weight decay (L2 for adam/sgd, decoupled for adamw).",
        low=0.0,
        high=1.0,
        space=CategoricalDistribution(WEIGHT_DECAYS),
    )
    label_smoothing: float = knob(
        0.0, "Label smoothing of the cross-entropy term.", low=0.0, high=0.5, space=FloatDistribution(0.0, 0.2)
    )
    augment: str = knob(
        "none",
        "none; flip (each row plain or mirrored); shift (each row in one of 18 views: translated by up to 4 "
        "pixels, plain or mirrored); or crops:K (one of K seeded random-resized crops of each image, the FKD way). "
        "shift and crops are for logit methods. The teacher's outputs are cached per view.",
        check=_augment_problem,
        space=CategoricalDistribution(SEARCHED_AUGMENTATIONS),
    )
    precision: str = knob(
        "fp32",
        "Forward pass: fp32, or autocast bf16 (CPU/CUDA) or fp16 (CUDA); losses stay float32.",
        choices=PRECISIONS,
        identity=True,
    )
    seed: int = knob(42, "Seed of initialisation, batch order and augmentation.", low=0, high=MAX_SEED)


@dataclass(frozen=True)
class LossConfig(Section):
    """The method and its own hyperparameters (complete: unset ones take the tutorial's values).

    Which names and values are valid depends on the method, so the method's ``Strategy`` checks
    them (``kdsearch.strategies``).
    """

    method: str = knob(
        "kd",
        "The distillation method; optimize also takes auto (every method) or a list (kd,dkd,ce): one study "
        "across them.",
        choices=METHODS,
    )
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from kdsearch.strategies import get_strategy

        super().__post_init__()
        if not isinstance(self.params, Mapping):
            raise ConfigError("params", f"must be a mapping of name to value, got {shown(self.params)}")
        object.__setattr__(self, "params", get_strategy(self.method).hyperparameters(dict(self.params)))


SECTIONS: dict[str, type[Section]] = {"data": DataConfig, "models": ModelsConfig, "recipe": RecipeConfig}
# Every knob's section, by its (unique) name: the flat namespace of CLI options and study attributes.
SECTION_OF: dict[str, str] = {name: section for section, cls in SECTIONS.items() for name, _ in knobs_of(cls)}
KNOBS: dict[str, Knob] = {name: rule for cls in SECTIONS.values() for name, rule in knobs_of(cls)}
# Recipe knobs every method searches, with their default spaces.
RECIPE_SPACE: dict[str, BaseDistribution] = {
    name: rule.space for name, rule in knobs_of(RecipeConfig) if rule.space is not None
}
# Keys an exported config carries for provenance; reading a config passes over them.
PROVENANCE_KEYS = ("source", "kdsearch_version")


@dataclass(frozen=True)
class RunConfig(Section):
    """Everything that defines one distillation run; the format of exported configs."""

    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    device: str = knob("auto", "auto, cpu, cuda or cuda:N.")

    @property
    def method(self) -> str:
        return self.loss.method

    def flat(self) -> dict[str, Any]:
        """Every knob by name, ``method`` and ``hyperparameters`` (the form of study attributes and legacy configs)."""
        values = {name: getattr(getattr(self, SECTION_OF[name]), name) for name in KNOBS}
        return {"method": self.method, **values, "hyperparameters": dict(self.loss.params)}

    def to_dict(self) -> dict[str, Any]:
        """The exported form: one mapping per section (portable: the device is not part of it)."""
        out: dict[str, Any] = {s: dataclasses.asdict(getattr(self, s)) for s in SECTIONS}
        out["loss"] = {"method": self.method, "params": dict(self.loss.params)}
        return out

    def identity(self) -> dict[str, Any]:
        """The knobs a study cannot mix between its trials."""
        flat = self.flat()
        return {"method": self.method, **{name: flat[name] for name, rule in KNOBS.items() if rule.identity}}

    def with_values(self, values: Mapping[str, Any]) -> RunConfig:
        """A copy with knobs and method hyperparameters replaced by name (a trial's params, ``--hp``).

        Names of knobs go to their section; every other name is one of the method's own. A
        ``method`` (a trial of a study across methods) switches the method: its values start from that
        method's tutorial ones, not the old method's.
        """
        changes: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
        method = str(values.get("method", self.method))
        params = dict(self.loss.params) if method == self.method else {}
        for name, value in values.items():
            if name == "method":
                continue
            if name in SECTION_OF:
                changes[SECTION_OF[name]][name] = value
            else:
                params[name] = value
        sections = {
            s: dataclasses.replace(getattr(self, s), **c) if c else getattr(self, s) for s, c in changes.items()
        }
        return dataclasses.replace(self, **sections, loss=LossConfig(method, params))

    @classmethod
    def read(cls, document: Mapping[str, Any]) -> RunConfig:
        """The one reader: a config from its sectioned form, a flat one migrated first; unknown keys refused.

        A wrong value raises ``ConfigError`` naming the field, for the caller to say the user's way.
        """
        doc = {key: value for key, value in document.items() if key not in PROVENANCE_KEYS}
        parts: dict[str, Any] = {}
        for key, value in (doc if is_sectioned(doc) else migrate(doc)).items():
            section = {**SECTIONS, "loss": LossConfig}.get(key)
            if key == "device":
                parts[key] = value
                continue
            if section is None or not isinstance(value, Mapping):
                raise UserError(f"unexpected key {shown(key)}; a config holds the sections {', '.join(SECTION_KEYS)}")
            known = {name for name, _ in knobs_of(section)} | ({"params"} if key == "loss" else set())
            if set(value) - known:
                raise UserError(f"section {key} has unknown keys {sorted(set(value) - known)}; known: {sorted(known)}")
            parts[key] = section(**value)
        return cls(**parts)

    @classmethod
    def from_dict(cls, document: Mapping[str, Any], *, origin: str) -> RunConfig:
        """A config from a file or a study's attributes (``origin``), its errors said as that file's keys:
        "config best.yaml: data.val_size must be at least 0, got -1" (flat files: their flat keys)."""
        try:
            return cls.read(document)
        except ConfigError as exc:
            raise UserError(f"config {origin}: {exc.say(file_key if is_sectioned(document) else plain)}") from None
        except UserError as exc:
            raise UserError(f"config {origin}: {exc}") from None

    @classmethod
    def from_flat(cls, values: Mapping[str, Any], *, origin: str) -> RunConfig:
        """A config from knob names (study attributes, pre-sections files): ``from_dict`` reads both forms."""
        return cls.from_dict(values, origin=origin)


SECTION_KEYS = (*SECTIONS, "loss")


def is_sectioned(document: Mapping[str, Any]) -> bool:
    """Whether a config is in the exported form (sections), not the flat form of older versions."""
    return any(key in document for key in SECTION_KEYS)


def migrate(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The sectioned form of a flat config: older exports, study attributes, command-line values.

    Every knob goes to its section, ``method`` and ``hyperparameters`` (the method's values) to
    ``loss``. Knobs found among the ``hyperparameters`` (older files kept lr, lr_schedule and augment
    there; ``--hp lr=…``) move to their section and win over the same knob given beside them.
    """
    values = dict(flat)
    unknown = set(values) - set(KNOBS) - {"method", "hyperparameters", "device"}
    if unknown:
        raise UserError(f"unknown keys {sorted(unknown)}; a config holds the sections {', '.join(SECTION_KEYS)}")
    params = values.pop("hyperparameters", None)
    params = {} if params is None else params
    if not isinstance(params, Mapping):
        raise ConfigError("hyperparameters", f"must be a mapping of name to value, got {shown(params)}")
    params = dict(params)
    values |= {name: params.pop(name) for name in [n for n in params if n in KNOBS]}
    document: dict[str, Any] = {s: {n: values[n] for n, _ in knobs_of(c) if n in values} for s, c in SECTIONS.items()}
    document["loss"] = {"params": params} | ({"method": values["method"]} if "method" in values else {})
    return document | ({"device": values["device"]} if "device" in values else {})


def file_key(name: str) -> str:
    """Where a field lives in a config file: the file reader's words for a field (``data.val_size``)."""
    if name in SECTION_OF:
        return f"{SECTION_OF[name]}.{name}"
    return f"loss.{name}" if name in ("method", "params") else name
