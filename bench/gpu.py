"""GPU checks of issue #14 in one short run (`make bench-gpu`); prints a table, writes bench/results/gpu.json.

On a CUDA machine, inside ``--budget`` seconds (default 480):

(a) ``pytest -q tests -k "device or precision or cuda"`` with ``KDSEARCH_TEST_DEVICE=cuda``: pass/fail counts;
(b) kd trained on the same CIFAR-10 slice, same seed, on the CPU and on the GPU: both test accuracies
    (the last digits may differ, whole points should not);
(c) the steady (second) epoch of kd on 50,000 synthetic 32x32 images in fp32, bf16 and fp16;
(d) a 50-trial, 10-epoch kd study with ``--n-jobs 1`` and ``--n-jobs 4`` on the one GPU: both wall times;
(e) the checkpoint saved on the GPU in (b), evaluated on the CPU: the same test accuracy.

Every step is timed and guarded: a failure is recorded with the last line of its stderr and the run goes
on; the exit code is 1 if any step failed. Each subprocess gets a share of the time left as its timeout,
so the whole run stays inside the budget. Without a GPU the script says so in one line and exits 0.

The GPU machine reaches no package registry and receives at most 64 MiB of the working tree, so the
packages it lacks (optuna and its needs, cmaes, ...) and a slice of the CIFAR-10 JPEG copy travel as a
bundle made here, where pip can reach PyPI:

    python bench/gpu.py prepare --data-dir ../shared/datasets/cifar10-jpeg   # here: bench/gpu-bundle/
    python bench/gpu.py                                                       # on the GPU machine

The run installs the bundle's wheels (``--no-index --no-deps``, only those not already there; never torch)
into a folder of its own that it puts, after the repository root, on the subprocesses' PYTHONPATH, so
``python -m kdsearch`` runs the working tree without kdsearch being installed there.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bench" / "gpu-bundle"
RESULTS = ROOT / "bench" / "results" / "gpu.json"
DEFAULT_SITE = Path(tempfile.gettempdir()) / "kdsearch-gpu-site"
SCHEMA = "kdsearch-bench-gpu/1"
MANIFEST = "manifest.json"
SITE_MARKER = ".kdsearch-gpu-site"  # only a folder holding this file is ever emptied by the run
MIB = 1024 * 1024
# The tree that travels to the device holds at most 64 MiB: the bundle may take 48 of them.
MAX_BUNDLE_BYTES = 48 * MIB
# The device's Python is not known for sure (its listing says 3.12.3): compiled wheels for each of these.
PYTHON_VERSIONS = ("3.10", "3.11", "3.12")
# pip matches a manylinux tag exactly, so name each glibc level a wheel may be tagged with; torch 2.11's
# own wheels need glibc 2.28, so nothing newer than that is asked for.
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# What kdsearch and the device tests need that the device's torch image may lack. Their dependencies are
# found from the downloaded wheels' metadata.
ROOTS = ("optuna", "cmaes", "pytest")
# kdsearch imports plotly and optuna-dashboard only for `report` and `dashboard`, which no step runs. They
# fit (with narwhals and bottle 13.6 MiB of the 29.0 MiB of wheels; 34.3 MiB of bundle with the slice, as
# measured when this was written), so they go along for anyone who wants a report on the device;
# `prepare --no-plots` leaves them out should the bundle outgrow its 48 MiB.
PLOT_ROOTS = ("plotly", "optuna-dashboard")
# Never bundled: the device's torch image has these (torch, torchvision and their own needs) and a second
# copy could shadow them; `--no-deps` keeps pip from touching them at install time.
DEVICE_PROVIDED = frozenset(
    {
        "torch",
        "torchvision",
        "triton",
        "numpy",
        "pillow",
        "click",
        "joblib",
        "pyyaml",
        "tqdm",
        "filelock",
        "typing-extensions",
        "jinja2",
        "sympy",
        "mpmath",
        "networkx",
        "fsspec",
        "setuptools",
    }
)
TEST_FILTER = "device or precision or cuda"
RESERVE_SECONDS = 15.0  # kept back from the budget: a timed-out step's SIGTERM grace, then the report
TERM_GRACE_SECONDS = 10.0
STUDY_MARGIN_SECONDS = 30.0  # a study's start-up and its last running trial, after Optuna's --timeout


# --- prepare (here, with PyPI) ----------------------------------------------------------------------


def canonical(name: str) -> str:
    """PEP 503 name, so ``SQLAlchemy``, ``sqlalchemy`` and a wheel's ``sqlalchemy`` compare equal."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_distribution(filename: str) -> str:
    """The canonical distribution name of a wheel file (``optuna_dashboard-0.21.0-py3-none-any.whl``)."""
    return canonical(Path(filename).name.split("-", 1)[0])


def marker_environment(python_version: str) -> dict[str, str]:
    """PEP 508 marker values of the device (CPython on x86-64 Linux) for ``python_version``."""
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython",
        "implementation_version": f"{python_version}.0",
        "platform_python_implementation": "CPython",
        "platform_machine": "x86_64",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_release": "",
        "platform_version": "",
        "extra": "",
    }


def _requirement_tools() -> tuple[Any, Any]:
    """``Requirement`` and ``SpecifierSet`` from ``packaging``, else from pip's vendored copy (prepare only)."""
    try:
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
        from pip._vendor.packaging.specifiers import SpecifierSet  # type: ignore[no-redef]
    return Requirement, SpecifierSet


def requires_dist(wheel: Path) -> list[str]:
    """A wheel's ``Requires-Dist`` lines, read from its METADATA without installing it."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = archive.read(name).decode("utf-8")
    headers = text.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in headers.splitlines() if line.startswith("Requires-Dist:")]


def needed_requirements(lines: Iterable[str], python_version: str) -> list[tuple[str, str]]:
    """``(name, specifier)`` of the requirements that apply on the device with ``python_version``.

    Requirements of extras and of other platforms fall out by their markers.
    """
    requirement_class, _ = _requirement_tools()
    env = marker_environment(python_version)
    out = []
    for line in lines:
        requirement = requirement_class(line)
        if requirement.marker is not None and not requirement.marker.evaluate(env):
            continue
        out.append((canonical(requirement.name), str(requirement.specifier)))
    return out


def local_version(name: str) -> str | None:
    """The version of ``name`` in this interpreter: the bundle pins what the CPU tests ran with."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def pip_download_command(spec: str, python_version: str, dest: Path, python: str = sys.executable) -> list[str]:
    """One ``pip download`` of one wheel (no dependencies) built for the device's platform and Python."""
    command = [python, "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps"]
    command += ["--only-binary=:all:", "--implementation", "cp", "--python-version", python_version]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    return [*command, "-d", str(dest), spec]


def download_wheel(spec: str, python_version: str, dest: Path) -> Path:
    """Download ``spec`` into ``dest`` (through a fresh folder, to learn the file's name); return it."""
    with tempfile.TemporaryDirectory(prefix="kdsearch-wheel-") as tmp:
        proc = subprocess.run(
            pip_download_command(spec, python_version, Path(tmp)), capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"pip download {spec} (Python {python_version}): {last_line(proc.stderr)}")
        files = [p for p in Path(tmp).iterdir() if p.suffix == ".whl"]
        if len(files) != 1:
            raise RuntimeError(f"pip download {spec} (Python {python_version}) gave {[p.name for p in files]}")
        target = dest / files[0].name
        if not target.exists():
            shutil.move(str(files[0]), target)
        return target


def resolve_wheels(
    roots: Sequence[str],
    python_version: str,
    dest: Path,
    provided: frozenset[str] = DEVICE_PROVIDED,
    download: Callable[[str, str, Path], Path] = download_wheel,
    pins: Callable[[str], str | None] = local_version,
) -> list[str]:
    """Download ``roots`` and everything they need for ``python_version``, except what the device has.

    Breadth first, one wheel per distribution, no backtracking: each is pinned to this interpreter's
    version when that satisfies the requirement (the versions the CPU tests passed with), else the newest
    that pip finds for that Python (SQLAlchemy 2.1 needs 3.11, so 3.10 gets 2.0, which needs greenlet).
    Returns the wheels' file names.
    """
    _, specifier_set = _requirement_tools()
    queue: list[tuple[str, str]] = [(canonical(r), "") for r in roots]
    seen: set[str] = set()
    wheels: list[str] = []
    while queue:
        name, specifier = queue.pop(0)
        if name in seen or name in provided:
            continue
        seen.add(name)
        pinned = pins(name)
        specs = [f"{name}{specifier}"]
        if pinned is not None and specifier_set(specifier).contains(pinned, prereleases=True):
            specs.insert(0, f"{name}=={pinned}")
        wheel = None
        for i, spec in enumerate(specs):
            try:
                wheel = download(spec, python_version, dest)
                break
            except RuntimeError:
                if i == len(specs) - 1:
                    raise
        assert wheel is not None
        wheels.append(wheel.name)
        queue.extend(needed_requirements(requires_dist(wheel), python_version))
    return sorted(wheels, key=str.lower)


def copy_slice(source: Path, dest: Path, train_per_class: int, test_per_class: int) -> dict[str, dict[str, int]]:
    """Copy the first N images (by name) of each class of an ImageFolder; return the counts per class.

    A fixed choice, so every bundle holds the same slice; a class with fewer images gives what it has.
    """
    counts: dict[str, dict[str, int]] = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        split_dir = source / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir} is missing: the data dir needs train/<class>/ and test/<class>/")
        counts[split] = {}
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            target = dest / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            images = sorted(p for p in class_dir.iterdir() if p.is_file() and not p.name.startswith("."))
            for path in images[:per_class]:
                shutil.copy2(path, target / path.name)
            counts[split][class_dir.name] = min(per_class, len(images))
    return counts


def tree_bytes(path: Path) -> int:
    """Bytes of all files under ``path``: what the bundle adds to the tree sent to the device."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare(args: argparse.Namespace) -> int:
    """Make ``bench/gpu-bundle/``: the device's missing wheels for each Python, and the CIFAR-10 slice."""
    bundle = Path(args.bundle)
    wheels_dir, slice_dir = bundle / "wheels", bundle / "cifar-slice"
    for folder in (wheels_dir, slice_dir):  # our own sub-folders only: the bundle is rebuilt from scratch
        if folder.exists():
            shutil.rmtree(folder)
    wheels_dir.mkdir(parents=True)
    # Never commit the bundle: it is carried to the device explicitly.
    (bundle / ".gitignore").write_text("# made by `python bench/gpu.py prepare`; carried to the device\n*\n")
    roots = ROOTS if args.no_plots else ROOTS + PLOT_ROOTS
    per_python: dict[str, list[str]] = {}
    for version in args.python_versions:
        per_python[version] = resolve_wheels(roots, version, wheels_dir)
        print(f"Python {version}: {len(per_python[version])} wheels")
    counts = copy_slice(Path(args.data_dir), slice_dir, args.train_per_class, args.test_per_class)
    wheel_bytes = tree_bytes(wheels_dir)
    manifest = {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "roots": list(roots),
        "wheels": per_python,
        "slice": {"source": str(args.data_dir), "counts": counts},
        "wheel_bytes": wheel_bytes,
    }
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    total = tree_bytes(bundle)
    print(f"{len(list(wheels_dir.glob('*.whl')))} wheel files, {wheel_bytes / MIB:.1f} MiB:")
    for path in sorted(wheels_dir.glob("*.whl")):
        print(f"  {path.stat().st_size / MIB:6.2f} MiB  {path.name}")
    n_train, n_test = sum(counts["train"].values()), sum(counts["test"].values())
    print(f"slice: {n_train} train + {n_test} test images, {tree_bytes(slice_dir) / MIB:.1f} MiB")
    print(f"bundle {bundle}: {total / MIB:.1f} MiB (limit {MAX_BUNDLE_BYTES / MIB:.0f} MiB)")
    if total > MAX_BUNDLE_BYTES:
        print(f"bundle is over {MAX_BUNDLE_BYTES / MIB:.0f} MiB: try --no-plots or a smaller slice", file=sys.stderr)
        return 1
    return 0


# --- the run's pieces (pure, tested on the CPU) ------------------------------------------------------


@dataclass
class Step:
    """One guarded, timed check. ``weight`` is its expected seconds: its share of the time left."""

    name: str
    weight: float
    groups: tuple[str, ...]
    needs: tuple[str, ...] = ()
    command: Callable[[float], list[str]] | None = None  # given the step's timeout
    action: Callable[[float], dict[str, Any]] | None = None  # in-process steps
    env: dict[str, str] = field(default_factory=dict)
    parse: str = "json"  # how stdout is read: "json" (kdsearch --json) or "pytest"
    ok_returncodes: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class Paths:
    """Where a run reads and writes: the slice from the bundle, everything else under a work folder."""

    bundle: Path
    data_dir: Path
    work: Path
    site: Path

    @property
    def home(self) -> Path:
        return self.work / "home"

    @property
    def synthetic(self) -> Path:
        return self.work / "synthetic"

    @property
    def teacher_slice(self) -> Path:
        return self.work / "teacher-slice.pt"

    @property
    def teacher_synthetic(self) -> Path:
        return self.work / "teacher-synthetic.pt"

    def checkpoint(self, device: str) -> Path:
        return self.work / f"ckpt-{device}.pt"

    @property
    def storage(self) -> str:
        return f"sqlite:///{self.work / 'gpu.db'}"


def positive_seconds(text: str) -> float:
    """argparse type of ``--budget``: a number of seconds above zero (anything else exits 2)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type of the counts: an integer above zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def step_timeout(remaining: float, weight: float, later_weights: Iterable[float]) -> float:
    """This step's share of the time left, by weight among the steps still to run.

    Time a step leaves unused flows on to the later ones, and no step can take more than its share of them.
    """
    total = weight + sum(later_weights)
    return max(0.0, remaining) * (weight / total if total > 0 else 1.0)


def study_optuna_timeout(timeout: float) -> float:
    """Optuna's ``--timeout`` for a study given ``timeout`` seconds: stop starting trials in time to exit."""
    return round(max(10.0, timeout - STUDY_MARGIN_SECONDS), 1)


def kdsearch(*args: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "kdsearch", *args]


def tests_command(python: str = sys.executable) -> list[str]:
    """(a): the device tests, run with KDSEARCH_TEST_DEVICE=cuda; no .pytest_cache in the tree."""
    return [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-k", TEST_FILTER]


def teacher_command(
    data_dir: Path, out: Path, epochs: int, val_size: int, device: str = "cuda", python: str = sys.executable
) -> list[str]:
    """A DeepNN teacher; ``val_size`` as the studies', so it never saw the images they validate on."""
    return kdsearch(
        "teacher", "--preset", "tutorial", "--dataset", "imagefolder", "--data-dir", str(data_dir),
        "--val-size", str(val_size), "--epochs", str(epochs), "--seed", "42", "--device", device, "--json", "-q",
        "--out", str(out),
        python=python,
    )  # fmt: skip


def train_command(
    data_dir: Path,
    teacher: Path,
    device: str,
    epochs: int,
    *,
    precision: str | None = None,
    out: Path | None = None,
    python: str = sys.executable,
) -> list[str]:
    """(b) and (c): one kd run on the whole train split (``--val-size 0``), seed 42."""
    args = [
        "train", "--method", "kd", "--dataset", "imagefolder", "--data-dir", str(data_dir), "--val-size", "0",
        "--epochs", str(epochs), "--seed", "42", "--device", device, "--teacher", str(teacher), "--json", "-q",
    ]  # fmt: skip
    if precision is not None:
        args += ["--precision", precision]
    if out is not None:
        args += ["--out", str(out)]
    return kdsearch(*args, python=python)


def evaluate_command(checkpoint: Path, data_dir: Path, device: str = "cpu", python: str = sys.executable) -> list[str]:
    """(e): a checkpoint's test accuracy on ``device``."""
    return kdsearch(
        "evaluate", "--checkpoint", str(checkpoint), "--dataset", "imagefolder", "--data-dir", str(data_dir),
        "--val-size", "0", "--device", device, "--json",
        python=python,
    )  # fmt: skip


def optimize_command(
    paths: Paths,
    n_jobs: int,
    trials: int,
    epochs: int,
    val_size: int,
    timeout: float | None = None,
    python: str = sys.executable,
) -> list[str]:
    """(d): a kd study on the GPU; ``timeout`` (Optuna's) makes a study that cannot finish stop in time."""
    args = [
        "optimize", "--method", "kd", "--trials", str(trials), "--epochs", str(epochs), "--n-jobs", str(n_jobs),
        "--dataset", "imagefolder", "--data-dir", str(paths.data_dir), "--val-size", str(val_size),
        "--device", "cuda", "--storage", paths.storage, "--study-name", f"kd-gpu-{n_jobs}",
        "--teacher", str(paths.teacher_slice),
    ]  # fmt: skip
    if timeout is not None:
        args += ["--timeout", f"{timeout:g}"]
    return kdsearch(*args, "--json", "-q", python=python)


def subprocess_env(base: Mapping[str, str], site: Path | None, home: Path) -> dict[str, str]:
    """The environment of every step: the working tree first on PYTHONPATH, then the bundle's packages.

    A studies home of the run's own keeps the teachers, caches and artifacts out of the tree.
    """
    env = dict(base)
    parts = [str(ROOT)]
    if site is not None:
        parts.append(str(site))
    if base.get("PYTHONPATH"):
        parts.append(base["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["KDSEARCH_HOME"] = str(home)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("KDSEARCH_STORAGE", None)
    return env


def last_line(text: str | None) -> str:
    """The last non-empty line of a stream: what a failed step is recorded with."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def parse_json_output(stdout: str) -> dict[str, Any]:
    """The JSON object that ``kdsearch ... --json`` prints (its last line that parses as one)."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise ValueError("no JSON object on stdout")


PYTEST_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)\b")


def parse_pytest_counts(stdout: str) -> dict[str, int]:
    """Counts from pytest's summary line (``3 passed, 1 skipped, 140 deselected in 2.1s``)."""
    for line in reversed(stdout.splitlines()):
        found = PYTEST_COUNT.findall(line)
        if found and " in " in line:
            counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
            for number, word in found:
                key = {"error": "errors", "warning": "warnings"}.get(word, word)
                counts[key] = counts.get(key, 0) + int(number)
            return counts
    return {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}


def steady_epoch(result: Mapping[str, Any]) -> float | None:
    """The steady epoch's seconds: the last one, after the first has paid the warm-up."""
    seconds = result.get("epoch_seconds") or []
    return float(seconds[-1]) if seconds else None


# --- device-side actions -------------------------------------------------------------------------------


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `python bench/gpu.py prepare` where pip reaches PyPI")
    return json.loads(path.read_text())


def is_installed(name: str, ignore: Path | None = None) -> bool:
    """Whether the device's Python has ``name``, not counting a copy under ``ignore`` (our own site folder,
    should an earlier run's PYTHONPATH still point there: it is emptied before the install)."""
    paths = [p for p in sys.path if ignore is None or not Path(p or ".").resolve().is_relative_to(ignore.resolve())]
    return next(iter(importlib.metadata.distributions(name=name, path=paths)), None) is not None


def wheels_to_install(
    manifest: Mapping[str, Any], python_version: str, installed: Callable[[str], bool] = is_installed
) -> tuple[list[str], list[str]]:
    """The bundle's wheels for ``python_version`` that the device lacks, and the names it already has.

    What is there is kept (never torch, never a newer numpy shadowed by ours).
    """
    wheels = manifest.get("wheels", {}).get(python_version)
    if wheels is None:
        made = ", ".join(sorted(manifest.get("wheels", {})))
        raise RuntimeError(f"the bundle has no wheels for Python {python_version} (made for {made})")
    missing: list[str] = []
    present: list[str] = []
    for filename in wheels:
        name = wheel_distribution(filename)
        if name in DEVICE_PROVIDED:
            continue
        if installed(name):
            present.append(name)
        else:
            missing.append(filename)
    return missing, present


def install_bundle(bundle: Path, site: Path, timeout: float, python: str = sys.executable) -> dict[str, Any]:
    """Install the missing wheels into ``site`` with pip, offline, without dependencies; unzip without pip."""
    manifest = read_manifest(bundle)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    missing, present = wheels_to_install(manifest, version, lambda name: is_installed(name, ignore=site))
    if site.exists():
        if not (site / SITE_MARKER).exists() and any(site.iterdir()):
            raise RuntimeError(f"{site} exists and was not made by this script; pass another --site")
        shutil.rmtree(site)
    site.mkdir(parents=True)
    (site / SITE_MARKER).write_text("made by bench/gpu.py; emptied by its next run\n")
    paths = [str(bundle / "wheels" / f) for f in missing]
    method = "pip"
    if paths:
        has_pip = subprocess.run([python, "-m", "pip", "--version"], capture_output=True, timeout=60).returncode == 0
        if has_pip:
            command = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-index", "--no-deps"]
            # --no-compile: modules are compiled when first imported; plotly alone would take seconds here.
            command += ["--no-cache-dir", "--no-compile", "--target", str(site), *paths]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"pip install: {last_line(proc.stderr)}")
        else:
            method = "unzip"  # a wheel is a zip of what goes on sys.path; enough for these packages
            for path in paths:
                with zipfile.ZipFile(path) as archive:
                    archive.extractall(site)
    return {"python": version, "site": str(site), "installed": missing, "already_there": present, "method": method}


def _write_images(task: tuple[str, int, int, int]) -> int:
    """Pool worker: ``count`` random 32x32 RGB PNGs into one class folder, seeded per chunk."""
    import numpy as np
    from PIL import Image

    folder, start, count, seed = task
    rng = np.random.default_rng(seed)
    for i in range(start, start + count):
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:05d}.png"), compress_level=1)
    return count


def write_synthetic(
    root: Path,
    n_train: int,
    n_test: int,
    classes: int = 10,
    processes: int | None = None,
    timeout: float | None = None,
    chunk: int = 500,
) -> dict[str, int]:
    """An ImageFolder of random 32x32 PNGs for timing (what a teacher learns from noise is beside the point).

    Made on the machine itself with a process pool: 50,000 files would not fit in the tree sent there.
    """
    tasks = []
    for split, total in (("train", n_train), ("test", n_test)):
        for label in range(classes):
            per_class = total // classes + (1 if label < total % classes else 0)
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for start in range(0, per_class, chunk):
                seed = len(tasks)
                tasks.append((str(folder), start, min(chunk, per_class - start), seed))
    if processes == 1:
        written = sum(_write_images(t) for t in tasks)
    else:
        import multiprocessing

        # spawn: the parent has touched CUDA; its children only need numpy and PIL.
        with multiprocessing.get_context("spawn").Pool(processes or os.cpu_count()) as pool:
            written = sum(pool.map_async(_write_images, tasks).get(timeout))
    return {"train": n_train, "test": n_test, "classes": classes, "written": written}


# --- the plan ------------------------------------------------------------------------------------------

GROUPS = ("tests", "train", "precision", "study")


def plan_steps(args: argparse.Namespace, paths: Paths, results: dict[str, dict[str, Any]]) -> list[Step]:
    """The run's steps in order; ``results`` holds earlier steps' parsed outputs for the checks."""
    py = args.python
    test_env = {"KDSEARCH_TEST_DEVICE": "cuda"}
    steps = [
        Step(
            "install",
            20,
            GROUPS,
            action=lambda t: install_bundle(paths.bundle, paths.site, t, py),
            parse="none",
        ),
        # pytest exits 5 when no test is selected: reported as 0 passed, not as a failure of the run.
        Step(
            "tests",
            60,
            ("tests",),
            command=lambda t: tests_command(py),
            env=test_env,
            parse="pytest",
            ok_returncodes=(0, 5),
        ),
        Step(
            "teacher-slice",
            20,
            ("train", "study"),
            command=lambda t: teacher_command(
                paths.data_dir, paths.teacher_slice, args.teacher_epochs, args.study_val_size, python=py
            ),
        ),
        Step(
            "train-cpu",
            40,
            ("train",),
            needs=("teacher-slice",),
            command=lambda t: train_command(
                paths.data_dir, paths.teacher_slice, "cpu", args.train_epochs, out=paths.checkpoint("cpu"), python=py
            ),
        ),
        Step(
            "train-gpu",
            20,
            ("train",),
            needs=("teacher-slice",),
            command=lambda t: train_command(
                paths.data_dir, paths.teacher_slice, "cuda", args.train_epochs, out=paths.checkpoint("cuda"), python=py
            ),
        ),
        Step(
            "cpu-vs-gpu",
            1,
            ("train",),
            needs=("train-cpu", "train-gpu"),
            action=lambda t: compare_accuracies(
                results["train-cpu"]["test_accuracy"], results["train-gpu"]["test_accuracy"], args.accuracy_tolerance
            ),
            parse="none",
        ),
        Step(
            "evaluate-cpu",
            15,
            ("train",),
            needs=("train-gpu",),
            command=lambda t: evaluate_command(paths.checkpoint("cuda"), paths.data_dir, "cpu", python=py),
        ),
        Step(
            "gpu-ckpt-on-cpu",
            1,
            ("train",),
            needs=("train-gpu", "evaluate-cpu"),
            action=lambda t: compare_accuracies(
                results["train-gpu"]["test_accuracy"], results["evaluate-cpu"]["test_accuracy"], args.eval_tolerance
            ),
            parse="none",
        ),
        Step(
            "synthetic-data",
            20,
            ("precision",),
            action=lambda t: write_synthetic(paths.synthetic, args.synthetic_images, args.synthetic_test, timeout=t),
            parse="none",
        ),
        Step(
            "teacher-synthetic",
            45,
            ("precision",),
            needs=("synthetic-data",),
            command=lambda t: teacher_command(paths.synthetic, paths.teacher_synthetic, 1, 0, python=py),
        ),
    ]
    for precision in ("fp32", "bf16", "fp16"):
        steps.append(
            Step(
                f"kd-{precision}",
                25,
                ("precision",),
                needs=("teacher-synthetic",),
                command=lambda t, p=precision: train_command(
                    paths.synthetic, paths.teacher_synthetic, "cuda", 2, precision=p, python=py
                ),
            )
        )
    for n_jobs in (1, args.parallel_jobs):
        steps.append(
            Step(
                f"study-{n_jobs}",
                100,
                ("study",),
                needs=("teacher-slice",),
                command=lambda t, n=n_jobs: optimize_command(
                    paths, n, args.study_trials, args.study_epochs, args.study_val_size, study_optuna_timeout(t), py
                ),
            )
        )
    return steps


def format_plan(steps: Sequence[Step], seconds: float) -> str:
    """The dry run: each step's timeout if every earlier one took all of its own, and its command line."""
    lines = []
    for i, step in enumerate(steps):
        share = step_timeout(seconds, step.weight, [s.weight for s in steps[i + 1 :]])
        seconds -= share
        shown = shlex.join(step.command(share)) if step.command else "(in-process)"
        lines.append(f"{step.name:<18} {share:5.0f} s  {shown}")
    return "\n".join(lines)


def compare_accuracies(first: float, second: float, tolerance: float) -> dict[str, Any]:
    """Two test accuracies (percent) that should agree within ``tolerance`` points; raise if they do not."""
    difference = round(abs(float(first) - float(second)), 4)
    if difference > tolerance:
        raise RuntimeError(f"{first:.2f}% vs {second:.2f}%: {difference:.2f} points apart (tolerance {tolerance})")
    return {"first": first, "second": second, "difference": difference, "tolerance": tolerance}


# --- running ---------------------------------------------------------------------------------------------


@dataclass
class CommandResult:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool


def _signal_group(pid: int, sig: int) -> None:
    """Signal the process group of a step we started (kdsearch's joblib workers are in it too)."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_command(command: Sequence[str], env: Mapping[str, str], timeout: float, cwd: Path = ROOT) -> CommandResult:
    """Run a step in its own process group; past ``timeout``, SIGTERM it (kdsearch closes its trials), then kill."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(command), cwd=cwd, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    timed_out = False
    try:
        stdout, stderr = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=TERM_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
    return CommandResult(proc.returncode, stdout, stderr, time.perf_counter() - start, timed_out)


def execute_step(step: Step, timeout: float, env: Mapping[str, str]) -> dict[str, Any]:
    """Run one step under its timeout; never raise: a failure is recorded with the last line of its stderr."""
    record: dict[str, Any] = {"name": step.name, "status": "ok", "timeout": round(timeout, 1), "error": None}
    start = time.perf_counter()
    try:
        if step.action is not None:
            record["result"] = step.action(timeout)
        else:
            assert step.command is not None
            command = step.command(timeout)
            record["command"] = command
            outcome = run_command(command, {**env, **step.env}, timeout)
            record["returncode"] = outcome.returncode
            if outcome.returncode not in step.ok_returncodes or outcome.timed_out:
                record["stderr_tail"] = outcome.stderr[-3000:]  # the whole story, for a run that is hard to repeat
            if outcome.timed_out:
                raise RuntimeError(f"timed out after {timeout:.0f} s; stderr: {last_line(outcome.stderr)}")
            if step.parse == "pytest":
                record["result"] = parse_pytest_counts(outcome.stdout)
                if outcome.returncode not in step.ok_returncodes:
                    raise RuntimeError(last_line(outcome.stdout) or last_line(outcome.stderr))
            else:
                if outcome.returncode not in step.ok_returncodes:
                    raise RuntimeError(last_line(outcome.stderr) or f"exit code {outcome.returncode}")
                record["result"] = parse_json_output(outcome.stdout)
                if record["result"].get("failed"):
                    raise RuntimeError(f"{record['result']['failed']} trials failed")
    except Exception as exc:  # noqa: BLE001 - one step's failure, whatever it is, must not stop the others
        record["status"] = "failed"
        record["error"] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RuntimeError) else str(exc)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def skipped(step: Step, reason: str) -> dict[str, Any]:
    return {"name": step.name, "status": "skipped", "seconds": 0.0, "timeout": 0.0, "error": reason}


def study_seconds_per_trial(result: Mapping[str, Any]) -> float | None:
    """Wall seconds per finished (complete or pruned) trial: comparable when Optuna's --timeout cut a study short."""
    finished = (result.get("complete") or 0) + (result.get("pruned") or 0)
    return round(float(result["wall_seconds"]) / finished, 3) if finished and "wall_seconds" in result else None


def describe(record: Mapping[str, Any]) -> str:
    """The one-line result of a step for the table."""
    if record["status"] != "ok":
        error = str(record.get("error") or "")
        return error if len(error) <= 100 else error[:97] + "..."
    result = record.get("result") or {}
    name = record["name"]
    if name == "install":
        return f"{len(result['installed'])} wheels installed ({result['method']}), {len(result['already_there'])} there"
    if name == "tests":
        return (
            f"{result['passed']} passed, {result['failed']} failed, {result['errors']} errors, "
            f"{result['skipped']} skipped"
        )
    if name in ("cpu-vs-gpu", "gpu-ckpt-on-cpu"):
        return f"{result['first']:.2f}% vs {result['second']:.2f}% ({result['difference']:.2f} points apart)"
    if name == "synthetic-data":
        return f"{result['train']} train + {result['test']} test random PNGs"
    if name.startswith("kd-"):
        return f"steady epoch {steady_epoch(result):.2f} s, test accuracy {result['test_accuracy']:.2f}%"
    if name.startswith("study-"):
        complete, pruned = result.get("complete", 0), result.get("pruned", 0)
        per_trial = study_seconds_per_trial(result)
        return (
            f"{result['wall_seconds']:.1f} s wall: {complete} complete, {pruned} pruned, "
            f"{result.get('failed', 0)} failed" + (f", {per_trial:.2f} s a trial" if per_trial is not None else "")
        )
    if "test_accuracy" in result:
        return f"test accuracy {result['test_accuracy']:.2f}%"
    return ""


def format_table(records: Sequence[Mapping[str, Any]]) -> str:
    """The printed table: one row per step with its status, seconds and result."""
    width = max([len("step")] + [len(r["name"]) for r in records])
    lines = [f"{'step':<{width}}  {'status':<7}  {'seconds':>7}  result"]
    for r in records:
        lines.append(f"{r['name']:<{width}}  {r['status']:<7}  {r['seconds']:7.1f}  {describe(r)}")
    return "\n".join(lines)


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The headline numbers of the issue, from the steps that ran (None where a step did not)."""
    by_name = {r["name"]: r.get("result") or {} for r in records if r["status"] == "ok"}

    def get(step: str, key: str) -> Any:
        return by_name.get(step, {}).get(key)

    studies = {
        name.removeprefix("study-"): {k: by_name[name].get(k) for k in ("wall_seconds", "complete", "pruned", "failed")}
        | {"seconds_per_trial": study_seconds_per_trial(by_name[name])}
        for name in by_name
        if name.startswith("study-")
    }
    return {
        "tests": by_name.get("tests"),
        "test_accuracy": {"cpu": get("train-cpu", "test_accuracy"), "cuda": get("train-gpu", "test_accuracy")},
        "gpu_checkpoint_on_cpu": get("evaluate-cpu", "test_accuracy"),
        "steady_epoch_seconds": {
            p: steady_epoch(by_name[f"kd-{p}"]) if f"kd-{p}" in by_name else None for p in ("fp32", "bf16", "fp16")
        },
        "studies": studies,
    }


def results_document(
    records: Sequence[Mapping[str, Any]], args: argparse.Namespace, host: Mapping[str, Any], wall: float
) -> dict[str, Any]:
    """What goes to bench/results/gpu.json: options, host, every step's raw record, the summary."""
    options = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k != "func"}
    return {
        "schema": SCHEMA,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "budget_seconds": args.budget,
        "wall_seconds": round(wall, 1),
        "host": dict(host),
        "options": options,
        "steps": list(records),
        "summary": summarize(records),
        "failed": [r["name"] for r in records if r["status"] == "failed"],
    }


def host_info() -> dict[str, Any]:
    import platform

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0),
        "cpus": os.cpu_count(),
    }


def gpu_absent_reason() -> str | None:
    """Why there is nothing to run here, or None on a CUDA machine."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not importable here ({exc})"
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is false"
    return None


def run(args: argparse.Namespace) -> int:
    """The device run: every step in order inside the budget, then the table and the JSON."""
    if not args.dry_run:
        reason = gpu_absent_reason()
        if reason is not None:
            print(f"bench/gpu.py: no CUDA GPU here ({reason}); nothing to run")
            return 0
    started = time.perf_counter()
    deadline = started + args.budget - RESERVE_SECONDS
    if args.work_dir:
        work = Path(args.work_dir)
    elif args.dry_run:
        work = Path(tempfile.gettempdir()) / "kdsearch-gpu-XXXXXXXX"  # made only by a real run
    else:
        work = Path(tempfile.mkdtemp(prefix="kdsearch-gpu-"))
    paths = Paths(Path(args.bundle), Path(args.data_dir or Path(args.bundle) / "cifar-slice"), work, Path(args.site))
    results: dict[str, dict[str, Any]] = {}
    steps = plan_steps(args, paths, results)
    wanted = [s.name for s in steps if not all(g in args.skip for g in s.groups)]
    if args.no_install:
        wanted.remove("install")
    weights = {s.name: s.weight for s in steps}
    if args.dry_run:
        print(format_plan([s for s in steps if s.name in wanted], args.budget - RESERVE_SECONDS))
        return 0
    paths.home.mkdir(parents=True, exist_ok=True)
    host = host_info()
    print(f"bench/gpu.py: {host['gpu']}, torch {host['torch']}, Python {host['python']}; budget {args.budget:.0f} s")
    print(f"work folder {work}", flush=True)
    env = subprocess_env(os.environ, None if args.no_install else paths.site, paths.home)
    needs = {s.name: s.needs for s in steps}
    records: list[dict[str, Any]] = []
    for step in steps:
        if step.name not in wanted:
            records.append(skipped(step, "not asked for (--skip/--no-install)"))
            continue
        missing = [n for n in step.needs if n not in results]
        if missing:
            records.append({**skipped(step, f"not run: needs {', '.join(missing)}"), "status": "failed"})
            continue
        failed = {r["name"] for r in records if r["status"] == "failed"}
        later = [weights[n] for n in wanted[wanted.index(step.name) + 1 :] if not set(needs[n]) & failed]
        timeout = step_timeout(deadline - time.perf_counter(), step.weight, later)
        if timeout < 3:
            records.append({**skipped(step, "not run: budget spent"), "status": "failed"})
            continue
        print(f"[{time.perf_counter() - started:4.0f} s] {step.name} (timeout {timeout:.0f} s)", flush=True)
        record = execute_step(step, timeout, env)
        records.append(record)
        if record["status"] == "ok":
            results[step.name] = record.get("result") or {}
        else:
            print(f"  failed: {record['error']}", flush=True)
    wall = time.perf_counter() - started
    document = results_document(records, args, host, wall)
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(format_table(records))
    print(f"{wall:.0f} s in all; results in {out}")
    return 1 if document["failed"] else 0


# --- command line ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bench/gpu.py",
        description="GPU checks of issue #14 (run), and the bundle they need on a machine without PyPI (prepare).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,prepare}")
    r = sub.add_parser("run", help="the checks, on the GPU machine (the default command)")
    r.add_argument("--budget", type=positive_seconds, default=480.0, help="seconds for the whole run (default 480)")
    r.add_argument("--bundle", default=str(BUNDLE), help="the bundle made by prepare (default bench/gpu-bundle)")
    r.add_argument("--data-dir", default=None, help="CIFAR-10 slice, ImageFolder layout (default BUNDLE/cifar-slice)")
    r.add_argument("--work-dir", default=None, help="teachers, checkpoints, synthetic images, the study database")
    r.add_argument("--site", default=str(DEFAULT_SITE), help="where the bundle's wheels are installed")
    r.add_argument("--results", default=str(RESULTS), help="the JSON written (default bench/results/gpu.json)")
    r.add_argument("--no-install", action="store_true", help="the packages are there already: install nothing")
    r.add_argument("--skip", action="append", choices=GROUPS, default=[], help="leave out a group (repeatable)")
    r.add_argument("--train-epochs", type=positive_int, default=3, help="(b) epochs on CPU and GPU (default 3)")
    r.add_argument("--teacher-epochs", type=positive_int, default=5, help="the slice teacher's epochs (default 5)")
    r.add_argument("--accuracy-tolerance", type=float, default=1.0, help="(b) CPU vs GPU, points (default 1)")
    r.add_argument(
        "--eval-tolerance",
        type=float,
        default=0.1,
        help="(e) points: CPU and cuDNN kernels may flip a near-tie, one image of 1,000 (default 0.1)",
    )
    r.add_argument("--synthetic-images", type=positive_int, default=50_000, help="(c) train images (default 50000)")
    r.add_argument("--synthetic-test", type=positive_int, default=1_000, help="(c) test images (default 1000)")
    r.add_argument("--study-trials", type=positive_int, default=50, help="(d) trials per study (default 50)")
    r.add_argument("--study-epochs", type=positive_int, default=10, help="(d) epochs per trial (default 10)")
    r.add_argument("--study-val-size", type=positive_int, default=1000, help="(d) validation images (default 1000)")
    r.add_argument("--parallel-jobs", type=positive_int, default=4, help="(d) the second study's --n-jobs (default 4)")
    r.add_argument("--python", default=sys.executable, help=argparse.SUPPRESS)
    r.add_argument("--dry-run", action="store_true", help="print each step's timeout share and command; run nothing")
    r.set_defaults(func=run)
    p = sub.add_parser("prepare", help="make the bundle, here, where pip reaches PyPI")
    p.add_argument("--data-dir", required=True, help="the CIFAR-10 JPEG copy (train/<class>/, test/<class>/)")
    p.add_argument("--bundle", default=str(BUNDLE), help="where to write it (default bench/gpu-bundle)")
    p.add_argument("--train-per-class", type=positive_int, default=500, help="slice train images per class")
    p.add_argument("--test-per-class", type=positive_int, default=100, help="slice test images per class")
    p.add_argument(
        "--python-versions",
        type=lambda s: tuple(v.strip() for v in s.split(",") if v.strip()),
        default=PYTHON_VERSIONS,
        help="the device Pythons to fetch compiled wheels for (default 3.10,3.11,3.12)",
    )
    p.add_argument("--no-plots", action="store_true", help="leave plotly and optuna-dashboard out")
    p.set_defaults(func=prepare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``run`` is the default command: ``python bench/gpu.py [--budget S ...]``."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or args_list[0] not in ("run", "prepare", "-h", "--help"):
        args_list.insert(0, "run")
    args = build_parser().parse_args(args_list)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
