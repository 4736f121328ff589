"""The settings of each command besides a run's config, declared like the config's sections.

A command's options are the knobs of the sections it lists (``kdsearch.cli``): a run's sections
(``kdsearch.config``) and these. Each setting is declared once, with its default, its help and its
range, and is checked by its knob when the command builds the section, so a wrong value reads the
same from every command. Settings that two commands share are declared once and reused with
``same`` (the storage, a study's name, the student's width). No torch here: ``--help`` stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdsearch.config import (
    DEFAULT_TEACHER_MODEL,
    DEFAULT_TEACHER_PRESET,
    TEACHER_PRESETS,
    DataConfig,
    ModelsConfig,
    RecipeConfig,
    RunConfig,
)
from kdsearch.knobs import Section, knob, same
from kdsearch.search_config import SearchConfig

# The baseline every confirmation compares with: the tutorial's hand-set config of the study's method.
HAND_SET = "hand-set"
STUDY_FORMATS = ("table", "json", "yaml")


@dataclass(frozen=True)
class Printing(Section):
    """How a command prints: one JSON object for scripts, and no progress bar."""

    json: bool = knob(False, "Print one JSON object.")
    quiet: bool = knob(False, "No progress bar.", short="-q")


@dataclass(frozen=True)
class TrainSettings(Section):
    """`kdsearch train`'s own settings: the file it starts from, the method's values, where it saves."""

    config: str | None = knob(
        None,
        "YAML/JSON run config (as `kdsearch export` writes); options given here override it.",
        kind=str,
        path="file",
    )
    rank: int = knob(1, "Which config of an `export {top} K` file.", low=1)
    hp: tuple[str, ...] = knob(
        (),
        "A method hyperparameter or recipe knob (repeatable), e.g. {hp} temperature=4; unset ones take the "
        "tutorial's values.",
        kind=tuple,
    )
    out: str | None = knob(None, "Save the trained student here.", kind=str, path="file")


@dataclass(frozen=True)
class TeacherConfig(Section):
    """What `kdsearch teacher` trains: a model on some data with a recipe (the preset's, options over it)."""

    data: DataConfig
    recipe: RecipeConfig
    model: str = knob(
        DEFAULT_TEACHER_MODEL, "deepnn, lightnn, torchvision.models:NAME, timm:NAME or package.module:Class."
    )
    device: str = same(RunConfig, "device")


@dataclass(frozen=True)
class TeacherSettings(Section):
    """`kdsearch teacher`'s own settings: the measured recipe it starts from, where it saves."""

    preset: str = knob(
        DEFAULT_TEACHER_PRESET,
        "A measured recipe: strong (the search's default teacher; see the README) or tutorial (10 epochs of "
        "Adam 1e-3, for reproduction); recipe options given here override it.",
        choices=tuple(TEACHER_PRESETS),
    )
    out: str | None = knob(
        None,
        "Checkpoint path [default: studies/teachers/<model>-<dataset>-<data id>[-<recipe id>][-val<N>].pt, the "
        "teacher that runs with the same {val_size} use by default].",
        kind=str,
        path="file",
    )


@dataclass(frozen=True)
class EvaluateSettings(Section):
    """`kdsearch evaluate`: which checkpoint, built as which model."""

    checkpoint: str = knob(None, "The checkpoint to evaluate.", kind=str, optional=False, path="file")
    model: str | None = knob(
        None, "deepnn, lightnn or package.module:Class [default: a built-in name the checkpoint records].", kind=str
    )
    width: float | None = same(
        ModelsConfig,
        "width",
        default=None,
        optional=True,
        help="Width multiplier [default: from the checkpoint, else 1].",
    )
    device: str = same(RunConfig, "device")


@dataclass(frozen=True)
class LayersSettings(Section):
    """`kdsearch layers`: the model whose tappable layers are listed, built for the dataset."""

    model: str = same(ModelsConfig, "student_model", default=None, optional=False, help="The model to list.")
    width: float = same(ModelsConfig, "width")


@dataclass(frozen=True)
class ConfirmSettings(Section):
    """`kdsearch confirm`: which study, how many of its best configs, how many seeds, against what."""

    study_name: str = same(
        SearchConfig, "study_name", optional=False, help="The study whose best configs are confirmed."
    )
    storage: str | None = same(SearchConfig, "storage")
    top: int = knob(3, "How many of its best configs.", low=1)
    seeds: int = knob(5, "Seeds per config.", low=1)
    against: str = knob(
        HAND_SET,
        f"The baseline, besides the hand-set config: {HAND_SET} alone, or the name of a study (a CE control) whose "
        "best config is re-trained with the same seeds. A study across methods is compared with its own best ce "
        "trial (control-ce) instead of a hand-set config.",
    )
    race: bool = knob(
        True,
        "Race the candidates over seeds (successive halving: the better half goes on to twice the seeds; the "
        "baselines get every seed) and reuse search trials that already are a run; off, every candidate runs every "
        "seed.",
    )


@dataclass(frozen=True)
class StudiesSettings(Section):
    """`kdsearch studies`: which storage, printed how."""

    storage: str | None = same(SearchConfig, "storage")
    format: str = knob("table", "Aligned columns, JSON or YAML.", choices=STUDY_FORMATS, short="-f")


@dataclass(frozen=True)
class ExportSettings(Section):
    """`kdsearch export`: which study, which of its trials, written where."""

    study_name: str = same(SearchConfig, "study_name", optional=False, help="The study to export.")
    storage: str | None = same(SearchConfig, "storage")
    output: str | None = knob(
        None, "Write to FILE.yaml or FILE.json [default: print YAML].", kind=str, path="file", short="-o"
    )
    checkpoint: str | None = knob(
        None, "Also save the best trial's student checkpoint here (a folder with {pareto}).", kind=str, path="any"
    )
    top: int = knob(1, "Export the K best trials.", low=1)
    pareto: bool = knob(False, "Every Pareto-optimal trial of a multi-objective study ({checkpoint}: a folder).")


@dataclass(frozen=True)
class ReportSettings(Section):
    """`kdsearch report`: which study, written where."""

    study_name: str = same(SearchConfig, "study_name", optional=False, help="The study to report on.")
    storage: str | None = same(SearchConfig, "storage")
    output: str = knob(None, "The HTML file to write.", kind=str, optional=False, path="file", short="-o")
    png: str | None = knob(None, "Also write PNGs here.", kind=str, path="dir")


def _listen_address_problem(host: str) -> str | None:
    """Why ``host`` cannot be an address to listen on (a URL, a path, spaces), or None.

    Caught here, it is one line naming the option; at bind time it would read as a resolver's error.
    """
    if any(c.isspace() for c in host) or "/" in host or not host.strip("[]"):
        return f"must be an address or a name to listen on, such as 127.0.0.1 or ::1, got {host!r:.80}"
    return None


@dataclass(frozen=True)
class DashboardSettings(Section):
    """`kdsearch dashboard`: the storage it serves, and where it listens."""

    storage: str | None = same(SearchConfig, "storage")
    host: str = knob(
        "127.0.0.1",
        "Address to bind (loopback unless you say so; ::1 for IPv6); requests must name it or loopback.",
        check=_listen_address_problem,
    )
    port: int = knob(8080, "Port to listen on (0: any free one).", low=0, high=65535)
